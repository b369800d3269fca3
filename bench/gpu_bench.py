"""GPU runbook benchmark: MFU and peak memory of 160M/410M/1B training in bf16, with and without activation
checkpointing, beside the memory planner's estimate; one bilevel outer step with a 31M proxy and a 410M target
(time, peak memory), and scoring throughput — on the pure PyTorch layer only.

Runs on GPU machines that have torch, transformers, pyarrow, pandas and numpy but NO ray, optuna, pydantic or
lm-eval and no network: it imports only ``bliss_ray.models``, ``bliss_ray.bilevel``, ``bliss_ray.train``,
``bliss_ray.selection.scoring``, ``bliss_ray.costs.flops``, ``bliss_ray.costs.memory`` (and
``bliss_ray.data.tokens`` via them), and fails if any forbidden module was imported anyway
(``forbidden_modules_loaded`` in the JSON). Start it with ``bench/gpu.sh``.

What and how:

* training MFU (``bench/mfu.py``'s measurement, bf16 autocast, fused AdamW, SDPA attention, seq_len 1024): model
  FLOPs per second by the ledger (3 × forward, paper convention; attention counted as the causal kernels compute
  it, ``bench/_attention.py``, the full-L² MFU recorded beside it) ÷ the device's dense bf16 peak (table in
  ``bliss_ray.costs.memory.GPU_BF16_PEAK``, by ``torch.cuda.get_device_name()``); the achieved bf16 matmul rate
  is recorded; every case prints ``torch.cuda.max_memory_allocated`` beside
  ``bliss_ray.costs.memory.train_step``'s estimate for one worker (1 GPU: no DDP buckets; FSDP's sharding needs
  several GPUs, so it is not measured here), and the ledger-count MFU that ``bliss-ray plan`` reads back from the
  RESULTS.md section (with the planner's device type);
* one ``outer_step`` (K = 1, Q = 3, γ = 0.01 with the 410M target for the KL term), 4 × 1024 tokens: median
  seconds, peak allocated memory, MFU by the ledger's op count. It runs in fp32 (no autocast in the loop) and
  the HVPs use the math attention path, so expect it far below training;
* scoring: ``bliss_ray.selection.scoring.Scorer`` on a saved score model (31M trunk), bf16 and fp32, rows/s and MFU.

Goal: ≥ 45 % MFU for 160M/410M training on an H100. ``gpu.sh`` stops it after 480 s (a short device lease), and
the JSON is written only at the end.

    bash bench/gpu.sh                   # on the GPU machine; writes bench/out/gpu_bench.json, fills RESULTS.md
    bash bench/gpu.sh --cpu             # tiny CPU smoke run, seconds (the test suite runs this)
    PYTHONPATH=. python bench/gpu_bench.py --cpu --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when run via runpy
import _common  # first: sets the offline environment before transformers is imported
from _common import line, median, timed, write_json

FORBIDDEN = ("ray", "pydantic", "optuna", "lm_eval")


def plan(cpu: bool) -> dict:
    """Shapes: the real ones on GPU; tiny ones (same code paths) for the CPU smoke run."""
    if cpu:
        return {
            "train": [
                {"kind": "train", "preset": "pythia-micro", "vocab": 512, "seq_len": 64, "batch": 4},
                {"kind": "train", "preset": "pythia-micro", "vocab": 512, "seq_len": 64, "batch": 4, "ac": 1},
            ],
            "outer": {
                "preset": "pythia-micro",
                "target": "pythia-tiny-proxy",
                "vocab": 512,
                "seq_len": 64,
                "batch": 4,
            },
            "score": {"preset": "pythia-micro", "vocab": 512, "seq_len": 64, "rows": 32, "batch_seqs": 16},
            "reps": 1,
        }
    V = 50304
    return {
        # ac: transformers' every_n_layers (1 = every block); 2 micro-batches per step, as the presets accumulate
        "train": [
            {"kind": "train", "preset": p, "vocab": V, "seq_len": 1024, "batch": 32, "micro": 16, "ac": ac}
            for p, ac in (
                ("pythia-160m", 0),
                ("pythia-160m", 1),
                ("pythia-410m", 0),
                ("pythia-410m", 2),
                ("pythia-410m", 1),
                ("pythia-1b", 0),
                ("pythia-1b", 1),
            )
        ],
        "outer": {"preset": "pythia-31m", "target": "pythia-410m", "vocab": V, "seq_len": 1024, "batch": 4},
        "score": {"preset": "pythia-31m", "vocab": V, "seq_len": 1024, "rows": 8192, "batch_seqs": 128},
        "reps": 10,
    }


def planned_gib(c: dict, device) -> float:
    """``bliss_ray.costs.memory``'s peak for this case on one worker, in GiB (what ``bliss-ray plan`` would say)."""
    from bliss_ray.costs.memory import GIB, Shape, train_step
    from bliss_ray.models.arch import arch_from_preset

    mode = {0: "none", 1: "full"}.get(c.get("ac", 0), "every_k")
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    shape = Shape(c["seq_len"], c.get("micro") or c["batch"], 1, "ddp", mode, max(2, c.get("ac", 0)), precision)
    return train_step(arch_from_preset(c["preset"], c["vocab"]), shape).peak / GIB


