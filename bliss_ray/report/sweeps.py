"""Render a Ray Tune sweep (``bliss-ray sweep``) as report.md: the ablation table and learning curves per variant.

Input: a sweep directory holding ``sweep.json``, ``sweep_results.parquet`` and ``sweep_curves.parquet`` (written by
``bliss_ray.sweep.write_results`` into OUT/<sweep>/ and into the Tune experiment directory). No Ray needed.

    bliss-ray report runs/table2_proxy_sigmoid_tiny --out report/table2_tiny      # build_report delegates here

Sections: one row per variant (= config point; repeats over ``seeds`` give mean ± sample std and n), the main
effect of each swept key (its values averaged over everything else), the objective at matched bilevel steps,
every trial, and ``sweep_curves.png`` (upper- and lower-level loss vs bilevel step, one line per variant, the
mean over seeds with a ±1 std band where repeated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on clusters and in CI
import matplotlib.pyplot as plt
import pandas as pd

RESULTS, CURVES, META = "sweep_results.parquet", "sweep_curves.parquet", "sweep.json"
DESCRIBE = {
    "upper_loss": "proxy's upper-level reference loss (nats/token)",
    "lower_loss": "lower-level weighted training loss (nats/token)",
    "paper_average": "downstream average accuracy of the final checkpoint",
    "reference_loss": "target's reference-set loss of the final checkpoint (nats/token)",
}


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


def _variant_rows(meta: dict, df: pd.DataFrame) -> list[str]:
    keys, metric = meta["space_keys"], meta["metric"]
    others = [m for m in DESCRIBE if m in df and m != metric and df[m].notna().any()]
    ok = df[df["status"] == "ok"]
    groups = [(vk, g) for vk, g in ok.groupby("variant_key", sort=False)]
    means = {vk: g[metric].astype(float).mean() for vk, g in groups}
    best = (min if meta["mode"] == "min" else max)(means, key=means.get) if means else None
    head = [*keys, f"**{metric}** (mean ± std)", "n", f"Δ {metric} vs best", *others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vk, g in sorted(groups, key=lambda kv: means[kv[0]], reverse=meta["mode"] == "max"):
        point = json.loads(vk)
        cells = [_value_label(meta, k, point.get(k)) for k in keys]
        shown = _stat(g[metric])
        cells += [f"**{shown}**" if vk == best else shown, str(len(g)), f"{means[vk] - means[best]:+.4f}"]
        cells += [_stat(g[m]) for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _main_effects(meta: dict, df: pd.DataFrame) -> list[str]:
    metric, ok = meta["metric"], df[df["status"] == "ok"]
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
        lines.append("")
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


def sweep_section(sweep_dir: Path, out: Path) -> list[str]:
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / META).read_text())
    df = pd.read_parquet(sweep_dir / RESULTS)
    curves = pd.read_parquet(sweep_dir / CURVES) if (sweep_dir / CURVES).exists() else pd.DataFrame()
    curves = curves.sort_values(["trial_id", "step"]) if len(curves) else curves  # variants in trial order
    metric, n_ok = meta["metric"], int((df["status"] == "ok").sum())
    objective = (
        f"`{metric}` = the {DESCRIBE[metric]}, mean of the last {meta['last_steps']} steps of bilevel round "
        f"{meta['round']}"
        if meta["stage"] == "bilevel"
        else f"`{metric}` = the {DESCRIBE[metric]} (whole pipeline)"
    )
    md = [f"## Sweep `{meta['name']}`", ""]
    md += [meta["description"], ""] if meta.get("description") else []
    search = meta["search"]["type"]
    search += (
        f" (seed {meta['search']['seed']}, {meta['search']['num_samples']} samples)" if search == "optuna" else ""
    )
    md += [
        f"- base: `{Path(meta['base_file']).name}` + overrides `{json.dumps(meta['overrides'])}`",
        f"- objective: {objective}; {'lower' if meta['mode'] == 'min' else 'higher'} is better",
        f"- search: {search}; seeds: {meta.get('seeds') or 'the base seed'}; trials: {len(df)} ({n_ok} finished)",
        f"- from `{sweep_dir}`",
        "",
        "### Ablation table (one row per variant)",
        "",
        *_variant_rows(meta, df),
        "",
        "Mean ± sample std over the variant's trials (seeds); n = finished trials; a single trial shows its value.",
        "",
    ]
    effects = _main_effects(meta, df)
    md += ["### Main effects", "", *effects] if effects else []
    matched = _matched_table(curves) if not curves.empty else []
    md += ["### upper_loss at matched bilevel steps", "", *matched, ""] if matched else []
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
