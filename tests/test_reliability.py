"""Reliability scenarios that need a live Ray (the others live next to the code they
test: bad rows and corrupt files in test_data_stages.py, invalid configs and security in test_architecture.py,
the target-pretraining worker kill in test_fsdp.py, the sweep driver kill in test_sweep.py).

    .venv/bin/python -m pytest tests/test_reliability.py -q
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bliss_ray.config import ResourcesConfig
from bliss_ray.train.checkpoint import read_metrics
from tests.conftest import RAY_INTERNALS, REPO, assert_same_state, without_timings
from tests.test_train_stage import _lm_spec, data  # noqa: F401  (data: the shared TokenArray fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _final_bilevel_state(train_run: str) -> dict:
    """The optimizer/scheduler/normaliser state of the run's last registered checkpoint (the stage output drops it)."""
    from bliss_ray.bilevel.checkpoint import STATE

    run_dir = Path(train_run)
    latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    return torch.load(run_dir / latest["checkpoint_dir_name"] / STATE, weights_only=True)


def test_bilevel_worker_killed_resumes_to_the_exact_step(tiny_run, tmp_path, monkeypatch):
    """Scenario 1 (bilevel stage): SIGKILL the worker at outer step 3 of 4. The restarted attempt resumes from the
    last registered checkpoint (step 2, or 1 if the last one was not registered yet: docs/ray.md, "Checkpoints"),
    which its state records, and ends equal to an uninterrupted run: proxy and score model weights, both AdamW
    states, both LR schedulers, the stale normaliser and every outer step's metrics, bit for bit. Exact because one
    worker on one thread replays the same float operations on the same data, and the checkpoint restores fp32
    weights (safetensors), optimizer moments and the normaliser (Python floats of fp32 values) without rounding.
    ``weight_norm: stale`` makes the step after the resume depend on the saved normaliser: one that was lost would
    give that step per-worker softmax weights, and different weights from then on."""
    from bliss_ray.stages import bilevel

    run, _ = tiny_run
    settings = dataclasses.replace(run.exp.bilevel, outer_steps=4, weight_norm="stale", ckpt_every_steps=1)
    res = ResourcesConfig(max_failures=2, torch_threads=1)
    outs = {}
    for name in ("uninterrupted", "killed"):
        if name == "killed":
            marker = tmp_path / "marker"
            fault = {"kill": {"stage": "blkill", "step": 2, "once": str(marker)}}
            monkeypatch.setenv("BLISS_FAULTS", json.dumps(fault))
        spec = bilevel.BilevelSpec(
            stage="blkill" if name == "killed" else "blref",
            settings=settings,
            proxy_dir=str(run.dir("warmup") / "state/model"),
            target_dir=str(run.dir("r0.pretrain") / "state/model"),
            score_dir=None,
            train_dir=str(run.dir("tokenize") / "reference/array"),
            reference_dir=str(run.dir("tokenize") / "reference/array"),
            seed=0,
            resources=res,
        )
        out = tmp_path / name
        out.mkdir()
        result = bilevel.fit_bilevel(spec, out, str(tmp_path / "ray"), 1)
        assert result["final_step"] == 4
        outs[name] = (out, _final_bilevel_state(result["train_run"]))
    assert marker.exists(), "the fault was not injected"
    (ref, ref_state), (out, state) = outs["uninterrupted"], outs["killed"]
    assert ref_state["resumed_from"] == [] and len(state["resumed_from"]) == 1, state["resumed_from"]
    assert state["resumed_from"][0] in (1, 2)  # resumed, not restarted from step 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    for model in ("proxy", "score_model"):
        assert_same_state(load_file(out / model / "model.safetensors"), load_file(ref / model / "model.safetensors"))
    for key in ("step", "proxy_opt", "score_opt", "proxy_sched", "score_sched", "normaliser"):
        assert_same_state(state[key], ref_state[key], key)
    assert state["normaliser"] is not None
    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(read_metrics(ref / "metrics.jsonl"))


def test_nonfinite_loss_fails_the_stage_naming_stage_and_step(data, tmp_path, monkeypatch):  # noqa: F811
    """Scenario 5 on Ray Train: a NaN loss at step 3 fails the run with a message naming the stage and the step,
    and no checkpoint after step 2 exists (nothing non-finite is ever written)."""
    import ray.train

    from bliss_ray.stages import train_lm

    monkeypatch.setenv("BLISS_FAULTS", json.dumps({"nonfinite": {"stage": "nanstage", "step": 3}}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ray.train.TrainingFailedError, match=r"stage 'nanstage': non-finite loss .* at step 3"):
        spec = _lm_spec(data, "nanstage", 6, 8, ckpt_every=1)
        train_lm.fit_lm(
            dataclasses.replace(spec, resources=ResourcesConfig(max_failures=0)), out, str(tmp_path / "ray"), 1
        )
    snapshot = json.loads((tmp_path / "ray" / "out" / "checkpoint_manager_snapshot.json").read_text())
    assert max(c["metrics"]["step"] for c in snapshot["checkpoint_results"]) == 2


def test_unschedulable_request_fails_fast_with_a_clear_error(ray_local, data, tmp_path):  # noqa: F811
    """Scenario 8: GPUs asked of a CPU-only cluster → an error naming the resource before anything waits."""
    from bliss_ray.stages import train_lm

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"has 0 GPU but the stage asks for 1 workers × 1 GPU"):
        spec = dataclasses.replace(_lm_spec(data, "gpu", 2, 8), resources=ResourcesConfig(use_gpu=True))
        train_lm.fit_lm(spec, tmp_path, str(tmp_path / "r"), 1)
    assert time.perf_counter() - t0 < 5


