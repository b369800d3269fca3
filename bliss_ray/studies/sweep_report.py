"""Render a Ray Tune sweep (``bliss-ray sweep``) as report.md: the ablation table and learning curves per variant.

Input: a sweep directory holding ``sweep.json``, ``sweep_results.parquet`` and ``sweep_curves.parquet``
(written by ``bliss_ray.studies.sweep_results.write_results`` into OUT/<sweep>/ and into the Tune experiment
directory). No Ray needed.

    bliss-ray report runs/table2_proxy_sigmoid_tiny --out report/table2_tiny      # the CLI sends sweeps here

Sections: one row per variant (= config point; repeats over ``seeds`` give mean ± sample std and n) with its
difference to the best variant marked against the noise (the seed spread, and lm-eval's standard errors where the
metric has them), the main effect of each swept key (its values averaged over everything else), the proxy's
upper-level loss at matched bilevel steps, every trial, and ``sweep_curves.png`` (upper- and lower-level loss vs
bilevel step, one line per variant, the mean over seeds with a ±1 std band where repeated). Warnings come first:
a proxy-level metric compared across proxies (not ranked), trials at unequal target tokens, downstream accuracy
at chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on clusters and in CI
import matplotlib.pyplot as plt
import pandas as pd

from bliss_ray.studies.sweep_metrics import PROXY_METRICS, proxy_keys

RESULTS, CURVES, META = "sweep_results.parquet", "sweep_curves.parquet", "sweep.json"
DESCRIBE = {
    "upper_loss": "proxy's upper-level reference loss (nats/token)",
    "lower_loss": "proxy's lower-level weighted training loss (nats/token)",
    "paper_average": "target's downstream average accuracy of its final checkpoint, after selection",
    "reference_loss": "target's held-out reference-set loss of its final checkpoint, after selection (nats/token)",
    "steps_to_baseline": "target steps at which the target's held-out reference loss first reaches the baseline's "
    "final loss (interpolated between checkpoints; a trial that never reaches it scores its final steps × (1 + "
    "relative loss gap))",
    "speedup": "baseline's final target steps ÷ steps_to_baseline (blank: never reached)",
}
NOISE_RULE = (
    "≈ marks a difference no larger than its noise band: the seed spread s (pooled within-variant sample std over "
    "seeds) or two standard errors of the difference of the means, 2·s·√(1/n₁ + 1/n₂), whichever is larger{eval}. "
    "Such a difference is not evidence that either variant is better; one beyond the band is no significance test."
)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / RESULTS).is_file() and (Path(path) / META).is_file()


def _stat(values: pd.Series, digits: int = 4) -> str:
    v = values.dropna().astype(float)
    if not len(v):
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _value_label(meta: dict, key: str, value) -> str:
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return meta.get("labels", {}).get(key, {}).get(str(value), shown)


def proxy_ranking_warning(meta: dict) -> str | None:
    """Why this sweep's ranking is not about data selection: a proxy-level metric compared across proxies."""
    varied = proxy_keys(meta["space_keys"])
    if meta["metric"] not in PROXY_METRICS or not varied:
        return None
    return (
        f"**⚠ This ranking does not answer the sweep's question.** `{meta['metric']}` is measured on the proxy "
        f"itself and the space varies the proxy ({', '.join(f'`{k}`' for k in varied)}): a larger or "
        "longer-trained proxy wins it by construction. It says nothing about which proxy selects better data; "
        "rerun with `stage: full` and `metric: reference_loss` (the target after selection). Variants are not ranked."
    )


def seed_spread(df: pd.DataFrame, metric: str) -> tuple[float | None, int]:
    """Pooled within-variant sample std of ``metric`` over seeds (finished trials), and its degrees of freedom;
    (None, 0) when no variant was repeated."""
    squares, dof = 0.0, 0
    for _, g in df[df["status"] == "ok"].groupby("variant_key"):
        v = g[metric].dropna().astype(float)
        squares += float(((v - v.mean()) ** 2).sum())
        dof += max(len(v) - 1, 0)
    return (math.sqrt(squares / dof), dof) if dof else (None, 0)


