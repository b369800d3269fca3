"""Running an experiment's stages: skip what is done, run the rest in order, publish each to the store.

``pipeline.Run`` says what runs and where its files go; this module runs it. Each stage runs in its node-local
directory (``Run.dir``), under the console (a start line, live progress, an end or failure line; the status markers
in the store), then ``publish`` makes it final: the local files uploaded when the run root is remote, then
``outputs.json``, then ``_SUCCESS``, the marker that vouches only for files already there. A finished stage is
never run again; an interrupted one resumes (Ray Train picks up its checkpoints).

    run_experiment(load_experiment("experiments/tiny.yaml"), "runs")   # what `bliss-ray run` does
    execute(Run(exp, "runs"), until="tokenize")                        # library use: plain lines on stderr
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Collection
from pathlib import Path

import ray

from bliss_ray import node_cache, storage
from bliss_ray.config import Experiment
from bliss_ray.pipeline import Run, setting
from bliss_ray.stages import _ray
from bliss_ray.stages._data_tasks import SelectedRows
from bliss_ray.stages.inputs import shared_rows
from bliss_ray.stages.steps import run_stage, select_stage
from bliss_ray.watch.console import StageConsole, reason_of, route_logs
from bliss_ray.watch.progress import BoardReader
from bliss_ray.watch.tracking import TensorBoardTracker

log = logging.getLogger("bliss_ray")


def execute(
    run: Run, until: str | None = None, runner: Callable = run_stage, console=None, only: Collection[str] | None = None
) -> dict[str, dict]:
    """Run (or skip, when done) every stage of ``run`` up to ``until``; returns each stage's outputs.
    ``runner(run, stage, dir)`` runs one stage (a sweep passes its own); ``console`` shows progress (default:
    plain lines on stderr and the experiment's trackers); ``only``: just these stages (their inputs among them or
    done), as a sweep computes the stages its trials share."""
    _ray.check_run_root(run.exp.resources, run.store)
    console = console or StageConsole(poll=BoardReader(), trackers=trackers(run), events=_ray.LostNodes())
    results = {}
    run.root.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(storage.join(run.store, "experiment.json"), run.exp.model_dump_json(indent=2).encode())
    for st in run.select_until(until):
        if only is not None and st.key not in only:
            continue
        d = run.dir(st.key)
        if run.done(st.key):
            results[st.key] = run.outputs(st.key)
            console.skipped(st, d, results[st.key])
            continue
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "stage": st.key,
            "identity": run.ids[st.key],
            "deps": {k: run.ids[k] for k in st.deps},
            "settings": {s: setting(run.exp, s) for s in st.settings},
        }
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        with console.stage(st, d, run.uri(st.key)) as finished:
            t0 = time.perf_counter()
            with node_cache.holding():  # this driver runs stage after stage: a stage's copies are free once it ends
                out = _with_retries(run, st, d, runner, console)
            out = {"stage": st.key, "kind": st.kind, "round": st.round, "seconds": time.perf_counter() - t0, **out}
            publish(run, st.key, out)
            finished(out)
        if run.remote:
            shutil.rmtree(d, ignore_errors=True)  # the store holds it now; later readers use Run.input
        results[st.key] = out
        sync_side_files(run)
    return results


def _with_retries(run: Run, st, d: Path, runner: Callable, console) -> dict:
    """The stage, run again when lost infrastructure interrupted it (``_ray.lost_infrastructure``), at most
    ``resources.stage_retries`` times: each attempt resumes from what the last one saved (Train checkpoints, scored
    files, evaluated checkpoints, probed chunks). Any other error fails the stage at once."""
    retries, attempt = run.exp.resources.stage_retries, 1
    while True:
        try:
            return runner(run, st, d)
        except Exception as e:
            lost = _ray.lost_infrastructure(e)
            if attempt > retries or lost is None:
                raise
            log.warning("stage %s, attempt %d of %d: %s", st.key, attempt, retries + 1, traceback.format_exc())
            cause = f"{type(lost).__name__}: {str(lost).strip().splitlines()[0] if str(lost).strip() else ''}"
            console.line(
                f"      {st.key}: attempt {attempt} of {retries + 1} lost its infrastructure ({cause}); again"
            )
            attempt += 1


def publish(run: Run, key: str, out: dict) -> None:
    """Everything the stage wrote locally into the store, then ``outputs.json``, then ``_SUCCESS`` last."""
    if run.remote:
        storage.upload(run.dir(key), run.uri(key))
    storage.write_json(run.uri(key, "outputs.json"), out)
    storage.write_bytes(run.uri(key, "_SUCCESS"), b"")


def select_and_share(run: Run, r: int) -> tuple[dict, str, int]:
    """Round ``r``'s select stage, run and published as ``execute`` runs it, then the token array of its selected
    rows that the round's pretraining workers read: the driver's whole part of a round between scoring and training
    (what the driver footprint test and ``bench/driver_scale.py`` measure). Returns the select stage's outputs, the
    array's location and its rows."""
    select, pretrain = run.by_key[f"r{r}.select"], run.by_key[f"r{r}.pretrain"]
    for key in (select.key, pretrain.key):
        run.dir(key).mkdir(parents=True, exist_ok=True)
    out = select_stage(run, select, run.dir(select.key))
    publish(run, select.key, out)
    chosen = SelectedRows(run.uri(select.key, "selected.parquet"))
    data, rows = shared_rows(run, pretrain, run.dir(pretrain.key), "data", chosen)
    return out, data, rows


