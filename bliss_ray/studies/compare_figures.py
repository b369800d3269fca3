"""The comparison report's Figure 3: held-out reference loss of some variants against target steps and against
FLOPs spent (mean over seeds, band ± 1 sd), with one variant's final loss as the line they race to. The report
draws it for every variant against the main baseline, and head to head (the method against each further
baseline, as the rebuttal draws BLISS against MATES). No Ray.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on clusters and in CI
import matplotlib.pyplot as plt
import numpy as np

from bliss_ray.studies.compare_curves import Curve

AXES = ("steps", "flops")


def figure3(curves: list[Curve], variants: list[str], against: str, axis: str, path: Path) -> Path:
    """Held-out reference loss of ``variants`` vs target steps or vs FLOPs spent: mean over seeds, band ± 1 sd;
    the dotted line is ``against``'s final loss (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in variants:
        mine = [c for c in curves if c.variant == name]
        x = np.mean([getattr(c, axis) for c in mine], axis=0)  # equal across seeds up to measured pool rows
        y = np.array([c.loss for c in mine])  # (seeds, C)
        ax.plot(x, y.mean(0), marker="o", ms=3, label=f"{name} ({len(mine)} seeds)")
        if len(mine) > 1:
            ax.fill_between(x, y.mean(0) - y.std(0, ddof=1), y.mean(0) + y.std(0, ddof=1), alpha=0.2)
    reference = np.mean([c.loss[-1] for c in curves if c.variant == against])
    ax.axhline(reference, color="grey", ls=":", lw=1, label=f"{against}'s final loss")
    ax.set_xlabel("target pretraining steps" if axis == "steps" else "total FLOPs spent (selection included)")
    ax.set_ylabel("held-out reference loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure3_pair(curves: list[Curve], variants: list[str], against: str, directory: Path, stem: str) -> list[Path]:
    """Figure 3 on both axes, as ``<stem>_steps.png`` and ``<stem>_flops.png`` in ``directory`` (characters a
    markdown link or a file system would misread in variant names become ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
    return [figure3(curves, variants, against, axis, directory / f"{safe}_{axis}.png") for axis in AXES]
