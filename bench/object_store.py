"""The tiny pipeline with its run root in an object store vs on local disk: wall-time ratio.

What: ``bliss-ray run experiments/tiny.yaml`` (every stage, one round, a fresh embedded Ray per run, as a user
runs it) with ``--out s3://…`` on a local S3-compatible server (moto in this process, 127.0.0.1 only; no network)
against the same command with a local ``--out``. Runs alternate (local, s3, s3, local, ...) so the machine's
load hits both alike; the ratio is the median of the per-pair ratios. Goal ≤ 1.15. A local S3 server measures
what the storage layer adds (uploads, node-cache copies, markers, listing), not a real bucket's latency.

    .venv/bin/python bench/object_store.py                                  # 2 pairs, ~12 min on 2 cores
    .venv/bin/python bench/object_store.py --pairs 1 --results-md bench/RESULTS.md   # and record it there
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import REPO, alternate, line, median, paired_ratio, write_json

from bliss_ray import storage
from bliss_ray.testing import local_s3_bucket


def run_pipeline(out: str) -> float:
    """One ``bliss-ray run`` of the tiny pipeline into ``out``, in its own process and Ray; wall seconds."""
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="bro_", dir="/tmp"), "HF_HUB_OFFLINE": "1"}
    env |= {"BLISS_CACHE_DIR": tempfile.mkdtemp(prefix="bliss_cache_")}  # each run starts with an empty node cache
    cmd = [str(Path(sys.executable).with_name("bliss-ray")), "run", "experiments/tiny.yaml", "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--results-md", type=Path, help="also write the result into this RESULTS.md section")
    args = p.parse_args(argv)
    n = {"local": 0, "s3": 0}
    with local_s3_bucket() as bucket, tempfile.TemporaryDirectory() as local:

        def case(kind: str) -> float:
            n[kind] += 1  # a fresh run root each time: a reused one would skip every stage
            return run_pipeline(
                f"{local}/runs{n[kind]}" if kind == "local" else storage.join(bucket, f"runs{n[kind]}")
            )

        times = alternate({"local": lambda: case("local"), "s3": lambda: case("s3")}, args.pairs)
    ratio = paired_ratio(times["s3"], times["local"])
    lines = [
        line("tiny pipeline wall, --out s3:// ÷ local --out", ratio, "goal ≤ 1.15; median of paired runs"),
        line("tiny pipeline wall, local --out [s]", median(times["local"]), str(times["local"]), "{:.1f}"),
        line("tiny pipeline wall, --out s3:// (local S3 server) [s]", median(times["s3"]), str(times["s3"]), "{:.1f}"),
    ]
    result = {"ratio": ratio, "times_s": times, "pairs": len(times["s3"])}
    write_json("object_store", result)
    if args.results_md:
        _common.record_lines(args.results_md, "object_store", lines)
    return result


if __name__ == "__main__":
    main()
