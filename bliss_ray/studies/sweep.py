"""Ray Tune sweeps over BLISS ablations: ``bliss-ray sweep SWEEP.yaml [--out DIR|URI] [--storage URI]``.

A sweep file (schema and examples: ``experiments/sweeps/README.md``; validated before anything runs by
``bliss_ray.studies.sweep_spec.load_sweep``, which raises ``ConfigError`` naming the field) names a ``base``
experiment, ``overrides``, a ``space`` over dotted config keys, the objective (``stage: full``: the whole
pipeline, scored by the target after selection at equal target tokens; ``stage: bilevel``: the proxy's
upper-level loss after round ``round``'s bilevel stage, refused over a space that varies the proxy),
``metric``/``mode``, the ``search`` (grid or seeded Optuna), ``seeds`` repeats, ``max_concurrent_trials`` and
``asha``.

Layout (OUT = ``--out`` and STORAGE = ``--storage``: local paths or ``s3://``/``gs://`` URIs; on a cluster whose
nodes share no disk, a bucket; STORAGE defaults to OUT/sweeps):

    OUT/<base name>/<stage>-<id>/         stages shared by trials (tokenizer … r0.pretrain, and in a grid any later
                                          stage two points share), computed once before Tune starts: the same
                                          directories ``bliss-ray run`` uses
    OUT/<sweep>/<trial id>/<base name>/   each trial's own pipeline run; it reads the shared stages in place
    STORAGE/<sweep>/                      the Tune experiment + sweep.json, sweep_results.parquet, sweep_curves.parquet
    STORAGE/<sweep>-train/<trial id>/     the trial's Ray Train runs, named ``<trial id>-r<k>.bilevel``

Each trial is a Tune function (a ~0.01-CPU "driver") that runs its pipeline; its bilevel stages are TorchTrainers
named from the trial id whose rank-0 metrics reach Tune through ``TuneReportCallback``. Resume: rerunning the same
command finds the experiment (``Tuner.can_restore``) and calls ``Tuner.restore(resume_errored=True)``: finished
trials are kept, interrupted ones rerun their pipeline, which skips finished stages, and their Train runs continue
from their last checkpoint (same storage + name). A finished sweep restores to a no-op.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray import tune

from bliss_ray.config import ConfigError
from bliss_ray.pipeline import Run
from bliss_ray.stages import _ray, bilevel, steps
from bliss_ray.stages.executor import execute, trackers
from bliss_ray.storage import cache_root, is_remote, read_bytes, upload, write_bytes
from bliss_ray.storage import join as join_uri
from bliss_ray.studies.sweep_console import SweepConsole, post_stage
from bliss_ray.studies.sweep_objective import baseline_final, objective
from bliss_ray.studies.sweep_results import SweepFailed, write_results
from bliss_ray.studies.sweep_spec import (
    Domain,
    Sweep,
    SweepSpec,
    load_sweep,
    points,
    sweep_json,
    trial_run,
)
from bliss_ray.studies.tune_callback import ForwardToTune
from bliss_ray.watch.console import StageConsole, console_line, route_logs
from bliss_ray.watch.progress import BoardReader

log = logging.getLogger("bliss_ray")
SETUP_KINDS = {"tokenizer", "tokenize", "select", "warmup", "pretrain"}  # round-0 / round-free stages
__all__ = ["ConfigError", "SweepFailed", "load_sweep", "run_sweep"]


# ---- the trial ----------------------------------------------------------------------------------------------


def _setup_keys(run: Run) -> list[str]:
    keys = []
    for st in run.stages:
        if (st.round or 0) > 0 or st.kind not in SETUP_KINDS:
            break
        keys.append(st.key)
    return keys


class _TuneBilevel:
    """A trial's bilevel launcher: ``stages.bilevel.fit_bilevel`` with the Train run named ``<trial id>-<stage>``
    and its rank-0 reports forwarded to Tune (the Train V2 idiom)."""

    def __init__(self, trial_id: str, metric: str):
        self.trial_id, self.metric, self.callbacks = trial_id, metric, []

    def __call__(self, spec, out_dir: Path, storage: str, workers: int, dest: str | None = None) -> dict:
        cb = ForwardToTune({"stage": spec.stage, "final": 0}, self.metric)
        self.callbacks.append(cb)
        name = f"{self.trial_id}-{spec.stage}"
        return bilevel.fit_bilevel(spec, out_dir, storage, workers, name=name, callbacks=[cb], dest=dest)

    def runner(self, run: Run, st, d: Path) -> dict:
        """The pipeline's stage runner, with this launcher for bilevel stages. Every stage runs in the trial's own
        process, as in ``bliss-ray run``'s driver: the tasks and actors a stage starts escape the trial's placement
        group by their own scheduling strategy (``stages._ray.task_options``), and the trial publishes the stage."""
        post_stage(self.trial_id, st.key)
        return steps.run_stage(
            run, st, d, runners=steps.RUNNERS | {"bilevel": partial(steps.bilevel_stage, launch=self)}
        )

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until Tune has taken every forwarded report, so that the trial's final report really is last."""
        deadline = time.monotonic() + timeout_s
        for cb in self.callbacks:
            while not cb._training_actor_item_queue.empty() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.callbacks:
            time.sleep(1.0)  # the session moves the item it took to its result queue just after taking it


