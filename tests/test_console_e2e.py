"""Proof of the console: the session's tiny pipeline (``tiny_run``: ``bliss-ray run`` in a pseudo-terminal
recorded by ``script``) showed a start and an end line for every stage and a live progress bar for every Train
stage, and nothing of Ray's internals (a run without a terminal, plain lines with no control characters, is
tests/test_reliability.py's driver-killed rerun). Ray's output is in the run's log file instead. Each run starts
its own embedded Ray (the CLI's ``ensure_ray``; no dashboard, so the placement-group cleaner's State API warnings
exist, in the log file only).

    .venv/bin/python -m pytest tests/test_console_e2e.py -q
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bliss_ray.config import load_experiment
from bliss_ray.pipeline import stages_of

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"
RAY_INTERNALS = ("core_worker.cc", "PlacementGroupCleaner", "Failed to query Ray Train Controller", "TrainingReport(")
TRAIN_KINDS = ("warmup", "pretrain", "bilevel")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1500)]


def _bliss_ray() -> str:
    return str(Path(sys.executable).with_name("bliss-ray"))


def test_terminal_shows_every_stage_and_train_progress_and_no_ray_internals(tiny_run):
    run, _ = tiny_run
    screen = (run.root.parent / "typescript").read_bytes().decode(errors="replace")  # bytes: keep every \r
    for needle in RAY_INTERNALS:
        assert needle not in screen, needle
    stages = stages_of(load_experiment(TINY))
    lines = screen.replace("\r\n", "\n").split("\n")
    for st in stages:
        assert any(re.search(rf"\bstart {re.escape(st.key)}\s", ln) for ln in lines), st.key
        assert any(re.search(rf"\bdone  {re.escape(st.key)}\s", ln) for ln in lines), st.key
    for st in (s for s in stages if s.kind in TRAIN_KINDS):
        # a tqdm redraw of this stage's bar: key, steps done/total, and a loss
        bar = rf"{re.escape(st.key)} .*\b\d+/\d+ .*(loss|upper) \d"
        assert re.search(bar, screen), st.key
    assert len(lines) < 150, len(lines)  # the console budget (bars redraw in place)
    logs = sorted((run.root / "logs").glob("run-*.log"))  # the first: later tests may run more in this root
    assert logs and "Started a local Ray instance" in logs[0].read_text()
    _assert_tensorboard_has_every_step(run.root / "tb" / run.variant, stages)
    status = subprocess.run(
        [_bliss_ray(), "status", str(run.root), "--config", str(TINY)], capture_output=True, text=True, timeout=300
    )
    assert status.returncode == 0 and status.stdout.splitlines()[0].endswith(f": {len(stages)} done"), status.stdout


def _assert_tensorboard_has_every_step(tb: Path, stages) -> None:
    """Read the event files back with TensorBoard's own reader: every step of every Train stage is there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = load_experiment(TINY)
    for st in (s for s in stages if s.kind in TRAIN_KINDS):
        acc = EventAccumulator(str(tb / st.key))
        acc.Reload()
        if st.kind == "bilevel":
            tag, first, n = "upper_loss", 1, exp.bilevel.outer_steps
            assert {"lower_loss", "kl", "weight_entropy", "tokens_per_s"} <= set(acc.Tags()["scalars"])
        else:
            train = exp.warmup if st.kind == "warmup" else exp.pretrain
            tag, first, n = "loss", (st.round or 0) * train.steps + 1, train.steps
            assert {"lr", "grad_norm", "tokens_per_s", "flops_per_s", "memory_gb"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars(tag)] == list(range(first, first + n)), st.key
        if st.kind == "pretrain":
            assert len(acc.Scalars("decay/loss")) == exp.pretrain.decay_steps, st.key
    rounds = EventAccumulator(str(tb / "rounds"))
    rounds.Reload()
    tags = rounds.Tags()["scalars"]
    assert any(t.startswith("selection/share/") for t in tags) and "eval/reference_loss" in tags
