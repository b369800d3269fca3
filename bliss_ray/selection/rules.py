"""Selection rules (pure NumPy): which ``keep_frac`` of a round's pool the target trains on next.

* ``topk`` — the k highest fp32 logits (BLISS; σ is monotone so this is top-k by score), ties broken by the
  smaller row id, so the result never depends on row order.
* ``gumbel_topk`` — BLISS convention: the k largest of logit/τ + G_i, G_i ~ Gumbel(0, 1). As τ → 0 it becomes
  ``topk``; this is exact Gumbel-top-k (Plackett–Luce) sampling from softmax(logit/τ).
* ``mates`` — MATES's code convention: the k *smallest* of prediction/τ + G_i (low predicted post-step
  reference loss = good). Note it adds +G to a quantity it minimises, which is not the textbook sampler over
  −prediction/τ (docs/method.md, "Scoring and selection"); we copy it on purpose so MATES numbers reproduce.
* ``random`` — a seeded, truly uniform subset (the released BLISS "random" takes the first rows; not here).

All noise is counter-based: row i's uniform draw is a hash of (seed, row id), so selections are reproducible and
independent of how the pool is split into files or ordered.

    keep = select(row_ids, logits, k, method="topk")
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bliss_ray.selection.canaries import canary_section

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def uniform_of(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """A reproducible U(0, 1) draw per row id (splitmix64 finaliser of id ⊕ seed), never exactly 0 or 1."""
    with np.errstate(over="ignore"):
        x = row_ids.astype(np.uint64) + np.uint64(seed) * _GOLD + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def gumbel_of(row_ids: np.ndarray, seed: int) -> np.ndarray:
    return -np.log(-np.log(uniform_of(row_ids, seed)))


def _top(values: np.ndarray, row_ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values; equal values → smaller row id first. A partition finds the cut-off and
    only the rows at or above it are sorted, which keeps the peak memory well below a full lexsort's."""
    n = len(values)
    cand = np.arange(n)
    if 0 < k < n:
        kth = np.partition(values, n - k)[n - k]  # the k-th largest value
        cand = np.flatnonzero(values >= kth)  # every row that can make the cut, ties included
    order = np.lexsort((row_ids[cand], -values[cand]))
    return cand[order[:k]]


def num_selected(pool_size: int, keep_frac: float) -> int:
    return max(1, int(pool_size * keep_frac)) if pool_size else 0


def select(
    row_ids: np.ndarray,
    values: np.ndarray | None,
    k: int,
    method: str,
    seed: int = 0,
    temperature: float = 1.0,
) -> np.ndarray:
    """Row ids of the selection, sorted. ``values``: fp32 logits (BLISS) or predicted losses (MATES)."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if k > len(row_ids):
        raise ValueError(f"cannot select {k} rows from a pool of {len(row_ids)}")
    if method == "random":
        idx = _top(uniform_of(row_ids, seed), row_ids, k)
    elif method == "topk":
        idx = _top(np.asarray(values), row_ids, k)  # in the logits' own dtype: a float64 copy changes no order
    elif method == "gumbel_topk":
        idx = _top(np.asarray(values, np.float64) / temperature + gumbel_of(row_ids, seed), row_ids, k)
    elif method == "mates":
        idx = _top(-(np.asarray(values, np.float64) / temperature + gumbel_of(row_ids, seed)), row_ids, k)
    else:
        raise ValueError(f"unknown selection method '{method}'")
    return np.sort(row_ids[idx])


def _code_counts(codes: np.ndarray, n: int) -> np.ndarray:
    """Rows per category code (−1, no domain, is not counted). In chunks: bincount widens its input to int64,
    8 B per row (80 MB at 10 M rows) for int8 codes."""
    counts = np.zeros(n + 1, np.int64)
    for start in range(0, len(codes), 1 << 20):
        counts += np.bincount(codes[start : start + (1 << 20)].astype(np.int64) + 1, minlength=n + 1)
    return counts[1:]


def manifest(
    row_ids: np.ndarray,
    values: np.ndarray | None,
    selected: np.ndarray,
    domains: np.ndarray | pd.Categorical | None,
    **settings,
) -> dict:
    """What was selected and from what: counts, threshold, score histogram, per-domain shares, and the canaries'
    shares with the flag of a corrupted form preferred over its source (``selection.canaries``) when the pool
    has canaries."""
    # a sorted lookup, not np.isin: isin sorts the concatenation of both arrays (~5x the pool's memory); in
    # chunks, so its int64 positions cost 8 MB, not 8 B per pool row (160 MB with their clipped copy at 10 M)
    selected = np.sort(selected)
    chosen = np.zeros(len(row_ids), bool)
    for start in range(0, len(row_ids) if len(selected) else 0, 1 << 20):
        part = row_ids[start : start + (1 << 20)]
        pos = np.searchsorted(selected, part).clip(max=len(selected) - 1)
        chosen[start : start + len(part)] = selected[pos] == part
    out = {**settings, "pool_size": len(row_ids), "selected": int(chosen.sum())}
    if values is not None and len(values):
        v = np.asarray(values)  # no float64 copy of the pool: histogram and min/max are exact in fp32
        counts, edges = np.histogram(v, bins=30)
        sel_counts, _ = np.histogram(v[chosen], bins=edges)
        out["threshold"] = float(v[chosen].min()) if settings.get("method") != "mates" else float(v[chosen].max())
        out["histogram"] = {"edges": edges.tolist(), "pool": counts.tolist(), "selected": sel_counts.tolist()}
        out["value_summary"] = {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean(dtype=np.float64))}
    if domains is not None:
        # codes, not strings: the pipeline passes a pandas Categorical (one small int per row)
        cat = domains if isinstance(domains, pd.Categorical) else pd.Categorical(domains)
        pool_counts = _code_counts(cat.codes, len(cat.categories))
        sel_counts = _code_counts(cat.codes[chosen], len(cat.categories))
        out["domain_share"] = {
            str(n): {"pool": float(c / len(cat)), "selected": float(s / max(int(chosen.sum()), 1))}
            for n, c, s in zip(cat.categories, pool_counts, sel_counts, strict=True)
            if c
        }
        names = [str(n) for n in cat.categories]
        canaries = canary_section(
            dict(zip(names, pool_counts.tolist(), strict=True)),
            dict(zip(names, sel_counts.tolist(), strict=True)),
            len(row_ids),
            out["selected"],
        )
        if canaries:
            out["canaries"] = canaries
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two selections (row id sets)."""
    inter = np.intersect1d(a, b).size
    union = np.union1d(a, b).size
    return inter / union if union else 1.0