def bliss_sweep_trial(config: dict, sweep: Sweep, out: str, storage: str, baselines: dict | None = None) -> None:
    """The Tune function trial (a "driver"): this trial's pipeline up to its objective, then the final report
    (``baselines``: seed → ``baseline_final`` of that seed's baseline run, for metric ``steps_to_baseline``)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    run = trial_run(sweep, config, trial_id, out, storage)
    launcher = _TuneBilevel(trial_id, sweep.spec.metric)
    results = execute(run, until=_objective_stage(sweep.spec), runner=launcher.runner)
    final = objective(sweep.spec, run, results, (baselines or {}).get(run.exp.seed))
    launcher.drain()
    tune.report(final)


# ---- the sweep ----------------------------------------------------------------------------------------------


def _restorable(exp_dir: str) -> bool:
    """A Tune experiment to resume: its tuner state and at least one saved experiment state (a driver killed
    before Tune saved any state left nothing to resume; starting afresh is then right)."""
    if not tune.Tuner.can_restore(exp_dir):
        return False
    fs, p = pafs.FileSystem.from_uri(exp_dir)
    names = [f.base_name for f in fs.get_file_info(pafs.FileSelector(p))]
    return any(n.startswith("experiment_state-") for n in names)


def _finished(exp_dir: str, sweep: Sweep) -> tune.ResultGrid | None:
    """The results of an experiment whose trials have all finished (read without Ray); None if any is left to run
    or retry, or if the state cannot be read (then ``Tuner.restore`` decides)."""
    spec = sweep.spec
    expected = spec.search.num_samples if spec.search.type == "optuna" else len(points(spec))
    try:
        analysis = tune.ExperimentAnalysis(exp_dir)
    except Exception as e:  # e.g. a state file caught mid-write by a killed driver
        log.warning("could not read %s (%s); resuming with Tuner.restore", exp_dir, e)
        return None
    trials = analysis.trials
    if len(trials) < expected or any(t.status != "TERMINATED" for t in trials):
        return None
    return tune.ResultGrid(analysis)


def precompute_shared(sweep: Sweep, out: str, stream=None) -> list[str]:
    """Run every stage that more than one trial would run once, in order, before Tune starts, in OUT/<base name>/,
    so that concurrent trials only read them (no two trials ever write one stage directory): ``shared_stages``.
    Returns the stage dirs used."""
    used: list[str] = []
    for run, keys in shared_stages(sweep, out):
        execute(run, until=keys[-1], only=set(keys), console=_console(run, stream))
        used += [run.uri(k) for k in keys if run.uri(k) not in used]
    return used


def shared_stages(sweep: Sweep, out: str) -> list[tuple[Run, list[str]]]:
    """Each enumerable point's run and its stages that other trials share: the setup stages (tokenizer …
    r0.pretrain) and, in a grid without ASHA (whose early stops need the trials' own reports), any later stage
    before the objective whose identity two points share, e.g. round 1 of arms that differ only from round 2 on.
    For Optuna, stages that depend on a continuous key are left to the trials. Points with none are left out."""
    pts = points(sweep.spec)
    runs = [Run(sweep.experiment(pt), out) for pt in pts]
    shared_ids: set[str] = set()
    if sweep.spec.search.type == "grid" and sweep.spec.asha is None:
        seen = Counter(i for run in runs for i in {run.ids[st.key] for st in _before_objective(sweep, run)})
        shared_ids = {i for i, n in seen.items() if n > 1}
    plan = []
    for pt, run in zip(pts, runs, strict=True):
        keys = _setup_keys(run)
        for key, dom in sweep.spec.space.items():
            for v in dom.candidates(True) if dom.kind in ("loguniform", "uniform") else []:
                ids = Run(sweep.experiment(pt | {key: v}), out).ids
                keys = list(itertools.takewhile(lambda k, ids=ids, run=run: ids[k] == run.ids[k], keys))
        keys += [s.key for s in _before_objective(sweep, run) if s.key not in keys and run.ids[s.key] in shared_ids]
        if keys:
            plan.append((run, keys))
    return plan


def _objective_stage(spec: SweepSpec) -> str:
    """The last stage a trial runs: the one its objective reads (a round's bilevel stage, or ``evaluate``)."""
    return f"r{spec.round}.bilevel" if spec.stage == "bilevel" else "evaluate"


def _before_objective(sweep: Sweep, run: Run) -> list:
    """The stages a trial runs before the one its objective reads."""
    return run.select_until(_objective_stage(sweep.spec))[:-1]


def run_baselines(sweep: Sweep, out: str, stream=None) -> dict[int, dict]:
    """Each seed's baseline run (``baseline`` overrides, no point of the space), whole, in OUT/<base name>/ beside
    the shared setup stages; a finished one is only read. Returns seed → its final steps and held-out loss."""
    if sweep.spec.baseline is None:
        return {}
    finals = {}
    for seed in sweep.seeds():
        run = Run(sweep.baseline_experiment(seed), out)
        results = execute(run, until="evaluate", console=_console(run, stream))
        finals[seed] = baseline_final(results["evaluate"])
        log.info("sweep %s: baseline seed %d ends at %s", sweep.spec.name, seed, finals[seed])
    return finals


def _param_space(spec: SweepSpec) -> dict:
    def domain(d: Domain):
        if d.kind == "grid":
            return tune.grid_search(d.grid)
        if d.kind == "choice":
            return tune.choice(d.choice)
        return getattr(tune, d.kind)(*getattr(d, d.kind))

    space = {k: domain(d) for k, d in spec.space.items()}
    if len(spec.seeds) > 1:
        space["seed"] = tune.grid_search(spec.seeds)
    return space


def _trial_dirname(trial) -> str:  # module level: Tune pickles it into the experiment state
    return f"trial_{trial.trial_id}"


def _optuna_search(sweep: Sweep):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = sweep.spec.search
    sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup_trials)
    return OptunaSearch(sampler=sampler, points_to_evaluate=[sweep.base_point()] if search.start_from_base else None)


def _tuner(sweep: Sweep, trainable, storage: str) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler

    spec = sweep.spec
    optuna = spec.search.type == "optuna"
    scheduler = None
    if spec.asha:  # off by default: the upper-level loss is noisy and non-monotone
        scheduler = ASHAScheduler(time_attr="training_iteration", **spec.asha.model_dump())
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_optuna_search(sweep) if optuna else None,
            scheduler=scheduler,
            num_samples=spec.search.num_samples if optuna else 1,
            max_concurrent_trials=spec.max_concurrent_trials,
            # a finished trial's driver process runs the next one (no second torch import); not with ASHA, whose
            # stopped trials may still be inside trainer.fit()
            reuse_actors=spec.asha is None,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,  # the console is SweepConsole's; Tune's own table goes to the log with the rest
            callbacks=[SweepConsole(spec)],
        ),
    )


