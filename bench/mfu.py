"""Model FLOPs utilisation (MFU) of training, scoring and the bilevel outer step.

What: model FLOPs per second ÷ peak, with model FLOPs from the ledger's formulas (``bliss_ray.costs.flops``, paper
convention: forward F = 2·P_mm + 4·L·d·n_layer per token incl. the LM head, training = 3F; scoring = F of the
trunk; the bilevel outer step = the ledger's own op count, ``ledger()``'s "bilevel optimisation" row), with the
attention term counted as the causal kernels compute it (``_attention``: on CPU 75 % of L² at L = 1024, all of
it at L ≤ 512). That MFU is the headline and carries the goal; the one against the ledger's full L² count is
printed beside it (``full-L² count``).

* training steps of Pythia-31M / 160M (and 410M with ``--full``; always on GPU) through ``train_lm``;
* scoring: a batched forward of a score model with a Pythia-31M trunk (what ``Scorer`` runs);
* one BLISS outer step with a Pythia-31M proxy (K = 1, Q = 3); on GPU with a Pythia-410M target (γ > 0).

Peak: on CPU the best fp32 2048² / 4096² matmul rate, re-measured right before every timed call, so each MFU
sample is a ratio of two rates measured back to back under the same machine load (the median is reported): a
CPU MFU is a fraction of the measured fp32 GEMM peak, not of a datasheet number, and every CPU line says so. On
GPU the device's dense bf16 peak from ``bliss_ray.costs.memory.GPU_BF16_PEAK`` (training in bf16 autocast); the
achieved bf16 matmul rate is recorded too. Every model prints ``config._attn_implementation``: training and
scoring must run SDPA, never eager attention, which is much slower on CPU.

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
    """(callable, ledger FLOPs per call, FLOPs per call as the causal kernels run them, the model whose attention
    path to report)."""
    import _workloads as w
    from _attention import uncomputed_flops

    from bliss_ray.models.arch import arch_from_preset

    k, L, B = case["kind"], case["seq_len"], case["batch"]
    arch = arch_from_preset(case["preset"], case["vocab"])
    if k == "train":
        fn, flops, model = w.train_step(case["preset"], case["vocab"], L, B, device, micro=case.get("micro"))
        if case.get("checkpointing_every"):  # per-block activation checkpointing (bench/gpu_bench.py's AC cases)
            model.activation_checkpointing_enable(every_n_layers=case["checkpointing_every"])
        kernel = flops - uncomputed_flops(arch, L, device.type, passes=3, tokens=B * L)
    elif k == "score":
        fn, flops, model = w.score_forward(case["preset"], case["vocab"], L, B, device, bf16=device.type == "cuda")
        kernel = flops - uncomputed_flops(arch, L, device.type, passes=1, tokens=B * L)
        model = model.trunk
    else:
        fn, flops, state = w.bilevel_step(case["preset"], case["target"], case["vocab"], L, B, B, device)
        settings = w.bilevel_settings(case["target"], B, B)
        kernel = w.outer_step_kernel_flops(case["preset"], case["target"], case["vocab"], L, settings, device.type)
        model = state.proxy
    return fn, flops, kernel, model


def measure(case: dict, device, reps: int, peak_fn) -> dict:
    """Warm-up once, then ``reps`` × (peak now, workload now): MFU sample = achieved rate ÷ that peak."""
    import torch
    from _workloads import sync

    fn, flops, kernel_flops, model = build(case, device)
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
    out = {
        **case,
        "attn_implementation": attn,
        "flops_per_call": kernel_flops,  # attention as the causal kernel computes it
        "flops_per_call_full_attention": flops,  # the ledger's count (full L²)
        "seconds": secs,
        "peak_flops": peaks,
        "achieved_flops": kernel_flops / median(secs),
        "mfu": median([kernel_flops / s / p for s, p in zip(secs, peaks, strict=True)]),
        "mfu_full_attention": median([flops / s / p for s, p in zip(secs, peaks, strict=True)]),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del fn, model
    return out


def of_peak(device_type: str) -> str:
    """What an MFU is a fraction of: on CPU the GEMM rate this benchmark measured, not a datasheet peak."""
    return "of the measured fp32 GEMM peak" if device_type == "cpu" else "of the dense bf16 peak"


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
            raise SystemExit(f"no bf16 peak known for '{name}': add it to bliss_ray.costs.memory.GPU_BF16_PEAK")
        measured_peak = _common.gpu_matmul_rate()
        peak_fn, peak_desc = (lambda: peak), f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
        extra = {"gpu": name, "table_peak_flops": peak, "bf16_matmul_flops": measured_peak}
    else:
        peak_fn = lambda: _common.cpu_matmul_peak(reps=2)  # noqa: E731
        peak_desc = f"fp32 GEMM peak measured before each call, {torch.get_num_threads()} threads"
        extra = {"threads": torch.get_num_threads()}
    results, lines = [], []
    for c in cases(device_type, full, quick):
        r = measure(c, device, reps, peak_fn)
        results.append(r)
        mem = f", peak mem {r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else ""
        # the first rate is the ledger's (full-L²) count: ``bliss-ray plan`` divides ledger FLOPs by it
        detail = (
            f"{r['flops_per_call_full_attention'] / median(r['seconds']) / 1e9:,.1f} GFLOP/s by the ledger's full-L² "
            f"count (MFU {r['mfu_full_attention']:.3f}), {r['achieved_flops'] / 1e9:,.1f} as the causal kernel "
            f"computes; peak {median(r['peak_flops']) / 1e9:,.1f}; {median(r['seconds']):.2f}s/call; "
            f"attn={r['attn_implementation']}{mem}"
        )
        lines.append(line(f"MFU {describe(r)} {of_peak(device_type)}", r["mfu"], detail))
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
