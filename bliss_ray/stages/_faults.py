"""Fault injection for reliability tests: real faults, triggered from the ``BLISS_FAULTS`` environment variable.

``BLISS_FAULTS`` is JSON, e.g. ``{"kill": {"stage": "r0.pretrain", "step": 7, "rank": 0, "once": "/tmp/k"},
"nonfinite": {"stage": "warmup", "step": 3}}``. ``kill`` SIGKILLs the worker process when it fetches the batches
of that global step (once per ``once`` marker file); ``pause`` (same keys, plus ``seconds``) holds it there
instead, so that a test can kill the node under it; ``nonfinite`` turns that step's loss into NaN. The variable
reaches Train workers through ``RunConfig.worker_runtime_env``; unset, every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def _faults() -> dict:
    raw = os.environ.get("BLISS_FAULTS")
    return json.loads(raw) if raw else {}


def _armed(kind: str, stage: str, step: int, rank: int) -> dict | None:
    """The ``kind`` fault if it targets this stage, step and rank and has not fired yet (its ``once`` marker)."""
    fault = _faults().get(kind)
    if not fault or fault["stage"] != stage or fault["step"] != step or fault.get("rank", 0) != rank:
        return None
    marker = Path(fault["once"])
    if marker.exists():
        return None
    marker.write_text(f"{kind} {stage} rank {rank} at step {step}\n")
    return fault


def at_step(stage: str, step: int, rank: int) -> None:
    """Called when a worker fetches the batches of global step ``step``: ``kill`` SIGKILLs the worker; ``pause``
    holds it there for ``seconds`` (default 600), a window in which a test kills the worker's whole node."""
    if _armed("kill", stage, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if pause := _armed("pause", stage, step, rank):
        time.sleep(float(pause.get("seconds", 600)))


def nonfinite_hook(stage: str):
    """A loss hook that returns NaN at the configured step of ``stage`` (every time: a deterministic fault)."""
    spec = _faults().get("nonfinite")
    if not spec or spec["stage"] != stage:
        return None
    value = float(spec.get("value", "nan"))

    def hook(step: int, loss):
        return loss * value if step + 1 == spec["step"] else loss

    return hook