def run_sweep(
    sweep: Sweep, storage: str | None = None, out: str | Path = "runs", so_far: bool = False, verbose: bool = False
) -> str:
    """Run, resume, or (when finished) re-collect a sweep; returns the path of its ``sweep_results.parquet``.
    ``so_far``: only write the results of the trials the experiment has now (running, stopped early or
    interrupted; read without Ray, nothing runs): unfinished trials are listed with status ``stopped``, those never
    started with ``pending``."""
    spec, out = sweep.spec, str(out) if is_remote(out) else str(Path(out).resolve())
    storage = storage or join_uri(out, "sweeps")
    storage = storage if "://" in storage else str(Path(storage).resolve())
    exp_dir, train_storage = join_uri(storage, spec.name), join_uri(storage, f"{spec.name}-train")
    resume = _restorable(exp_dir)
    old = read_bytes(join_uri(exp_dir, "sweep.json")) if resume else None
    if old and json.loads(old)["fingerprint"] != sweep.fingerprint():
        raise ConfigError(
            f"{sweep.path}: the sweep or its base changed since {exp_dir} was started; resuming would mix "
            "configurations. Give the sweep a new name (or delete the old experiment) to start afresh."
        )
    if so_far:
        if not resume:
            raise ConfigError(f"{sweep.path}: no sweep state in {exp_dir} to collect results from")
        return write_results(tune.ResultGrid(tune.ExperimentAnalysis(exp_dir)), sweep, exp_dir, out, train_storage)
    if resume and (done := _finished(exp_dir, sweep)) is not None:
        log.info("sweep %s: all %d trials finished, nothing to run (no Ray started)", spec.name, len(done))
        return write_results(done, sweep, exp_dir, out, train_storage)
    logs = _log_dir(spec.name, out)
    stream, restore = route_logs(logs / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose)
    try:
        return _run_tune(sweep, out, storage, exp_dir, train_storage, resume, stream)
    finally:
        restore()
        if is_remote(out):
            upload(logs, join_uri(out, spec.name, "logs"))


