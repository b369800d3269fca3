"""Where a run stands: each planned stage as done / running / interrupted / failed / pending (``bliss-ray status``).

A stage directory tells its own state: ``_SUCCESS`` (done; ``outputs.json`` has its duration and outputs),
``_RUNNING.json`` (the pid and host of the driver running it: a dead pid on this host means interrupted),
``_FAILED.json`` (the reason and where the traceback is). The pipeline writes the markers
(``bliss_ray.watch.console.StageConsole``); this module only reads files, so it works while a run is going and without
Ray. The plan and identities come from the run's ``experiment.json`` (the experiment launched last in that
directory), or from ``--config`` when several experiments share the directory (BLISS and its random baseline share
round 0), so a stage that those settings would rerun shows as pending.

    bliss-ray status runs/demo            # one table
    bliss-ray status runs/demo --watch    # refreshed every few seconds until interrupted
    bliss-ray status runs/demo --config experiments/demo.yaml --set selection.method=random
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from bliss_ray import storage
from bliss_ray.config import parse_experiment
from bliss_ray.pipeline import Run

RUNNING, FAILED, SUCCESS = "_RUNNING.json", "_FAILED.json", "_SUCCESS"


def mark_running(d: str | Path) -> None:
    """Markers live with the stage in the store (``d``: its location), so ``status`` on another machine sees them."""
    storage.remove(storage.join(d, FAILED))
    storage.write_json(
        storage.join(d, RUNNING), {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    )


def mark_failed(d: str | Path, reason: str, log_path: str | None) -> None:
    storage.write_json(storage.join(d, FAILED), {"reason": reason, "log": log_path, "failed": time.time()})
    storage.remove(storage.join(d, RUNNING))


def clear_running(d: str | Path) -> None:
    storage.remove(storage.join(d, RUNNING))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(loc: str | Path) -> dict | None:
    try:
        return storage.read_json(loc)
    except (OSError, ValueError):
        return None


def last_metrics(d: str | Path, phase: str | None = None) -> dict:
    """The last per-step record of a Train stage's ``metrics.jsonl`` (of ``phase`` when given), or {}."""
    data = storage.read_bytes(storage.join(d, "metrics.jsonl"))
    if data is None:
        return {}
    lines = data.decode().splitlines()
    for line in reversed(lines):
        rec = json.loads(line) if line.strip() else {}
        if rec and (phase is None or rec.get("phase") == phase) and "skipped_step" not in rec:
            return rec
    return {}


def _num(x, fmt: str = ".4g") -> str:
    return "?" if x is None else format(x, fmt)


