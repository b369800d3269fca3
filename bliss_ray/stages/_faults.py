"""Fault injection for reliability tests: real faults, triggered from the ``BLISS_FAULTS`` environment variable.

``BLISS_FAULTS`` is JSON, e.g. ``{"kill": {"stage": "r0.pretrain", "step": 7, "rank": 0, "once": "/tmp/k"},
"nonfinite": {"stage": "warmup", "step": 3}}``. ``kill`` SIGKILLs the worker process when it fetches the batches
of that global step (once per ``once`` marker file); ``nonfinite`` turns that step's loss into NaN. The variable
reaches Train workers through ``RunConfig.worker_runtime_env``; unset, every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def _faults() -> dict:
    raw = os.environ.get("BLISS_FAULTS")
    return json.loads(raw) if raw else {}


def maybe_kill(stage: str, step: int, rank: int) -> None:
    kill = _faults().get("kill")
    if not kill or kill["stage"] != stage or kill["step"] != step or kill.get("rank", 0) != rank:
        return
    marker = Path(kill["once"])
    if marker.exists():
        return
    marker.write_text(f"killed {stage} rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def nonfinite_hook(stage: str):
    """A loss hook that returns NaN at the configured step of ``stage`` (every time: a deterministic fault)."""
    spec = _faults().get("nonfinite")
    if not spec or spec["stage"] != stage:
        return None
    value = float(spec.get("value", "nan"))

    def hook(step: int, loss):
        return loss * value if step + 1 == spec["step"] else loss

    return hook
