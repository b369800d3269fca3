"""Ray Tune sweeps (bliss_ray.studies.sweep): validation before compute (including the rules that keep a ranking about
data selection), the objective and results files, and the tiny Table-2 sweep end to end through ``bliss-ray sweep``
(cut to 2 whole-pipeline trials), its driver killed mid-sweep and resumed with the same command. The sweep
report's arithmetic is tested on synthetic frames in tests/test_report.py.

    .venv/bin/python -m pytest tests/test_sweep.py -q                 # everything (a few minutes on 2 cores)
    .venv/bin/python -m pytest tests/test_sweep.py -q -m "not ray"   # validation + results only (seconds)
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bliss_ray import storage
from bliss_ray.config import ConfigError
from tests.conftest import RAY_INTERNALS

REPO = Path(__file__).resolve().parents[1]
TABLE2 = REPO / "experiments" / "sweeps" / "table2_proxy_sigmoid_tiny.yaml"
DEMO_TUNE = REPO / "experiments" / "sweeps" / "demo_tune.yaml"


def _write_sweep(tmp_path: Path, **changes) -> Path:
    tree = yaml.safe_load(TABLE2.read_text())
    if "space" in changes:
        tree.pop("labels")  # they name the shipped space's keys
    for key, value in changes.items():
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ---- validation: no Ray, no compute ---------------------------------------------------------------------------

GRID = {"models.proxy.arch": {"grid": ["pythia-micro"]}}
BAD = {
    "typo": ({"metrik": "upper_loss"}, "metrik"),
    "unknown space key": ({"space": {"bilevel.gama": {"grid": [0.1]}}}, "bilevel.gama"),
    "unknown override key": ({"overrides": {"bilevel.outer_step": 3}}, "bilevel.outer_step"),
    "section as key": ({"space": {"bilevel": {"grid": [1]}}}, "'bilevel' is a section"),
    "two domains": ({"space": {"bilevel.gamma": {"grid": [0.1], "choice": [0.2]}}}, "space[bilevel.gamma]"),
    "unknown domain": ({"space": {"bilevel.gamma": {"grd": [0.1]}}}, "space[bilevel.gamma].grd"),
    "bad range": (
        {"space": {"bilevel.gamma": {"loguniform": [0, 0.5]}}, "search": "optuna"},
        "space[bilevel.gamma]",
    ),
    "grid value the schema rejects": ({"space": {"bilevel.outer_steps": {"grid": [4, 0]}}}, "bilevel.outer_steps"),
    "unknown model preset": ({"space": {"models.proxy.arch": {"grid": ["pythia-huge"]}}}, "pythia-huge"),
    "grid domain under optuna": ({"search": {"type": "optuna", "num_samples": 2}}, "space[models.proxy.arch]"),
    "metric the stage does not report": ({"stage": "bilevel", "metric": "paper_average", "mode": "max"}, "metric"),
    "wrong mode": ({"mode": "max"}, "mode: reference_loss is better when minimised"),
    "round without a bilevel stage": (
        {"stage": "bilevel", "metric": "upper_loss", "space": {"bilevel.use_sigmoid": {"grid": [True]}}, "round": 2},
        "round",
    ),
    "paper row naming no variant": (
        {"paper": {"source": "Table 2", "rows": {"proxy 31M (pythia-micro), sigmod": "44.7"}}},
        "paper: rows ['proxy 31M (pythia-micro), sigmod'] name no variant",
    ),
    # Table 2 as once reported: the proxy's own loss ranks proxy capacity, not the data the proxy selects
    "proxy-level metric across proxies": ({"stage": "bilevel", "metric": "upper_loss"}, "metric: 'upper_loss'"),
    "proxy-level metric across warm-ups": (
        {"metric": "lower_loss", "space": {"warmup.steps": {"grid": [4, 6]}}},
        "space varies the proxy (warmup.steps)",
    ),
    "unequal target tokens": ({"space": {"pretrain.steps": {"grid": [6, 8]}}}, "different token counts"),
    "downstream metric without a paper task": (
        {"metric": "paper_average", "mode": "max", "overrides": {"eval.tasks": ["bliss_ref_cloze"]}},
        "evaluates no paper task",
    ),
    "seeds under optuna": (
        {"space": {"bilevel.gamma": {"choice": [0.1]}}, "search": "optuna", "seeds": [0, 1]},
        "seeds",
    ),
    "missing base": ({"base": "experiments/nope.yaml"}, "base"),
    "steps_to_baseline without a baseline": ({"metric": "steps_to_baseline"}, "baseline: metric steps_to_baseline"),
    "a baseline no metric uses": ({"baseline": {"selection.method": "random"}}, "baseline"),
    "unknown baseline key": (
        {"metric": "steps_to_baseline", "baseline": {"selection.metod": "random"}},
        "baseline: 'selection.metod' is not a config key",
    ),
    "baseline at other target tokens": (
        {"metric": "steps_to_baseline", "baseline": {"selection.method": "random", "pretrain.steps": 8}},
        "baseline: it trains the target on",
    ),
}


@pytest.mark.parametrize("change,field", BAD.values(), ids=BAD.keys())
def test_load_sweep_rejects_bad_sweeps_naming_the_field(tmp_path, change, field):
    from bliss_ray.studies.sweep import load_sweep

    with pytest.raises(ConfigError) as err:
        load_sweep(_write_sweep(tmp_path, **change))
    assert field in str(err.value), str(err.value)


def test_shipped_sweeps_enumerate_their_points():
    from bliss_ray.studies.sweep import _param_space, load_sweep
    from bliss_ray.studies.sweep_spec import points, trial_run, variant_label

    sweep = load_sweep(TABLE2)
    pts = points(sweep.spec)
    assert len(pts) == 8 and len({json.dumps(p, sort_keys=True) for p in pts}) == 8  # 4 variants × 2 seeds
    assert sweep.experiment(pts[-1]).models.proxy.arch == "pythia-tiny-proxy"
    assert variant_label(sweep.spec, pts[2]) == "proxy 31M (pythia-micro), no sigmoid"
    assert _param_space(sweep.spec)["seed"] == {"grid_search": [0, 1]}  # seeds are a grid dimension
    run = trial_run(sweep, pts[3], "t3", Path("/tmp/x"), "/tmp/x/storage")  # what Tune passes: the point + seed
    assert (run.exp.seed, run.exp.bilevel.use_sigmoid, run.exp.resources.storage_path) == (
        1,
        False,
        "/tmp/x/storage/t3",
    )
    optuna = load_sweep(REPO / "experiments" / "sweeps" / "gamma_lambda_tiny.yaml")
    # Optuna: one probe per choice value (ranges are only validated at their bounds, never pre-computed)
    assert points(optuna.spec) == [{"bilevel.l2": 1e-7}, {"bilevel.l2": 1e-6}]
    assert len(points(optuna.spec, ranges=True)) == 3


def test_the_sweep_console_names_the_stage_a_trial_is_in_not_its_last_report():
    from bliss_ray.studies.sweep_console import where_trial

    report = {"stage": "r1.bilevel", "step": 40}
    assert where_trial(report, "r1.score") == "r1.score"  # the bilevel stage ended; scoring reports nothing to Tune
    assert where_trial(report, "r1.bilevel") == "r1.bilevel step 40"
    assert where_trial(report, None) == "r1.bilevel step 40"  # nothing posted (a board that was not up)
    assert where_trial({}, "r0.pretrain") == "r0.pretrain" and where_trial({}, None) == "starting"


def test_a_grid_computes_the_stages_its_points_share_once_before_tune(tmp_path):
    """Table 3's carry arms differ only from round 2 on (round 1 has no score model to inherit), so each seed's
    round 1 is computed once per score-model init before Tune; Table 2's arms share nothing after the setup."""
    from bliss_ray.studies.sweep import load_sweep, shared_stages

    sweeps = REPO / "experiments" / "sweeps"
    plan = shared_stages(load_sweep(sweeps / "table3_score_init_demo.yaml"), str(tmp_path))
    assert len(plan) == 12  # 2 inits × 2 carries × 3 seeds: every point has setup stages
    round1 = ["r1.bilevel", "r1.score", "r1.select", "r1.pretrain"]
    setup = ["tokenizer", "tokenize", "r0.select", "warmup", "r0.pretrain"]
    for run, keys in plan:
        assert keys == setup + round1, (run.exp.label, keys)
    by_arm = {(run.exp.bilevel.score_init, run.exp.bilevel.score_carry, run.exp.seed): run.ids for run, _ in plan}
    inherit, reset = by_arm["random", "inherit", 1], by_arm["random", "reset", 1]
    assert inherit["r1.pretrain"] == reset["r1.pretrain"] and inherit["r2.bilevel"] != reset["r2.bilevel"]
    assert inherit["r1.bilevel"] != by_arm["proxy_warmup", "inherit", 1]["r1.bilevel"]
    assert len({ids["r1.bilevel"] for ids in by_arm.values()}) == 6  # one per init × seed
    for run, keys in shared_stages(load_sweep(sweeps / "table2_proxy_sigmoid_demo.yaml"), str(tmp_path)):
        assert keys == setup, (run.exp.label, keys)