def noise_band(spread: float | None, n_a: int, n_b: int, eval_se: float | None = None) -> float | None:
    """A difference of two means (of n_a and n_b trials) at or below this is noise: the seed spread itself, or two
    standard errors of the difference where larger; with an evaluation stderr of the difference (lm-eval's, which
    repeating seeds on the same items does not shrink), also two of those. None: no noise estimate at all."""
    bands = [spread, 2 * spread * math.sqrt(1 / n_a + 1 / n_b)] if spread is not None else []
    bands += [2 * eval_se] if eval_se is not None and eval_se == eval_se else []
    return max(bands) if bands else None


def _num(value) -> float | None:
    """A float, or None for missing values (None or NaN, as pandas mixes them)."""
    return None if value is None or value != value else float(value)


def _mean(g: pd.DataFrame, column: str) -> float | None:
    return _num(g[column].astype(float).mean()) if column in g else None


def _summary(meta: dict, df: pd.DataFrame, by: str) -> dict:
    """group → {mean, n, se (mean evaluation stderr of the metric), chance, above_chance} over finished trials.
    The paper average is above chance when it beats it by more than two lm-eval stderrs and the seed spread."""
    metric, ok = meta["metric"], df[df["status"] == "ok"]
    spread = seed_spread(df, "paper_average")[0] if "paper_average" in ok else None
    out = {}
    for key, g in ok.groupby(by, sort=False):
        row = {"mean": _mean(g, metric), "n": len(g), "se": _mean(g, f"{metric}_stderr")}
        avg, chance, se = (_mean(g, c) for c in ("paper_average", "paper_average_chance", "paper_average_stderr"))
        if avg is not None and chance is not None:
            margin = max(2 * se if se is not None else 0.0, spread or 0.0)
            row |= {"chance": chance, "above_chance": avg - chance > margin}
        out[key] = row
    return out


def _band(spread: float | None, a: dict, b: dict) -> float | None:
    eval_se = math.hypot(a["se"], b["se"]) if a["se"] is not None and b["se"] is not None else None
    return noise_band(spread, a["n"], b["n"], eval_se)


def _verdict(delta: float, band: float | None, best: bool) -> str:
    if band is None:
        return "best (n = 1: noise unknown)" if best else "n = 1: noise unknown"
    if best:
        return "best"
    return f"≈ best (band {band:.4f})" if abs(delta) <= band else f"beyond noise (band {band:.4f})"


def _variant_rows(meta: dict, df: pd.DataFrame) -> list[str]:
    keys, metric = meta["space_keys"], meta["metric"]
    others = [m for m in DESCRIBE if m in df and m != metric and df[m].notna().any()]
    ok = df[df["status"] == "ok"]
    stats = _summary(meta, df, "variant_key")
    ranked = proxy_ranking_warning(meta) is None
    at_chance = {vk: metric == "paper_average" and not r.get("above_chance", True) for vk, r in stats.items()}
    means = {vk: r["mean"] for vk, r in stats.items() if r["mean"] is not None and not at_chance[vk]}
    best = (min if meta["mode"] == "min" else max)(means, key=means.get) if means and ranked else None
    spread = seed_spread(df, metric)[0]
    paper = (meta.get("paper") or {}).get("rows")
    head = [*keys, f"**{metric}** (mean ± std)", "n", f"Δ {metric} vs best", "vs best", *others]
    head += ["the paper reports"] if paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(stats, key=lambda vk: (stats[vk]["mean"] is None, stats[vk]["mean"] or 0.0))
    for vk in order[::-1] if meta["mode"] == "max" else order:
        point, g, r = json.loads(vk), ok[ok["variant_key"] == vk], stats[vk]
        cells = [_value_label(meta, k, point.get(k)) for k in keys]
        if not ranked:
            delta, verdict = "–", "not ranked (proxy-level metric)"
        elif at_chance[vk]:
            delta, verdict = "–", "at chance: not ranked"
        elif best is None or r["mean"] is None:
            delta, verdict = "–", "–"
        else:
            delta = r["mean"] - stats[best]["mean"]
            delta, verdict = f"{delta:+.4f}", _verdict(delta, _band(spread, r, stats[best]), vk == best)
        shown = _stat(g[metric])
        shown = (f"**{shown}**" if vk == best else shown) + (_chance_note(r) if metric == "paper_average" else "")
        cells += [shown, str(len(g)), delta, verdict]
        cells += [_stat(g[m]) + (_chance_note(r) if m == "paper_average" else "") for m in others]
        cells += [paper.get(g["variant"].iloc[0], "–")] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _chance_note(r: dict) -> str:
    return f" ({'above' if r['above_chance'] else 'at'} chance {r['chance']:.2f})" if "chance" in r else ""