def test_requests_are_checked_against_the_autoscalers_ceiling_not_what_is_up_now(monkeypatch):
    """On an autoscaling cluster (it publishes the most it can grow to) a GPU request waits for a GPU node that
    is not up yet, ``use_gpu: null`` means GPUs, and a request above the ceiling fails at once naming it. On a fixed
    cluster the ceiling is the most it has had: a request it met waits while a lost node is replaced."""
    from bliss_ray.stages import _ray

    monkeypatch.setattr(_ray.ray, "cluster_resources", lambda: {"CPU": 2.0})  # a CPU head, no GPU node up yet
    monkeypatch.setattr(_ray, "cluster_ceiling", lambda: {"CPU": 66.0, "GPU": 8.0})
    _ray.check_schedulable({"CPU": 1, "GPU": 1}, 8)
    assert _ray.use_gpu(ResourcesConfig(use_gpu=None))
    with pytest.raises(RuntimeError, match=r"autoscaler can provide at most 8 GPU but .* 16 workers × 1 GPU = 16"):
        _ray.check_schedulable({"CPU": 1, "GPU": 1}, 16)
    monkeypatch.setattr(_ray, "cluster_ceiling", lambda: {"CPU": -1, "GPU": 0})  # unbounded CPUs, never a GPU
    _ray.check_schedulable({"CPU": 4}, 100)
    assert not _ray.use_gpu(ResourcesConfig(use_gpu=None))
    monkeypatch.setattr(_ray, "cluster_ceiling", lambda: None)  # a fixed cluster: the most it had is all there is
    monkeypatch.setattr(_ray, "_SEEN", {})
    with pytest.raises(RuntimeError, match=r"the Ray cluster has 2 CPU but .* = 4"):
        _ray.check_schedulable({"CPU": 1}, 4)
    monkeypatch.setattr(_ray.ray, "cluster_resources", lambda: {})  # its worker node lost, a replacement booting
    _ray.check_schedulable({"CPU": 1}, 2)  # met before: waits for the node (Train's start timeout bounds it)
    with pytest.raises(RuntimeError, match=r"the Ray cluster has 2 CPU but .* = 3"):
        _ray.check_schedulable({"CPU": 1}, 3)


def test_stages_ask_for_their_gpu_type_and_a_type_no_node_serves_fails_before_compute(monkeypatch):
    """``resources.gpu_type`` (and ``gpu_types`` per stage kind) becomes Ray's accelerator type of Train workers,
    tasks and actors; on an autoscaling cluster whose node types declare A10G and A100-40G, a stage on an H100
    fails at once, naming the type, instead of waiting for a node that never comes."""
    from bliss_ray.stages import _ray

    monkeypatch.setattr(_ray.ray, "cluster_resources", lambda: {"CPU": 2.0})
    ceiling = {"CPU": 64.0, "GPU": 12.0, "accelerator_type:A10G": 2.0, "accelerator_type:A100-40G": 1.0}
    monkeypatch.setattr(_ray, "cluster_ceiling", lambda: ceiling)
    res = ResourcesConfig(gpu_type="A10G-24GB", gpu_types={"bilevel": "A100-40GB", "probe": "H100-80GB"})
    pretrain = _ray.scaling_config(res, 4, "pretrain")
    assert pretrain.accelerator_type == "A10G"
    assert pretrain.placement_strategy == "PACK"  # a stage's workers on the fewest nodes: HSDP's groups are nodes
    assert _ray.scaling_config(res, 4, "bilevel").accelerator_type == "A100-40G"
    opts = _ray.task_options(res, "evaluate", 1.0)
    assert opts["accelerator_type"] == "A10G" and opts["num_gpus"] == 1 and opts["scheduling_strategy"] == "DEFAULT"
    with pytest.raises(RuntimeError, match=r"no H100 GPU .*accelerator_type:H100"):
        _ray.task_options(res, "probe", 1.0)
    cpu_only = ResourcesConfig(gpu_type="A10G-24GB", use_gpu=False)  # a CPU run ignores the type
    assert _ray.scaling_config(cpu_only, 2, "pretrain").accelerator_type is None


