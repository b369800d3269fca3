"""Report figures (matplotlib, written as PNG): the rebuttal's Figures 1–3 and selection diagnostics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on clusters and in CI
import matplotlib.pyplot as plt
import numpy as np

from bliss_ray.report.collect import Variant


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k < 2:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def bilevel_curves(variants: list[Variant], path: Path) -> Path | None:
    """Figures 1–2: lower-level (weighted CE) loss and KL(target ‖ proxy) over bilevel steps, per round/proxy."""
    series = [(v, r, m) for v in variants for r, m in v.bilevel_metrics().items() if m]
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for v, r, metrics in series:
        step = np.array([m["step"] for m in metrics])
        proxy = v.exp["models"]["proxy"]["arch"]
        for ax, key in zip(axes, ("lower_loss", "kl", "upper_loss"), strict=True):
            y = np.array([m[key] if m.get(key) is not None else np.nan for m in metrics], dtype=float)
            k = max(1, len(y) // 20)
            ax.plot(step[k - 1 :] if k > 1 else step, _smooth(y, k), label=f"{v.label}, round {r} ({proxy})")
    titles = ("lower-level loss Σ P_i CE_i", "KL(target ‖ proxy)", "upper-level reference loss")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("bilevel outer step")
        ax.set_ylabel("nats (moving average)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def downstream_curves(variants: list[Variant], path: Path) -> Path | None:
    """Figure 3: downstream average and reference-set loss vs target pretraining steps, one curve per variant."""
    if not variants:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        ck = v.checkpoints()
        steps = [c["steps"] for c in ck]
        avg = [100 * c["paper_average"] if c.get("paper_average") is not None else np.nan for c in ck]
        err = [100 * (c.get("paper_average_stderr") or 0.0) for c in ck]
        axes[0].errorbar(steps, avg, yerr=err, marker="o", capsize=3, label=v.label)
        axes[1].plot(steps, [c["reference_loss"] for c in ck], marker="o", label=v.label)
    axes[0].set_title("downstream average (paper tasks available offline), ± s.e.")
    axes[0].set_ylabel("accuracy (%)")
    axes[1].set_title("target loss on the held-out reference set")
    axes[1].set_ylabel("cross-entropy (nats/token)")
    for ax in axes:
        ax.set_xlabel("target pretraining steps (decay-branch checkpoints)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def score_histograms(variants: list[Variant], path: Path) -> Path | None:
    rows = [(v, r, s["manifest"]) for v in variants for r, s in v.selections().items() if "histogram" in s["manifest"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, (v, r, m) in zip(axes[0], rows, strict=True):
        h = m["histogram"]
        edges = np.array(h["edges"])
        centers, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
        ax.bar(centers, h["pool"], width=width, alpha=0.45, label="pool")
        ax.bar(centers, h["selected"], width=width, alpha=0.8, label=f"selected ({m['method']})")
        ax.set_title(f"{v.label}: round {r}", fontsize=9)
        ax.set_xlabel("score-model logit (fp32)" if v.method == "bliss" else "predicted reference loss")
        ax.set_ylabel("rows")
        ax.legend(fontsize=7)
    return _save(fig, path)


def domain_shares(variants: list[Variant], path: Path) -> Path | None:
    rows = [
        (v, r, s["manifest"]["domain_share"])
        for v in variants
        for r, s in v.selections().items()
        if r > 0 and "domain_share" in s["manifest"]
    ]
    if not rows:
        return None
    domains = sorted({d for _, _, share in rows for d in share})
    x = np.arange(len(domains))
    width = 0.8 / (len(rows) + 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(domains)), 4))
    pool = rows[0][2]
    ax.bar(
        x - 0.4 + width / 2,
        [100 * pool.get(d, {}).get("pool", 0) for d in domains],
        width,
        label="pool",
        color="lightgray",
    )
    for i, (v, r, share) in enumerate(rows, start=1):
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            [100 * share.get(d, {}).get("selected", 0) for d in domains],
            width,
            label=f"{v.label}, round {r}",
        )
    ax.set_xticks(x, domains, rotation=20)
    ax.set_ylabel("share of rows (%)")
    ax.set_title("per-domain share: pool vs selections")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
