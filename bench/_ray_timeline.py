"""Where a Ray stage's fixed cost goes: the processes Ray started during a time window, read off its session logs.

For each worker process the raylet started between ``t0`` and ``t1`` (``raylet.out``: "Started worker process"):
when it was spawned, when its interpreter had imported Ray and connected (the first line of its
``python-core-worker-*.log``), which actor it became (``worker-*.out``: ":actor_name:"), and when that actor's
constructor returned ("Actor creation task finished"). Times are seconds after ``t0``. Nothing here is timed by us:
the raylet and each core worker stamp their own log lines, to the millisecond.

    rows = processes(logs_dir, t0, t1)     # logs_dir: ray._private.worker.global_worker.node.get_logs_dir_path()
    print(render(rows))
    print(render_phases(train_phases(logs_dir, t0, t1)))  # Train's own account of its worker group's start

``train_phases`` reads Ray Train's controller log (``train/ray-train-sys-controller-*.log``, JSON lines): the time
of its first line, each "[Worker Group Initialization] <phase> in <s>s." and when it began shutting the group down.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_SPAWN = re.compile(r"Started worker process with pid (\d+) worker_id=([0-9a-f]+)")


def _time(line: str) -> float | None:
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def _first(path: Path, needle: str | None = None) -> float | None:
    """The stamp of the first line of ``path`` (containing ``needle``, if given)."""
    if not path.exists():
        return None
    with path.open(errors="replace") as f:
        for line in f:
            if needle is None or needle in line:
                t = _time(line)
                if t is not None:
                    return t
    return None


def _actor_name(logs: Path, worker_id: str) -> str:
    for out in logs.glob(f"worker-{worker_id}-*.out"):
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(":actor_name:"):
                return line.removeprefix(":actor_name:")
    return "(task worker)"


def processes(logs_dir: str | Path, t0: float, t1: float) -> list[dict]:
    """One row per worker process spawned in [t0, t1]: name, spawned, up, created (seconds after t0, or None)."""
    logs = Path(logs_dir)
    rows = []
    for line in (logs / "raylet.out").read_text(errors="replace").splitlines():
        m, t = _SPAWN.search(line), _time(line)
        if not m or t is None or not t0 <= t <= t1:
            continue
        pid, wid = m.groups()
        core_log = logs / f"python-core-worker-{wid}_{pid}.log"
        up, created = _first(core_log), _first(core_log, "Actor creation task finished")
        rows.append(
            {
                "name": _actor_name(logs, wid),
                "spawned_s": t - t0,
                "up_s": None if up is None else up - t0,
                "created_s": None if created is None else created - t0,
            }
        )
    return rows


def _offset(x: float | None) -> str:
    return "?" if x is None else f"+{x:.1f}"


def render(rows: list[dict]) -> str:
    """``Name spawned→up→created`` per process, in order of spawning, e.g. ``TrainController +0.3→+1.6→+6.8``."""
    f = _offset
    return "; ".join(f"{r['name']} {f(r['spawned_s'])}→{f(r['up_s'])}→{f(r['created_s'])}" for r in rows)


_PHASE = re.compile(r"^\[Worker Group Initialization\] (.+?) in (\d+(?:\.\d+)?)s")


def train_phases(logs_dir: str | Path, t0: float, t1: float) -> dict:
    """Ray Train's controller log within [t0, t1]: ``first_s`` (its first line, s after t0), ``phases`` (name →
    seconds, in order, from its "[Worker Group Initialization]" lines) and ``shutdown_s`` (s after t0)."""
    out: dict = {"first_s": None, "phases": {}, "shutdown_s": None}
    for path in sorted((Path(logs_dir) / "train").glob("ray-train-sys-controller-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                t = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except (ValueError, KeyError):
                continue
            if not t0 <= t <= t1:
                continue
            message = record.get("message", "")
            out["first_s"] = t - t0 if out["first_s"] is None else out["first_s"]
            if m := _PHASE.match(message):
                out["phases"][m.group(1)] = float(m.group(2))
            elif message.startswith("Shutting down") and out["shutdown_s"] is None:
                out["shutdown_s"] = t - t0
    return out


def render_phases(p: dict) -> str:
    """One line: the controller's first log line, its start-up phases and when it began the shutdown."""
    # Ray's wording, shortened; phases under 0.05 s (callbacks that do nothing here) left out
    short = {k.replace(" callbacks completed", "").replace(" on workers", ""): s for k, s in p["phases"].items()}
    phases = ", ".join(f"{name} {s:.1f} s" for name, s in short.items() if s >= 0.05)
    first, shutdown = _offset(p["first_s"]), _offset(p["shutdown_s"])
    return f"controller's first log line {first}; {phases or 'no phases logged'}; shutdown {shutdown}"
