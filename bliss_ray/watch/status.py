"""Where a run stands: each planned stage as done / running / interrupted / failed / pending (``bliss-ray status``).

A stage directory tells its own state: ``_SUCCESS`` (done; ``outputs.json`` has its duration and outputs),
``_RUNNING.json`` (the driver running it, a lease it renews: a lease run out, or a dead pid on this host,
means interrupted),
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

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from bliss_ray import storage
from bliss_ray.config import parse_experiment
from bliss_ray.pipeline import Run

RUNNING, FAILED, SUCCESS = "_RUNNING.json", "_FAILED.json", "_SUCCESS"


LEASE_S = 120.0  # a running marker not renewed for this long belongs to a driver that is gone


class RunningLease:
    """A stage's ``_RUNNING.json`` marker, in the store with the stage (``d``: its location) so that ``status`` on
    any machine sees it, renewed every ``lease_s / 4`` seconds while the stage runs: once it is not renewed for
    ``lease_s`` the driver is gone, wherever it ran, and ``status`` calls the stage interrupted."""

    def __init__(self, d: str | Path, lease_s: float = LEASE_S):
        self.loc, self.lease_s = storage.join(d, RUNNING), lease_s
        self.started, self.stopped = time.time(), threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True, name="bliss-lease")

    def _write(self) -> None:
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started}
        storage.write_json(self.loc, marker | {"renewed": time.time(), "lease_s": self.lease_s})

    def _renew(self) -> None:
        while not self.stopped.wait(self.lease_s / 4):
            with contextlib.suppress(Exception):  # an unreachable store for a moment: the next renewal tries again
                self._write()

    def start(self) -> RunningLease:
        storage.remove(storage.join(storage.parent(self.loc), FAILED))
        self._write()
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the marker stays until ``clear_running`` or ``mark_failed`` replaces it)."""
        self.stopped.set()
        self.thread.join()


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
        canaries = out.get("canaries")
        return (
            f"{out.get('rows_in')} docs → {out.get('seqs')} rows, {_num(out.get('tokens'), ',')} tokens; "
            f"{out.get('rows_quarantined', 0)} quarantined"
            + (f"; {canaries['docs']} canary docs × 3 forms" if canaries else "")
        )
    if kind == "select":
        text = f"{out.get('selected')}/{out.get('pool_size')} rows ({out.get('method')})"
        shares = (_read(storage.join(d, "manifest.json")) or {}).get("domain_share") or {}
        top = sorted(shares.items(), key=lambda kv: -kv[1]["selected"])[:3]
        if top:
            text += "; shares " + ", ".join(f"{k} {v['selected']:.2f} (pool {v['pool']:.2f})" for k, v in top)
        preferred = out.get("canaries", {}).get("prefers_corrupted")
        return text + (f"; prefers corrupted canaries: {', '.join(preferred)}" if preferred else "")
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
        parts = [  # each checkpoint by round and target step: a round has mid-round branches and its end
            f"r{c['round']}@{c['steps']}: ref loss {_num(c.get('reference_loss'))}, "
            f"avg acc {_num(c.get('paper_average'), '.3f')}"
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
            renewed = float(running.get("renewed", running["started"]))
            gone = time.time() - renewed > float(running.get("lease_s", LEASE_S))
            row["state"] = "interrupted" if gone or (here and not _alive(int(running["pid"]))) else "running"
            row["seconds"] = time.time() - float(running["started"])
        elif storage.exists(d):
            row["state"] = "interrupted"  # started before markers existed, or killed between writes
        rows.append(row)
    return rows


def variants_in(run_dir: str | Path) -> list:
    """Every experiment launched into a run root (each stage directory records the one that ran it, and the root the
    last one launched): BLISS and its random baseline share ``runs/demo``, a comparison's variants and seeds theirs.
    In launch order where known, the last-launched last."""
    run_dir = str(run_dir) if storage.is_remote(run_dir) else str(Path(run_dir).resolve())
    recorded = [storage.join(d, "experiment.json") for d in storage.listdir(run_dir, dirs=True)]
    trees = [storage.read_json(loc) for loc in [*recorded, storage.join(run_dir, "experiment.json")]]
    parsed = [parse_experiment(tree) for tree in trees if tree]
    if not parsed:
        raise FileNotFoundError(f"{run_dir} is not a run directory (no experiment.json)")
    return list({e.model_dump_json(): e for e in parsed}.values())  # as parsed: files of older layouts agree


def format_status(run_dir: Path, rows: list[dict], variant: str = "") -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "interrupted", "failed", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"{run_dir}{f' [{variant}]' if variant else ''}: {summary}"]
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
    """Print the status table of ``exp``, else one per experiment launched into ``run_dir`` (``watch``: redraw
    every ``every_s`` seconds until Ctrl-C). Exit code 1 if a stage failed."""
    stream = stream or sys.stdout
    while True:
        tables = [(e, stage_states(run_dir, e)) for e in ([exp] if exp else variants_in(run_dir))]
        named = len(tables) > 1
        text = "\n".join(format_status(run_dir, rows, Run(e, "x").variant if named else "") for e, rows in tables)
        rows = [r for _, rs in tables for r in rs]
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