@pytest.mark.parametrize("name", ["table2_proxy_sigmoid", "table3_score_init"])
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "cluster"])
def test_table_sweeps_judge_the_target_after_selection(name, tiny):
    """Tables 2 and 3 ask which variant selects better data: the target's result after selection, at equal target
    tokens (load_sweep enforces that), with repeats on the CPU versions."""
    from bliss_ray.studies.sweep import load_sweep
    from bliss_ray.studies.sweep_metrics import TARGET_METRICS, target_tokens
    from bliss_ray.studies.sweep_spec import points

    sweep = load_sweep(REPO / "experiments" / "sweeps" / f"{name}{'_tiny' if tiny else ''}.yaml")
    assert sweep.spec.stage == "full" and sweep.spec.metric in TARGET_METRICS
    assert len({target_tokens(sweep.experiment(p)) for p in points(sweep.spec)}) == 1
    assert len(sweep.spec.seeds) >= 2 or not tiny


def test_an_optuna_search_can_start_from_the_base_settings_and_refuses_a_base_outside_its_space(tmp_path):
    from bliss_ray.studies.sweep import _optuna_search, _param_space
    from bliss_ray.studies.sweep_spec import load_sweep

    tree = yaml.safe_load(DEMO_TUNE.read_text()) | {"base": str(REPO / "experiments" / "demo.yaml")}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    sweep = load_sweep(path)
    assert sweep.base_point()["bilevel.outer_steps"] == 40 and sweep.spec.search.start_from_base
    search = _optuna_search(sweep)
    search.set_search_properties(sweep.spec.metric, sweep.spec.mode, _param_space(sweep.spec))
    first, second = search.suggest("t1"), search.suggest("t2")
    assert first == sweep.base_point() and second != first
    tree["space"]["bilevel.gamma"] = {"loguniform": [0.05, 0.5]}  # the demo's γ is 1e-2
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"start_from_base: the base's bilevel.gamma = 0.01 is outside space"):
        load_sweep(path)


