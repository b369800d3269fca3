"""Model FLOPs utilisation (MFU) of training, scoring and the bilevel outer step.

What: model FLOPs per second ÷ peak, with model FLOPs from the ledger's formulas (``bliss_ray.flops``, paper
convention: forward F = 2·P_mm + 4·L·d·n_layer per token incl. the LM head, training = 3F; scoring = F of the
trunk; the bilevel outer step = the ledger's own op count, ``ledger()``'s "bilevel optimisation" row):

* training steps of Pythia-31M / 160M (and 410M with ``--full``; always on GPU) through ``train_lm``;
* scoring: a batched forward of a score model with a Pythia-31M trunk (what ``Scorer`` runs);
* one BLISS outer step with a Pythia-31M proxy (K = 1, Q = 3); on GPU with a Pythia-410M target (γ > 0).

Peak: on CPU the best fp32 2048² / 4096² matmul rate, re-measured right before every timed call, so each MFU
sample is a ratio of two rates measured back to back under the same machine load (the median is reported). On
GPU the device's dense bf16 peak from ``_common.GPU_BF16_PEAK`` (training in bf16 autocast); the achieved bf16
matmul rate is recorded too. Every model prints ``config._attn_implementation``: training and scoring must run
SDPA, never eager attention (issue 9: eager costs ~25 % of a 160M step on CPU).

Conditions on CPU: seq_len 1024; training at batch 1 and (the goal case, ≥ 0.80) at one micro-batch of 4
sequences; scoring at batch 4; the outer step at seq_len 256 × batch 1 (the math-attention double backward is
the slow part). GPU: seq_len 1024 everywhere, larger batches (goal ≥ 0.45 for 160M and 410M training).

    .venv/bin/python bench/mfu.py            # 31M + 160M training, scoring, outer step: ~3 min on 2 cores
    .venv/bin/python bench/mfu.py --full     # + 410M training (CPU: ~3 more minutes)
    .venv/bin/python bench/mfu.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse

import _common
from _common import line, median, timed, write_json


def cases(device_type: str, full: bool, quick: bool) -> list[dict]:
    """What to measure: kind, preset, seq_len, batch (and the outer step's proxy/target)."""
    V = 50304  # Pythia's padded vocabulary: the LM head is part of every training FLOP count
    if quick:
        return [
            {"kind": "train", "preset": "pythia-14m", "vocab": V, "seq_len": 256, "batch": 1},
            {"kind": "score", "preset": "pythia-14m", "vocab": V, "seq_len": 256, "batch": 2},
            {"kind": "outer", "preset": "pythia-tiny-proxy", "target": None, "vocab": 8192, "seq_len": 64, "batch": 4},
        ]
    if device_type == "cuda":
        return [
            {"kind": "train", "preset": "pythia-31m", "vocab": V, "seq_len": 1024, "batch": 16},
            {"kind": "train", "preset": "pythia-160m", "vocab": V, "seq_len": 1024, "batch": 16, "goal": 0.45},
            {
                "kind": "train",
                "preset": "pythia-410m",
                "vocab": V,
                "seq_len": 1024,
                "batch": 16,
                "micro": 8,
                "goal": 0.45,
            },
            {"kind": "score", "preset": "pythia-31m", "vocab": V, "seq_len": 1024, "batch": 64},
            {
                "kind": "outer",
                "preset": "pythia-31m",
                "target": "pythia-410m",
                "vocab": V,
                "seq_len": 1024,
                "batch": 4,
            },
        ]
    out = [
        {"kind": "train", "preset": "pythia-31m", "vocab": V, "seq_len": 1024, "batch": 1},
        {"kind": "train", "preset": "pythia-160m", "vocab": V, "seq_len": 1024, "batch": 1},
        # the goal case: a micro-batch of several sequences, as pretraining runs (the paper presets: 16)
        {"kind": "train", "preset": "pythia-160m", "vocab": V, "seq_len": 1024, "batch": 4, "goal": 0.80},
        {"kind": "score", "preset": "pythia-31m", "vocab": V, "seq_len": 1024, "batch": 4},
        {"kind": "outer", "preset": "pythia-31m", "target": None, "vocab": V, "seq_len": 256, "batch": 1},
    ]
    if full:
        out.insert(2, {"kind": "train", "preset": "pythia-410m", "vocab": V, "seq_len": 1024, "batch": 1})
    return out


def build(case: dict, device):
    """(callable, FLOPs per call, the model whose attention path to report)."""
    import _workloads as w

    k = case["kind"]
    if k == "train":
        fn, flops, model = w.train_step(
            case["preset"], case["vocab"], case["seq_len"], case["batch"], device, micro=case.get("micro")
        )
    elif k == "score":
        fn, flops, model = w.score_forward(
            case["preset"], case["vocab"], case["seq_len"], case["batch"], device, bf16=device.type == "cuda"
        )
        model = model.trunk
    else:
        fn, flops, state = w.bilevel_step(
            case["preset"], case["target"], case["vocab"], case["seq_len"], case["batch"], case["batch"], device
        )
        model = state.proxy
    return fn, flops, model


def measure(case: dict, device, reps: int, peak_fn) -> dict:
    """Warm-up once, then ``reps`` × (peak now, workload now): MFU sample = achieved rate ÷ that peak."""
    import torch
    from _workloads import sync

    fn, flops, model = build(case, device)
    attn = model.config._attn_implementation
    if case["kind"] != "outer" and attn == "eager":
        raise AssertionError(f"{case['preset']} {case['kind']} fell back to eager attention")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # warm-up: kernels, thread pools, and on CPU the allocator, whose heap grows over the first two steps
    # (``train.host_memory``) and then serves every step with no page faults, as in a long training run
    for _ in range(2 if device.type == "cpu" else 1):
        fn()
    secs, peaks = [], []
    for _ in range(reps):
        peaks.append(peak_fn())
        secs.append(timed(fn, lambda: sync(device)))
    mfus = [flops / s / p for s, p in zip(secs, peaks, strict=True)]
    out = {
        **case,
        "attn_implementation": attn,
        "flops_per_call": flops,
        "seconds": secs,
        "peak_flops": peaks,
        "achieved_flops": flops / median(secs),
        "mfu": median(mfus),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del fn, model
    return out


def describe(r: dict) -> str:
    shape = f"L={r['seq_len']} B={r['batch']}"
    who = r["preset"] + (f" + {r['target']} target" if r.get("target") else "")
    return f"{r['kind']} {who} {shape}"


def run(device_type: str, full: bool, quick: bool, reps: int, threads: int | None) -> tuple[dict, list[str]]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peak = _common.gpu_peak(name)
        if peak is None:
            raise SystemExit(f"no bf16 peak known for '{name}': add it to _common.GPU_BF16_PEAK")
        measured_peak = _common.gpu_matmul_rate()
        peak_fn, peak_desc = (lambda: peak), f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
        extra = {"gpu": name, "table_peak_flops": peak, "bf16_matmul_flops": measured_peak}
    else:
        peak_fn = lambda: _common.cpu_matmul_peak(reps=2)  # noqa: E731
        peak_desc = f"fp32 matmul peak measured before each call, {torch.get_num_threads()} threads"
        extra = {"threads": torch.get_num_threads()}
    results, lines = [], []
    for c in cases(device_type, full, quick):
        r = measure(c, device, reps, peak_fn)
        results.append(r)
        mem = f", peak mem {r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else ""
        detail = (
            f"{r['achieved_flops'] / 1e9:,.1f} GFLOP/s of {median(r['peak_flops']) / 1e9:,.1f}; "
            f"{median(r['seconds']):.2f}s/call; attn={r['attn_implementation']}{mem}"
        )
        lines.append(line(f"MFU {describe(r)}", r["mfu"], detail))
    return {"peak": peak_desc, "cases": results, **extra}, lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke)")
    p.add_argument("--full", action="store_true", help="also 410M training on CPU")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    payload, lines = run(device, args.full, args.quick, 1 if args.quick else args.reps, args.threads)
    print(f"peak: {payload['peak']}")
    write_json("mfu", {**payload, "lines": lines})
    return payload


if __name__ == "__main__":
    main()
