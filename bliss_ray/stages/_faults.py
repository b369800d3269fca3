"""Fault injection for reliability tests: real faults, triggered from the ``BLISS_FAULTS`` environment variable.

``BLISS_FAULTS`` is JSON, e.g. ``{"kill": {"stage": "r0.pretrain", "step": 7, "rank": 0, "once": "/tmp/k"},
"nonfinite": {"stage": "warmup", "step": 3}}``. ``kill`` SIGKILLs the worker process when it fetches the batches
of that global step (once per ``once`` marker file); ``pause`` (same keys, plus ``seconds``) holds it there
instead, so that a test can kill the node under it; ``nonfinite`` turns that step's loss into NaN. A pause may also
hold other places where a stage's work runs, named by ``at``: ``"launch"`` (a Train worker receiving the stage's
train function, while Train's controller still starts the worker group), ``"score"`` (a scoring actor's batch),
``"evaluate"`` (an evaluation task); ``pause`` may be a list, each entry firing once. The variable reaches Train
workers through ``RunConfig.worker_runtime_env`` and tasks and actors through their ``runtime_env``
(``env_vars``); unset, every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

ENV = "BLISS_FAULTS"


def env_vars() -> dict[str, str]:
    """The variable, for the runtime environment of the processes a stage starts (empty when unset)."""
    return {ENV: os.environ[ENV]} if ENV in os.environ else {}


def _entries(kind: str) -> list[dict]:
    raw = os.environ.get(ENV)
    found = json.loads(raw).get(kind) if raw else None
    return found if isinstance(found, list) else [found] if found else []


def _armed(kind: str, at: str, stage: str | None = None, step: int | None = None, rank: int = 0) -> dict | None:
    """The first ``kind`` fault aimed at this place (``at``, and the stage, step and rank it names) that has not
    fired yet; firing writes its ``once`` marker."""
    for fault in _entries(kind):
        aimed = (fault.get("at", "step"), fault.get("stage", stage), fault.get("step", step), fault.get("rank", 0))
        if aimed != (at, stage, step, rank):
            continue
        marker = Path(fault["once"])
        if marker.exists():
            continue
        marker.write_text(f"{kind} at {at} {stage or ''} step {step} rank {rank}\n")
        return fault
    return None


def _hold(fault: dict | None) -> None:
    if fault:
        time.sleep(float(fault.get("seconds", 600)))


def at_step(stage: str, step: int, rank: int) -> None:
    """Called when a worker fetches the batches of global step ``step``: ``kill`` SIGKILLs the worker; ``pause``
    holds it there for ``seconds`` (default 600), a window in which a test kills the worker's whole node."""
    if _armed("kill", "step", stage, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    _hold(_armed("pause", "step", stage, step, rank))


def hold(at: str) -> None:
    """Called where a scoring batch (``"score"``) or an evaluation task (``"evaluate"``) starts: a pause aimed
    there holds the first one to arrive."""
    _hold(_armed("pause", at))


class _HeldLaunch:
    """A Train function whose unpickling is held by a ``launch`` pause: a worker unpickles it in the call that
    Train's controller waits on while it starts the worker group."""

    def __init__(self, stage: str, fn: Callable[[], None]):
        self.stage, self.fn = stage, fn

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _hold(_armed("pause", "launch", self.stage))

    def __call__(self) -> None:
        return self.fn()


def on_launch(stage: str, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, wrapped so that a ``launch`` pause aimed at ``stage`` holds its delivery to the workers."""
    aimed = any(f.get("at") == "launch" and f.get("stage") == stage for f in _entries("pause"))
    return _HeldLaunch(stage, fn) if aimed else fn


def nonfinite_hook(stage: str):
    """A loss hook that returns NaN at the configured step of ``stage`` (every time: a deterministic fault)."""
    specs = [s for s in _entries("nonfinite") if s["stage"] == stage]
    if not specs:
        return None
    spec = specs[0]
    value = float(spec.get("value", "nan"))

    def hook(step: int, loss):
        return loss * value if step + 1 == spec["step"] else loss

    return hook
