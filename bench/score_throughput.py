"""Ray Data scoring stage vs a bare PyTorch loop: rows/s over the same shard, same model, same threads.

What: the packed bundled pool (the demo's BPE, 128-token rows) scored with a saved score model whose trunk is
the demo's proxy (``pythia-tiny-proxy``; ``--arch`` for another)

* bare: ``bliss_ray.selection.scoring.Scorer`` called in this process on blocks of ``4 × batch_seqs`` rows read with
  pyarrow, outputs written as one parquet per input file (what a user without Ray would do);
* Ray: ``bliss_ray.stages.score.score_pool`` — read_parquet with the shard filter fused in → repartition (few
  files) → ``map_batches(Scorer)`` on an ``ActorPoolStrategy`` of ``--actors`` actors → partitioned
  ``write_parquet`` → per-file validation.

Threads match: the stage gives each actor ``int(2 × data_actor_cpus)`` torch threads, so we set
``data_actor_cpus = threads / 2`` (1 actor × 1 thread, ``data_actor_cpus`` = 0.5 as in the demo, against 1
thread in the bare loop by default). Cores match too: the whole benchmark — this process, and every Ray
daemon and worker (``pin_cores``) — runs on the same ``--cores`` cores (default: as many as ``--threads``).
Without that the stage's read, filter and write tasks, actor start, raylet and GCS would run on the machine's
other core while the bare loop had one: a comparison of 2 cores against 1 (the stage's fixed start is CPU work,
not waiting).

How: each side runs on the BIG input (``--files`` files) and a SMALL one (1/32 of one file: ~140 rows, nearly
all fixed cost), the four runs alternating. Headline: rows/s of the stage ÷ rows/s of the bare loop on the big
input (median of back-to-back pairs; ``ray.init`` excluded, once per driver), goal ≥ 0.90. Also: the
steady-state ratio with fixed costs removed (time = fixed + rows / rate: rate = Δrows / Δ median time), the
pipeline's fixed overhead (the intercept: actor start, model load, planning, validation) beyond the bare
loop's, and rows per CPU-second of the whole process tree (``_common.TreeCpu``: robust to other users' load,
blind to idle waits) for each side and their ratio.

Where Ray's extra CPU goes: the big Ray run's CPU-seconds by process (``TreeCpu.by_role``: the driver, the
scoring actor, the read / shard-filter / write task workers, raylet, GCS, ...) beside the bare loop's, and Ray
Data's own per-operator remote CPU time (``ds.stats()``, which the stage saves as ``ray_data_stats.txt``). What
such a breakdown has shown is in docs/design.md, "Where the scoring stage's CPU goes".

Threads: 1 by default (``--threads``), the same on both sides. On a 2-core machine shared with other users, a
2-thread OpenMP pool spin-waits through its partner's lost time slices: a bare step then takes longer and burns
several times the CPU of a 1-thread step, which buries any orchestration overhead in scheduling noise.

    .venv/bin/python bench/score_throughput.py           # 2 files × 2 reps, ~3 min on 2 cores
    .venv/bin/python bench/score_throughput.py --quick   # 1 file, 1 rep
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import _common
import _fixtures
from _common import alternate, line, median, paired_ratio, write_json


def bare_score(files: list[str], shard, model_dir: Path, args, out: Path) -> tuple[float, int]:
    """Scorer in-process over the same rows (same shard), writing the same columns. Returns (seconds, rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bliss_ray.data.packing import shard_of
    from bliss_ray.data.tokens import read_token_table, tokens_of
    from bliss_ray.selection.scoring import Scorer

    t0 = time.perf_counter()
    scorer = Scorer(str(model_dir), batch_seqs=args.batch_seqs, threads=args.threads)
    out.mkdir(parents=True)
    rows = 0
    for i, f in enumerate(files):
        table = read_token_table(f, ["row_id", "input_ids"])
        if shard is not None:
            table = table.filter(pa.array(shard_of(table.column("row_id").to_numpy(), shard[1]) == shard[0]))
        parts = []
        block = 4 * args.batch_seqs  # the stage's map_batches batch_size
        for s in range(0, table.num_rows, block):
            chunk = table.slice(s, block)
            parts.append(scorer({"row_id": chunk.column("row_id").to_numpy(), "input_ids": tokens_of(chunk)}))
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pq.write_table(pa.table(cols), out / f"{i:05d}.parquet")
        rows += len(cols["row_id"])
    return time.perf_counter() - t0, rows


def ray_score(files: list[str], shard, model_dir: Path, args, out: Path) -> tuple[float, int]:
    from bliss_ray.config import Experiment, ResourcesConfig, ScoreConfig
    from bliss_ray.stages.score import score_pool

    exp = Experiment(
        name="bench",
        score=ScoreConfig(batch_seqs=args.batch_seqs),
        resources=ResourcesConfig(data_actors=(args.actors, args.actors), data_actor_cpus=args.threads / 2),
    )
    t0 = time.perf_counter()
    m = score_pool(exp, model_dir, files, shard, out)  # a fresh out dir: a reused one would skip done files
    seconds = time.perf_counter() - t0
    assert m["rows_scored_this_run"] == m["rows_in"] == m["rows_scored"] + m["rows_quarantined"], m
    return seconds, m["rows_in"]


def operator_cpu(stats: str) -> dict[str, float]:
    """Remote CPU seconds per Ray Data operator, from ``ds.stats()`` text (``Operator N name: ...`` followed by
    ``* Remote cpu time: ... total``)."""
    import re

    out, name = {}, None
    for row in stats.splitlines():
        if m := re.match(r"Operator \d+ (.+?): ", row):
            name = m.group(1)
        elif name and (m := re.search(r"Remote cpu time: .*?([\d.]+)(ms|s|us) total", row)):
            out[name] = float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m.group(2)]
    return out


