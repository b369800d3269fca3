"""BLISS losses (docs/method.md, "The bilevel problem").

Lower level, on a training batch B with sample weights P (Σ_{i∈B} P_i = 1):

    g(θ_p, θ_s) = Σ_i P_i · CE_i(θ_p)  +  γ · mean_i KL_i(target ‖ proxy)  +  λ · ‖θ_p‖²

* CE_i is sample i's mean next-token cross-entropy (the released code's ``chunked_cross_entropy`` per sample).
* KL_i = mean_t Σ_v p_tr(v) (log p_tr(v) − log p_p(v)): KL(target ‖ proxy), token-level, summed over the
  vocabulary, averaged over positions — exactly ``F.kl_div(log_softmax(proxy), softmax(target))`` as the
  released code computes it (its docstring says KL(P‖Q) but the direction is target‖proxy, forward KL as in
  distillation). It is *not* weighted by P_i. Target logits are detached, the target in eval mode.
* λ‖θ_p‖² is added on top of AdamW's weight decay (released code).

Upper level: the proxy's CE on the reference set, over all tokens (passages) or only the continuation tokens
(LAMBADA-style items, ``loss_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _nll(logp: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position from log-probabilities (B, T, V) → (B, T-1).

    A gather on ``log_softmax`` rather than ``F.cross_entropy``: same value and gradient, but its double
    backward (every Hessian-vector product of the bilevel step) is cheaper on CPU. The gather runs on all
    T positions (the last one reads a dummy target) and the (B, T) result is sliced: slicing the (B, T, V)
    input instead would cost a vocabulary-sized zero-fill and copy in every backward."""
    next_ids = torch.roll(input_ids, -1, dims=1)  # (B, T): position t predicts t+1; the last entry is unused
    return -logp.gather(-1, next_ids[..., None]).squeeze(-1)[:, :-1]


def _mean_over(token_loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return token_loss.mean(1)  # (B,)
    m = loss_mask[:, 1:].to(token_loss.dtype)  # (B, T-1): target t+1 is predicted at position t
    return (token_loss * m).sum(1) / m.sum(1).clamp(min=1)  # (B,)


def per_sample_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None):
    """Mean next-token CE of each sequence (fp32). ``loss_mask[i, t]`` marks tokens t that count as targets."""
    return _mean_over(_nll(F.log_softmax(logits.float(), dim=-1), input_ids), loss_mask)


def _kl_from(logp_proxy: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    log_p_target = F.log_softmax(target_logits.detach().float(), dim=-1)  # (B, T, V), no gradient to the target
    return (log_p_target.exp() * (log_p_target - logp_proxy)).sum(-1).mean(1)  # (B,)


def per_sample_kl(proxy_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ proxy) per sequence: Σ_v over the vocabulary, mean over all positions. (B,)"""
    return _kl_from(F.log_softmax(proxy_logits.float(), dim=-1), target_logits)


def weighted_lower_loss(
    proxy_logits: torch.Tensor,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    target_logits: torch.Tensor | None,
    gamma: float,
    global_batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This worker's share of the data terms of g: Σ_{i local} P_i CE_i + γ/B_global Σ_{i local} KL_i.

    Summing it over workers gives the data terms of g on the global batch (λ‖θ‖² is added once, outside).
    Returns (loss, ce (B,), kl (B,) or zeros)."""
    logp = F.log_softmax(proxy_logits.float(), dim=-1)  # (B, T, V), shared by CE and KL: one softmax to undo
    ce = _nll(logp, input_ids).mean(1)  # (B,)
    loss = (weights * ce).sum()
    kl = torch.zeros_like(ce)
    if gamma > 0 and target_logits is not None:
        kl = _kl_from(logp, target_logits)  # (B,)
        loss = loss + gamma * kl.sum() / global_batch
    return loss, ce, kl
