"""The console's budgets: how soon a Train stage's first progress update reaches the driver, and how many lines a
run prints in a terminal.

What: ``bliss-ray run CONFIG`` (default the tiny pipeline: every stage, a fresh embedded Ray) in a pseudo-terminal
(``script``, as a person sees it). Rank 0's progress reporter stamps when its train function received it (the
workers have started); the driver logs, for the first record of every Train stage, the seconds since that stamp
(``first progress update of …`` in ``<run>/logs/run-*.log``). Goals: every stage's first update within 10 s of
its workers' start on 2 cores; the console output under ~150 lines (the terminal bar redraws in place, so lines
are counted after the last carriage return of each).

    .venv/bin/python bench/console_latency.py                                   # tiny, ~4 min on 2 cores
    .venv/bin/python bench/console_latency.py --results-md bench/RESULTS.md     # and record it there
    .venv/bin/python bench/console_latency.py --make-demo                       # make demo's two runs, ~20 min
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import _common
from _common import REPO, line, write_json

FIRST = re.compile(r"first progress update of (\S+): ([\d.]+) s after its train function started")


def screen_lines(typescript: str) -> int:
    """Lines a person saw: what remains of each line after its last carriage return, empty ones dropped."""
    lines = typescript.replace("\r\n", "\n").split("\n")  # a lone \r is a redraw in place (str.splitlines splits it)
    return sum(1 for raw in lines if raw.rsplit("\r", 1)[-1].strip())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/tiny.yaml")
    p.add_argument("--make-demo", action="store_true", help="what `make demo` runs: demo.yaml, then random")
    p.add_argument("--results-md", type=Path, help="also write the result into this RESULTS.md section")
    p.add_argument("--out", type=Path, help="run root to keep (default: a new temporary directory)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bliss_console_"))
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brl_", dir="/tmp")}
    run = f"{Path(sys.executable).with_name('bliss-ray')} run"
    cmd = f"{run} {args.config} --out {out}"
    if args.make_demo:  # the Makefile's two commands, install excluded
        args.config = "make demo (experiments/demo.yaml, then --set selection.method=random)"
        demo = f"{run} experiments/demo.yaml --out {out}"
        cmd = f"{demo} && {demo} --set selection.method=random"
    typescript = out / "typescript"
    proc = subprocess.run(["script", "-q", "-e", "-f", "-c", cmd, str(typescript)], cwd=REPO, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed; see {typescript}")
    logs = "".join(p.read_text() for p in sorted(out.glob("*/logs/run-*.log")))
    delays = [(stage, float(s)) for stage, s in FIRST.findall(logs)]  # every run's stages (make demo: two runs)
    if not delays:
        raise RuntimeError(f"no 'first progress update' line in the run's logs under {out}")
    n_lines = screen_lines(typescript.read_bytes().decode(errors="replace"))
    lines = [
        line("first progress update after the workers start, worst stage [s]", max(s for _, s in delays), "goal ≤ 10"),
        *(line(f"  {stage} [s]", s, fmt="{:.1f}") for stage, s in delays),
        line("console lines in a terminal", n_lines, f"{args.config}; goal < ~150 for make demo", "{:.0f}"),
    ]
    result = {"first_update_s": delays, "console_lines": n_lines, "config": args.config}
    write_json("console_latency", result)
    if args.results_md:
        _common.record_lines(args.results_md, "console", lines)
    return result


if __name__ == "__main__":
    main()
