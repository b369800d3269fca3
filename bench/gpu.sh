#!/usr/bin/env bash
# GPU runbook: MFU and peak memory of 160M/410M/1B training in bf16, with and without activation checkpointing,
# beside bliss_ray.costs.memory's estimate (what `bliss-ray plan` says); one bilevel outer step (31M proxy, 410M
# target: time and peak memory) and scoring throughput, on the pure PyTorch layer. Needs only
# torch, transformers, pyarrow, pandas and numpy (no ray/pydantic/optuna/lm-eval, no network). The RESULTS.md
# section it writes names the planner's device type: `bliss-ray plan --gpu THAT` then uses the measured MFU.
#
#   bash bench/gpu.sh            # GPU: writes bench/out/gpu_bench.json and fills the GPU section of bench/RESULTS.md
#   bash bench/gpu.sh --cpu      # tiny CPU smoke run in seconds (tests/test_bench_smoke.py runs this)
#   PYTHON=/path/to/python bash bench/gpu.sh    # another interpreter (default: python3)
# Extra arguments go to bench/gpu_bench.py (e.g. --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--cpu" ]]; then
    exec "$PY" bench/gpu_bench.py "$@"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# a hard stop well inside a short device lease; the JSON is written only at the end
exec timeout 480 "$PY" bench/gpu_bench.py --results-md bench/RESULTS.md "$@"