def pin_cores(n: int) -> list[int]:
    """Restrict this process and all its descendants — after ``ray.init``, Ray's daemons and workers; the raylet
    passes its affinity on to the workers it starts later — to the first ``n`` of this process's cores. (Pinned
    before ``ray.init``, a 1-core Ray start can time out on a loaded machine.)"""
    import os

    import psutil

    cores = sorted(os.sched_getaffinity(0))[:n]
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.cpu_affinity(cores)
    return cores


def unpinned(cores: list[int]) -> list[str]:
    """Descendants now running with another affinity than ``cores`` (a check that the pinning held)."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if sorted(proc.cpu_affinity()) != cores:
                out.append(proc.name())
    return out


def _top_roles(roles: dict[str, float], n: int = 6) -> str:
    top = sorted(roles.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:.1f}" for k, v in top) + (f", {len(roles) - n} more" if len(roles) > n else "")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 file, 1 rep (smoke)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--files", type=int, default=2, help="bundled pool files in the big input (~4.6k rows each)")
    p.add_argument("--arch", default="pythia-tiny-proxy")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-seqs", type=int, default=64, help="score.batch_seqs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="cores for both sides, Ray's daemons and workers too (default: --threads)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.files = 1, 1

    files = _fixtures.packed_pool(args.seq_len, args.vocab, n_files=args.files)
    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    model_dir = _fixtures.save_score_model(args.arch, args.vocab, args.seq_len, tmp / "score_model")
    t0 = time.perf_counter()
    _common.start_ray()
    ray_init_s = time.perf_counter() - t0
    cores = pin_cores(args.cores or args.threads)

    inputs = {"small": (files[:1], (0, 32)), "big": (files, None)}
    rows: dict[str, int] = {}
    cpu: dict[str, list[float]] = {}
    by_role: dict[str, dict[str, float]] = {}  # the last big run of each side
    started: dict[str, int] = {}  # processes it started
    counter = iter(range(10**6))
    ray_stats = ""

    def case(side, size):
        fn = bare_score if side == "bare" else ray_score

        def go():
            nonlocal ray_stats
            out = tmp / f"{side}-{size}-{next(counter)}"
            with _common.TreeCpu() as meter:  # this process + Ray's daemons and workers
                secs, n = fn(*inputs[size], model_dir, args, out)
            rows[size] = n
            cpu.setdefault(f"{side}_{size}", []).append(meter.seconds)
            if size == "big":
                by_role[side], started[side] = meter.by_role, meter.started
                ray_stats = (out / "ray_data_stats.txt").read_text() if side == "ray" else ray_stats
            return secs

        return go

    t = alternate({f"{s}_{z}": case(s, z) for s in ("bare", "ray") for z in ("small", "big")}, args.reps)
    if escaped := unpinned(cores):  # Ray started a process with other cores: the comparison is not like for like
        raise AssertionError(f"processes outside cores {cores}: {escaped}")
    e2e = paired_ratio(t["bare_big"], t["ray_big"])  # rows/s ratio = inverse time ratio (same rows)
    cpu_ratio = paired_ratio(cpu["bare_big"], cpu["ray_big"])  # rows per CPU-second, Ray ÷ bare
    rows_per_cpu_s = {s: rows["big"] / median(cpu[f"{s}_big"]) for s in ("bare", "ray")}
    dn = rows["big"] - rows["small"]
    med = {k: median(v) for k, v in t.items()}
    rate = {s: dn / (med[f"{s}_big"] - med[f"{s}_small"]) for s in ("bare", "ray")}
    fixed = {s: med[f"{s}_small"] - rows["small"] / rate[s] for s in ("bare", "ray")}
    steady = rate["ray"] / rate["bare"]
    overhead = fixed["ray"] - fixed["bare"]
    if min(rate.values()) <= 0:
        print("WARNING: a small input took longer than the big one: machine load swamps the steady-state estimate")
    cond = (
        f"{args.arch} trunk, {args.seq_len}-token rows, batch {args.batch_seqs}, {args.threads} threads, "
        f"{args.actors} actor(s), {len(cores)} core(s) for all, {rows['big']} rows; {args.reps} alternating reps"
    )
    print(
        f"rows/s on {rows['big']} rows: bare {rows['big'] / med['bare_big']:,.0f} ({med['bare_big']:.1f}s), "
        f"Ray Data {rows['big'] / med['ray_big']:,.0f} ({med['ray_big']:.1f}s); CPU-seconds: bare "
        f"{median(cpu['bare_big']):.1f}, Ray {median(cpu['ray_big']):.1f}"
    )
    lines = [
        line("score_throughput ratio (Ray Data / bare rows/s)", e2e, cond + "; ray.init excluded; goal >= 0.90"),
        line("score_throughput steady-state ratio (fixed costs removed)", steady, f"small input {rows['small']} rows"),
        line("rows per CPU-second, bare loop", rows_per_cpu_s["bare"], "whole process tree", "{:.0f}"),
        line("rows per CPU-second, Ray Data stage", rows_per_cpu_s["ray"], "whole process tree", "{:.0f}"),
        line("score_throughput CPU ratio (rows per CPU-second, Ray / bare)", cpu_ratio, "whole process tree"),
        line(
            "Ray Data stage CPU-seconds by process [s]",
            median(cpu["ray_big"]),
            f"big input, last rep, {started['ray']} processes started: {_top_roles(by_role['ray'])}; bare loop: "
            + _top_roles(by_role["bare"]),
            "{:.1f}",
        ),
        line(
            "Ray Data remote CPU by operator [s]",
            sum(operator_cpu(ray_stats).values()),
            "ds.stats(): " + ", ".join(f"{k} {v:.1f}" for k, v in operator_cpu(ray_stats).items()),
            "{:.1f}",
        ),
        line("Ray Data scoring fixed overhead [s]", overhead, "intercept of time vs rows, minus bare's", "{:.1f}"),
        line("ray.init [s] (excluded)", ray_init_s, "", "{:.1f}"),
    ]
    result = {
        "ratio": e2e,
        "ratio_steady_state": steady,
        "ratio_cpu": cpu_ratio,
        "rows_per_cpu_s": rows_per_cpu_s,
        "cpu_seconds_by_process": by_role,
        "processes_started": started,
        "ray_data_operator_cpu_s": operator_cpu(ray_stats),
        "ray_data_stats": ray_stats,
        "cores": cores,
        "rows_per_s_steady": rate,
        "fixed_overhead_s": overhead,
        "fixed_s": fixed,
        "seconds": t,
        "cpu_seconds": cpu,
        "rows": rows,
        "ray_init_s": ray_init_s,
        "conditions": cond,
        "lines": lines,
    }
    write_json("score_throughput", result)
    return result


if __name__ == "__main__":
    main()
