"""The comparison report (``bliss-ray compare``): the rebuttal's Table 4 and Figure 3 at laptop scale.

From each variant × seed's evaluated checkpoints (decay branches: every round's end and its mid-round branches) and
its FLOPs ledger (``compare_curves``), it computes, per seed against a baseline of the same seed:

* speed-up at equal target steps: the baseline's final steps ÷ the steps at which the variant first reaches the
  baseline's final held-out reference loss (linear interpolation between checkpoints);
* speed-up at equal FLOPs: the same with total FLOPs spent (``compare_spec.spent_flops``: warm-up, the selection
  of every round so far, and the target's steps) in place of steps;

and reports their mean ± standard deviation over seeds: against the main baseline with the final results and total
FLOPs (Table 4), against every baseline (``also_against`` too) in a table of its own and seed by seed, and Figure 3
(``compare_figures``): every variant against the main baseline, and the method head to head with each further
baseline, and the canaries' selected shares (``report.canaries``) when the pool has them. No Ray; pure reading of
stage outputs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bliss_ray import storage
from bliss_ray.costs.ledger import unit_of
from bliss_ray.pipeline import setting
from bliss_ray.studies.compare_curves import Curve, speedup, speedups
from bliss_ray.studies.compare_figures import AXES, figure3_pair
from bliss_ray.studies.compare_spec import CompareSpec
from bliss_ray.studies.sweep_spec import load_sweep


def _stat(values: list[float | None], digits: int = 2) -> str:
    """Speed-ups over seeds as "mean ± sd×", with how many seeds reach the baseline where not all do."""
    got = np.array([v for v in values if v is not None], dtype=float)
    if len(got) == 0:
        return f"not reached (0 of {len(values)} seeds)"
    text = f"{got.mean():.{digits}f}" + (f" ± {got.std(ddof=1):.{digits}f}" if len(got) > 1 else "") + "×"
    return text + (f" ({len(got)} of {len(values)} seeds reach it)" if len(got) < len(values) else "")


def _mean_sd(values: np.ndarray, digits: int) -> str:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "–"
    sd = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{values.mean():.{digits}f}{sd}"


def _speedup_cell(curves: list[Curve], variant: str, against: str, axis: str) -> str:
    return "(baseline)" if variant == against else _stat(speedups(curves, variant, against, axis))


def table4(spec: CompareSpec, curves: list[Curve]) -> list[str]:
    unit = 10.0 ** unit_of(max(c.total_flops for c in curves))
    lines = [
        f"| variant | total FLOPs (×{unit:.0e}) | selection share | target steps | final held-out ref. loss "
        f"| paper avg (%) | speed-up at equal steps | speed-up at equal FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in spec.variants:
        mine = [c for c in curves if c.variant == name]
        lines.append(
            f"| {name} | {np.mean([c.total_flops for c in mine]) / unit:.3g} "
            f"| {100 * np.mean([c.selection_share for c in mine]):.1f}% | {mine[0].steps[-1]:.0f} "
            f"| {_mean_sd(np.array([c.loss[-1] for c in mine]), 4)} "
            f"| {_mean_sd(100 * np.array([c.average[-1] for c in mine]), 1)} | "
            + " | ".join(_speedup_cell(curves, name, spec.baseline, axis) for axis in AXES)
            + " |"
        )
    return lines


def every_baseline_table(spec: CompareSpec, curves: list[Curve]) -> list[str]:
    """Each variant's speed-up over every baseline (``spec.baselines``), a column pair (equal target steps, equal
    FLOPs) per baseline."""
    head = " | ".join(f"vs {b}: steps | vs {b}: FLOPs" for b in spec.baselines)
    lines = [f"| variant | {head} |", "|---" * (1 + len(AXES) * len(spec.baselines)) + "|"]
    for name in spec.variants:
        cells = [_speedup_cell(curves, name, b, axis) for b in spec.baselines for axis in AXES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def seed_rows(curves: list[Curve], against: str) -> list[str]:
    """Every other variant × seed: its final loss, ``against``'s of the same seed, and its speed-ups over it."""
    lines = [
        f"| variant | seed | final loss | {against}'s final loss | speed-up (steps) | speed-up (FLOPs) |",
        "|---|---|---|---|---|---|",
    ]
    bases = {c.seed: c for c in curves if c.variant == against}
    for c in curves:
        if c.variant == against:
            continue
        b = bases[c.seed]
        s, f = (speedup(c, b, axis) for axis in AXES)
        lines.append(
            f"| {c.variant} | {c.seed} | {c.loss[-1]:.4f} | {b.loss[-1]:.4f} | "
            f"{'never' if s is None else f'{s:.2f}×'} | {'never' if f is None else f'{f:.2f}×'} |"
        )
    return lines