def _train_label(t: dict) -> str:
    ac = t.get("ac", 0)
    return t["preset"] + ("" if not ac else ", AC every block" if ac == 1 else f", AC every {ac}")


def bench_outer(c: dict, device, reps: int, peak: float) -> dict:
    import torch
    from _workloads import bilevel_settings, bilevel_step, outer_step_kernel_flops, sync

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, flops, state = bilevel_step(
        c["preset"], c["target"], c["vocab"], c["seq_len"], c["batch"], c["batch"], device
    )
    settings = bilevel_settings(c["target"], c["batch"], c["batch"])
    kernel = outer_step_kernel_flops(c["preset"], c["target"], c["vocab"], c["seq_len"], settings, device.type)
    step()  # warm-up
    secs = [timed(step, lambda: sync(device)) for _ in range(reps)]
    out = {
        **c,
        "seconds": secs,
        "flops_per_step": kernel,  # attention as the causal kernels compute it (bench/_attention.py)
        "flops_per_step_full_attention": flops,
        "mfu": kernel / median(secs) / peak,
        "mfu_full_attention": flops / median(secs) / peak,
        "attn_implementation": state.proxy.config._attn_implementation,
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def bench_score(c: dict, device, reps: int, peak: float, work: Path) -> dict:
    import numpy as np
    from _attention import uncomputed_flops
    from _fixtures import save_score_model  # models only (its config-layer helpers import pydantic lazily)

    from bliss_ray.costs.flops import forward_flops_per_token
    from bliss_ray.models.arch import arch_from_preset
    from bliss_ray.selection.scoring import Scorer

    model_dir = save_score_model(c["preset"], c["vocab"], c["seq_len"], work / "score_model")
    rng = np.random.default_rng(0)
    batch = {
        "row_id": np.arange(c["rows"], dtype=np.int64),
        "input_ids": rng.integers(0, c["vocab"], (c["rows"], c["seq_len"]), dtype=np.int32),
    }
    arch = arch_from_preset(c["preset"], c["vocab"])
    flops_row = forward_flops_per_token(arch, c["seq_len"], head=False) * c["seq_len"]
    ledger_row = flops_row  # the ledger's count (full L²), what the planner's GPU-hours divide
    flops_row -= uncomputed_flops(arch, c["seq_len"], device.type, passes=1, tokens=c["seq_len"])  # causal kernel
    out = {**c}
    for dtype in ("bfloat16", "float32"):
        scorer = Scorer(str(model_dir), batch_seqs=c["batch_seqs"], dtype=dtype, device=device.type)
        scorer(batch)  # warm-up (the numpy → device copies and kernels included, as the stage runs them)
        secs = [timed(lambda s=scorer: s(batch)) for _ in range(max(1, reps // 2))]
        rows_s = c["rows"] / median(secs)
        out[dtype] = {"rows_per_s": rows_s, "tokens_per_s": rows_s * c["seq_len"], "mfu": rows_s * flops_row / peak}
        out[dtype]["mfu_ledger"] = rows_s * ledger_row / peak
        out[dtype]["attn_implementation"] = scorer.model.trunk.config._attn_implementation
    return out


def render_section(res: dict) -> str:
    """The GPU section of bench/RESULTS.md, from this script's JSON."""
    m, o, s = res["machine"], res["outer"], res["score"]
    head = (
        f"Device: **{res['device_name']}** (planner type {res.get('planner_device')}; dense bf16 peak "
        f"{res['peak_flops'] / 1e12:.0f} TFLOP/s; measured bf16 "
        f"matmul {res.get('bf16_matmul_flops', 0) / 1e12:.0f}), {m['cores']} CPU cores, torch {m['torch']}, "
        f"{m['date']}. Command: `{res['command']}`."
    )
    rows = [head, "", "| measurement | value | conditions |", "|---|---|---|"]
    for t in res["train"]:
        cond = (
            f"bf16 autocast, {t['batch']}×{t['seq_len']} tokens/step ({t.get('micro') or t['batch']} per micro-batch)"
        )
        mem = f"peak {t.get('peak_memory_gb', float('nan')) * 1e9 / 2**30:.3g} GiB, planner {t['planned_gib']:.3g} GiB"
        detail = f"{median(t['seconds']):.3f} s/step, ledger MFU {t['mfu_full_attention']:.3f}, {mem}"
        rows.append(f"| MFU training {_train_label(t)} | {t['mfu']:.3f} | {cond}, {detail} |")
    value = f"{median(o['seconds']):.2f} s, {o.get('peak_memory_gb', float('nan')):.1f} GB peak, MFU {o['mfu']:.3f}"
    cond = f"K=1 Q=3 γ=0.01, {o['batch']}×{o['seq_len']} tokens, fp32, ledger MFU {o['mfu_full_attention']:.3f}"
    rows.append(f"| bilevel outer step ({o['preset']} proxy, {o['target']} target) | {value} | {cond} |")
    for dt in ("bfloat16", "float32"):
        value = f"{s[dt]['rows_per_s']:,.0f} rows/s, MFU {s[dt]['mfu']:.3f} (ledger MFU {s[dt]['mfu_ledger']:.3f})"
        rows.append(f"| scoring, {s['preset']} trunk, {dt} | {value} | {s['rows']} rows × {s['seq_len']} tokens |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny smoke run on CPU (seconds)")
    p.add_argument("--out", default=None, help="JSON path (default bench/out/gpu_bench[_cpu].json)")
    p.add_argument("--results-md", default=None, help="fill the GPU section of this RESULTS.md (GPU runs only)")
    args = p.parse_args(argv)
    import torch
    from mfu import measure, of_peak

    t_start = time.perf_counter()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the smoke test")
    device = torch.device("cpu" if args.cpu else "cuda")
    cfg = plan(args.cpu)
    if args.cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        name, peak = "cpu", _common.cpu_matmul_peak(sizes=(512,), reps=3)  # a smoke peak: shapes are tiny
        extra = {}
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32: the outer step is not silently TF32
        name = torch.cuda.get_device_name()
        peak = _common.gpu_peak(name)
        if peak is None:
            raise SystemExit(f"no bf16 peak known for '{name}': add it to bliss_ray.costs.memory.GPU_BF16_PEAK")
        from bliss_ray.costs.memory import device_of

        planner = device_of(name, torch.cuda.get_device_properties(0).total_memory)
        extra = {"bf16_matmul_flops": _common.gpu_matmul_rate(), "planner_device": planner}
    lines, train, of = [], [], of_peak(device.type)
    for c in cfg["train"]:
        r = measure({**c, "checkpointing_every": c.get("ac", 0)}, device, cfg["reps"], lambda: peak)
        r["planned_gib"] = planned_gib(c, device)
        train.append(r)
        mem = f", peak {r['peak_memory_gb'] * 1e9 / 2**30:.3g} GiB" if "peak_memory_gb" in r else ""
        detail = f"{median(r['seconds']):.3f} s/step{mem}, planner {r['planned_gib']:.3g} GiB; "
        detail += f"full-L² count {r['mfu_full_attention']:.3f}"
        lines.append(line(f"MFU train {_train_label(c)} {of}", r["mfu"], detail))
    outer = bench_outer(cfg["outer"], device, max(1, cfg["reps"] // 2), peak)
    mem = f", peak {outer['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in outer else ""
    detail = f"MFU {outer['mfu']:.3f} {of}{mem}"
    lines.append(line("bilevel outer step [s]", median(outer["seconds"]), detail, "{:.3f}"))
    with tempfile.TemporaryDirectory() as work:
        score = bench_score(cfg["score"], device, cfg["reps"], peak, Path(work))
    for dt in ("bfloat16", "float32"):
        mfu = f"MFU {score[dt]['mfu']:.3f} {of}"
        lines.append(line(f"scoring rows/s ({dt})", score[dt]["rows_per_s"], mfu, "{:,.0f}"))
    loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN and sys.modules[m]})
    result = {
        "device": device.type,
        "device_name": name,
        "peak_flops": peak,
        **extra,
        "train": train,
        "outer": outer,
        "score": score,
        "forbidden_modules_loaded": loaded,
        "seconds_total": time.perf_counter() - t_start,
        "lines": lines,
    }
    default = _common.OUT / ("gpu_bench_cpu.json" if args.cpu else "gpu_bench.json")
    path = write_json("gpu_bench", result, Path(args.out) if args.out else default)
    if args.results_md and not args.cpu:
        _common.set_section(Path(args.results_md), "gpu", render_section(json.loads(path.read_text())), "GPU")
    if loaded:
        raise SystemExit(f"the pure layer imported {loaded}: the GPU machines do not have them")
    return result


if __name__ == "__main__":
    main()