def test_target_tokens_count_every_round_and_the_decay_branch():
    from bliss_ray.config import load_experiment
    from bliss_ray.studies.sweep_metrics import target_tokens

    exp = load_experiment(REPO / "experiments" / "tiny.yaml")  # 1 round, 6 steps/round + 4 decay, 8 × 64 tokens
    assert target_tokens(exp) == ((1 + 1) * 6 + 4) * 8 * 64
    paper = load_experiment(REPO / "experiments" / "paper" / "pythia410m.yaml", {"schedule.rounds": 1})
    assert target_tokens(paper) / 1e9 == pytest.approx(10.5, abs=0.2)  # the rebuttal's Table 2: 10B tokens


def test_objective_is_the_mean_of_the_last_steps(tmp_path):
    from bliss_ray.pipeline import Run
    from bliss_ray.studies.sweep_objective import objective
    from bliss_ray.studies.sweep_spec import load_sweep

    space = {"bilevel.use_sigmoid": {"grid": [True, False]}}
    sweep = load_sweep(_write_sweep(tmp_path, stage="bilevel", metric="upper_loss", space=space, last_steps=3))
    run = Run(sweep.experiment({}), tmp_path)
    d = run.dir("r1.bilevel")
    d.mkdir(parents=True)
    rows = [{"step": i + 1, "upper_loss": 10.0 - i, "lower_loss": 20.0 - i} for i in range(8)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = objective(sweep.spec, run, {})
    assert out["upper_loss"] == pytest.approx((5 + 4 + 3) / 3)  # last_steps: 3 → steps 6, 7, 8
    assert (out["upper_loss_first"], out["upper_loss_last"], out["bilevel_steps"]) == (10.0, 3.0, 8)


def test_full_objective_scores_the_final_checkpoint(tmp_path):
    from bliss_ray.pipeline import Run
    from bliss_ray.studies.sweep_objective import objective
    from bliss_ray.studies.sweep_spec import load_sweep

    sweep = load_sweep(TABLE2)
    run = Run(sweep.experiment({}), tmp_path)  # tiny: 1 round, so the last bilevel stage is r1.bilevel
    run.dir("r1.bilevel").mkdir(parents=True)
    (run.dir("r1.bilevel") / "metrics.jsonl").write_text('{"upper_loss": 2.0, "lower_loss": 3.0}\n')
    tasks = {"bliss_ref_cloze": {}, "sciq_local": {}, "piqa": {}}  # chance: sciq 1/4, piqa 1/2; the cloze is none
    last = {"steps": 12, "paper_average": 0.4, "paper_average_stderr": 0.05, "reference_loss": 5.0, "tasks": tasks}
    out = objective(sweep.spec, run, {"evaluate": {"checkpoints": [last, {"steps": 6, "paper_average": 0.3}]}})
    assert (out["paper_average"], out["reference_loss"], out["target_steps"]) == (0.4, 5.0, 12)
    assert (out["paper_average_stderr"], out["paper_average_chance"]) == (0.05, (0.25 + 0.5) / 2)
    assert out["target_tokens"] == ((1 + 1) * 6 + 4) * 8 * 64  # tiny: 2 × 6 steps + 4 decay steps, 8 × 64 tokens
    assert out["upper_loss"] == 2.0 and out["objective_stage"] == "r1.bilevel"


def test_steps_to_baseline_interpolates_and_ranks_a_miss_below_every_hit():
    from bliss_ray.studies.sweep_objective import steps_to_baseline

    goal = {"steps": 180, "reference_loss": 5.0}
    fast = [{"steps": s, "reference_loss": v} for s, v in [(60, 6.0), (120, 5.2), (100, 5.4), (180, 4.8)]]
    assert steps_to_baseline(fast, goal) == (pytest.approx(150.0), True)  # between 120 (5.2) and 180 (4.8)
    near = [{"steps": 60, "reference_loss": 6.0}, {"steps": 180, "reference_loss": 5.1}]
    far = [{"steps": 60, "reference_loss": 6.0}, {"steps": 180, "reference_loss": 5.5}]
    (near_steps, hit), (far_steps, _) = steps_to_baseline(near, goal), steps_to_baseline(far, goal)
    assert not hit and 180 < near_steps < far_steps  # a miss scores worse than any hit, and worse the further off
    assert near_steps == pytest.approx(180 * (1 + 0.1 / 5.0))


def test_objective_against_the_baseline_gives_steps_and_speedup(tmp_path):
    from bliss_ray.pipeline import Run
    from bliss_ray.studies.sweep_objective import baseline_final, objective
    from bliss_ray.studies.sweep_spec import load_sweep

    sweep = load_sweep(REPO / "experiments" / "sweeps" / "demo_tune_tiny.yaml")
    assert sweep.baseline_experiment(100).selection.method == "random"
    assert sweep.baseline_experiment(100).bilevel == sweep.base.bilevel  # no point of the space leaks in
    base_eval = {"checkpoints": [{"steps": 3, "reference_loss": 7.0}, {"steps": 16, "reference_loss": 6.0}]}
    goal = baseline_final(base_eval)
    assert goal == {"steps": 16, "reference_loss": 6.0}
    run = Run(sweep.experiment({"bilevel.gamma": 0.01, "bilevel.score_lr": 1e-3}, {"seed": 100}), tmp_path)
    run.dir("r1.bilevel").mkdir(parents=True)
    (run.dir("r1.bilevel") / "metrics.jsonl").write_text('{"upper_loss": 2.0, "lower_loss": 3.0}\n')
    cks = [{"steps": 3, "reference_loss": 6.5, "tasks": {}}, {"steps": 16, "reference_loss": 5.5, "tasks": {}}]
    out = objective(sweep.spec, run, {"evaluate": {"checkpoints": cks}}, goal)
    assert out["reached_baseline"] and out["steps_to_baseline"] == pytest.approx(3 + 13 * 0.5)
    assert out["speedup"] == pytest.approx(16 / 9.5) and out["baseline_reference_loss"] == 6.0


def test_resuming_a_changed_sweep_is_refused_before_ray_starts(tmp_path):
    from bliss_ray.studies.sweep import load_sweep, run_sweep, sweep_json

    overrides = yaml.safe_load(TABLE2.read_text())["overrides"]
    sweep = load_sweep(_write_sweep(tmp_path))
    exp_dir = tmp_path / "storage" / sweep.spec.name  # a stand-in for an interrupted Tune experiment
    exp_dir.mkdir(parents=True)
    for name in ("tuner.pkl", "experiment_state-2026-01-01_00-00-00.json"):
        (exp_dir / name).write_text("{}")
    (exp_dir / "sweep.json").write_bytes(sweep_json(sweep))
    how = load_sweep(_write_sweep(tmp_path, overrides=overrides | {"resources.num_cpus": 2}))
    assert how.fingerprint() == sweep.fingerprint()  # how to run may change between runs
    changed = _write_sweep(tmp_path, overrides=overrides | {"bilevel.outer_steps": 9})
    with pytest.raises(ConfigError, match="changed since"):
        run_sweep(load_sweep(changed), storage=str(tmp_path / "storage"), out=tmp_path / "runs")
    # a --set that changes a result changes the sweep as much as its file does
    with pytest.raises(ConfigError, match="changed since"):
        run_sweep(load_sweep(_write_sweep(tmp_path), {"bilevel.outer_steps": 9}), str(tmp_path / "storage"), tmp_path)


class _FakeResult:  # the parts of ray.tune.Result that write_results reads
    def __init__(self, path, config, history, error=None):
        self.path, self.config, self.metrics_dataframe, self.error = path, config, pd.DataFrame(history), error


class _FakeGrid(list):
    def get_dataframe(self):
        return pd.DataFrame([{"trial_id": Path(r.path).name[6:], **r.metrics_dataframe.iloc[-1]} for r in self])


def test_results_keep_final_metrics_and_a_failed_trial_fails_the_sweep(tmp_path):
    from bliss_ray.studies.sweep_results import SweepFailed, write_results
    from bliss_ray.studies.sweep_spec import load_sweep

    sweep = load_sweep(TABLE2)
    history = [
        {"step": 4, "upper_loss": 9.0, "final": 0},
        {"upper_loss": 7.5, "objective_stage": "r1.bilevel", "final": 1},
    ]
    arch = "models.proxy.arch"
    grid = _FakeGrid(
        [
            _FakeResult("x/trial_a_00000", {arch: "pythia-micro", "bilevel.use_sigmoid": True}, history),
            _FakeResult("x/trial_a_00001", {arch: "pythia-micro", "bilevel.use_sigmoid": False}, history[:1], "boom"),
        ]
    )
    exp_dir = tmp_path / "storage" / "t"
    with pytest.raises(SweepFailed, match="1 of 2 trials failed: a_00001"):
        write_results(grid, sweep, str(exp_dir), tmp_path / "runs", str(tmp_path / "train"))
    df = pd.read_parquet(exp_dir / "sweep_results.parquet").set_index("trial_id")
    assert df.loc["a_00000", "status"] == "ok" and df.loc["a_00000", "upper_loss"] == 7.5  # the final row, not 9.0
    assert df.loc["a_00001", "status"] == "error" and "boom" in df.loc["a_00001", "error"]
    curves = pd.read_parquet(tmp_path / "runs" / sweep.spec.name / "sweep_curves.parquet")
    assert list(curves["step"]) == [4, 4]  # no metrics.jsonl here: the per-checkpoint reports Tune kept


# ---- Ray: the tiny Table-2 sweep, killed mid-sweep, resumed, ranked ---------------------------------------------


def _states(exp_dir: str) -> dict[str, str]:
    """trial id → status in the newest experiment state Tune saved (what a restore will see)."""
    files = sorted(storage.listdir(exp_dir, ".json"))  # experiment_state-<timestamp>.json sort by time
    files = [f for f in files if storage.name(f).startswith("experiment_state-")]
    if not files:
        return {}
    try:
        trials = [json.loads(t[0]) for t in json.loads(storage.read_bytes(files[-1]))["trial_data"]]
    except (TypeError, json.JSONDecodeError, KeyError):  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in trials}