def _same(a, b) -> bool:
    both_numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return bool(np.isclose(a, b, rtol=1e-6)) if both_numbers else a == b


def _point_of(spec: CompareSpec, variant: str, keys: list[str]) -> dict:
    """A variant's value of each searched key (the first seed's experiment: seeds change no searched key)."""
    return {k: setting(spec.experiment(variant, spec.seeds[0]), k) for k in keys}


def _is_point(point: dict, best: dict) -> bool:
    return all(_same(point[k], best[k]) for k in best)


def tuning_section(spec: CompareSpec, out: str | Path, curves: list[Curve] = ()) -> list[str]:
    """The report's tuning section (``tuning_and_check``'s lines)."""
    return tuning_and_check(spec, out, curves)[0]


def _search_intro(spec: CompareSpec, sweep, used: dict) -> list[str]:
    """The section's heading and where the tuned variant's settings were searched (tuning seeds vs held-out ones)."""
    search, shown = sweep.spec.search, ", ".join(f"`{k}` = {v}" for k, v in used.items())
    return [
        "## Tuning: the search and the held-out check",
        "",
        f"`{spec.tuning.variant}`'s settings are searched by `bliss-ray sweep {Path(spec.tuning.sweep).name}` "
        f"({search.type}, {search.num_samples} trials, objective `{sweep.spec.metric}`, {sweep.spec.mode}imised) "
        f"on tuning seeds {sweep.seeds()}; this comparison's seeds {spec.seeds} are held out from it. "
        f"Compared here: {shown}.",
        "",
    ]


