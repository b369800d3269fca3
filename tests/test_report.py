"""Report arithmetic without Ray: where a curve reaches a score (Figure 3's speed-up) and when a speed-up is noise;
sweep reports on synthetic result frames: differences marked against the seed spread and lm-eval's standard errors,
a proxy-level metric across proxies flagged and not ranked, downstream accuracy at chance, unequal target tokens.

.venv/bin/python -m pytest tests/test_report.py -q
"""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bliss_ray.report.build import _noise_note
from bliss_ray.report.collect import reach_step


def test_reach_step_interpolates_between_checkpoints():
    assert reach_step([100, 200, 300], [0.30, 0.40, 0.50], 0.45, higher_is_better=True) == pytest.approx(250)
    assert reach_step([100, 200], [5.0, 4.0], 4.5, higher_is_better=False) == pytest.approx(150)
    assert reach_step([100, 200], [0.30, 0.40], 0.41, higher_is_better=True) is None


def test_a_difference_within_two_standard_errors_is_called_noise():
    base = {"paper_average": 0.300, "paper_average_stderr": 0.010}
    close = {"paper_average": 0.310, "paper_average_stderr": 0.010}  # diff 1.0 pt, se 1.41 pt
    far = {"paper_average": 0.350, "paper_average_stderr": 0.010}  # diff 5.0 pt
    assert "not evidence of a speed-up" in _noise_note(base, close, "paper_average")
    assert "not evidence" not in _noise_note(base, far, "paper_average")
    assert "5.00 ± 1.41" in _noise_note(base, far, "paper_average")
    assert _noise_note({"reference_loss": 4.0}, {"reference_loss": 3.9}, "reference_loss") == ""  # no stderr


def test_seed_groups_pool_variants_that_differ_only_in_seeds():
    from bliss_ray.report.collect import Variant, seed_groups

    def variant(method: str, seed: int, z_init: str = "zero") -> Variant:
        exp = {"name": f"demo-s{seed}", "seed": seed, "selection": {"method": method, "seed": seed}}
        return Variant(root=Path(f"runs/demo-s{seed}"), exp=exp | {"bilevel": {"z_init": z_init}}, evaluate={})

    vs = [variant("bliss", s, z) for s in (0, 1, 2) for z in ("zero", "constant")] + [variant("random", 0)]
    groups = dict(seed_groups(vs))
    assert sorted(groups) == ["bliss (z_init=constant)", "bliss (z_init=zero)", "random"]
    assert [v.exp["seed"] for v in groups["bliss (z_init=zero)"]] == [0, 1, 2]
    assert len(groups["random"]) == 1


# ---- sweep reports (bliss_ray.studies.sweep_report) on synthetic result frames --------------------------------------


def _sweep_dir(tmp_path, per_variant: dict, *, metric="upper_loss", keys=("bilevel.use_sigmoid",), **columns):
    """A sweep directory as ``bliss_ray.studies.sweep_results.write_results`` leaves it: ``per_variant`` maps a
    tuple of values of ``keys`` to the metric's value per seed; ``columns`` maps a column to {values tuple: value}
    (the same for every seed) for the other final metrics."""
    meta = {
        "name": "synthetic",
        "base_file": "tiny.yaml",
        "overrides": {},
        "stage": "full" if metric in ("reference_loss", "paper_average") else "bilevel",
        "round": 1,
        "last_steps": 3,
        "metric": metric,
        "mode": "max" if metric == "paper_average" else "min",
        "search": {"type": "grid", "seed": 0},
        "seeds": [],
        "space_keys": list(keys),
        "labels": {},
        "sweep_file": "experiments/sweeps/synthetic.yaml",
    }
    rows, curves = [], []
    for values, per_seed in per_variant.items():
        point = dict(zip(keys, values, strict=True))
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        for seed, value in enumerate(per_seed):
            ident = {"trial_id": f"t{len(rows):02d}", "variant": label, "variant_key": json.dumps(point)}
            ident |= {"seed": seed, "status": "ok"}
            row = ident | {f"config/{k}": v for k, v in point.items()} | {metric: value, "time_total_s": 9.0}
            rows.append(row | {c: by[values] for c, by in columns.items()})
            curves += [ident | {"stage": "r1.bilevel", "step": s, "upper_loss": value + 1 / s} for s in (1, 2)]
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(meta))
    pd.DataFrame(rows).to_parquet(d / "sweep_results.parquet")
    pd.DataFrame(curves).to_parquet(d / "sweep_curves.parquet")
    return d


