"""A comparison's curves: each variant × seed's evaluated checkpoints as held-out reference loss against target
steps and against FLOPs spent, and how much sooner one curve reaches another's final loss (the speed-up the
report's tables and figures state). No Ray; pure reading of stage outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bliss_ray.costs.ledger import ledger, selection_share, totals
from bliss_ray.report.collect import reach_step
from bliss_ray.studies.compare_spec import spent_flops

METRIC = "reference_loss"  # lower is better; measured on the held-out part of the reference set


@dataclass
class Curve:
    """One variant × seed: its checkpoints in step order, the FLOPs spent at each, and its total FLOPs."""

    variant: str
    seed: int
    steps: np.ndarray  # (C,) target steps of each evaluated checkpoint
    flops: np.ndarray  # (C,) FLOPs spent when that checkpoint exists
    loss: np.ndarray  # (C,) held-out reference loss
    average: np.ndarray  # (C,) paper-task average (nan when no paper task was evaluated)
    total_flops: float
    selection_share: float  # of total FLOPs


def curve_of(variant: str, seed: int, exp, evaluate: dict, pool_rows: int | None) -> Curve:
    rows = ledger(exp, pool_rows_per_round=pool_rows)
    cks = sorted(evaluate["checkpoints"], key=lambda c: c["steps"])
    total = totals(rows)
    return Curve(
        variant,
        seed,
        np.array([c["steps"] for c in cks], dtype=float),
        np.array([spent_flops(rows, exp, c["steps"], c["round"]) for c in cks]),
        np.array([c[METRIC] for c in cks], dtype=float),
        np.array([np.nan if c.get("paper_average") is None else c["paper_average"] for c in cks]),
        total["total"],
        selection_share(rows),
    )


def speedup(curve: Curve, base: Curve, axis: str) -> float | None:
    """How much sooner ``curve`` reaches ``base``'s final loss, on ``axis`` ("steps" or "flops"); None if never."""
    x, bx = getattr(curve, axis), getattr(base, axis)
    at = reach_step(list(x), list(curve.loss), float(base.loss[-1]), higher_is_better=False)
    return None if at is None or at <= 0 else float(bx[-1] / at)


def speedups(curves: list[Curve], variant: str, against: str, axis: str) -> list[float | None]:
    """``variant``'s speed-up over ``against`` of the same seed, seed by seed (None where it never reaches it)."""
    bases = {c.seed: c for c in curves if c.variant == against}
    return [speedup(c, bases[c.seed], axis) for c in curves if c.variant == variant]