def _noise_lines(meta: dict, df: pd.DataFrame) -> list[str]:
    """How to read the Δ column: the seed spread and the noise rule, or loudly that there is no noise estimate."""
    metric = meta["metric"]
    spread, dof = seed_spread(df, metric)
    has_se = f"{metric}_stderr" in df and df[f"{metric}_stderr"].notna().any()
    eval_band = "; or two lm-eval standard errors of the difference, 2·√(se₁² + se₂²)" if has_se else ""
    rule = NOISE_RULE.format(eval=eval_band)
    if spread is None and not has_se:
        return [
            f"**One seed per variant: the seed spread of `{metric}` is unknown, so no difference in this table can "
            "be told from noise.** Repeat with `seeds: [0, 1]` (or more).",
        ]
    if spread is None:  # one seed, but lm-eval's stderrs: item-sampling noise only, not training noise
        return [f"No seed repeats: the band is two lm-eval standard errors of the difference alone. {rule}"]
    return [f"Seed spread of `{metric}`: s = {spread:.4f} ({dof} dof). {rule}"]


def _main_effects(meta: dict, df: pd.DataFrame) -> list[str]:
    metric, ok = meta["metric"], df[df["status"] == "ok"]
    spread, _ = seed_spread(df, metric)
    lines = []
    for key in meta["space_keys"]:
        col = f"config/{key}"
        n = ok[col].nunique() if col in ok else 0
        if n < 2 or n == len(ok) or n > 12:  # one value, or one trial per value (continuous knobs): nothing to pool
            continue
        lines += [f"**{key}** ({metric}, mean ± std over all other settings):", "", "| value | mean ± std | n |"]
        lines.append("|---|---|---|")
        for value, g in ok.groupby(col, sort=False):
            lines.append(f"| {_value_label(meta, key, value)} | {_stat(g[metric])} | {len(g)} |")
        stats = sorted((r for r in _summary(meta, df, col).values() if r["mean"] is not None), key=lambda r: r["mean"])
        if len(stats) < 2:
            continue
        lo, hi = stats[0], stats[-1]
        band, delta = _band(spread, lo, hi), hi["mean"] - lo["mean"]
        if proxy_ranking_warning(meta) and proxy_keys([key]):
            note = "not comparable: a proxy-level metric across proxies"
        elif band is None:
            note = "n = 1 per variant: noise unknown"
        else:
            note = f"≈ within noise (band {band:.4f})" if delta <= band else f"beyond noise (band {band:.4f})"
        lines += ["", f"Largest difference between values: {delta:.4f}: {note}.", ""]
    return lines


