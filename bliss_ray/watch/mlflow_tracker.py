"""MLflow tracking (``tracking: [mlflow]``) through Ray's own integration, ``ray.air.integrations.mlflow``.

One MLflow run per pipeline stage, in the experiment named after the bliss_ray experiment: ``setup_mlflow`` (on the
driver; it gates ranks only inside Train workers) creates the experiment if needed, starts the run with the
stage's settings as parameters and its key, kind and directory as tags. The driver's progress watcher then logs
rank 0's per-step records into it by run id, and the stage's end adds its round summaries (selection shares,
evaluation results) and closes it, ``FAILED`` when the stage failed.

The store defaults to ``sqlite:///<run>/mlflow.db`` (MLflow ≥ 3.7 refuses a bare ``./mlruns`` file store; one
SQLite file on the driver's disk, never shared between nodes); ``MLFLOW_TRACKING_URI`` points elsewhere, e.g. a
tracking server on a cluster. Needs ``pip install 'bliss-ray[tracking]'`` (mlflow-skinny).

    mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bliss_ray.watch.tracking import _scalars, phase_prefix, round_summary, stage_params, unseen_steps

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MLflowTracker:
    def __init__(self, run_root: Path, experiment_name: str, tracking_uri: str | None = None, variant: str = ""):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_root) / 'mlflow.db'}"
        self.experiment_name = experiment_name
        self.client = MlflowClient(self.uri)
        self.run_ids: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.mlflow = None
        self.variant = variant

    def stage_start(self, key: str, kind: str, d: Path) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        self.mlflow = setup_mlflow(
            stage_params(d),
            tracking_uri=self.uri,
            experiment_name=self.experiment_name,
            run_name=key,
            create_experiment_if_not_exists=True,
            tags={"bliss_ray.stage": key, "bliss_ray.kind": kind, "bliss_ray.stage_dir": d.name}
            | ({"bliss_ray.variant": self.variant} if self.variant else {}),
            rank_zero_only=False,  # the driver is no Train rank
        )
        self.run_ids[key] = self.mlflow.active_run().info.run_id

    def steps(self, key: str, kind: str, records: list[dict]) -> None:
        from mlflow.entities import Metric

        run_id = self.run_ids.get(key)
        if run_id is None or not records:
            return
        metrics = []
        for rec in records:
            prefix = phase_prefix(rec)
            ts = int(float(rec.get("time", time.time())) * 1000)
            metrics += [Metric(prefix + k, v, ts, int(rec["step"])) for k, v in _scalars(rec).items()]
            self.last_step[key] = int(rec["step"])
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH])

    def stage_end(self, key: str, kind: str, round_index: int | None, outputs: dict, d: str | Path) -> None:
        if key not in self.run_ids:
            return
        self.steps(key, kind, unseen_steps(d, self.last_step.pop(key, None)))
        for name, value, step in round_summary(kind, round_index, outputs, d):
            self.client.log_metric(self.run_ids[key], name, value, step=step)
        self._end(key, "FINISHED")

    def stage_failed(self, key: str) -> None:
        if key in self.run_ids:
            self._end(key, "FAILED")

    def _end(self, key: str, status: str) -> None:
        self.run_ids.pop(key)
        self.mlflow.end_run(status=status)

    def close(self) -> None:
        for key in list(self.run_ids):
            self._end(key, "KILLED")