def _report(tmp_path, sweep_dir) -> str:
    from bliss_ray.studies.sweep_report import build_sweep_report

    return build_sweep_report([sweep_dir], tmp_path / "report").read_text()


def test_seed_spread_pools_within_variant_variances():
    from bliss_ray.studies.sweep_report import noise_band, seed_spread

    df = pd.DataFrame({"variant_key": list("aabbbc"), "status": "ok", "m": [1.0, 3.0, 2.0, 4.0, 6.0, 9.0]})
    spread, dof = seed_spread(df, "m")  # squares about the means: a 1+1, b 4+0+4, c (one trial) 0; dof 1 + 2
    assert dof == 3 and spread == pytest.approx(math.sqrt(10 / 3))
    assert seed_spread(df[df["variant_key"] == "c"], "m") == (None, 0)
    assert noise_band(1.0, 2, 2) == pytest.approx(2.0)  # 2·1·√(1/2 + 1/2) exceeds s itself
    assert noise_band(1.0, 50, 50) == pytest.approx(1.0)  # many seeds: the seed spread itself
    assert noise_band(None, 1, 1, eval_se=0.5) == pytest.approx(1.0) and noise_band(None, 1, 1) is None


def test_sweep_report_marks_a_difference_within_the_seed_spread(tmp_path):
    """2 variants × 3 seeds: mean ± sample std and n; Δ = 1 is inside the band max(1, 2·1·√(2/3)) = 1.633."""
    text = _report(tmp_path, _sweep_dir(tmp_path, {(True,): [5.0, 6.0, 7.0], (False,): [6.0, 7.0, 8.0]}))
    assert "| True | **6.0000 ± 1.0000** | 3 | +0.0000 | best |" in text  # 5, 6, 7: mean 6, std 1
    assert "| False | 7.0000 ± 1.0000 | 3 | +1.0000 | ≈ best (band 1.6330) |" in text
    assert "s = 1.0000 (4 dof)" in text
    assert "Largest difference between values: 1.0000: ≈ within noise (band 1.6330)." in text
    assert "| use_sigmoid=True | 7.0000 ± 1.0000 |" in text  # matched step 1: 5+1, 6+1, 7+1
    assert (tmp_path / "report" / "synthetic_curves.png").stat().st_size > 10_000


def test_sweep_report_keeps_a_difference_beyond_the_band(tmp_path):
    text = _report(tmp_path, _sweep_dir(tmp_path, {(True,): [5.0, 6.0, 7.0], (False,): [10.0, 11.0, 12.0]}))
    assert "| +5.0000 | beyond noise (band 1.6330) |" in text
    assert "≈" not in text.split("### Ablation")[1].split("Mean ±")[0]


def test_the_paper_column_shows_what_the_paper_reports_beside_each_variant(tmp_path):
    d = _sweep_dir(tmp_path, {(True,): [5.0, 6.0], (False,): [6.0, 7.0]})
    meta = json.loads((d / "sweep.json").read_text())
    meta["paper"] = {"source": "the rebuttal's Table 2", "rows": {"use_sigmoid=True": "44.7 (1.3)"}}
    (d / "sweep.json").write_text(json.dumps(meta))
    text = _report(tmp_path, d)
    assert "| best | 44.7 (1.3) |" in text and "| ≈ best (band 1.4142) | – |" in text
    assert "The paper's column: the rebuttal's Table 2." in text
    # the page says how it was made: the sweep's command and its own
    made = f"made by `bliss-ray sweep experiments/sweeps/synthetic.yaml --out {tmp_path}`; this page by "
    assert made + f"`bliss-ray report {d} --out {tmp_path / 'report'}`" in text


