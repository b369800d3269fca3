"""Sample weights from score-model outputs: a softmax over the *global* batch (docs/method.md, "The bilevel
problem").

    P_i = exp(s_i) / Σ_{j ∈ global batch} exp(s_j)

Every worker all-gathers the scores of the whole global batch (B_global = micro-batch × workers, a few dozen
floats) and normalises locally with the shared max and denominator, so Σ_i P_i = 1 over all workers and
1 worker × 32 sequences computes exactly what 8 workers × 4 do.

``weight_norm="stale"`` reproduces the released code: the lower-level steps of outer step t use the max and
denominator gathered at outer step t−1, so the weights only sum to ≈1. Before the first hypergradient step there
is no global normaliser: the released code then uses a per-worker softmax, which sums to 1 on *each* worker, i.e.
to N over the global batch. Divided by N it sums to 1 globally like every later step (else the first step's CE
weight would be N× too large). It costs nothing extra (the normaliser is kept from the previous hypergradient step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bliss_ray.train import dist


@dataclass
class Normaliser:
    max: float
    denom: float


def global_softmax(scores_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Normaliser]:
    """(P for this worker's samples, P of the whole global batch, the normaliser). Differentiable in scores."""
    scores_all = dist.all_gather_cat(scores_local.detach())  # (B_global,)
    m = scores_all.max()
    denom = torch.exp(scores_all - m).sum()
    p_local = torch.exp(scores_local - m) / denom  # (B_local,) keeps the graph to the local scores
    p_all = torch.exp(scores_all - m) / denom  # (B_global,)
    return p_local, p_all, Normaliser(m.item(), denom.item())


def stale_softmax(scores_local: torch.Tensor, previous: Normaliser | None) -> torch.Tensor:
    """The released code's lower-level weights: the previous outer step's global normaliser."""
    if previous is None:  # first step: the per-worker softmax, / N so that the global batch's weights sum to 1
        return torch.softmax(scores_local, dim=0) / dist.world_size()
    return torch.exp(scores_local - previous.max) / previous.denom


def weight_stats(p_all: torch.Tensor) -> dict:
    """Entropy (nats; log B_global when uniform) and max/min ratio of the global weights."""
    p = p_all.detach().double()
    return {
        "weight_entropy": float(-(p * p.clamp_min(1e-300).log()).sum()),
        "weight_max_min_ratio": float(p.max() / p.min().clamp_min(1e-300)),
    }