def headline(kind: str, out: dict, d: str | Path) -> str:
    """One line of what a finished stage produced (losses, rows, selection shares...)."""
    if kind == "tokenizer":
        return f"vocab {out.get('vocab_size')}"
    if kind == "tokenize":
        return (
            f"{out.get('rows_in')} docs → {out.get('seqs')} rows, {_num(out.get('tokens'), ',')} tokens; "
            f"{out.get('rows_quarantined', 0)} quarantined"
        )
    if kind == "select":
        text = f"{out.get('selected')}/{out.get('pool_size')} rows ({out.get('method')})"
        shares = (_read(storage.join(d, "manifest.json")) or {}).get("domain_share") or {}
        top = sorted(shares.items(), key=lambda kv: -kv[1]["selected"])[:3]
        if top:
            text += "; shares " + ", ".join(f"{k} {v['selected']:.2f} (pool {v['pool']:.2f})" for k, v in top)
        return text
    if kind in ("warmup", "pretrain"):
        stable, decay = last_metrics(d, "stable"), last_metrics(d, "decay")
        text = f"step {out.get('final_step')}, loss {_num(stable.get('loss'))}"
        return text + (f", after decay {_num(decay.get('loss'))}" if decay else "")
    if kind == "bilevel":
        m = last_metrics(d)
        return (
            f"{out.get('final_step')} outer steps; upper loss {_num(m.get('upper_loss'))}, "
            f"lower loss {_num(m.get('lower_loss'))}, weight entropy {_num(m.get('weight_entropy'))}"
        )
    if kind == "score":
        rate = out.get("rows_per_s")
        return (
            f"{out.get('rows_scored')} rows scored"
            + (f" at {rate:.0f} rows/s" if rate else "")
            + (f"; {out.get('rows_quarantined')} quarantined" if out.get("rows_quarantined") else "")
        )
    if kind == "evaluate":
        parts = [
            f"{c['stage']}: ref loss {_num(c.get('reference_loss'))}, avg acc {_num(c.get('paper_average'), '.3f')}"
            for c in out.get("checkpoints", [])
        ]
        return "; ".join(parts)
    if kind == "report":
        return str(out.get("report"))
    scalars = {k: v for k, v in out.items() if isinstance(v, int | float) and k not in ("seconds", "round")}
    return ", ".join(f"{k} {_num(v)}" for k, v in list(scalars.items())[:4])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def stage_states(run_dir: str | Path, exp=None) -> list[dict]:
    """One dict per stage of ``exp``'s plan (default: the experiment launched last in ``run_dir``): key, kind,
    identity, state, seconds, headline, error, log."""
    run_dir = str(run_dir) if storage.is_remote(run_dir) else str(Path(run_dir).resolve())
    recorded = storage.read_json(storage.join(run_dir, "experiment.json"))
    if recorded is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory (no experiment.json)")
    exp = exp or parse_experiment(recorded)
    run = Run(exp, storage.parent(run_dir))
    rows = []
    for st in run.stages:
        d = run.uri(st.key)
        row = {"key": st.key, "kind": st.kind, "identity": run.ids[st.key], "state": "pending", "seconds": None}
        row |= {"headline": "", "error": None, "log": None}
        running, failed = _read(storage.join(d, RUNNING)), _read(storage.join(d, FAILED))
        if storage.exists(storage.join(d, SUCCESS)):
            out = _read(storage.join(d, "outputs.json")) or {}
            try:
                text = headline(st.kind, out, d)
            except (KeyError, TypeError, ValueError):  # outputs of an older layout
                text = ""
            row |= {"state": "done", "seconds": out.get("seconds"), "headline": text}
        elif failed:
            row |= {"state": "failed", "error": failed.get("reason"), "log": failed.get("log")}
        elif running:
            here = running.get("host") == socket.gethostname()
            row["state"] = "interrupted" if here and not _alive(int(running["pid"])) else "running"
            row["seconds"] = time.time() - float(running["started"])
        elif storage.exists(d):
            row["state"] = "interrupted"  # started before markers existed, or killed between writes
        rows.append(row)
    return rows


def format_status(run_dir: Path, rows: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "interrupted", "failed", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"{run_dir}: {summary}"]
    for r in rows:
        lines.append(
            f"  {r['state']:<11} {r['key']:<14} {r['identity']}  {_duration(r['seconds']):>7}  {r['headline']}"
        )
        if r["error"]:
            lines.append(f"      error: {r['error']}")
            if r["log"]:
                lines.append(f"      details: {r['log']}")
    return "\n".join(line.rstrip() for line in lines)


def show(run_dir: Path, watch: bool = False, every_s: float = 5.0, stream=None, exp=None) -> int:
    """Print the status table (``watch``: redraw every ``every_s`` seconds until Ctrl-C). Exit code 1 if a
    stage failed."""
    import sys

    stream = stream or sys.stdout
    while True:
        rows = stage_states(run_dir, exp)
        text = format_status(run_dir, rows)
        if watch and stream.isatty():
            stream.write("\x1b[H\x1b[2J")  # clear the screen: a terminal's redraw, never written to files
        stream.write(text + "\n")
        stream.flush()
        if not watch:
            return int(any(r["state"] == "failed" for r in rows))
        try:
            time.sleep(every_s)
        except KeyboardInterrupt:
            return 0