def _trials_table(ok: pd.DataFrame, keys: list[str], metric: str) -> list[str]:
    """The finished trials, best first: each one's point and its objective (and speed-up columns when recorded)."""
    cols = [metric, *(c for c in ("reached_baseline", "speedup", "reference_loss") if c in ok)]
    lines = ["| rank | " + " | ".join([*keys, *cols]) + " |", "|---" * (len(keys) + len(cols) + 1) + "|"]
    for rank, (_, r) in enumerate(ok.iterrows(), 1):
        point = json.loads(r["variant_key"])
        cells = [*(point[k] for k in keys), *(r[c] for c in cols)]
        lines.append(f"| {rank} | " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return lines


def _best_verdict(spec: CompareSpec, used: dict, best: dict, keys: list[str]) -> str:
    """Whether the compared settings are the search's best trial (and, if not, what that trial was)."""
    return (
        "The compared settings are the search's best trial"
        + (", which became the defaults after the held-out check below." if spec.tuning.before else ".")
        if _is_point(used, best)
        else "The compared settings are **not** the search's best trial ("
        + ", ".join(f"`{k}` = {best[k]}" for k in keys)
        + "): the base experiment's settings are kept until the best trial also wins on these held-out seeds."
    )


def _heldout_check(
    spec: CompareSpec, curves: list[Curve], keys: list[str], used: dict, best: dict, lines: list[str]
) -> tuple[list[str], dict | None]:
    """Append the held-out check to ``lines``: the one this comparison runs (a candidate, or defaults that are the
    best point; refused when the candidate does not run that point), else one an earlier comparison stored
    (``tuning.check``)."""
    if spec.tuning.candidate is not None or (spec.tuning.before is not None and _is_point(used, best)):
        record = check_record(spec, curves, keys)
        if not _is_point(record["point"], best):
            shown = ", ".join(f"`{k}` = {record['point'][k]}" for k in keys)
            return [
                *lines,
                f"`{record['candidate']}` was meant to run the search's best point but runs {shown}: "
                "no held-out check.",
                "",
            ], None
        return [*lines, *_render_check(record)], record
    if spec.tuning.check is not None:
        lines += _stored_check(spec, curves, keys, best)
    return lines, None


def tuning_and_check(spec: CompareSpec, out: str | Path, curves: list[Curve] = ()) -> tuple[list[str], dict | None]:
    """Where the tuned variant's settings came from: the sweep's trials (read from ``<out>/<sweep name>/`` or
    ``tuning.results``), its best point, whether the compared settings are that point, and the held-out check: with
    a ``candidate`` (a variant running the best point), does it beat the tuned variant on every seed of this
    comparison (``load_compare`` refuses seeds the sweep tuned on)? With ``before`` (the best point has become the
    defaults), the same check of the defaults against the settings they replaced. Returns the section's lines and
    the check this comparison ran (``check_record``; None if it ran none), which ``bliss-ray compare`` keeps beside
    its report (``heldout_check.json``) for a later comparison's ``tuning.check``."""
    if spec.tuning is None:
        return [], None
    sweep = load_sweep(spec.tuning.sweep)
    metric, keys = sweep.spec.metric, list(sweep.spec.space)
    used = _point_of(spec, spec.tuning.variant, keys)
    lines = _search_intro(spec, sweep, used)
    results = storage.join(spec.tuning.results or storage.join(out, sweep.spec.name), "sweep_results.parquet")
    blob = storage.read_bytes(results)
    if blob is None:
        return [*lines, f"**The search has not been run into this run root** (`{results}` is missing).", ""], None
    df = pd.read_parquet(io.BytesIO(blob))
    ok = df[df["status"] == "ok"].sort_values(metric, ascending=sweep.spec.mode == "min")
    lines += _trials_table(ok, keys, metric)
    if len(ok) == 0:
        return [*lines, "", f"No trial of the search finished ({len(df)} recorded).", ""], None
    best = json.loads(ok.iloc[0]["variant_key"])
    planned = f"{len(ok)} of the {sweep.spec.search.num_samples} planned trials finished ({len(df)} recorded)"
    lines += ["", f"{planned}. {_best_verdict(spec, used, best, keys)}", ""]
    return _heldout_check(spec, curves, keys, used, best, lines)


def check_record(spec: CompareSpec, curves: list[Curve], keys: list[str]) -> dict:
    """The held-out check this comparison runs: the candidate (running the search's best point) against the
    defaults, or with ``tuning.before`` the defaults against the settings they replaced; each one's speed-up over
    the baseline at equal target steps, seed by seed."""
    t = spec.tuning
    cand, name = (t.candidate, t.variant) if t.candidate is not None else (t.variant, t.before)
    ups = {v: _speedups(spec, curves, v) for v in (cand, name)}
    return {
        "candidate": cand,
        "variant": name,
        "adopted": t.before is not None,
        "baseline": spec.baseline,
        "point": _point_of(spec, cand, keys),
        "speedups": {s: {"candidate": ups[cand][s], "variant": ups[name][s]} for s in ups[cand] if s in ups[name]},
    }


def _speedups(spec: CompareSpec, curves: list[Curve], variant: str) -> dict[str, float]:
    """Seed (as text: JSON keys) → the variant's speed-up over the baseline at equal target steps (0: never)."""
    bases = {c.seed: c for c in curves if c.variant == spec.baseline}
    return {str(c.seed): speedup(c, bases[c.seed], "steps") or 0.0 for c in curves if c.variant == variant}


def _stored_check(spec: CompareSpec, curves: list[Curve], keys: list[str], best: dict) -> list[str]:
    """``tuning.check``: the check an earlier comparison made, shown if it judged the search's best point against
    this comparison's tuned variant; its runs of that variant should be this comparison's (same seeds, settings)."""
    record = json.loads(Path(spec.tuning.check).read_text())
    shown = f"`{Path(spec.tuning.check).name}`, made by `{record.get('command', '?')}`"
    if record["variant"] != spec.tuning.variant or not _is_point(record["point"], best):
        return [f"The kept held-out check ({shown}) judged another point or variant: no held-out check.", ""]
    now = _speedups(spec, curves, spec.tuning.variant)  # on this comparison's runs
    differ = [s for s, v in record["speedups"].items() if s in now and not _same(v["variant"], now[s])]
    lines = _render_check(record, f"; kept from an earlier comparison: {shown}")
    if differ:
        lines.insert(
            -1,
            f"Its `{record['variant']}` speed-ups differ from this comparison's on seeds "
            f"{', '.join(differ)}: it was made on other runs.",
        )
    return lines


def _render_check(record: dict, source: str = "") -> list[str]:
    cand, name, ups = record["candidate"], record["variant"], record["speedups"]
    if not ups:
        return [f"Held-out check: `{cand}` and `{name}` have no seed in common yet.", ""]
    cells = "; ".join(f"seed {s}: {u['candidate']:.2f}× vs {u['variant']:.2f}×" for s, u in ups.items())
    wins = sum(u["candidate"] > u["variant"] for u in ups.values())
    seeds = list(ups)
    if record["adopted"]:
        verdict = (
            f"it wins on all {len(seeds)}: its settings replaced `{name}`'s as the defaults."
            if wins == len(seeds)
            else f"it wins on only {wins} of {len(seeds)}: **the defaults should go back to `{name}`'s settings**."
        )
    else:
        verdict = (
            f"it wins on all {len(seeds)}: its settings may replace the defaults."
            if wins == len(seeds)
            else f"it wins on {wins} of {len(seeds)}: the defaults stay."
        )
    return [
        f"**Held-out check** (speed-up over `{record['baseline']}` at equal target steps, `{cand}` = the "
        f"search's best point vs `{name}`{source}): {cells}; {verdict}",
        "",
    ]


def _every_baseline_section(spec: CompareSpec, curves: list[Curve]) -> list[str]:
    """The table against every baseline (none when the main baseline is the only one: Table 4 says it all)."""
    if not spec.also_against:
        return []
    return [
        "## Against every baseline",
        "",
        f"Every variant's speed-ups over each of {', '.join(f'`{b}`' for b in spec.baselines)}, computed as in "
        "Table 4 with that baseline's final held-out loss of the same seed as the goal: mean ± standard deviation "
        "over seeds, and how many seeds reach it where not all do.",
        "",
        *every_baseline_table(spec, curves),
        "",
    ]


def _figure3_section(spec: CompareSpec, curves: list[Curve], directory: Path, stem: str) -> list[str]:
    """Figure 3 of every variant against the main baseline, then the method head to head with each further
    baseline, as the rebuttal draws BLISS against MATES."""
    steps_png, flops_png = figure3_pair(curves, list(spec.variants), spec.baseline, directory, f"{stem}_fig3")
    lines = ["## Figure 3", "", f"![loss vs steps]({steps_png.name}) ![loss vs FLOPs]({flops_png.name})", ""]
    for b in spec.also_against:
        steps_png, flops_png = figure3_pair(curves, [spec.lead, b], b, directory, f"{stem}_fig3_{spec.lead}_vs_{b}")
        on_steps, on_flops = (_stat(speedups(curves, spec.lead, b, axis)) for axis in AXES)
        lines += [
            f"### `{spec.lead}` against `{b}`",
            "",
            f"The dotted line is `{b}`'s final held-out loss; `{spec.lead}`'s speed-up to it: {on_steps} at equal "
            f"target steps, {on_flops} at equal FLOPs.",
            "",
            f"![{spec.lead} vs {b}, loss vs steps]({steps_png.name}) "
            f"![{spec.lead} vs {b}, loss vs FLOPs]({flops_png.name})",
            "",
        ]
    return lines


def _per_seed_section(spec: CompareSpec, curves: list[Curve]) -> list[str]:
    lines = ["## Per seed", ""]
    for b in spec.baselines:
        lines += [f"Against `{b}`:", "", *seed_rows(curves, b), ""]
    return lines


def write_markdown(
    spec: CompareSpec, curves: list[Curve], path: Path, command: str, tuning: list[str] = (), canaries: list[str] = ()
) -> Path:
    """The report's markdown at ``path`` (figures beside it); ``tuning`` and ``canaries`` are sections made
    elsewhere (``tuning_and_check``, ``report.canaries``), empty when the comparison has none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_ck = min(len(c.steps) for c in curves)
    md = [
        f"# {spec.name}: {', '.join(spec.variants)} over seeds {', '.join(map(str, spec.seeds))}",
        "",
        spec.description.strip(),
        "",
        f"Generated by `{command}` from the runs' own outputs (rerunning the command recomputes nothing that is "
        "finished). Reference loss is measured on the **held-out evaluation part** of the reference set, which "
        f"neither the bilevel upper level nor MATES's probes see. Each curve has ≥ {n_ck} evaluated checkpoints "
        "(decay branches at the end of every round and inside it). FLOPs follow the ledger (`bliss-ray flops`; "
        "evaluation excluded); a checkpoint's FLOPs are what was spent when it existed, in plan order.",
        "",
        "## Table 4 at laptop scale",
        "",
        f"Mean ± standard deviation over seeds. A speed-up is {spec.baseline}'s final steps (or FLOPs) ÷ the steps "
        f"(FLOPs) at which the variant first reaches {spec.baseline}'s final held-out loss of the same seed.",
        "",
        *table4(spec, curves),
        "",
        *_every_baseline_section(spec, curves),
        *_figure3_section(spec, curves, path.parent, path.stem),
        *_per_seed_section(spec, curves),
        *canaries,
        *tuning,
    ]
    path.write_text("\n".join(md) + "\n")
    return path