def sync_side_files(run: Run) -> None:
    """The console log and the trackers' files of a remote run (TensorBoard's, MLflow's SQLite file, W&B's offline
    runs), copied to the store: a fresh head, or anyone with the bucket, sees them."""
    if not run.remote:
        return
    for sub in ("logs", "tb", "wandb"):
        if (run.root / sub).is_dir():
            storage.upload(run.root / sub, storage.join(run.store, sub))
    if (run.root / "mlflow.db").is_file():
        storage.write_bytes(storage.join(run.store, "mlflow.db"), (run.root / "mlflow.db").read_bytes())


def trackers(run: Run) -> list:
    """The trackers the experiment's ``tracking`` setting names; ``Run.variant`` keeps apart the variants of one
    run root (methods, seeds, settings). MLflow and W&B come through Ray's integrations."""
    tracking, out = run.exp.tracking, []
    if "tensorboard" in tracking:
        out.append(TensorBoardTracker(run.root, run.variant))
    try:
        if "wandb" in tracking:
            from bliss_ray.watch.wandb_tracker import WandbTracker  # lazy: optional dependency (wandb)

            out.append(WandbTracker(run.root, run.exp.name, run.variant))
        if "mlflow" in tracking:
            from bliss_ray.watch.mlflow_tracker import MLflowTracker  # lazy: optional dependency (mlflow)

            out.append(MLflowTracker(run.root, run.exp.name, run.exp.mlflow_uri, variant=run.variant))
    except ImportError as e:
        raise ImportError(f"tracking: {tracking} needs pip install 'bliss-ray[tracking]' ({e})") from e
    return out


def run_experiment(
    exp: Experiment,
    out,
    until: str | None = None,
    verbose: bool = False,
    keep_ray: bool = False,
    owns_ray: bool = False,
) -> tuple[int, dict]:
    """One experiment's pipeline with a console: stage lines and live progress on screen, Ray's output and
    tracebacks in ``<run>/logs/run-*.log`` (everything on screen too with ``verbose``). Returns (exit code, each
    stage's outputs); a failed stage gives 1 and one message. Ray is shut down at the end if started here (or by a
    caller that runs several experiments, ``owns_ray``), unless ``keep_ray``."""
    run = Run(exp, out)
    log_path = run.root / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    stream, restore = route_logs(log_path, verbose)
    tracking: list = []  # filled inside the try: a tracker that cannot start is reported like any failure
    console = StageConsole(
        stream, poll=BoardReader(), trackers=tracking, events=_ray.LostNodes(), log_path=str(log_path)
    )
    ray_was_up = ray.is_initialized() and not owns_ray
    try:
        tracking += trackers(run)
        results = execute(run, until=until, console=console)
    except Exception as e:
        if console.failed is None:  # not a stage's failure (those the console has announced)
            log.exception("run failed")
            console.line(f"error: {reason_of(e)}; details: {log_path}")
        return 1, {}
    finally:
        for tracker in tracking:
            tracker.close()
        if not ray_was_up and ray.is_initialized() and not keep_ray:
            ray.shutdown()  # now, while its last streamed worker lines still go to the log, not at exit
        restore()
        sync_side_files(run)  # a remote run's log and TensorBoard files, into the store
    report = results.get("report", {}).get("report")
    console.line(f"run directory: {run.store}" + (f"\nreport: {report}" if report else "") + f"\nlogs: {log_path}")
    return 0, results
