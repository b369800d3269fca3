"""Ray Train stages: 1 vs 2 workers compute the same bilevel outer step (LM training: test_fsdp), and a
SIGKILLed worker resumes from a checkpoint, ends at the exact step count and equals an uninterrupted run; mid-round
evaluation branches (``pretrain.eval_branches``) survive a restart and leave the stable run bit for bit unchanged.

    .venv/bin/python -m pytest tests/test_train_stage.py -q
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bliss_ray.config import ResourcesConfig
from bliss_ray.data.tokens import TokenArray
from bliss_ray.models.lm import load_lm
from bliss_ray.train.checkpoint import read_metrics
from bliss_ray.train.settings import TrainSettings
from tests.conftest import assert_same_state, micro_lm_spec, without_timings

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

RES = ResourcesConfig(cpus_per_worker=1.0, torch_threads=1, max_failures=2)


@pytest.fixture(scope="module")
def data(tiny_run, tmp_path_factory):
    """A small TokenArray from the tiny run's packed pool, and the tokenizer."""
    run, _ = tiny_run
    files = sorted(str(p) for p in (run.dir("tokenize") / "pool" / "packed").glob("*.parquet"))
    d = tmp_path_factory.mktemp("arr")
    arr = TokenArray.build(files, d / "arr")
    return run, d / "arr", str(run.dir("tokenizer") / "tokenizer"), len(arr)


def _lm_spec(data, stage, steps, micro, ckpt_every=10, **train):
    run, arr, tok, _ = data
    train = dataclasses.replace(
        run.exp.pretrain,
        **{"decay_steps": 0, "eval_branches": 0, "warmup_steps": 1} | train,
        steps=steps,
        micro_batch_seqs=micro,
        global_batch_seqs=8,
        ckpt_every_steps=ckpt_every,
    )
    return micro_lm_spec(stage, tok, str(arr), train, 2048, 64, RES)


def test_trains_controller_imports_no_bliss_ray_stage_model_or_transformers(ray_local, tmp_path):
    """Train's controller unpickles the trainer's run context (run config with its callbacks, scaling, loop config)
    before it starts any worker, importing the module of every class in it. Built as the stages build it, with the
    sweep's callback, and unpickled in a fresh interpreter: the only bliss_ray module imported is the callback's
    (bliss_ray's specs once made the controller import the stages, the models and transformers: +3 s a stage)."""
    import subprocess
    import sys

    from ray import cloudpickle

    from bliss_ray.stages import train_lm
    from bliss_ray.stages._ray import run_config, torch_trainer
    from bliss_ray.studies.tune_callback import ForwardToTune
    from bliss_ray.watch.progress import StepReporter

    spec = micro_lm_spec("ctl", str(tmp_path / "tok"), str(tmp_path / "arr"), TrainSettings(steps=2), 2048, 64)
    forward = ForwardToTune.__new__(ForwardToTune)  # its __init__ needs a Tune session; pickling needs only the class
    forward.extra, forward.metric = {}, "loss"
    config = run_config("ctl", str(tmp_path), RES, callbacks=[forward])
    progress = StepReporter("ctl", 0, 2)
    trainer = torch_trainer(train_lm._worker, {"spec": spec, "progress": progress}, RES, 1, config, "pretrain")
    code = (
        "import json, pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('bliss_ray', 'transformers'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=cloudpickle.dumps(trainer.train_run_context),
        capture_output=True,
        check=True,
        timeout=120,
    )
    imported = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert imported == ["bliss_ray", "bliss_ray.studies", "bliss_ray.studies.tune_callback"], imported


