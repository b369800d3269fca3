"""Weights & Biases tracking (``tracking: [wandb]``) through Ray's own integration, ``ray.air.integrations.wandb``.

One W&B run per pipeline stage, in the project named after the bliss_ray experiment, grouped by variant:
``setup_wandb`` (on the driver, which is no Train rank) starts it with the stage's settings as its config. The
driver's progress watcher logs rank 0's per-step records into it (``step`` = the stage's global step), and the
stage's end adds its round summaries (selection shares, evaluation results) and finishes it, exit code 1 when the
stage failed.

Files go to ``<run>/wandb`` (``WANDB_DIR`` overrides). ``WANDB_MODE`` decides where runs go: ``offline`` (nothing
leaves the machine; ``wandb sync <run>/wandb/offline-run-*`` uploads later) or online with ``WANDB_API_KEY`` /
``wandb login``. Needs ``pip install 'bliss-ray[tracking]'``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bliss_ray.watch.tracking import _scalars, phase_prefix, round_summary, stage_params, unseen_steps


class WandbTracker:
    def __init__(self, run_root: Path, experiment_name: str, variant: str = ""):
        import wandb  # noqa: F401  (missing: fail when the run starts, not at its first stage)

        self.dir = Path(os.environ.get("WANDB_DIR") or Path(run_root) / "wandb")
        self.project = experiment_name
        self.group = variant or Path(run_root).name
        self.runs: dict[str, object] = {}
        self.last_step: dict[str, int] = {}

    def stage_start(self, key: str, kind: str, d: Path) -> None:
        from ray.air.integrations.wandb import setup_wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs[key] = setup_wandb(
            stage_params(d),
            rank_zero_only=False,  # the driver is no Train rank
            project=self.project,
            group=self.group,
            name=key,
            id=f"{d.name}-{os.urandom(3).hex()}",  # a rerun of a stage is a new W&B run, never a resumed one
            resume=None,
            job_type=kind,
            dir=str(self.dir),
            tags=[kind],
        )

    def steps(self, key: str, kind: str, records: list[dict]) -> None:
        run = self.runs.get(key)
        if run is None:
            return
        for rec in records:
            step = int(rec["step"])
            if step <= self.last_step.get(key, -1):
                continue  # W&B's step only grows: replayed steps after a worker restart keep their first values
            prefix = phase_prefix(rec)
            run.log({prefix + k: v for k, v in _scalars(rec).items()}, step=step)
            self.last_step[key] = step

    def stage_end(self, key: str, kind: str, round_index: int | None, outputs: dict, d: str | Path) -> None:
        run = self.runs.get(key)
        if run is None:
            return
        self.steps(key, kind, unseen_steps(d, self.last_step.get(key)))
        for name, value, step in sorted(round_summary(kind, round_index, outputs, d), key=lambda x: x[2]):
            if step >= self.last_step.get(key, -1):  # selection shares, evaluation results (no steps of their own)
                run.log({name: value}, step=step)
                self.last_step[key] = step
            else:  # W&B's step never goes back
                run.summary[name] = value
        self._end(key, 0)

    def stage_failed(self, key: str) -> None:
        if key in self.runs:
            self._end(key, 1)

    def _end(self, key: str, exit_code: int) -> None:
        self.last_step.pop(key, None)
        self.runs.pop(key).finish(exit_code=exit_code)

    def close(self) -> None:
        import wandb

        for key in list(self.runs):
            self._end(key, 1)
        wandb.teardown()  # its service process writes the run files; they are complete once it has stopped
