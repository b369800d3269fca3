"""What a selection did with the canaries (pure Python; ``selection.rules.manifest`` calls it).

For each canary domain (``bliss_ray.data.canaries``) present in the round's pool: its rows in the pool and in the
selection, its pool share and selected share, and their ratio (above 1: the selector enriches it). A corrupted form
is flagged when the selector keeps it at a higher rate than the intact source (equivalently, its ratio exceeds the
source's) by more than ``Z_FLAG`` standard errors of a two-proportion z-test: a few dozen canary rows per round
make equal rates differ by chance, and a flag that random selection trips would mean nothing.

    section = canary_section({"canary_source": 40, "canary_shuffled": 40, ...}, {...}, pool_size, selected)
    section["prefers_corrupted"]    # e.g. ["canary_shuffled"]
"""

from __future__ import annotations

import math

from bliss_ray.data.canaries import CANARY_DOMAINS, CORRUPTED, SOURCE

Z_FLAG = 2.0


def keep_rate_z(kept_a: int, rows_a: int, kept_b: int, rows_b: int) -> float:
    """z of (a's keep rate − b's) under the pooled two-proportion test; 0 when neither rate can differ."""
    pooled = (kept_a + kept_b) / (rows_a + rows_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / rows_a + 1 / rows_b))
    return (kept_a / rows_a - kept_b / rows_b) / se if se > 0 else 0.0


def canary_section(pool_rows: dict[str, int], selected_rows: dict[str, int], pool_size: int, selected: int) -> dict:
    """The manifest's ``canaries`` section from per-domain row counts ({} when the pool has no canary source)."""
    if not pool_rows.get(SOURCE):
        return {}
    forms = {}
    for name in CANARY_DOMAINS:
        n, s = int(pool_rows.get(name, 0)), int(selected_rows.get(name, 0))
        if not n:
            continue
        pool_share, selected_share = n / pool_size, s / max(selected, 1)
        forms[name] = {
            "pool_rows": n,
            "selected_rows": s,
            "pool_share": pool_share,
            "selected_share": selected_share,
            "ratio": selected_share / pool_share,
        }
    src = forms[SOURCE]
    for name in CORRUPTED:
        if name in forms:
            f = forms[name]
            f["z_vs_source"] = keep_rate_z(f["selected_rows"], f["pool_rows"], src["selected_rows"], src["pool_rows"])
    prefers = [n for n in CORRUPTED if n in forms and forms[n]["z_vs_source"] > Z_FLAG]
    return {"forms": forms, "prefers_corrupted": prefers, "z_flag": Z_FLAG}