def _train_step(snapshot: str) -> int:
    """The step of the latest checkpoint Train registered (0 if none, or the snapshot is caught mid-write)."""
    try:
        latest = json.loads(storage.read_bytes(snapshot))["latest_checkpoint_result"]
    except (TypeError, json.JSONDecodeError, KeyError):
        return 0
    return int((latest or {}).get("metrics", {}).get("step", 0))


def _rows(exp_dir: str, tid: str) -> list[dict]:
    blob = storage.read_bytes(storage.join(exp_dir, f"trial_{tid}", "result.json"))
    return [json.loads(line) for line in blob.splitlines() if line.strip()] if blob else []


def _stage_uri(root: str, prefix: str) -> str:
    """The one stage directory of ``root`` whose name starts with ``prefix``."""
    [name] = [n for n in storage.listdir(root, dirs=True) if storage.name(n).startswith(prefix)]
    return name


def _mtime_ns(loc: str) -> int:
    fs, path = storage.resolve(loc)
    return fs.get_file_info(path).mtime_ns


@pytest.mark.ray
@pytest.mark.timeout(1500)
# extended (6 min): sweep validation, objective, results and report arithmetic are tested without Ray in CI
@pytest.mark.extended
def test_tiny_table2_sweep_in_a_bucket_survives_a_killed_driver_and_ranks_proxies_by_the_target(tmp_path, s3_bucket):
    """The shipped tiny Table 2 cut to what CI affords: both proxies (sigmoid on), one seed, so 2 trials of the whole
    pipeline, run by ``bliss-ray sweep`` as a cluster user runs it: run roots (``--out``) and Tune's storage
    (``--storage``) in a bucket (a local S3 server). Reliability scenario 7 on the way: SIGKILL the driver (its whole
    process group: Ray goes too) once trial 1 finished and trial 2's bilevel Train run has a checkpoint with steps
    left; the same command, from a fresh driver (new Ray, empty local cache), restores (Tuner.restore) from the
    bucket, keeps trial 1 and finishes trial 2 from that checkpoint; a third run is a no-op. Then the result: each
    trial is scored by its target after selection at equal target tokens; the report, built from the bucket, says
    that one seed cannot tell a difference from noise and where downstream accuracy sits against chance."""
    from bliss_ray.report.build import build_report

    tree = yaml.safe_load(TABLE2.read_text())
    tree["space"].pop("bilevel.use_sigmoid")
    tree["labels"].pop("bilevel.use_sigmoid")
    tree.pop("seeds")
    tree["base"] = str(REPO / "experiments" / "tiny.yaml")
    tree["overrides"] |= {"bilevel.outer_steps": 12, "bilevel.ckpt_every_steps": 2}  # a kill window of ~8 steps
    outer_steps = tree["overrides"]["bilevel.outer_steps"]
    sweep = tmp_path / "table2.yaml"
    sweep.write_text(yaml.safe_dump(tree))
    out, store = storage.join(s3_bucket, "t2", "runs"), storage.join(s3_bucket, "t2", "sweeps")
    name = tree["name"]
    exp_dir, train = storage.join(store, name), storage.join(store, f"{name}-train")
    cmd = [sys.executable, "-m", "bliss_ray.cli", "sweep", str(sweep), "--storage", store, "--out", out]
    log = tmp_path / "driver.log"

    def fresh_driver() -> dict:
        """A driver on a new head: its own Ray and an empty node cache (nothing local survives from the last)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session's Ray
        env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brk_", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
        env |= {"BLISS_CACHE_DIR": tempfile.mkdtemp(prefix="bcache_", dir=tmp_path)}
        return env | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save the experiment state every second

    def run(tag: str) -> float:
        t0 = time.perf_counter()
        with log.open("a") as f:
            f.write(f"\n==== {tag}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=fresh_driver(), stdout=f, stderr=subprocess.STDOUT, timeout=900)
        assert proc.returncode == 0, log.read_text()[-4000:]
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with log.open("w") as f:
        driver = subprocess.Popen(
            cmd, cwd=REPO, env=fresh_driver(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            assert driver.poll() is None, "the sweep ended before it could be killed:\n" + log.read_text()[-4000:]
            states = _states(exp_dir)
            done = [t for t, s in states.items() if s == "TERMINATED"]  # saved as finished: a restore keeps it
            rest = [t for t in states if t not in done]  # saved as PENDING or RUNNING: a restore resumes it
            if done and rest and _rows(exp_dir, rest[0]):  # trial 2 has reported (= checkpointed) at least once
                snapshot = storage.join(train, rest[0], f"{rest[0]}-r1.bilevel", "checkpoint_manager_snapshot.json")
                # Train registered a checkpoint and has steps left: Tune's rows lag Train's, so a kill decided
                # on them alone can land after the Train run finished, leaving the resume nothing to do
                if 0 < _train_step(snapshot) <= outer_steps - 4:
                    break
            assert time.perf_counter() - t0 < 1200, "no kill point reached:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's process group: the sweep and the Ray it started
        driver.wait()
    killed_at, first_run = time.time(), time.perf_counter() - t0
    finished, interrupted = done[0], rest[0]
    kept = storage.read_bytes(storage.join(exp_dir, f"trial_{finished}", "result.json"))
    before = [r["step"] for r in _rows(exp_dir, interrupted) if not r["final"]]  # Tune rewrites this file on restore
    assert max(before) < outer_steps, f"killed too late to test a resume: {before}"
    trial_root = storage.join(out, name, finished, "tiny")
    success = _mtime_ns(storage.join(_stage_uri(trial_root, "r1.bilevel-"), "_SUCCESS"))

    resume = run("resume")
    states = _states(exp_dir)
    assert sorted(states) == sorted([finished, interrupted]) and set(states.values()) == {"TERMINATED"}
    assert storage.read_bytes(storage.join(exp_dir, f"trial_{finished}", "result.json")) == kept  # not re-run
    assert _mtime_ns(storage.join(_stage_uri(trial_root, "r1.bilevel-"), "_SUCCESS")) == success
    after = [r["step"] for r in _rows(exp_dir, interrupted) if r["timestamp"] >= killed_at and not r["final"]]
    assert before and after and min(after) > min(before), (before, after)  # went on from a checkpoint, not step 0
    assert max(after) == outer_steps

    rows = {t: _rows(exp_dir, t) for t in states}
    noop = run("no-op")
    assert _states(exp_dir) == states and {t: _rows(exp_dir, t) for t in states} == rows
    resumed, noop_log = log.read_text().split("==== resume")[1].split("==== no-op")
    assert "(Tuner.restore)" in resumed and "Started a local Ray" not in noop_log and "nothing to run" in noop_log
    trial_dirs = [storage.name(d) for d in storage.listdir(storage.join(out, name), dirs=True)]
    assert sorted(trial_dirs) == sorted([*states, "logs"])  # a run root per trial, and the sweep's log
    print(f"kill test: first run until kill {first_run:.0f} s, resume {resume:.0f} s, no-op {noop:.0f} s")
    print(f"steps reported by the interrupted trial before the kill {before}, after the resume {after}")

    df = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(exp_dir, "sweep_results.parquet"))))
    assert len(df) == 2 and set(df["status"]) == {"ok"} and df["variant_key"].nunique() == 2
    assert np.isfinite(df["reference_loss"]).all() and (df["final"] == 1).all()
    assert set(df["target_tokens"]) == {((1 + 1) * 6 + 4) * 8 * 64}  # tiny: 2 × 6 steps + 4 decay, 8 × 64 tokens
    assert set(df["target_steps"]) == {12} and set(df["objective_stage"]) == {"r1.bilevel"}
    assert set(df["paper_average_chance"]) == {0.25}  # sciq_local is the tiny eval's one paper task (4 choices)
    assert (df["training_iteration"] >= 2).all()  # Train's rank-0 reports reached Tune before the final one
    shared = storage.join(out, "tiny")
    for tid in df["trial_id"]:  # each trial's Train run is named from its trial id, under the sweep's storage
        assert storage.exists(storage.join(train, tid, f"{tid}-r1.bilevel", "checkpoint_manager_snapshot.json"))
        assert any(
            storage.name(d).startswith("r1.pretrain-") for d in storage.listdir(storage.join(train, tid), dirs=True)
        )
        own = [storage.name(d) for d in storage.listdir(storage.join(out, name, tid, "tiny"), dirs=True)]
        # shared setup stages were computed once, before Tune, and read in place: no trial has its own copy
        assert not any(n.startswith("tokenize-") for n in own) and _stage_uri(shared, "tokenize-")
    text = build_report([storage.join(out, name)], tmp_path / "report").read_text()
    assert "`reference_loss` = the target's held-out reference-set loss of its final checkpoint" in text
    assert "target trained on 8,192 tokens in every trial" in text and "does not answer" not in text
    ablation = text.split("### Ablation table")[1].split("###")[0]
    table = [line for line in ablation.splitlines() if line.startswith("| proxy ")]
    assert len(table) == 2 and all("n = 1: noise unknown" in line and "chance 0.25)" in line for line in table)
    assert "**One seed per variant" in ablation
    assert (tmp_path / "report" / f"{name}_curves.png").is_file()


@pytest.mark.ray
@pytest.mark.timeout(1200)
# extended (~5 min): steps_to_baseline, the baseline's validation and the objective are tested without Ray in CI
@pytest.mark.extended
def test_tiny_tuning_sweep_scores_trials_against_the_random_baseline_of_the_same_seed(tmp_path):
    """Issue 17's tuning, in miniature, run as a user runs it: ``bliss-ray sweep demo_tune_tiny.yaml`` runs random
    selection once on the tuning seed, then 2 Optuna trials; each trial's objective is recomputed here from its own
    evaluated checkpoints and the baseline's, read from their run directories."""
    from bliss_ray.report.build import build_report
    from bliss_ray.studies.sweep_objective import steps_to_baseline

    path = REPO / "experiments" / "sweeps" / "demo_tune_tiny.yaml"
    name = yaml.safe_load(path.read_text())["name"]
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session's Ray
    env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brt_", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "bliss_ray.cli", "sweep", str(path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    def evaluated(run_dir: Path) -> list[dict]:
        return json.loads(next(run_dir.glob("evaluate-*/outputs.json")).read_text())["checkpoints"]

    baseline_run = out / "tiny"  # the baseline lives beside the shared setup stages
    assert json.loads((baseline_run / "experiment.json").read_text())["selection"]["method"] == "random"
    base_cks = evaluated(baseline_run)
    base_final = max(base_cks, key=lambda c: c["steps"])
    df = pd.read_parquet(out / name / "sweep_results.parquet")
    assert len(df) == 2 and set(df["status"]) == {"ok"} and set(df["seed"]) == {100}
    assert set(df["baseline_reference_loss"]) == {base_final["reference_loss"]}
    assert set(df["baseline_steps"]) == {base_final["steps"]}
    for r in df.itertuples():
        cks = evaluated(out / name / r.trial_id / "tiny")
        assert len(cks) >= 2  # the mid-round branch and the round's end: a curve, not one point
        steps, reached = steps_to_baseline(cks, {"reference_loss": base_final["reference_loss"]})
        assert (r.steps_to_baseline, bool(r.reached_baseline)) == (pytest.approx(steps), reached)
        assert (r.speedup == pytest.approx(base_final["steps"] / steps)) if reached else np.isnan(r.speedup)
    text = build_report([out / name], tmp_path / "report").read_text()
    assert "`steps_to_baseline` = the target steps at which the target's held-out reference loss" in text


