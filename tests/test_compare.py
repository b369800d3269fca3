"""The method comparison's pure parts: the comparison file, FLOPs matching, FLOPs spent per checkpoint, speed-ups
against every baseline and the report (Table 4, the table against every baseline, Figure 3 and its head-to-head).
The end-to-end ``bliss-ray compare`` run is in tests/test_pipeline.py.

    .venv/bin/python -m pytest tests/test_compare.py -q
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

from bliss_ray.config import ConfigError
from bliss_ray.costs.ledger import ledger, model_archs, selection_share, totals
from bliss_ray.studies import compare_figures
from bliss_ray.studies.compare_curves import Curve, speedup, speedups
from bliss_ray.studies.compare_report import (
    every_baseline_table,
    table4,
    tuning_and_check,
    tuning_section,
    write_markdown,
)
from bliss_ray.studies.compare_spec import (
    CompareSpec,
    load_compare,
    matching_extra_steps,
    spent_flops,
    target_step_flops,
)
from tests.conftest import REPO

DEMO = REPO / "experiments" / "compare" / "demo.yaml"


def _spec_file(tmp_path, **changes):
    tree = yaml.safe_load(DEMO.read_text()) | changes
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"baseline": "uniform"}, "baseline"),
        (
            {"variants": {"bliss": {}, "r": {"match_flops": "nope"}}, "baseline": "bliss", "also_against": []},
            "variants.r.match_flops",
        ),
        ({"variants": {"random": {"overrides": {"pretrain.steps": 0}}}, "baseline": "random"}, "variants"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [0, 100]}, "tuning.sweep: demo_tune.yaml tunes on seeds \\[100\\]"),
        ({"tuning": {"sweep": "experiments/sweeps/demo_tune.yaml", "variant": "blis"}}, "tuning.variant"),
        ({"tuning": {"sweep": "experiments/sweeps/demo_tune_tiny.yaml", "variant": "bliss"}}, "its base"),
        (
            {"tuning": {"sweep": "experiments/sweeps/demo_tune.yaml", "variant": "bliss", "results": "nowhere"}},
            "tuning.results: no sweep_results.parquet in 'nowhere'",
        ),
        (
            {"tuning": {"sweep": "experiments/sweeps/demo_tune.yaml", "variant": "bliss", "before": "bliss"}},
            "tuning.before: the tuned variant itself",
        ),
        ({"also_against": ["matess"]}, "also_against: 'matess' is not one of the variants"),
        ({"also_against": ["random"]}, "also_against: 'random' is the baseline already"),
        ({"also_against": ["bliss"]}, "also_against: 'bliss' is the first variant"),
        ({"also_against": ["mates", "mates"]}, "also_against: a variant named twice"),
        ({"also_against": "mates"}, "also_against: Input should be a valid list"),
    ],
)
def test_a_bad_comparison_fails_before_compute_naming_the_field(tmp_path, changes, field):
    with pytest.raises(ConfigError, match=field):
        load_compare(_spec_file(tmp_path, **changes))


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml"])
def test_the_shipped_comparisons_measure_every_method_against_mates_too(name):
    spec = load_compare(DEMO.parent / name)
    assert (spec.lead, spec.baselines) == ("bliss", ["random", "mates"])


def test_variants_share_the_base_and_differ_only_where_they_say():
    spec = load_compare(DEMO)
    assert Path(spec.base).is_file()  # resolved to a file once, when loaded
    bliss, random = spec.experiment("bliss", 2), spec.experiment("random", 2)
    assert spec.experiment("bliss", 2) == bliss  # building one variant never leaks into the next
    assert (bliss.selection.method, random.selection.method) == ("bliss", "random")
    assert bliss.seed == random.seed == bliss.selection.seed == 2 and bliss.name == random.name == spec.name
    assert spec.order().index("random_flops") > spec.order().index("bliss")  # matched after what it matches


@pytest.mark.parametrize("pool_rows", [1_000, 12_200, 50_000])
def test_flops_matched_random_equals_bliss_within_half_a_target_step(pool_rows):
    spec = load_compare(DEMO)
    goal = totals(ledger(spec.experiment("bliss", 0), pool_rows_per_round=pool_rows))["total"]
    extra = matching_extra_steps(spec.experiment("random_flops", 0), goal)
    matched = spec.experiment("random_flops", 0, extra_steps=extra)
    step = target_step_flops(matched)
    assert extra > 0
    assert abs(totals(ledger(matched))["total"] - goal) <= step / 2
    # one step fewer or more would be further from the goal: the rounding is the nearest
    for off in (-1, 1):
        other = spec.experiment("random_flops", 0, extra_steps=extra + off)
        assert abs(totals(ledger(other))["total"] - goal) >= abs(totals(ledger(matched))["total"] - goal)


def test_the_paper_proportions_comparison_puts_selection_under_a_quarter_of_bliss_flops_before_running():
    """Table 4's argument needs Table 1's proportions (selection ~21 % of BLISS's FLOPs); the demo's are not."""
    spec = load_compare(DEMO.parent / "paper_proportions.yaml")
    for seed in spec.seeds:
        bliss = spec.experiment("bliss", seed)
        share = selection_share(ledger(bliss))  # the report's "selection share": warm-up, bilevel and scoring
        assert 0.15 <= share <= 0.25, share
        target, proxy = model_archs(bliss)
        assert target.n_params(embeddings=False) >= 4 * proxy.n_params(embeddings=False)
        # each round's kept fraction covers its target steps, as the paper's 20 % of a shard covers 10k steps
        kept_rows = bliss.selection.keep_frac * bliss.flops.pool_rows_per_round
        assert kept_rows >= bliss.pretrain.steps * bliss.pretrain.global_batch_seqs
    demo = load_compare(DEMO).experiment("bliss", 0)
    demo_rows = ledger(demo, pool_rows_per_round=bliss.flops.pool_rows_per_round)
    assert selection_share(demo_rows) > 0.5  # what this comparison corrects


def test_flops_spent_grow_in_plan_order_and_end_at_the_ledger_total():
    spec = load_compare(DEMO)
    exp = spec.experiment("bliss", 0)
    rows = ledger(exp, pool_rows_per_round=12_200)
    warmup = sum(r.flops for r in rows if r.group == "warm-up")
    assert spent_flops(rows, exp, 0, 0) == warmup  # the warm-up runs before round 0's pretraining
    steps = exp.pretrain.steps
    spent = [spent_flops(rows, exp, s, s // steps) for s in range(0, (exp.schedule.rounds + 1) * steps + 1, 10)]
    assert all(b > a for a, b in itertools.pairwise(spent))
    end = (exp.schedule.rounds + 1) * steps
    assert spent_flops(rows, exp, end, exp.schedule.rounds) == pytest.approx(totals(rows)["total"], rel=1e-12)


def _curve(variant, seed, steps, loss, flops_per_step=1.0, selection=0.0):
    steps = np.asarray(steps, dtype=float)
    return Curve(
        variant,
        seed,
        steps,
        selection + flops_per_step * steps,
        np.asarray(loss, dtype=float),
        np.full(len(steps), np.nan),
        selection + flops_per_step * steps[-1],
        selection / (selection + flops_per_step * steps[-1]),
    )


def test_speedups_interpolate_between_checkpoints_on_both_axes():
    base = _curve("random", 0, [0, 60, 120, 180], [8.0, 6.5, 6.0, 5.8])
    # reaches 5.8 halfway between steps 90 and 120 (5.9 → 5.7): at step 105
    fast = _curve("bliss", 0, [0, 30, 60, 90, 120, 180], [8.0, 7.0, 6.4, 5.9, 5.7, 5.5], selection=60.0)
    assert speedup(fast, base, "steps") == pytest.approx(180 / 105)
    assert speedup(fast, base, "flops") == pytest.approx(180 / (60 + 105))  # selection FLOPs count against it
    slow = _curve("mates", 0, [0, 60, 120, 180], [8.0, 7.0, 6.5, 6.1])
    assert speedup(slow, base, "steps") is None


def test_table4_and_report_state_speedups_with_their_spread(tmp_path):
    spec = load_compare(DEMO)
    spec = spec.model_copy(update={"seeds": [0, 1]})
    curves = []
    for seed, reach in ((0, 5.9), (1, 6.1)):  # bliss reaches random's 5.8 at step 90 + 30·(reach-5.8)/… per seed
        curves.append(_curve("random", seed, [0, 60, 120, 180], [8.0, 6.5, 6.0, 5.8]))
        curves.append(_curve("random_flops", seed, [0, 60, 120, 300], [8.0, 6.5, 6.0, 5.6]))
        curves.append(_curve("mates", seed, [0, 60, 120, 180], [8.0, 6.6, 6.1, 5.9]))
        curves.append(_curve("bliss", seed, [0, 60, 90, 120, 180], [8.0, 6.4, reach, 5.7, 5.5], selection=50.0))
    per_seed = [
        speedup(c, next(b for b in curves if b.variant == "random" and b.seed == c.seed), "steps")
        for c in curves
        if c.variant == "bliss"
    ]
    expected = f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}×"
    rows = {line.split("|")[1].strip(): line for line in table4(spec, curves)[2:]}
    assert expected in rows["bliss"]
    assert "not reached (0 of 2 seeds)" in rows["mates"] and "(baseline)" in rows["random"]
    path = write_markdown(spec, curves, tmp_path / "report.md", "bliss-ray compare x.yaml")
    text = path.read_text()
    assert "## Table 4" in text and "held-out evaluation part" in text and "`bliss-ray compare x.yaml`" in text
    for png in ("report_fig3_steps.png", "report_fig3_flops.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def _against_every_baseline_case() -> tuple[CompareSpec, list[Curve]]:
    """Linear losses over steps 0–200 with known crossings. random ends at 6.0, mates at 5.0 (reaching 6.0 at step
    133.3: 1.50× random). bliss reaches 6.0 at steps 100 / 80 (2.00× / 2.50× random) and 5.0 at 150 / 120 (1.33× /
    1.67× mates) on seeds 0 / 1, with 50 selection FLOPs first; late reaches 6.0 at 150 / 166.7 (1.33× / 1.20×
    random) and 5.0 only on seed 0, at its last step (1.00×); flat never reaches either."""
    spec = CompareSpec.model_validate(
        {
            "name": "c",
            "base": "unused.yaml",
            "seeds": [0, 1],
            "baseline": "random",
            "also_against": ["mates"],
            "variants": {v: {} for v in ("bliss", "late", "flat", "mates", "random")},
        }
    )
    steps = [0, 100, 200]
    curves = []
    for seed, (bliss_mid, late_end) in enumerate(((6.0, 5.0), (5.5, 5.5))):
        curves += [
            _curve("random", seed, steps, [8.0, 7.0, 6.0]),
            _curve("mates", seed, steps, [8.0, 6.5, 5.0]),
            _curve("bliss", seed, steps, [8.0, bliss_mid, 2 * bliss_mid - 8.0], selection=50.0),
            _curve("late", seed, steps, [8.0, 7.0, late_end]),
            _curve("flat", seed, steps, [8.0, 7.5, 7.0]),
        ]
    return spec, curves


def test_speedups_against_any_baseline_on_linear_curves():
    _, curves = _against_every_baseline_case()
    assert speedups(curves, "mates", "random", "steps") == pytest.approx([1.5, 1.5])
    assert speedups(curves, "bliss", "random", "steps") == pytest.approx([2.0, 2.5])
    assert speedups(curves, "bliss", "mates", "steps") == pytest.approx([200 / 150, 200 / 120])
    # bliss's 50 selection FLOPs come before its first step: at equal FLOPs it reaches mates's loss at 200 / 170
    assert speedups(curves, "bliss", "mates", "flops") == pytest.approx([200 / 200, 200 / 170])
    assert speedups(curves, "late", "mates", "steps") == pytest.approx([1.0, None])
    assert speedups(curves, "flat", "random", "steps") == speedups(curves, "flat", "mates", "flops") == [None, None]


def test_the_table_against_every_baseline_gives_a_column_pair_per_baseline():
    spec, curves = _against_every_baseline_case()
    lines = every_baseline_table(spec, curves)
    assert lines[0] == "| variant | vs random: steps | vs random: FLOPs | vs mates: steps | vs mates: FLOPs |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    sd = np.std([200 / 150, 200 / 120], ddof=1)
    assert rows["bliss"] == [
        f"2.25 ± {np.std([2.0, 2.5], ddof=1):.2f}×",
        f"{np.mean([200 / 150, 200 / 130]):.2f} ± {np.std([200 / 150, 200 / 130], ddof=1):.2f}×",  # 50 + 100, 50 + 80
        f"1.50 ± {sd:.2f}×",
        f"{np.mean([1.0, 200 / 170]):.2f} ± {np.std([1.0, 200 / 170], ddof=1):.2f}×",
    ]
    assert rows["late"][2] == "1.00× (1 of 2 seeds reach it)"
    assert rows["flat"] == ["not reached (0 of 2 seeds)"] * 4
    assert rows["mates"][:2] == ["1.50 ± 0.00×"] * 2 and rows["mates"][2:] == ["(baseline)"] * 2
    assert rows["random"][:2] == ["(baseline)"] * 2 and rows["random"][2:] == ["not reached (0 of 2 seeds)"] * 2
    # Table 4 stays against the main baseline only
    table = {line.split("|")[1].strip(): line for line in table4(spec, curves)[2:]}
    assert table["bliss"].endswith(f"| 2.25 ± {np.std([2.0, 2.5], ddof=1):.2f}× | {rows['bliss'][1]} |")
    assert table["mates"].endswith("| 1.50 ± 0.00× | 1.50 ± 0.00× |")


def test_the_report_draws_the_method_head_to_head_with_each_further_baseline(tmp_path, monkeypatch):
    spec, curves = _against_every_baseline_case()
    drawn = []
    monkeypatch.setattr(compare_figures.plt, "close", drawn.append)  # keep the figures to look at them
    text = write_markdown(spec, curves, tmp_path / "report.md", "bliss-ray compare c.yaml").read_text()
    pngs = ["report_fig3_steps.png", "report_fig3_flops.png"]
    pngs += ["report_fig3_bliss_vs_mates_steps.png", "report_fig3_bliss_vs_mates_flops.png"]
    for png in pngs:
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 10_000
    assert "## Against every baseline" in text and "| vs mates: steps |" in text
    assert "### `bliss` against `mates`" in text
    assert f"`bliss`'s speed-up to it: 1.50 ± {np.std([200 / 150, 200 / 120], ddof=1):.2f}× at equal target" in text
    assert "Against `random`:" in text and "Against `mates`:" in text
    assert (
        "| late | 1 | 5.5000 | 5.0000 | never | never |" in text and "| bliss | 0 | 4.0000 | 5.0000 | 1.33× |" in text
    )
    labels = [fig.axes[0].get_legend_handles_labels()[1] for fig in drawn]
    assert labels[2] == labels[3] == ["bliss (2 seeds)", "mates (2 seeds)", "mates's final loss"]
    assert labels[0][-1] == "random's final loss" and len(labels[0]) == len(spec.variants) + 1
    assert drawn[2].axes[0].lines[-1].get_ydata()[0] == pytest.approx(5.0)  # mates's final loss is the line
    for fig in drawn:
        fig.clf()


def test_the_report_shows_the_search_and_whether_the_compared_settings_won_it(tmp_path):
    import json

    import pandas as pd

    tree = yaml.safe_load(DEMO.read_text())
    tree["tuning"].pop("results")  # read from the run root
    spec = load_compare(_write(tmp_path, tree))
    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "demo_tune.yaml").read_text())
    assert "not been run" in "\n".join(tuning_section(spec, tmp_path))
    bliss = spec.experiment("bliss", 0).bilevel
    ours = {"bilevel.gamma": bliss.gamma, "bilevel.score_lr": bliss.score_lr, "bilevel.proxy_lr": bliss.proxy_lr}
    ours |= {"bilevel.outer_steps": bliss.outer_steps, "bilevel.z_init": bliss.z_init}
    other = ours | {"bilevel.gamma": 0.05}
    rows = [  # the other point wins, ours second, a failed trial is not ranked
        {"variant_key": json.dumps(ours, sort_keys=True), "status": "ok", "steps_to_baseline": 150.0},
        {"variant_key": json.dumps(other, sort_keys=True), "status": "ok", "steps_to_baseline": 120.0},
        {"variant_key": json.dumps(other, sort_keys=True), "status": "error", "steps_to_baseline": float("nan")},
    ]
    (tmp_path / sweep["name"]).mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / sweep["name"] / "sweep_results.parquet")
    text = "\n".join(tuning_section(spec, tmp_path))
    table = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert table[0].startswith("| 1 | 0.05 |") and table[0].endswith("| 120 |") and table[1].endswith("| 150 |")
    assert "2 of the 8 planned trials finished (3 recorded)" in text and "**not** the search's best trial" in text
    rows[0]["steps_to_baseline"] = 100.0
    pd.DataFrame(rows).to_parquet(tmp_path / sweep["name"] / "sweep_results.parquet")
    assert "The compared settings are the search's best trial." in "\n".join(tuning_section(spec, tmp_path))
    # a copy of the search kept elsewhere (tuning.results) is read in place of the run root's
    kept = tmp_path / "kept"
    (tmp_path / sweep["name"]).rename(kept)
    tree = yaml.safe_load(DEMO.read_text())
    tree["tuning"]["results"] = str(kept)
    tree["base"] = str(REPO / tree["base"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    kept_spec = load_compare(tmp_path / "c.yaml")
    assert "not been run" in "\n".join(tuning_section(spec, tmp_path))
    assert "The compared settings are the search's best trial." in "\n".join(tuning_section(kept_spec, tmp_path))


def _held_out_check_case(tmp_path) -> tuple[dict, list[Curve]]:
    """The demo comparison cut to seeds 0–1 with ``bliss_tuned`` running a recorded search's best point (a
    candidate), and curves where ``bliss`` reaches random's final loss 1.33× sooner on both seeds and
    ``bliss_tuned`` 2.00× on seed 0 and 1.20× on seed 1."""
    import json

    import pandas as pd

    tree = yaml.safe_load(DEMO.read_text())
    best = {"bilevel.gamma": 0.05, "bilevel.score_lr": 2e-3, "bilevel.proxy_lr": 1e-3}
    best |= {"bilevel.outer_steps": 80, "bilevel.z_init": "constant"}
    tree["variants"] = {"bliss": {}, "bliss_tuned": {"overrides": best}, "random": tree["variants"]["random"]}
    tree.pop("also_against")  # no mates here
    tree["seeds"] = [0, 1]
    kept = tmp_path / "search"
    kept.mkdir()
    rows = [{"variant_key": json.dumps(best, sort_keys=True), "status": "ok", "steps_to_baseline": 90.0}]
    pd.DataFrame(rows).to_parquet(kept / "sweep_results.parquet")
    tree["tuning"] = {"sweep": tree["tuning"]["sweep"], "variant": "bliss", "candidate": "bliss_tuned"}
    tree["tuning"]["results"] = str(kept)
    curves = [_curve("random", s, [50, 100], [6.0, 5.0]) for s in (0, 1)]
    curves += [_curve("bliss", s, [50, 100], [5.5, 4.5]) for s in (0, 1)]  # reaches 5.0 at 75: 1.33×
    curves += [_curve("bliss_tuned", 0, [50, 100], [5.0, 4.4]), _curve("bliss_tuned", 1, [50, 100], [5.8, 4.6])]
    return tree, curves


def test_the_held_out_check_judges_the_searchs_best_point_against_the_defaults_seed_by_seed(tmp_path):
    """A candidate variant running the search's best point replaces the defaults only if it beats them on every
    held-out seed; a candidate that does not run the best point gets no verdict."""
    tree, curves = _held_out_check_case(tmp_path)
    spec = load_compare(_write(tmp_path, tree))
    text = "\n".join(tuning_section(spec, tmp_path, curves))
    assert "seed 0: 2.00× vs 1.33×; seed 1: 1.20× vs 1.33×; it wins on 1 of 2: the defaults stay." in text
    curves[-1] = _curve("bliss_tuned", 1, [50, 100], [4.9, 4.4])
    text = "\n".join(tuning_section(spec, tmp_path, curves))
    assert "it wins on all 2: its settings may replace the defaults." in text
    tree["variants"]["bliss_tuned"]["overrides"]["bilevel.gamma"] = 0.02
    lines, check = tuning_and_check(load_compare(_write(tmp_path, tree)), tmp_path, curves)
    text = "\n".join(lines)
    assert "was meant to run the search's best point" in text and "Held-out check" not in text
    assert check is None  # nothing is kept for a later comparison either


def test_a_kept_held_out_check_is_shown_without_running_the_candidate_again(tmp_path):
    """The check a comparison ran (``heldout_check.json`` beside its report) is shown by a later comparison that
    names it in ``tuning.check`` and runs only the tuned variant; if that variant's speed-ups on the later runs
    differ from the kept ones, the report says so."""
    import json

    tree, curves = _held_out_check_case(tmp_path)
    record = tuning_and_check(load_compare(_write(tmp_path, tree)), tmp_path, curves)[1]
    record |= {"command": "bliss-ray compare check.yaml"}
    (tmp_path / "heldout_check.json").write_text(json.dumps(record))

    later = tree | {"variants": {"bliss": {}, "random": tree["variants"]["random"]}}
    later["tuning"] = {k: v for k, v in tree["tuning"].items() if k != "candidate"} | {
        "check": str(tmp_path / "heldout_check.json")
    }
    spec = load_compare(_write(tmp_path, later))
    lines, own = tuning_and_check(spec, tmp_path, curves[:4])
    assert own is None  # runs no check of its own: writes none
    text = "\n".join(lines)
    kept_from = "vs `bliss`; kept from an earlier comparison: `heldout_check.json`, made by `bliss-ray compare check"
    assert kept_from in text
    assert "seed 0: 2.00× vs 1.33×; seed 1: 1.20× vs 1.33×; it wins on 1 of 2: the defaults stay." in text
    assert "differ" not in text
    moved = [*curves[:3], _curve("bliss", 1, [50, 100], [5.4, 4.5])]
    assert "speed-ups differ from this comparison's on seeds 1" in "\n".join(tuning_section(spec, tmp_path, moved))
    with pytest.raises(ConfigError, match=r"tuning\.check: a check made earlier"):
        load_compare(_write(tmp_path, later | {"tuning": later["tuning"] | {"candidate": "random"}}))
    with pytest.raises(ConfigError, match=r"tuning\.check: no file 'nowhere.json'"):
        load_compare(_write(tmp_path, later | {"tuning": later["tuning"] | {"check": "nowhere.json"}}))


def test_once_the_best_point_is_the_default_the_report_keeps_its_held_out_check(tmp_path):
    """``tuning.before``: the defaults run the search's best point and a variant runs the settings they replaced;
    the report says they replaced them after winning on every held-out seed, or that they should go back."""
    import json

    import pandas as pd

    tree = yaml.safe_load(DEMO.read_text())
    best = {"bilevel.gamma": 0.05, "bilevel.score_lr": 2e-3, "bilevel.proxy_lr": 1e-3}
    best |= {"bilevel.outer_steps": 80, "bilevel.z_init": "constant"}
    random = tree["variants"]["random"]
    tree["variants"] = {"bliss": {"overrides": best}, "bliss_before": {}, "random": random}
    tree.pop("also_against")  # no mates here
    tree["seeds"] = [0, 1]
    kept = tmp_path / "search"
    kept.mkdir()
    rows = [{"variant_key": json.dumps(best, sort_keys=True), "status": "ok", "steps_to_baseline": 90.0}]
    pd.DataFrame(rows).to_parquet(kept / "sweep_results.parquet")
    tree["tuning"] = {"sweep": tree["tuning"]["sweep"], "variant": "bliss", "before": "bliss_before"}
    tree["tuning"]["results"] = str(kept)
    spec = load_compare(_write(tmp_path, tree))
    curves = [_curve("random", s, [50, 100], [6.0, 5.0]) for s in (0, 1)]
    curves += [_curve("bliss_before", s, [50, 100], [5.5, 4.5]) for s in (0, 1)]  # 1.33×
    curves += [_curve("bliss", 0, [50, 100], [5.0, 4.4]), _curve("bliss", 1, [50, 100], [4.9, 4.4])]
    text = "\n".join(tuning_section(spec, tmp_path, curves))
    assert "The compared settings are the search's best trial, which became the defaults" in text
    assert "seed 0: 2.00× vs 1.33×; seed 1: 2.00× vs 1.33×; it wins on all 2: its settings replaced" in text
    curves[-1] = _curve("bliss", 1, [50, 100], [5.8, 4.6])
    text = "\n".join(tuning_section(spec, tmp_path, curves))
    assert "it wins on only 1 of 2: **the defaults should go back to `bliss_before`'s settings**" in text
    with pytest.raises(ConfigError, match=r"tuning\.before: a candidate is still on trial"):
        load_compare(_write(tmp_path, tree | {"tuning": tree["tuning"] | {"candidate": "bliss_before"}}))


def _write(tmp_path, tree):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