# extended: in CI, test_fsdp.py's killed FSDP worker resumes bit for bit through the same restart path (and its
# orphan checkpoint is collected), and tests/test_two_node.py's warm-up resumes after its node is lost
@pytest.mark.extended
@pytest.mark.timeout(900)  # two 8-step runs, one with a worker-group restart
def test_killed_worker_resumes_and_finishes_at_the_exact_step(data, tmp_path, monkeypatch):
    """Scenario 1 (target pretraining): SIGKILL the worker while it fetches step 6's batches; Ray Train restarts
    the group from the last registered checkpoint (step 4 here, or 2: possibly older, docs/ray.md, "Checkpoints"),
    which the state records as the step the resumed attempt started from. The run ends at exactly step 8 with each step
    logged once, and equals an uninterrupted run bit for bit: weights, AdamW state and every step's metrics (one
    worker on one thread replays the same float operations on the same batches, and the checkpoint restores fp32
    weights from safetensors and the optimizer moments unrounded). An orphan checkpoint directory planted in the
    run's storage (what a worker that dies right after uploading leaves behind) is deleted; registered ones stay."""
    from bliss_ray.stages import train_lm

    storage = tmp_path / "ray"
    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    train_lm.fit_lm(_lm_spec(data, "noKill", 8, 8, ckpt_every=2), ref, str(storage), 1)
    marker = tmp_path / "killed"
    monkeypatch.setenv("BLISS_FAULTS", json.dumps({"kill": {"stage": "killme", "step": 5, "once": str(marker)}}))
    out = tmp_path / "out"
    out.mkdir()
    orphan = storage / out.name / "checkpoint_2000-01-01_00-00-00.000000"  # the Train run is named after out/
    orphan.mkdir(parents=True)
    (orphan / "train_state.pt").write_bytes(b"a partial upload")
    result = train_lm.fit_lm(_lm_spec(data, "killme", 8, 8, ckpt_every=2), out, str(storage), 1)
    assert marker.exists(), "the fault was not injected"
    assert result["final_step"] == 8
    state = torch.load(out / "state" / "train_state.pt", weights_only=True)
    ref_state = torch.load(ref / "state" / "train_state.pt", weights_only=True)
    assert state["step"] == 8
    assert ref_state["resumed_from"] == [] and len(state["resumed_from"]) == 1, state["resumed_from"]
    assert state["resumed_from"][0] in (2, 4)  # resumed, not restarted from step 0
    history = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(1, 9))  # replayed steps overwrite nothing
    weights = load_file(out / "state" / "model" / "model.safetensors")
    assert_same_state(weights, load_file(ref / "state" / "model" / "model.safetensors"), "weights")
    assert_same_state(state["optimizer"], ref_state["optimizer"], "optimizer")
    assert without_timings(history) == without_timings(read_metrics(ref / "metrics.jsonl"))
    run_dir = Path(result["train_run"])
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    dirs = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert not orphan.exists(), "gc_orphan_checkpoints left an unregistered checkpoint directory"
    assert dirs and all(d in snapshot for d in dirs), (dirs, snapshot)


# extended: in CI, test_lm_run resumes a run killed inside a branch without Ray (the branch carried, the run bit
# identical), test_fsdp.py's killed FSDP worker the Ray Train restart
@pytest.mark.extended
@pytest.mark.timeout(900)  # three short runs, one with a worker-group restart
def test_mid_round_branches_are_kept_and_leave_the_stable_run_bit_identical(data, tmp_path, monkeypatch):
    """pretrain.eval_branches=2 in a round of 8 steps from global step 6: 3-step decay branches from the stable
    state at steps 8 and 11 (train.schedule.branch_steps), saved as branches/8 and branches/11. A SIGKILL inside the
    branch at 11 (fetching step 12's batches) restarts the group from a checkpoint (step 10 or 8) that carries
    branches/8: that branch is restored, not recomputed, and the one at 11 is recomputed. Bit for bit: the stage's
    final stable state and end-of-round decay branch equal the same stage's without branches, and branches/11
    equals the end-of-round decay branch of the same stage cut at step 11, whose stable weights it differs from."""
    from bliss_ray.stages import train_lm

    def run(stage: str, steps: int, branches: int):
        spec = _lm_spec(data, stage, steps, 8, ckpt_every=2, decay_steps=3, eval_branches=branches)
        out = tmp_path / stage
        out.mkdir()
        result = train_lm.fit_lm(dataclasses.replace(spec, start_step=6), out, str(tmp_path / "ray"), 1)
        return out, result

    ref, ref_result = run("plain", 8, 0)
    cut, _ = run("cut", 5, 0)  # the same stable run, ending at step 11
    marker = tmp_path / "killed"
    monkeypatch.setenv("BLISS_FAULTS", json.dumps({"kill": {"stage": "branched", "step": 12, "once": str(marker)}}))
    out, result = run("branched", 8, 2)
    assert marker.exists(), "the fault was not injected"
    assert result["branch_steps"] == [8, 11] and ref_result["branch_steps"] == []
    assert sorted(p.name for p in (out / "branches").iterdir()) == ["11", "8"]
    state = torch.load(out / "state" / "train_state.pt", weights_only=True)
    assert state["step"] == 14 and len(state["resumed_from"]) == 1 and state["resumed_from"][0] in (8, 10)

    weights = {d: load_file(d / "model.safetensors") for d in (out / "branches" / "8", out / "branches" / "11")}
    for d in weights:
        assert all(torch.isfinite(p).all() for p in load_lm(d).parameters())  # an HF directory that loads
    assert_same_state(weights[out / "branches" / "11"], load_file(cut / "decay" / "model.safetensors"), "branch@11")
    stable_11 = load_file(cut / "state" / "model" / "model.safetensors")
    assert any(not torch.equal(v, stable_11[k]) for k, v in weights[out / "branches" / "11"].items())
    for part in ("state/model", "decay"):
        assert_same_state(
            load_file(out / part / "model.safetensors"), load_file(ref / part / "model.safetensors"), part
        )
    ref_state = torch.load(ref / "state" / "train_state.pt", weights_only=True)
    assert_same_state(state["optimizer"], ref_state["optimizer"], "optimizer")

    # metrics: each branch's steps once under its own phase (the carried branch at 8 was not run again), the
    # stable and decay steps exactly the run's without branches
    history = without_timings(read_metrics(out / "metrics.jsonl"))
    for at in (8, 11):
        assert [m["step"] for m in history if m["phase"] == f"branch@{at}"] == [at + 1, at + 2, at + 3]
    cut_decay = [m for m in without_timings(read_metrics(cut / "metrics.jsonl")) if m["phase"] == "decay"]
    branch_11 = [m | {"phase": "decay"} for m in history if m["phase"] == "branch@11"]
    assert branch_11 == cut_decay
    assert [m for m in history if not m["phase"].startswith("branch@")] == without_timings(
        read_metrics(ref / "metrics.jsonl")
    )