# In CI (one of the tier's slowest: most of it Ray Train's process starts for its three Train stages): the sweep in
# a bucket. Its setup stages are the session's tiny run, uploaded: every setup stage of a bucket run root is proven
# by tests/test_two_node.py; here only Tune's storage and the trials are new.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the session's tiny run, if this test is the first to ask for it
def test_a_sweep_in_a_bucket_resumes_from_it_after_its_driver_dies_without_duplicate_trials(
    tiny_run, tmp_path, s3_bucket
):
    """``bliss-ray sweep --out s3://… --storage s3://…``, 2 grid trials of round 1's bilevel stage (6 and 12 outer
    steps). A fault holds the 12-step trial's worker before step 9, once the 6-step trial has finished; the test
    SIGKILLs the driver's process group (Ray goes too). The same command from a fresh driver (a new Ray, an empty
    node cache, nothing local from the first) restores from the bucket: the finished trial is kept as it was, the
    held one goes on from its checkpoint in the bucket to exactly step 12, there are still 2 trials; a third run is a
    no-op that starts no Ray. Between kill and resume, ``--results-so-far`` lists the finished trial and the held
    one (stopped) from the bucket alone."""
    run, _ = tiny_run
    tree = yaml.safe_load((REPO / "experiments" / "sweeps" / "gamma_lambda_tiny.yaml").read_text())
    tree |= {"name": "bucket_sweep", "search": "grid", "space": {"bilevel.outer_steps": {"grid": [6, 12]}}}
    tree["overrides"] |= {"bilevel.ckpt_every_steps": 2}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(tree))
    out, store = storage.join(s3_bucket, "sw", "runs"), storage.join(s3_bucket, "sw", "sweeps")
    storage.upload(run.root, storage.join(out, run.exp.name))  # the setup stages, as a finished earlier sweep's
    exp_dir, train = storage.join(store, "bucket_sweep"), storage.join(store, "bucket_sweep-train")
    cmd = [sys.executable, "-m", "bliss_ray.cli", "sweep", str(sweep), "--storage", store, "--out", out]
    held, log = tmp_path / "held", tmp_path / "driver.log"

    def fresh_driver(**extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session's Ray
        env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brk_", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
        env |= {"BLISS_CACHE_DIR": tempfile.mkdtemp(prefix="bcache_", dir=tmp_path), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        return env | extra

    def run_again(tag: str, *extra: str) -> str:
        with log.open("a") as f:
            f.write(f"\n==== {tag}\n")
            f.flush()
            proc = subprocess.run(
                [*cmd, *extra], cwd=REPO, env=fresh_driver(), stdout=f, stderr=subprocess.STDOUT, timeout=900
            )
        text = log.read_text().split(f"==== {tag}\n")[-1]
        assert proc.returncode == 0, f"{tag}:\n" + text[-4000:]
        return text

    fault = {"pause": {"stage": "r1.bilevel", "step": 9, "once": str(held), "seconds": 600}}
    t0 = time.perf_counter()
    with log.open("w") as f:
        env = fresh_driver(BLISS_FAULTS=json.dumps(fault))
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            assert driver.poll() is None, "the sweep ended before it could be killed:\n" + log.read_text()[-4000:]
            states = _states(exp_dir)
            done = [t for t, s in states.items() if s == "TERMINATED"]
            rest = [t for t in states if t not in done]
            if held.exists() and done and rest and _rows(exp_dir, rest[0]):  # held, with a checkpoint reported
                snapshot = storage.join(train, rest[0], f"{rest[0]}-r1.bilevel", "checkpoint_manager_snapshot.json")
                if _train_step(snapshot) >= 6:
                    break
            assert time.perf_counter() - t0 < 500, "no kill point reached:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's process group: the sweep and the Ray it started
        driver.wait()
    killed_at = time.time()
    [finished], [interrupted] = done, rest
    kept = storage.read_bytes(storage.join(exp_dir, f"trial_{finished}", "result.json"))
    before = [r["step"] for r in _rows(exp_dir, interrupted) if not r["final"]]
    assert before and max(before) < 9, before

    saved = _states(exp_dir)
    so_far = run_again("results so far", "--results-so-far")  # reads the bucket; runs nothing, starts no Ray
    assert "Started a local Ray" not in so_far and _states(exp_dir) == saved
    df = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(out, "bucket_sweep", "sweep_results.parquet"))))
    assert dict(zip(df["trial_id"], df["status"], strict=True)) == {finished: "ok", interrupted: "stopped"}

    resumed = run_again("resume")
    # the sweep's console: a line per trial start and end, what runs, nothing of Ray's or Tune's own output (in the
    # sweep's log in the bucket)
    assert not [line for line in resumed.splitlines() if re.search(RAY_INTERNALS, line)], resumed[-3000:]
    assert re.search(rf"^\S+ start trial {interrupted} \(", resumed, re.M), resumed[-3000:]
    assert re.search(rf"^\S+ done  trial {interrupted} \(.*\)\s+\S+\s+upper_loss \d", resumed, re.M), resumed[-3000:]
    assert storage.listdir(storage.join(out, "bucket_sweep", "logs"), ".log")
    states = _states(exp_dir)
    assert sorted(states) == sorted([finished, interrupted]) and set(states.values()) == {"TERMINATED"}
    assert storage.read_bytes(storage.join(exp_dir, f"trial_{finished}", "result.json")) == kept  # not re-run
    after = [r["step"] for r in _rows(exp_dir, interrupted) if r["timestamp"] >= killed_at and not r["final"]]
    assert after and min(after) > 6 and max(after) == 12, (before, after)  # from its checkpoint, not step 0
    assert "(Tuner.restore)" in resumed
    noop = run_again("no-op")
    assert _states(exp_dir) == states and "nothing to run" in noop and "Started a local Ray" not in noop
    trial_dirs = [storage.name(d) for d in storage.listdir(storage.join(out, "bucket_sweep"), dirs=True)]
    assert sorted(trial_dirs) == sorted([*states, "logs"])  # a run root per trial, and the sweep's log
    df = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(exp_dir, "sweep_results.parquet"))))
    assert sorted(json.loads(k)["bilevel.outer_steps"] for k in df["variant_key"]) == [6, 12]
    assert set(df["status"]) == {"ok"} and np.isfinite(df["upper_loss"]).all()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_train_stage_started_by_a_tune_trial_gets_its_own_start_timeout(ray_local, tmp_path):
    """The worker-group start timeout a Train worker sees when a Tune trial starts its stage is the stage's
    ``resources.worker_start_timeout_s`` (123 s here), not what the trial's process inherited (the session's 60 s):
    ``stages._ray.fit`` sets Train's settings in whichever process starts the stage."""
    from ray import tune

    from bliss_ray.config import ResourcesConfig
    from bliss_ray.stages._ray import fit, run_config

    def trial(config):
        def worker(loop_config):
            import os
            import tempfile

            import ray.train

            with tempfile.TemporaryDirectory() as d:  # Train keeps the metrics of checkpointed reports
                seen = float(os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"])
                ray.train.report({"timeout": seen}, checkpoint=ray.train.Checkpoint.from_directory(d))

        res = ResourcesConfig(worker_start_timeout_s=123.0, torch_threads=1, max_failures=0)
        result = fit(worker, {}, res, 1, run_config("timeout", str(tmp_path / "train"), res), "pretrain")
        tune.report({"timeout": result.metrics["timeout"]})

    run = tune.RunConfig(storage_path=str(tmp_path / "tune"), name="timeout")
    grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.01}), run_config=run).fit()
    assert grid[0].error is None, grid[0].error
    assert grid[0].metrics["timeout"] == 123.0