def _log_dir(name: str, out: str) -> Path:
    """Where the sweep's log file is written: under OUT/<sweep>/logs, or a local copy of it for a store."""
    return cache_root() / "sweeps" / name / "logs" if is_remote(out) else Path(out) / name / "logs"


def _console(run: Run, stream) -> StageConsole:
    """``bliss-ray run``'s console on ``stream`` for a run the sweep's driver runs itself (setup, baselines)."""
    return StageConsole(stream, poll=BoardReader(), trackers=trackers(run), events=_ray.LostNodes())


def _run_tune(sweep: Sweep, out: str, storage: str, exp_dir: str, train_storage: str, resume: bool, stream) -> str:
    """The shared setup stages and the baselines (new sweep), then Tune: a fresh Tuner or ``Tuner.restore``."""
    spec = sweep.spec
    started = _ray.ensure_ray(sweep.base.resources)
    try:
        if not resume:
            write_bytes(join_uri(exp_dir, "sweep.json"), sweep_json(sweep))
            shared = precompute_shared(sweep, out, stream)
            console_line(f"sweep {spec.name}: {len(shared)} shared stages ready; starting Tune")
        baselines = run_baselines(sweep, out, stream)  # before any trial; on resume, read from the finished runs
        fn = tune.with_parameters(bliss_sweep_trial, sweep=sweep, out=out, storage=train_storage, baselines=baselines)
        trainable = tune.with_resources(fn, spec.trial_resources)
        if resume:
            console_line(f"resuming sweep {spec.name} from {exp_dir} (Tuner.restore)")
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        else:
            tuner = _tuner(sweep, trainable, storage)
        return write_results(tuner.fit(), sweep, exp_dir, out, train_storage)
    finally:
        if started:
            ray.shutdown()
