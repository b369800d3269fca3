"""The canary table of a report (``bliss-ray report`` and the comparison report): per variant and round, each canary
form's selected share against its pool share, and how often a corrupted form was preferred over its source
(``bliss_ray.selection.canaries``). Nothing when no selection had canaries.

    lines = canary_lines([("bliss", 1, manifest["canaries"]), ...])
"""

from __future__ import annotations

from bliss_ray.data.canaries import CANARY_DOMAINS

_SHORT = {name: name.removeprefix("canary_") for name in CANARY_DOMAINS}


def _cell(sections: list[dict], name: str) -> str:
    """Selected share vs pool share (%, means over the runs), and the ratio of the means."""
    got = [s["forms"][name] for s in sections if name in s["forms"]]
    if not got:
        return "–"
    sel = sum(f["selected_share"] for f in got) / len(got)
    pool = sum(f["pool_share"] for f in got) / len(got)
    return f"{100 * sel:.2f}% vs {100 * pool:.2f}% ({sel / pool:.2f}×)"


def canary_lines(rows: list[tuple[str, int, dict]]) -> list[str]:
    """A markdown section from (variant, round, manifest ``canaries`` section) rows; several rows of one variant and
    round (seeds) are averaged and their flags counted. [] without rows."""
    rows = [r for r in rows if r[2]]
    if not rows:
        return []
    groups: dict[tuple[str, int], list[dict]] = {}
    for label, r, section in rows:
        groups.setdefault((label, r), []).append(section)
    forms = " | ".join(_SHORT[n] for n in CANARY_DOMAINS)
    lines = [
        "## Canaries",
        "",
        "Reference documents moved into the pool (`data.canaries`; never in the reference set's parts): intact "
        "(source), words shuffled, characters scrambled. Each cell: selected share vs pool share (selected ÷ pool). "
        "A selector that keeps a corrupted form at a higher rate than its source, by more than "
        f"{rows[0][2]['z_flag']:g} standard errors, prefers text that only looks like the reference.",
        "",
        f"| variant | round | {forms} | prefers a corrupted form |",
        "|---" * (3 + len(CANARY_DOMAINS)) + "|",
    ]
    for (label, r), sections in groups.items():
        flagged = [s for s in sections if s["prefers_corrupted"]]
        which = sorted({_SHORT[n] for s in flagged for n in s["prefers_corrupted"]})
        verdict = f"**yes** ({', '.join(which)})" if flagged else "no"
        if len(sections) > 1:
            verdict += f", {len(flagged)} of {len(sections)} runs"
        cells = " | ".join(_cell(sections, n) for n in CANARY_DOMAINS)
        lines.append(f"| {label} | {r} | {cells} | {verdict} |")
    return [*lines, ""]
