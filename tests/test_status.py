"""``bliss-ray status`` on a finished, an interrupted and a failed run, and the failure path of ``bliss-ray run``:
one message naming stage, reason and log file, exit code 1, the traceback only in the log.

    .venv/bin/python -m pytest tests/test_status.py -q
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bliss_ray.watch.status import stage_states

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"


def _env() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bliss_ray.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


@pytest.mark.ray
@pytest.mark.slow
def test_status_of_a_finished_run(tiny_run):
    run, _ = tiny_run
    rows = stage_states(run.root, run.exp)  # other tests launch experiments into the same directory
    assert [r["key"] for r in rows] == [s.key for s in run.stages]
    assert {r["state"] for r in rows} == {"done"}
    assert all(r["identity"] == run.ids[r["key"]] and r["seconds"] is not None for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert "loss" in by_key["r0.pretrain"]["headline"] and "after decay" in by_key["r0.pretrain"]["headline"]
    assert "upper loss" in by_key["r1.bilevel"]["headline"]
    assert "shares" in by_key["r1.select"]["headline"]
    proc = _cli("status", str(run.root), "--config", str(TINY))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(f"{len(rows)} done")


def test_status_of_an_interrupted_run(tmp_path):
    """The driver dies (SIGKILL) inside the tokenize stage, after the tokenizer stage finished."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from bliss_ray.config import load_experiment
        from bliss_ray.pipeline import Run
        from bliss_ray.stages.executor import execute
        from bliss_ray.stages.steps import run_stage

        def runner(run, st, d):
            if st.kind == "tokenize":
                os.kill(os.getpid(), signal.SIGKILL)
            return run_stage(run, st, d)

        execute(Run(load_experiment({str(TINY)!r}), Path({str(tmp_path)!r})), until="tokenize", runner=runner)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    rows = stage_states(tmp_path / "tiny")
    states = {r["key"]: r["state"] for r in rows}
    assert states["tokenizer"] == "done" and states["tokenize"] == "interrupted"
    assert {states[k] for k in states if k not in ("tokenizer", "tokenize")} == {"pending"}
    status = _cli("status", str(tmp_path / "tiny"))
    assert status.returncode == 0
    assert "1 done, 1 interrupted" in status.stdout.splitlines()[0]


def test_failed_stage_ends_with_one_message_and_status_shows_it(tmp_path):
    """A stage that fails (a tokenizer directory without a tokenizer in it) ends ``bliss-ray run`` with exit code
    1 and one line naming the stage, the reason and the log; the traceback is in the log, not on screen."""
    not_a_tokenizer = tmp_path / "empty"
    not_a_tokenizer.mkdir()
    overrides = ["--set", "tokenizer.kind=pretrained", "--set", f"tokenizer.name_or_path={not_a_tokenizer}"]
    proc = _cli("run", str(TINY), "--out", str(tmp_path / "runs"), *overrides)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    screen = (proc.stdout + proc.stderr).splitlines()
    failed = [line for line in screen if "FAILED" in line]
    assert len(failed) == 1 and "FAILED tokenizer" in failed[0], screen
    assert "Traceback" not in proc.stdout + proc.stderr
    log_path = Path(failed[0].split("details: ")[1])
    assert log_path.parent == tmp_path / "runs" / "tiny" / "logs"
    assert "Traceback" in log_path.read_text()
    assert len(screen) <= 3, screen  # start, FAILED, nothing from libraries
    status = _cli("status", str(tmp_path / "runs" / "tiny"))
    assert status.returncode == 1
    assert "failed      tokenizer" in status.stdout
    assert "error: " in status.stdout and f"details: {log_path}" in status.stdout


def test_a_running_marker_is_a_lease_that_status_anywhere_sees_run_out(tmp_path):
    """The driver renews its stage's ``_RUNNING.json`` while the stage runs; a marker from another machine whose
    lease ran out (a driver that died there) reads ``interrupted``, a renewed one ``running``, with no pid to ask."""
    import json
    import time

    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run
    from bliss_ray.watch.status import RUNNING, RunningLease

    run = Run(load_experiment(TINY), tmp_path)
    run.root.mkdir(parents=True)
    (run.root / "experiment.json").write_text(run.exp.model_dump_json())
    lease = RunningLease(run.uri("tokenizer"), lease_s=0.4).start()
    first = json.loads((run.dir("tokenizer") / RUNNING).read_text())
    time.sleep(0.5)
    renewed = json.loads((run.dir("tokenizer") / RUNNING).read_text())
    lease.stop()
    assert renewed["renewed"] > first["renewed"] and renewed["started"] == first["started"]
    elsewhere = {"pid": 1, "host": "another-head", "started": time.time() - 600, "lease_s": 120.0}
    for key, renewed_s_ago in (("tokenizer", 5), ("tokenize", 300)):
        run.dir(key).mkdir(parents=True, exist_ok=True)
        marker = elsewhere | {"renewed": time.time() - renewed_s_ago}
        (run.dir(key) / RUNNING).write_text(json.dumps(marker))
    states = {r["key"]: r["state"] for r in stage_states(run.root)}
    assert states["tokenizer"] == "running" and states["tokenize"] == "interrupted"


def test_status_of_a_run_root_shows_every_experiment_launched_into_it(tmp_path, capsys):
    """``make demo`` launches BLISS, then its random baseline into ``runs/demo``: the root's ``experiment.json`` is
    the baseline's, and ``status`` shows both (each stage directory records the experiment that ran it)."""
    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run
    from bliss_ray.watch.status import show, variants_in

    bliss = Run(load_experiment(TINY), tmp_path)
    random = Run(load_experiment(TINY, ["selection.method=random"]), tmp_path)
    for run, key in ((bliss, "warmup"), (random, "r1.select")):
        run.dir(key).mkdir(parents=True)
        (run.dir(key) / "experiment.json").write_text(run.exp.model_dump_json())
    (random.root / "experiment.json").write_text(random.exp.model_dump_json())
    assert sorted(e.selection.method for e in variants_in(random.root)) == ["bliss", "random"]
    assert show(random.root) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert len(heads) == 2 and any("[bliss-" in h for h in heads) and any("[random-" in h for h in heads), heads
