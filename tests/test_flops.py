"""The FLOPs ledger: the rebuttal's Table 1 rows derived from the architecture (not hard-coded), the analytic
per-token count against torch's FlopCounterMode on one real step, and the CLI.

    .venv/bin/python -m pytest tests/test_flops.py -q
"""

import subprocess
import sys
from pathlib import Path

import pytest

from bliss_ray.config import load_experiment
from bliss_ray.flops import counted_train_flops_per_token, forward_flops_per_token, ledger, totals
from bliss_ray.models.lm import arch_from_preset

REPO = Path(__file__).resolve().parents[1]


def test_paper_410m_recipe_gives_table_1_pretraining_and_warmup_rows():
    rows = {r.stage: r.flops for r in ledger(load_experiment(REPO / "experiments/paper/pythia410m.yaml"))}
    assert round(rows["target pretraining"] / 1e19, 2) == 6.35  # rebuttal Table 1
    assert round(rows["proxy warm-up"] / 1e19, 2) == 0.07
    # the 6·N·D convention does not reproduce it (method.md §4.2): the conventions really differ
    six = {r.stage: r.flops for r in ledger(load_experiment(REPO / "experiments/paper/pythia410m.yaml"), "6nd")}
    assert round(six["target pretraining"] / 1e19, 2) == 6.38


def test_bilevel_and_selection_rows_are_small_shares():
    exp = load_experiment(REPO / "experiments/paper/pythia410m.yaml")
    t = totals(ledger(exp))
    assert 0.005 < t["selection"] / t["total"] < 0.05


@pytest.mark.parametrize("name,seq_len", [("pythia-31m", 1024), ("pythia-160m", 512), ("llama-tiny", 128)])
def test_analytic_matches_flop_counter(name, seq_len):
    """FlopCounterMode counts matmuls (incl. attention's QKᵀ and AV at full L²) of a real forward+backward on
    meta tensors; the paper formula is 3 × forward. Tolerance 1 %: both count the same matmuls, the counter
    also sees nothing else (norms, softmax and rotary are not matmuls)."""
    arch = arch_from_preset(name, 50304)
    analytic = 3 * forward_flops_per_token(arch, seq_len)
    assert counted_train_flops_per_token(arch, seq_len) == pytest.approx(analytic, rel=0.01)


def test_cli_prints_the_breakdown():
    out = subprocess.run(
        [sys.executable, "-m", "bliss_ray.cli", "flops", "experiments/paper/pythia410m.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    assert "target pretraining" in out and "6.352" in out and "×1e19" in out and "share" in out
