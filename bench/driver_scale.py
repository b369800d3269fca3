"""A remote run's driver as the pool grows: its store traffic, peak RSS and wall time for pool ×1, ×4 and ×16.

What: the tiny experiment with its run root in a local S3-compatible server (moto in this process, 127.0.0.1
only), a synthetic packed pool of ``3 × scale`` files and a logit per row planted where the tokenize and score
stages put them (``bliss_ray.testing.plant_scored_pool``), then round 1's select stage and the array its
pretraining reads, as the executor runs them, in a fresh driver process with its own Ray. The driver's bytes are
counted at the storage layer (``storage.bytes_moved``), its peak RSS is ``VmHWM``; the tasks' output sizes are
read from the store. Prints each scale's numbers and the ratio ×16 ÷ ×1 (goal: 1.0 for the driver's bytes and
RSS, while the tasks' output grows ~16×), and draws them (bench/driver_scale.png, shown in RESULTS.md).

    .venv/bin/python bench/driver_scale.py                                   # ~2 min on 2 cores
    .venv/bin/python bench/driver_scale.py --results-md bench/RESULTS.md    # and record it there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import REPO, line, write_json

from bliss_ray import storage
from bliss_ray.config import load_experiment
from bliss_ray.pipeline import Run
from bliss_ray.stages.executor import select_and_share
from bliss_ray.testing import local_s3_bucket, plant_scored_pool

SCALES = (1, 4, 16)
ROWS_PER_FILE = 4000
FIGURE = REPO / "bench" / "driver_scale.png"


def driver(out: str) -> dict:
    """The driver's part, in this (child) process: select round 1 and build its pretraining array."""
    ray = _common.start_ray()
    run = Run(load_experiment(REPO / "experiments" / "tiny.yaml"), out)
    t0 = time.perf_counter()
    _, data, _ = select_and_share(run, 1)
    wall = time.perf_counter() - t0
    ray.shutdown()
    tasks = {"selected": storage.size(run.uri("r1.select", "selected.parquet")), "data": storage.size(data)}
    return storage.bytes_moved() | {"peak_rss_mb": _common.peak_rss_mb(), "wall_s": wall, "task_bytes": tasks}


def measure(bucket: str, scale: int) -> dict:
    """Plant a pool of ``3 × scale`` files, then run the driver's part in a fresh process."""
    out = storage.join(bucket, f"pool_x{scale}")
    plant_scored_pool(Run(load_experiment(REPO / "experiments" / "tiny.yaml"), out), 3 * scale, ROWS_PER_FILE)
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="brd_", dir="/tmp")}
    env |= {"BLISS_CACHE_DIR": tempfile.mkdtemp(prefix="bliss_cache_")}
    cmd = [sys.executable, __file__, "--driver", out]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"driver for ×{scale} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: dict[int, dict], path: Path) -> None:
    xs = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {
        "driver bytes moved": [results[s].get("read", 0) + results[s].get("written", 0) for s in xs],
        "driver peak RSS": [results[s]["peak_rss_mb"] * 2**20 for s in xs],
        "tasks' output (selection + array)": [sum(results[s]["task_bytes"].values()) for s in xs],
    }
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="pool size (× the smallest)", ylabel="bytes")
    ax.set_xticks(xs, [f"×{s}" for s in xs])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results-md", type=Path, help="also write the result into this RESULTS.md section")
    p.add_argument("--driver", help=argparse.SUPPRESS)  # the child process: the driver's part on this run root
    args = p.parse_args(argv)
    if args.driver:
        print(json.dumps(driver(args.driver)))
        return {}
    with local_s3_bucket() as bucket:
        results = {s: measure(bucket, s) for s in SCALES}
    lines = []
    for s, r in results.items():
        moved = r.get("read", 0) + r.get("written", 0)
        detail = f"peak RSS {r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.1f} s, tasks wrote {r['task_bytes']}"
        lines.append(line(f"pool ×{s} ({3 * s * ROWS_PER_FILE} rows): driver bytes moved", moved, detail, "{:.0f}"))
    first, last = results[SCALES[0]], results[SCALES[-1]]

    def ratio(f) -> float:
        return f(last) / f(first)

    lines += [
        line("driver bytes moved, ×16 ÷ ×1", ratio(lambda r: r.get("read", 0) + r.get("written", 0)), "goal 1.0"),
        line("driver peak RSS, ×16 ÷ ×1", ratio(lambda r: r["peak_rss_mb"]), "goal 1.0"),
        line("tasks' output bytes, ×16 ÷ ×1", ratio(lambda r: sum(r["task_bytes"].values())), "grows with the pool"),
        line("wall, ×16 ÷ ×1", ratio(lambda r: r["wall_s"]), "select + array build, tasks included"),
    ]
    plot(results, FIGURE)
    write_json("driver_scale", {"scales": results})
    if args.results_md:
        _common.record_lines(args.results_md, "driver_scale", lines, FIGURE.name)
    return results


if __name__ == "__main__":
    main()