def test_one_seed_per_variant_says_the_noise_is_unknown(tmp_path):
    """A sigmoid case as once reported: 0.0001 nats apart, one seed each."""
    text = _report(tmp_path, _sweep_dir(tmp_path, {(True,): [7.0300], (False,): [7.0301]}))
    assert "**One seed per variant: the seed spread of `upper_loss` is unknown" in text
    assert "| +0.0001 | n = 1: noise unknown |" in text and "best (n = 1: noise unknown)" in text


def test_a_proxy_level_metric_across_proxies_is_flagged_and_not_ranked(tmp_path):
    """A Table 2 report as once written: the 160M proxy 'won' on its own upper-level loss (7.03 vs 7.34)."""
    keys = ("models.proxy.arch", "bilevel.use_sigmoid")
    runs = {("micro", True): [7.34, 7.35], ("micro", False): [7.33, 7.36], ("mini", True): [7.03, 7.02]}
    text = _report(tmp_path, _sweep_dir(tmp_path, runs | {("mini", False): [7.04, 7.03]}, keys=keys))
    assert "**⚠ This ranking does not answer the sweep's question.** `upper_loss` is measured on the proxy" in text
    rows = [line for line in text.split("### Ablation")[1].split("Mean ±")[0].splitlines() if line.startswith("| mi")]
    assert len(rows) == 4 and all(r.endswith("| – | not ranked (proxy-level metric) |") for r in rows), rows
    assert not any("**" in r for r in rows)  # no variant is shown as the best
    effects = text.split("### Main effects")[1].split("###")[0]
    assert "not comparable: a proxy-level metric across proxies" in effects  # the proxy key
    assert effects.count("within noise") + effects.count("beyond noise") == 1  # sigmoid: same proxies on both sides


def test_downstream_accuracy_at_chance_is_flagged_and_not_ranked(tmp_path):
    """A: mean 0.225 vs chance 0.25, lm-eval se 0.08 → at chance; B: 0.71, 0.46 above chance (> 2·0.03, > s)."""
    runs = {("A",): [0.15, 0.30], ("B",): [0.70, 0.72]}
    cols = {"paper_average_chance": {("A",): 0.25, ("B",): 0.25}}
    cols |= {"paper_average_stderr": {("A",): 0.08, ("B",): 0.03}, "target_tokens": {("A",): 8192, ("B",): 8192}}
    text = _report(tmp_path, _sweep_dir(tmp_path, runs, metric="paper_average", keys=("arm",), **cols))
    assert "**Downstream accuracy is at chance for 1 of 2 variants**" in text
    assert "| A | 0.2250 ± 0.1061 (at chance 0.25) | 2 | – | at chance: not ranked |" in text
    assert "| B | **0.7100 ± 0.0141** (above chance 0.25) | 2 | +0.0000 | best |" in text
    assert "target trained on 8,192 tokens in every trial" in text and "Not at equal target tokens" not in text


def test_rebuttal_table2_differences_are_within_lm_eval_standard_errors(tmp_path):
    """One seed each (as in the rebuttal): 44.7, 44.1, 44.2 ± 1.3 → band 2·√(1.3² + 1.3²) = 3.68 points."""
    runs = {("31M",): [0.447], ("160M",): [0.441], ("31M no sigmoid",): [0.442]}
    cols = {"paper_average_stderr": dict.fromkeys(runs, 0.013), "paper_average_chance": dict.fromkeys(runs, 1 / 3)}
    text = _report(tmp_path, _sweep_dir(tmp_path, runs, metric="paper_average", keys=("proxy",), **cols))
    assert "| 160M | 0.4410 (above chance 0.33) | 1 | -0.0060 | ≈ best (band 0.0368) |" in text
    assert "| 31M no sigmoid | 0.4420 (above chance 0.33) | 1 | -0.0050 | ≈ best (band 0.0368) |" in text
    assert "No seed repeats: the band is two lm-eval standard errors of the difference alone" in text


def test_unequal_target_tokens_are_flagged(tmp_path):
    runs = {("short",): [5.0, 5.1], ("long",): [4.0, 4.1]}
    tokens = {"target_tokens": {("short",): 8192, ("long",): 16384}}
    text = _report(tmp_path, _sweep_dir(tmp_path, runs, metric="reference_loss", keys=("steps",), **tokens))
    assert "**⚠ Not at equal target tokens:** the trials trained the target on 8,192, 16,384 tokens" in text