def test_bilevel_outer_step_1_vs_2_workers(data, tmp_path):
    """One outer step with the global batch split over 2 workers (scores all-gathered, HVPs / ∇f / c̄ /
    hypergradient all-reduced) equals the same step in one worker: same proxy and score-model weights."""
    from bliss_ray.models.score import ScoreModel
    from bliss_ray.stages import bilevel

    run, arr, _, _ = data
    models = {}
    for workers in (1, 2):
        settings = dataclasses.replace(
            run.exp.bilevel,
            outer_steps=1,
            micro_batch_seqs=8 // workers,
            reference_batch_seqs=4 // workers,
            warmup_frac=0.0,
            gamma=0.1,
            score_init="proxy_warmup",
            use_sigmoid=True,
            ckpt_every_steps=1,
        )
        spec = bilevel.BilevelSpec(
            stage=f"bl{workers}",
            settings=settings,
            proxy_dir=str(run.dir("warmup") / "state" / "model"),
            target_dir=str(run.dir("r0.pretrain") / "state" / "model"),
            score_dir=None,
            train_dir=str(arr),
            reference_dir=str(run.dir("tokenize") / "reference" / "array"),
            seed=0,
            resources=RES,
        )
        out = tmp_path / f"w{workers}"
        out.mkdir()
        bilevel.fit_bilevel(spec, out, str(tmp_path / "ray"), workers)
        models[workers] = ScoreModel.load(out / "score_model").state_dict()
        metrics = read_metrics(out / "metrics.jsonl")[0]
        models[f"m{workers}"] = metrics
    initial = ScoreModel.from_proxy(load_lm(run.dir("warmup") / "state" / "model"), True, seed=0).state_dict()
    assert max((models[1][k] - v).abs().max().item() for k, v in initial.items()) > 0  # the step moved θ_s
    # AdamW's first step moves each coordinate by ≈ lr·g/(|g| + eps): coordinates whose true hypergradient is
    # ~eps move by a rounding-dependent fraction of lr (1e-3). atol 1e-5 = 1 % of lr; a real mismatch (wrong
    # normaliser, a missing all-reduce) moves whole tensors by ~lr.
    for k, v in models[1].items():
        torch.testing.assert_close(models[2][k], v, rtol=1e-4, atol=1e-5)
    for key in ("lower_loss", "kl", "upper_loss", "c_bar"):
        assert models["m1"][key] == pytest.approx(models["m2"][key], rel=1e-4, abs=1e-7), key
    assert os.path.exists(tmp_path / "w2" / "score_model" / "model.safetensors")
