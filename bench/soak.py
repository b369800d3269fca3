"""Soak test (not in CI): the whole pipeline with Train workers SIGKILLed N times, every output checked.

What: one uninterrupted run of an experiment (default ``experiments/tiny.yaml``: every stage of the demo on a
quarter of the bundled pool; ``--config experiments/demo.yaml`` for the real demo) and ``ceil(N / S)`` runs of
the same experiment and seed in fresh directories, where S is the number of Ray Train stages (warm-up, every
round's pretraining, every round's bilevel). In each interrupted run a seeded random choice of stages gets one
``BLISS_FAULTS`` kill each (``stages/_faults.py``: SIGKILL of rank 0 when it fetches the batches of a random
step, decay branch included), set only while that stage runs; Ray Train restarts the worker group from the last
registered checkpoint.

Checks, for every run: every stage has ``_SUCCESS``; tokenize rows in = packed + quarantined; score rows in =
scored + quarantined; each selection has exactly ``num_selected(pool, keep_frac)`` unique rows; final step counts
are exact (warm-up and pretraining ``train_state.pt``, bilevel ``final_step``) and every metrics history holds
each step exactly once; every planned kill fired (its marker exists). Against the uninterrupted run: identical
selections, the same scores, and the same final weights of the target, proxy and score models (rtol 1e-5: a
resumed run replays the same batches with the same ops).

Cost: tiny ≈ 2–3 min per pipeline run on 2 quiet cores, so the default (N = 3: baseline + 1 interrupted run)
takes ≈ 5–7 min; the demo config ≈ 8 min per run.

    .venv/bin/python bench/soak.py                       # N = 3 kills on tiny.yaml
    .venv/bin/python bench/soak.py --kills 8 --seed 1    # 2 interrupted runs
    .venv/bin/python bench/soak.py --config experiments/demo.yaml --kills 4
    .venv/bin/python bench/soak.py --quick               # 1 kill, stops after the first selection round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
from _common import REPO, write_json


def kill_points(run) -> dict[str, range]:
    """Ray Train stages of the plan and the step indices their ``_faults.at_step`` hook sees."""
    exp, out = run.exp, {}
    for st in run.stages:
        if st.kind == "warmup":
            out[st.key] = range(1, exp.warmup.steps)
        elif st.kind == "pretrain":
            p = exp.pretrain
            out[st.key] = range(st.round * p.steps + 1, (st.round + 1) * p.steps + p.decay_steps)
        elif st.kind == "bilevel":
            b = exp.bilevel
            out[st.key] = range(1, b.outer_steps * (b.inner_steps + (0 if b.reuse_inner_batch else 1)))
    return out


def runner_with_kills(kills: dict[str, dict]):
    """A pipeline runner that sets BLISS_FAULTS only while the stage it targets runs (run_config copies the
    variable into the Train workers' runtime env when the stage starts)."""
    from bliss_ray.stages.steps import run_stage

    def runner(run, st, d):
        if st.key in kills:
            os.environ["BLISS_FAULTS"] = json.dumps({"kill": kills[st.key]})
        try:
            return run_stage(run, st, d)
        finally:
            os.environ.pop("BLISS_FAULTS", None)

    return runner


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check_run(run, until: str | None) -> list[str]:
    """Every invariant of one finished run; returns the failures (empty = all good)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch

    from bliss_ray.selection.rules import num_selected

    exp, bad = run.exp, []
    for st in run.select_until(until):
        d = run.dir(st.key)
        if not (d / "_SUCCESS").exists():
            bad.append(f"{st.key}: no _SUCCESS")
            continue
        o = run.outputs(st.key)
        if st.kind == "tokenize" and o["rows_in"] != o["docs_packed"] + o["rows_quarantined"]:
            bad.append(f"tokenize: rows in {o['rows_in']} != packed + quarantined")
        if st.kind == "score":
            if o["rows_in"] != o["rows_scored"] + o["rows_quarantined"]:
                bad.append(f"{st.key}: rows in {o['rows_in']} != scored + quarantined")
            ids = pads.dataset(str(d / "scores"), partitioning="hive").to_table(columns=["row_id"])["row_id"]
            if len(np.unique(ids.to_numpy())) != o["rows_in"]:
                bad.append(f"{st.key}: rows not scored exactly once")
        if st.kind == "select":
            sel = pq.read_table(d / "selected.parquet")["row_id"].to_numpy()
            k = num_selected(o["pool_size"], exp.selection.keep_frac)
            if not (len(sel) == o["selected"] == k == len(np.unique(sel))):
                bad.append(f"{st.key}: {len(sel)} rows selected, expected {k} unique")
        if st.kind in ("warmup", "pretrain"):
            t = exp.warmup if st.kind == "warmup" else exp.pretrain
            start = 0 if st.kind == "warmup" else st.round * t.steps
            step = torch.load(d / "state" / "train_state.pt", weights_only=True)["step"]
            if step != start + t.steps:
                bad.append(f"{st.key}: final step {step}, expected {start + t.steps}")
            stable = [m["step"] for m in _metrics(d / "metrics.jsonl") if m.get("phase", "stable") == "stable"]
            if stable != list(range(start + 1, start + t.steps + 1)):
                bad.append(f"{st.key}: metrics steps are not each step exactly once")
        if st.kind == "bilevel":
            steps = [m["step"] for m in _metrics(d / "metrics.jsonl")]
            if o["final_step"] != exp.bilevel.outer_steps or steps != list(range(1, exp.bilevel.outer_steps + 1)):
                bad.append(f"{st.key}: final step {o['final_step']} / metrics steps not exactly 1..T")
    return bad


def _weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def compare_runs(base, other, until: str | None, rtol: float) -> tuple[list[str], float]:
    """Outputs that must equal the uninterrupted run's. Returns (differences, max abs weight difference)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    bad, worst = [], 0.0
    for st in base.select_until(until):
        a, b = base.dir(st.key), other.dir(st.key)
        sel = "selected.parquet"
        if st.kind == "select" and not pq.read_table(a / sel).equals(pq.read_table(b / sel)):
            bad.append(f"{st.key}: selection differs")
        if st.kind == "score":
            ta, tb = (
                pads.dataset(str(x / "scores"), partitioning="hive").to_table(["row_id", "logit"]) for x in (a, b)
            )
            ta, tb = ta.sort_by("row_id"), tb.sort_by("row_id")
            if not np.allclose(ta["logit"].to_numpy(), tb["logit"].to_numpy(), rtol=rtol, atol=1e-6):
                bad.append(f"{st.key}: scores differ")
        files = {
            "warmup": ["state/model/model.safetensors"],
            "pretrain": ["state/model/model.safetensors", "decay/model.safetensors"],
            "bilevel": ["score_model/model.safetensors", "proxy/model.safetensors"],
        }.get(st.kind, [])
        for f in files:
            if not (a / f).exists():
                continue
            wa, wb = _weights(a / f), _weights(b / f)
            for k in wa:
                worst = max(worst, float(np.abs(wa[k] - wb[k]).max()))
                if not np.allclose(wa[k], wb[k], rtol=rtol, atol=1e-7):
                    bad.append(f"{st.key}/{f}: tensor {k} differs")
                    break
    return bad, worst


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/tiny.yaml")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value overrides (as bliss-ray run)")
    p.add_argument("--kills", type=int, default=3, help="N: total worker kills, at most one per stage per run")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    p.add_argument("--until", default=None, help="last stage to run (default: the whole plan)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--quick", action="store_true", help="1 kill, stop after r1.select")
    p.add_argument("--results-md", default=None, help="record the outcome in this RESULTS.md's soak section")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.until = 1, args.until or "r1.select"

    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run
    from bliss_ray.stages._ray import ensure_ray
    from bliss_ray.stages.executor import execute

    exp = load_experiment(REPO / args.config, args.set)
    ensure_ray(exp.resources, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    base = Run(exp, work / "baseline")
    execute(base, until=args.until)
    base_s = time.perf_counter() - t0
    points = {k: v for k, v in kill_points(base).items() if k in {s.key for s in base.select_until(args.until)}}
    failures = [f"baseline: {x}" for x in check_run(base, args.until)]
    runs, left = [], args.kills
    for i in range(math.ceil(args.kills / max(1, len(points)))):
        chosen = rng.sample(sorted(points), min(left, len(points)))
        left -= len(chosen)
        kills = {
            k: {"stage": k, "step": rng.choice(points[k]), "rank": 0, "once": str(work / f"k{i}-{k}")} for k in chosen
        }
        t1 = time.perf_counter()
        run = Run(exp, work / f"killed{i}")
        execute(run, until=args.until, runner=runner_with_kills(kills))
        seconds = time.perf_counter() - t1
        fired = [k for k, v in kills.items() if Path(v["once"]).exists()]
        bad = check_run(run, args.until) + [f"kill in {k} never fired" for k in kills if k not in fired]
        diff, worst = compare_runs(base, run, args.until, args.rtol)
        failures += [f"killed{i}: {x}" for x in bad + diff]
        runs.append({"kills": kills, "fired": fired, "seconds": seconds, "max_abs_weight_diff": worst})
        where = ", ".join(f"{k}@{v['step']}" for k, v in kills.items())
        print(f"run killed{i}: {len(fired)}/{len(kills)} kills fired ({where}); {seconds:.0f}s; max |Δw| {worst:.2e}")
    total = time.perf_counter() - t0
    status = "PASS" if not failures else "FAIL"
    n_fired = sum(len(r["fired"]) for r in runs)
    print(
        f"soak {status}: {n_fired} worker kills over {len(runs)} run(s) of {args.config}; "
        f"baseline {base_s:.0f}s, total {total:.0f}s"
    )
    for f in failures:
        print("  " + f)
    result = {
        "status": status,
        "config": args.config,
        "overrides": args.set,
        "kills_fired": n_fired,
        "runs": runs,
        "baseline_s": base_s,
        "total_s": total,
        "failures": failures,
        "lines": [f"soak {status}: {n_fired} kills, {len(runs)} interrupted run(s), {total:.0f}s total"],
    }
    path = write_json("soak", result)
    if args.results_md:
        body = json.loads(path.read_text())
        kills = "; ".join(", ".join(f"{k}@{v['step']}" for k, v in r["kills"].items()) for r in runs)
        text = (
            f"**{status}** — {n_fired} Train-worker SIGKILLs ({kills}) over {len(runs)} interrupted run(s) of "
            f"`{args.config}` {' '.join(args.set)}; every output checked and equal to the uninterrupted run "
            f"(max |Δw| {max((r['max_abs_weight_diff'] for r in runs), default=0):.1e}). Baseline run "
            f"{base_s:.0f} s, total {total:.0f} s on {body['machine']['cores']} cores ({body['machine']['cpu']}), "
            f"{body['machine']['date']}. Command: `{body['command']}`."
        )
        if failures:
            text += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures)
        _common.set_section(Path(args.results_md), "soak", text, "Soak (bench/soak.py, not in make bench)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