def test_unschedulable_request_on_an_autoscaling_cluster_times_out(tmp_path):
    """Scenario 8 on an autoscaling cluster whose ceiling allows the request (here a published ceiling of 8 GPUs
    that no node ever provides): Ray Train's worker-group start timeout and our finite controller failure limit
    turn the wait into an error in bounded time. Runs in its own Ray, started with a 60 s start timeout in its
    environment, and a stage whose resources say 5 s and one controller attempt
    (``resources.controller_failure_limit=1``): ``fit`` hands the stage's own setting to Train."""
    code = f"""
import json, os, sys, time
os.environ.update(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="60", RAY_AUTH_MODE="disabled")
sys.path.insert(0, {str(REPO)!r})
import ray, ray.train
from bliss_ray.config import ResourcesConfig
from bliss_ray.stages import _ray
from bliss_ray.stages._ray import ensure_ray, fit, run_config
_ray.cluster_ceiling = lambda: {{"CPU": 16, "GPU": 8}}  # what an autoscaler would publish
ensure_ray(ResourcesConfig(num_cpus=2), quiet=True)
res = ResourcesConfig(use_gpu=True, worker_start_timeout_s=5, controller_failure_limit=1)
t0 = time.perf_counter()
try:
    fit(lambda c: None, {{}}, res, 1, run_config("gpu", {str(tmp_path)!r}, res), "pretrain")
except ray.train.ControllerError as e:
    print("FAILED", json.dumps({{"s": time.perf_counter() - t0, "cause": type(e.controller_failure).__name__,
                                "message": str(e)}}))
"""
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brs_", dir="/tmp")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    line = [x for x in proc.stdout.splitlines() if x.startswith("FAILED ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]  # any other exception (or none) is a failure
    failed = json.loads(line[0].removeprefix("FAILED "))
    assert failed["cause"] == "WorkerGroupStartupTimeoutError", failed
    assert "worker group startup timed out after 5.0 seconds waiting for 1 workers" in failed["message"], failed
    assert failed["s"] < 120  # one controller attempt of 5 s plus start-up


def test_driver_killed_inside_a_stage_resumes_to_identical_outputs(tiny_run, tmp_path):
    """Scenario 2: SIGKILL the `bliss-ray run` driver (and with it the embedded Ray) while r0.pretrain is
    training, once a checkpoint is registered; rerun the same command: finished stages are skipped, r0.pretrain
    resumes from that checkpoint or a later one (its state records the step the resuming attempt started from: a
    restart from step 0 records nothing), and its outputs equal the uninterrupted run's (same seed). The upstream
    stages are copied from the session's tiny run to keep the test short. (Killed *between* stages is
    test_pipeline.py's idempotent rerun.)"""
    run, _ = tiny_run
    out = tmp_path / "runs"
    for key in ("tokenizer", "tokenize", "r0.select", "warmup"):
        shutil.copytree(run.dir(key), out / "tiny" / run.dir(key).name)
    cmd = [
        sys.executable,
        "-m",
        "bliss_ray.cli",
        "run",
        "experiments/tiny.yaml",
        "--out",
        str(out),
        "--stage",
        "r0.pretrain",
    ]
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brk_", dir="/tmp")}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline, registered = time.time() + 300, []
    while time.time() < deadline and not registered:  # a checkpoint *registered* by Train, not just uploaded
        assert proc.poll() is None, "the driver exited before it could be killed"
        time.sleep(0.2)
        for snapshot in out.glob("tiny/_ray/r0.pretrain-*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(json.JSONDecodeError):  # caught mid-write: the next poll reads it whole
                registered = [c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    assert registered, "no checkpoint was registered in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    assert not list(out.glob("tiny/r0.pretrain-*/_SUCCESS")), "killed too late: the stage had finished"
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="brk_", dir="/tmp")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_plain_console(done.stdout + done.stderr)
    resumed = next(out.glob("tiny/r0.pretrain-*"))
    assert resumed.name == run.dir("r0.pretrain").name  # same identity, same directory
    a = load_file(resumed / "state/model/model.safetensors")
    b = load_file(run.dir("r0.pretrain") / "state/model/model.safetensors")
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-7) for k in b)
    steps = [m["step"] for m in read_metrics(resumed / "metrics.jsonl") if m.get("phase") == "stable"]
    assert steps == list(range(1, 7))
    (resumed_at,) = torch.load(resumed / "state/train_state.pt", weights_only=True)["resumed_from"]
    assert max(registered) <= resumed_at <= 6, (registered, resumed_at)  # checkpoints are every 3 of 6 steps


def _assert_plain_console(out: str) -> None:
    """Without a terminal the console is plain lines: no control characters, nothing of Ray's, the skipped stages,
    the resume and the stage's progress as lines of text."""
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out.replace("\n", "")), repr(out[:2000])
    assert not [line for line in out.splitlines() if re.search(RAY_INTERNALS, line)], out[-3000:]
    assert "skip warmup" in out
    assert re.search(r"r0\.pretrain: resumed from a checkpoint at step \d", out), out[-3000:]
    assert re.search(r"r0\.pretrain step \d+/\d+ .*loss \d", out), out[-3000:]
    assert re.search(r"done  r0\.pretrain\s", out), out[-3000:]
