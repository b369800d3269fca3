"""GPU runbook benchmark (issue 9 §5): MFU of 160M/410M training in bf16, one bilevel outer step with a 31M
proxy and a 410M target (time, peak memory), and scoring throughput — on the pure PyTorch layer only.

Runs on GPU machines that have torch, transformers, pyarrow, pandas and numpy but NO ray, optuna, pydantic or
lm-eval and no network: it imports only ``bliss_ray.models``, ``bliss_ray.bilevel``, ``bliss_ray.train``,
``bliss_ray.scoring``, ``bliss_ray.flops`` (and ``bliss_ray.data.tokens`` via them), and fails if any forbidden
module was imported anyway (``forbidden_modules_loaded`` in the JSON). Start it with ``bench/gpu.sh``.

What and how:

* training MFU (``bench/mfu.py``'s measurement, bf16 autocast, fused AdamW, SDPA attention, seq_len 1024): model
  FLOPs per second by the ledger (3 × forward, paper convention) ÷ the device's dense bf16 peak (table in
  ``_common.GPU_BF16_PEAK``, by ``torch.cuda.get_device_name()``); the achieved bf16 matmul rate is recorded;
* one ``outer_step`` (K = 1, Q = 3, γ = 0.01 with the 410M target for the KL term), 4 × 1024 tokens: median
  seconds, peak allocated memory, MFU by the ledger's op count. It runs in fp32 (no autocast in the loop) and
  the HVPs use the math attention path, so expect it far below training;
* scoring: ``bliss_ray.scoring.Scorer`` on a saved score model (31M trunk), bf16 and fp32, rows/s and MFU.

Goals (issue 9): ≥ 45 % MFU for 160M/410M training on an H100. The whole script takes < 8 min on one H100.

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
            "train": [{"kind": "train", "preset": "pythia-micro", "vocab": 512, "seq_len": 64, "batch": 4}],
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
        "train": [
            {"kind": "train", "preset": "pythia-160m", "vocab": V, "seq_len": 1024, "batch": 32, "micro": 16},
            {"kind": "train", "preset": "pythia-410m", "vocab": V, "seq_len": 1024, "batch": 32, "micro": 16},
        ],
        "outer": {"preset": "pythia-31m", "target": "pythia-410m", "vocab": V, "seq_len": 1024, "batch": 4},
        "score": {"preset": "pythia-31m", "vocab": V, "seq_len": 1024, "rows": 8192, "batch_seqs": 128},
        "reps": 10,
    }


def bench_outer(c: dict, device, reps: int, peak: float) -> dict:
    import torch
    from _workloads import bilevel_step, sync

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, flops, state = bilevel_step(
        c["preset"], c["target"], c["vocab"], c["seq_len"], c["batch"], c["batch"], device
    )
    step()  # warm-up
    secs = [timed(step, lambda: sync(device)) for _ in range(reps)]
    out = {
        **c,
        "seconds": secs,
        "flops_per_step": flops,
        "mfu": flops / median(secs) / peak,
        "attn_implementation": state.proxy.config._attn_implementation,
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def bench_score(c: dict, device, reps: int, peak: float, work: Path) -> dict:
    import numpy as np
    from _fixtures import save_score_model  # models only (its config-layer helpers import pydantic lazily)

    from bliss_ray.flops import forward_flops_per_token
    from bliss_ray.models.lm import arch_from_preset
    from bliss_ray.scoring import Scorer

    model_dir = save_score_model(c["preset"], c["vocab"], c["seq_len"], work / "score_model")
    rng = np.random.default_rng(0)
    batch = {
        "row_id": np.arange(c["rows"], dtype=np.int64),
        "input_ids": rng.integers(0, c["vocab"], (c["rows"], c["seq_len"]), dtype=np.int32),
    }
    flops_row = forward_flops_per_token(arch_from_preset(c["preset"], c["vocab"]), c["seq_len"], head=False)
    flops_row *= c["seq_len"]
    out = {**c}
    for dtype in ("bfloat16", "float32"):
        scorer = Scorer(str(model_dir), batch_seqs=c["batch_seqs"], dtype=dtype, device=device.type)
        scorer(batch)  # warm-up (the numpy → device copies and kernels included, as the stage runs them)
        secs = [timed(lambda s=scorer: s(batch)) for _ in range(max(1, reps // 2))]
        rows_s = c["rows"] / median(secs)
        out[dtype] = {"rows_per_s": rows_s, "tokens_per_s": rows_s * c["seq_len"], "mfu": rows_s * flops_row / peak}
        out[dtype]["attn_implementation"] = scorer.model.trunk.config._attn_implementation
    return out


def render_section(res: dict) -> str:
    """The GPU section of bench/RESULTS.md, from this script's JSON."""
    m, o, s = res["machine"], res["outer"], res["score"]
    head = (
        f"Device: **{res['device_name']}** (dense bf16 peak {res['peak_flops'] / 1e12:.0f} TFLOP/s; measured bf16 "
        f"matmul {res.get('bf16_matmul_flops', 0) / 1e12:.0f}), {m['cores']} CPU cores, torch {m['torch']}, "
        f"{m['date']}. Command: `{res['command']}`."
    )
    rows = [head, "", "| measurement | value | conditions |", "|---|---|---|"]
    for t in res["train"]:
        cond = f"bf16 autocast, {t['batch']}×{t['seq_len']} tokens/step, attn={t['attn_implementation']}"
        rows.append(f"| MFU training {t['preset']} | {t['mfu']:.3f} | {cond}, {median(t['seconds']):.3f} s/step |")
    value = f"{median(o['seconds']):.2f} s, {o.get('peak_memory_gb', float('nan')):.1f} GB peak, MFU {o['mfu']:.3f}"
    cond = f"K=1 Q=3 γ=0.01, {o['batch']}×{o['seq_len']} tokens, fp32"
    rows.append(f"| bilevel outer step ({o['preset']} proxy, {o['target']} target) | {value} | {cond} |")
    for dt in ("bfloat16", "float32"):
        value = f"{s[dt]['rows_per_s']:,.0f} rows/s, MFU {s[dt]['mfu']:.3f}"
        rows.append(f"| scoring, {s['preset']} trunk, {dt} | {value} | {s['rows']} rows × {s['seq_len']} tokens |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny smoke run on CPU (seconds)")
    p.add_argument("--out", default=None, help="JSON path (default bench/out/gpu_bench[_cpu].json)")
    p.add_argument("--results-md", default=None, help="fill the GPU section of this RESULTS.md (GPU runs only)")
    args = p.parse_args(argv)
    import torch
    from mfu import measure

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
            raise SystemExit(f"no bf16 peak known for '{name}': add it to _common.GPU_BF16_PEAK")
        extra = {"bf16_matmul_flops": _common.gpu_matmul_rate()}
    lines, train = [], []
    for c in cfg["train"]:
        r = measure(c, device, cfg["reps"], lambda: peak)
        train.append(r)
        mem = f", peak {r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else ""
        lines.append(line(f"MFU train {c['preset']}", r["mfu"], f"{median(r['seconds']):.3f} s/step{mem}"))
    outer = bench_outer(cfg["outer"], device, max(1, cfg["reps"] // 2), peak)
    mem = f", peak {outer['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in outer else ""
    lines.append(line("bilevel outer step [s]", median(outer["seconds"]), f"MFU {outer['mfu']:.3f}{mem}", "{:.3f}"))
    with tempfile.TemporaryDirectory() as work:
        score = bench_score(cfg["score"], device, cfg["reps"], peak, Path(work))
    for dt in ("bfloat16", "float32"):
        lines.append(line(f"scoring rows/s ({dt})", score[dt]["rows_per_s"], f"MFU {score[dt]['mfu']:.3f}", "{:,.0f}"))
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
