"""What a worker achieves, in model FLOP/s by the ledger's count: measured on the device type when
``bench/RESULTS.md`` holds a run of it (``bench/mfu.py`` on CPU, ``bench/gpu.sh`` on a GPU: training rows by model,
bilevel and scoring rows), otherwise an assumed fraction of the device's peak, said so. ``costs.planner`` turns it
into GPU-hours.

    rate_of("pretrain", "pythia-1b", "bf16-mixed", "A10G-24GB", measured_mfu("A10G-24GB"))  # (FLOP/s, its source)
"""

from __future__ import annotations

import re
from pathlib import Path

from bliss_ray.costs.memory import DEVICES

RESULTS_MD = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
# MFU (model FLOPs by the ledger ÷ peak) when bench/RESULTS.md has no run on the device: 16-bit steps against the
# bf16 peak, fp32 ones (the bilevel step, fp32 training) against the fp32 peak. Assumptions, printed as such.
ASSUMED_MFU = {"train": 0.35, "inference": 0.30, "bilevel": 0.30}
ASSUMED_CPU_FLOPS = 100e9  # per worker, when RESULTS.md has no CPU measurement
MFU_KIND = {"pretrain": "train", "warmup": "train", "probe": "train", "influence": "train", "bilevel": "bilevel"}


def measured_mfu(device: str, results_md: Path = RESULTS_MD) -> dict:
    """What ``bench/RESULTS.md`` measured on this device type, by the ledger's FLOP count: {"train": {preset:
    value}, "bilevel": value, "inference": value, "unit": "mfu" (of the bf16 peak, GPU) or "flops" (achieved
    FLOP/s per worker, CPU), "source": …}. Empty when it has none."""
    if not results_md.is_file():
        return {}
    text = results_md.read_text()
    out: dict = {"train": {}}
    if device == "CPU":  # bench/mfu.py's lines: "MFU train pythia-160m L=1024 B=4: 0.828  (269.3 GFLOP/s of …"
        pattern = (
            r"MFU (train|score|outer) (\S+)(?: \+ \S+ target)? L=\d+ B=\d+[^:\n]*: [0-9.]+\s+\(([0-9.,]+) GFLOP/s"
        )
        for kind, preset, rate in re.findall(pattern, text):
            flops = float(rate.replace(",", "")) * 1e9
            if kind == "train":
                out["train"][preset] = max(flops, out["train"].get(preset, 0.0))
            else:
                out["inference" if kind == "score" else "bilevel"] = flops
        return out | {"unit": "flops", "source": "bench/RESULTS.md, CPU"} if out["train"] else {}
    # bench/gpu_bench.py's section names the planner's device type and each row's MFU by the ledger's count
    section = re.search(r"<!-- gpu:begin -->(.*?)<!-- gpu:end -->", text, re.S)
    body = section.group(1) if section else ""
    if f"planner type {device}" not in body:
        return {}
    ledger_mfu = r"ledger MFU ([0-9.]+)"
    out["train"] = {p: float(v) for p, v in re.findall(r"^\| MFU training (\S+) \|.*?" + ledger_mfu, body, re.M)}
    for key, row in (("bilevel", r"^\| bilevel outer step "), ("inference", r"^\| scoring, \S+ trunk, bfloat16 ")):
        if m := re.search(row + r".*?" + ledger_mfu, body, re.M):
            out[key] = float(m.group(1))
    return out | {"unit": "mfu", "source": f"bench/RESULTS.md, {device}"} if out["train"] else {}


def rate_of(kind: str, preset: str, precision: str, device: str, measured: dict) -> tuple[float, str]:
    """Achieved model FLOP/s per worker, and where it comes from: measured on this device type (the same model,
    else the nearest measured one), else the assumption."""
    key = MFU_KIND.get(kind, "inference")
    got = measured.get(key)
    if isinstance(got, dict):  # training, by model
        which = preset if preset in got else max(got, key=got.get, default=None)
        got = got.get(which) if which else None
        source = measured.get("source", "") + ("" if which == preset else f", {which}")
    else:
        source = measured.get("source", "")
    d = DEVICES[device]
    if got is not None:
        if measured["unit"] == "flops":
            return got, f"{got / 1e9:.0f} GFLOP/s measured ({source})"
        return got * d.bf16_flops, f"MFU {got:.2f} measured ({source})"
    if device == "CPU":
        return ASSUMED_CPU_FLOPS, f"{ASSUMED_CPU_FLOPS / 1e9:.0f} GFLOP/s assumed"
    sixteen = key != "bilevel" and precision != "fp32"
    peak = d.bf16_flops if sixteen else d.fp32_flops
    return ASSUMED_MFU[key] * peak, f"MFU {ASSUMED_MFU[key]:.2f} of the {'bf16' if sixteen else 'fp32'} peak, assumed"