def _matched(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    """variant × step → mean, std, n over seeds, at the steps every trial of the variant reached."""
    rows = []
    for variant, g in curves.dropna(subset=[column]).groupby("variant", sort=False):
        per_trial = g.groupby("trial_id")["step"].apply(set)
        common = sorted(set.intersection(*per_trial)) if len(per_trial) else []
        at = g[g["step"].isin(common)].groupby("step")[column]
        stats = at.agg(["mean", "std", "count"]).reset_index()
        rows.append(stats.assign(variant=variant))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _matched_table(curves: pd.DataFrame) -> list[str]:
    m = _matched(curves, "upper_loss")
    if m.empty:
        return []
    steps = sorted(set.intersection(*(set(g["step"]) for _, g in m.groupby("variant"))))
    if not steps:
        return []
    picks = sorted({steps[round(q * (len(steps) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)})
    lines = ["| variant | " + " | ".join(f"step {s}" for s in picks) + " |", "|---|" + "---|" * len(picks)]
    for variant, g in m.groupby("variant", sort=False):
        by = g.set_index("step")
        cells = [
            f"{by.at[s, 'mean']:.4f}" + (f" ± {by.at[s, 'std']:.4f}" if by.at[s, "count"] > 1 else "") for s in picks
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _styles(meta: dict, curves: pd.DataFrame) -> dict[str, dict]:
    """variant → line style: colour by the first swept key, dashes by the second, markers by the rest, so that
    variants that differ in one key only stay distinguishable where their curves overlap."""
    keys = meta["space_keys"]
    points = {v: json.loads(k) for v, k in curves[["variant", "variant_key"]].drop_duplicates().values}
    values = [sorted({json.dumps(p.get(k), default=str) for p in points.values()}) for k in keys]
    dashes, markers, colors = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "P"], plt.get_cmap("tab10")
    styles = {}
    for i, (variant, p) in enumerate(points.items()):
        idx = [vals.index(json.dumps(p.get(k), default=str)) for k, vals in zip(keys, values, strict=True)]
        styles[variant] = {
            "color": colors((idx[0] if len(keys) > 1 else i) % 10),
            "linestyle": dashes[idx[1] % 4] if len(keys) > 1 else "-",
            "marker": markers[sum(idx[2:]) % 6] if len(keys) > 2 else "o",
        }
    return styles


def curves_figure(meta: dict, curves: pd.DataFrame, path: Path) -> Path | None:
    """Upper- and lower-level loss vs bilevel step per variant (mean over seeds, ±1 std band where n > 1)."""
    panels = [c for c in ("upper_loss", "lower_loss") if c in curves and curves[c].notna().any()]
    if curves.empty or not panels:
        return None
    styles = _styles(meta, curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        for variant, g in _matched(curves, column).groupby("variant", sort=False):
            x, y, s = g["step"].to_numpy(), g["mean"].to_numpy(), g["std"].fillna(0).to_numpy()
            n = int(g["count"].max())
            ax.plot(x, y, ms=4, lw=1.6, label=f"{variant} (n={n})", **styles[variant])
            if n > 1:
                ax.fill_between(x, y - s, y + s, color=styles[variant]["color"], alpha=0.15)
        ax.set_xlabel("bilevel outer step")
        ax.set_ylabel(f"{column.replace('_', ' ')} (nats/token, lower is better)")
        ax.set_title(DESCRIBE[column].split(" (")[0])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 2 if len(labels) > 3 else len(labels)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8.5, frameon=False)
    stages = ", ".join(sorted(curves["stage"].dropna().unique()))
    fig.suptitle(f"{meta['name']}: learning curves per variant ({stages}; mean over seeds)", fontsize=11)
    rows = math.ceil(len(labels) / max(ncol, 1))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _trials(meta: dict, df: pd.DataFrame) -> list[str]:
    metric = meta["metric"]
    lines = ["| trial | variant | seed | status | " + metric + " | time (s) |", "|---|---|---|---|---|---|"]
    for _, r in df.sort_values("trial_id").iterrows():  # Tune's trial ids count up in creation order
        t = r.get("time_total_s")
        value = r.get(metric)
        shown = "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        secs = "–" if t is None or (isinstance(t, float) and math.isnan(t)) else f"{t:.0f}"
        lines.append(f"| {r['trial_id']} | {r['variant']} | {r['seed']} | {r['status']} | {shown} | {secs} |")
    return lines


def _tokens(df: pd.DataFrame) -> str:
    tokens = df.loc[df["status"] == "ok", "target_tokens"].dropna().unique() if "target_tokens" in df else []
    return f"; target trained on {int(tokens[0]):,} tokens in every trial" if len(tokens) == 1 else ""


def _warnings(meta: dict, df: pd.DataFrame) -> list[str]:
    """What makes this sweep's ranking unreliable, said before the table."""
    out = [w] if (w := proxy_ranking_warning(meta)) else []
    ok = df[df["status"] == "ok"]
    tokens = sorted(ok["target_tokens"].dropna().unique()) if "target_tokens" in ok else []
    if len(tokens) > 1:
        out.append(
            "**⚠ Not at equal target tokens:** the trials trained the target on "
            f"{', '.join(f'{int(t):,}' for t in tokens)} tokens: their differences mix data with training length."
        )
    chance = [r for r in _summary(meta, df, "variant_key").values() if "chance" in r]
    if at := sum(not r["above_chance"] for r in chance):
        out.append(
            f"**Downstream accuracy is at chance for {at} of {len(chance)} variants** (within two lm-eval standard "
            "errors or the seed spread of the chance level): its differences there are noise."
            + (" Those variants are not ranked." if meta["metric"] == "paper_average" else "")
        )
    return out


def sweep_section(sweep_dir: Path, out: Path) -> list[str]:
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / META).read_text())
    df = pd.read_parquet(sweep_dir / RESULTS)
    curves = pd.read_parquet(sweep_dir / CURVES) if (sweep_dir / CURVES).exists() else pd.DataFrame()
    curves = curves.sort_values(["trial_id", "step"]) if len(curves) else curves  # variants in trial order
    metric, n_ok = meta["metric"], int((df["status"] == "ok").sum())
    trial_s = df["time_total_s"].sum() if "time_total_s" in df else 0.0
    objective = (
        f"`{metric}` = the {DESCRIBE[metric]}, mean of the last {meta['last_steps']} steps of bilevel round "
        f"{meta['round']}"
        if meta["stage"] == "bilevel"
        else f"`{metric}` = the {DESCRIBE[metric]}{_tokens(df)}"
    )
    md = [f"## Sweep `{meta['name']}`", ""]
    md += [meta["description"], ""] if meta.get("description") else []
    search = meta["search"]["type"]
    search += (
        f" (seed {meta['search']['seed']}, {meta['search']['num_samples']} samples"
        + ("; the first runs the base's own settings)" if meta["search"].get("start_from_base") else ")")
        if search == "optuna"
        else ""
    )
    md += [
        f"- base: `{Path(meta['base_file']).name}` + overrides `{json.dumps(meta['overrides'])}`",
        f"- objective: {objective}; {'lower' if meta['mode'] == 'min' else 'higher'} is better",
        f"- search: {search}; seeds: {meta.get('seeds') or 'the base seed'}; trials: {len(df)} ({n_ok} finished, "
        f"{trial_s:.0f} s of trial time in all, the stages shared by trials and run before Tune not counted)",
        f"- made by `bliss-ray sweep {meta.get('sweep_file', '…')} --out {sweep_dir.parent}`; this page by "
        f"`bliss-ray report {sweep_dir} --out {out}` (it recomputes nothing)",
        "",
        *[f"> {w}\n" for w in _warnings(meta, df)],
        "### Ablation table (one row per variant)",
        "",
        *_variant_rows(meta, df),
        "",
        "Mean ± sample std over the variant's trials (seeds); n = finished trials; a single trial shows its value.",
        *([f"The paper's column: {meta['paper']['source']}."] if meta.get("paper") else []),
        "",
        *_noise_lines(meta, df),
        "",
    ]
    effects = _main_effects(meta, df)
    md += ["### Main effects", "", *effects] if effects else []
    matched = _matched_table(curves) if not curves.empty else []
    diagnostic = " (the proxy's own loss: a diagnostic, not the objective)" if meta["stage"] == "full" else ""
    md += [f"### upper_loss at matched bilevel steps{diagnostic}", "", *matched, ""] if matched else []
    fig = curves_figure(meta, curves, out / f"{meta['name']}_curves.png")
    md += [f"![learning curves]({fig.name})", ""] if fig else ["No learning curves were recorded.", ""]
    md += ["### Trials", "", *_trials(meta, df), ""]
    errors = df[df["status"] == "error"]
    for _, r in errors.iterrows():
        md += [f"- trial {r['trial_id']} failed: `{str(r.get('error'))[:300]}`"]
    return md


def build_sweep_report(sweep_dirs: list[Path], out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# BLISS sweep report", ""]
    for d in sweep_dirs:
        md += sweep_section(Path(d), out)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
