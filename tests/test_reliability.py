"""Reliability scenarios of the reliability issue that need a live Ray (the others live next to the code they
test: bad rows and corrupt files in test_data_stages.py, invalid configs and security in test_architecture.py,
the target-pretraining worker kill in test_train_stage.py, the sweep driver kill in test_sweep.py).

    .venv/bin/python -m pytest tests/test_reliability.py -q
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from bliss_ray.config import ResourcesConfig
from bliss_ray.train.checkpoint import read_metrics
from tests.conftest import REPO
from tests.test_train_stage import _lm_spec, data  # noqa: F401  (the shared TokenArray fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_bilevel_worker_killed_resumes_to_the_exact_step(tiny_run, tmp_path, monkeypatch):
    """Scenario 1 (bilevel stage): SIGKILL the worker at outer step 3 of 4; the run resumes from its last
    registered checkpoint (proxy, score model, both optimizers, schedulers, stale normaliser, metrics) and logs
    each outer step exactly once."""
    from bliss_ray.bilevel.loop import BilevelSettings
    from bliss_ray.stages import bilevel

    run, _ = tiny_run
    marker = tmp_path / "killed"
    monkeypatch.setenv("BLISS_FAULTS", json.dumps({"kill": {"stage": "blkill", "step": 2, "once": str(marker)}}))
    settings = {k: v for k, v in run.exp.bilevel.model_dump().items() if k in BilevelSettings.__dataclass_fields__}
    spec = bilevel.BilevelSpec(
        stage="blkill",
        settings=settings | {"outer_steps": 4},
        proxy_dir=str(run.dir("warmup") / "state/model"),
        target_dir=str(run.dir("r0.pretrain") / "state/model"),
        score_dir=None,
        score_init="proxy_warmup",
        use_sigmoid=True,
        train_dir=str(run.dir("tokenize") / "reference/array"),
        reference_dir=str(run.dir("tokenize") / "reference/array"),
        seed=0,
        threads=1,
        ckpt_every_steps=1,
    )
    out = tmp_path / "out"
    out.mkdir()
    result = bilevel.run(spec, out, ResourcesConfig(max_failures=2), str(tmp_path / "ray"), 1)
    assert marker.exists() and result["final_step"] == 4
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_nonfinite_loss_fails_the_stage_naming_stage_and_step(data, tmp_path, monkeypatch):  # noqa: F811
    """Scenario 5 on Ray Train: a NaN loss at step 3 fails the run with a message naming the stage and the step,
    and no checkpoint after step 2 exists (nothing non-finite is ever written)."""
    import ray.train

    from bliss_ray.stages import train_lm

    monkeypatch.setenv("BLISS_FAULTS", json.dumps({"nonfinite": {"stage": "nanstage", "step": 3}}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ray.train.TrainingFailedError, match=r"stage 'nanstage': non-finite loss .* at step 3"):
        train_lm.run(
            _lm_spec(data, "nanstage", 6, 8, ckpt_every=1),
            out,
            ResourcesConfig(max_failures=0),
            str(tmp_path / "ray"),
            1,
        )
    snapshot = json.loads((tmp_path / "ray" / "out" / "checkpoint_manager_snapshot.json").read_text())
    assert max(c["metrics"]["step"] for c in snapshot["checkpoint_results"]) == 2


def test_unschedulable_request_fails_fast_with_a_clear_error(ray_local, data, tmp_path):  # noqa: F811
    """Scenario 8: GPUs asked of a CPU-only cluster → an error naming the resource before anything waits."""
    from bliss_ray.stages import train_lm

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"has 0 GPU but the stage asks for 1 workers × 1 GPU"):
        train_lm.run(_lm_spec(data, "gpu", 2, 8), tmp_path, ResourcesConfig(use_gpu=True), str(tmp_path / "r"), 1)
    assert time.perf_counter() - t0 < 5


def test_unschedulable_request_on_an_autoscaling_cluster_times_out(tmp_path):
    """Scenario 8 where no pre-check is possible (an autoscaler might add GPUs): Ray Train's worker-group start
    timeout and our finite controller failure limit turn the wait into an error in bounded time. Runs in its
    own Ray (the timeout must be set before ray.init) with a 5 s start timeout: 3 attempts ≈ 30 s."""
    code = f"""
import os, sys, time
os.environ.update(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5", BLISS_AUTOSCALING="1", RAY_AUTH_MODE="disabled")
sys.path.insert(0, {str(REPO)!r})
import ray, ray.train
from ray.train.torch import TorchTrainer
from bliss_ray.config import ResourcesConfig
from bliss_ray.stages._ray import ensure_ray, run_config, scaling_config
ensure_ray(ResourcesConfig(num_cpus=2), quiet=True)
t0 = time.perf_counter()
try:
    TorchTrainer(lambda c: None, scaling_config=scaling_config(ResourcesConfig(use_gpu=True), 1),
                 run_config=run_config("gpu", {str(tmp_path)!r}, ResourcesConfig())).fit()
except Exception as e:
    print("FAILED_AFTER", round(time.perf_counter() - t0), type(e).__name__)
"""
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brs_", dir="/tmp")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    line = [x for x in proc.stdout.splitlines() if x.startswith("FAILED_AFTER")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    seconds = int(line[0].split()[1])
    assert seconds < 180 and "Error" in line[0]


def test_driver_killed_inside_a_stage_resumes_to_identical_outputs(tiny_run, tmp_path):
    """Scenario 2: SIGKILL the `bliss-ray run` driver (and with it the embedded Ray) while r0.pretrain is
    training, rerun the same command: finished stages are skipped, r0.pretrain resumes from its checkpoint, and
    its outputs equal the uninterrupted run's (same seed). The upstream stages are copied from the session's
    tiny run to keep the test short. (Killed *between* stages is test_pipeline.py's idempotent rerun.)"""
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
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("tiny/_ray/r0.pretrain-*/checkpoint_*")):
        assert proc.poll() is None, "the driver exited before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    assert not list(out.glob("tiny/r0.pretrain-*/_SUCCESS")), "killed too late: the stage had finished"
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="brk_", dir="/tmp")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skip warmup" in done.stderr + done.stdout
    resumed = next(out.glob("tiny/r0.pretrain-*"))
    assert resumed.name == run.dir("r0.pretrain").name  # same identity, same directory
    a = load_file(resumed / "state/model/model.safetensors")
    b = load_file(run.dir("r0.pretrain") / "state/model/model.safetensors")
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-7) for k in b)
    steps = [m["step"] for m in read_metrics(resumed / "metrics.jsonl") if m.get("phase") == "stable"]
    assert steps == list(range(1, 7))
