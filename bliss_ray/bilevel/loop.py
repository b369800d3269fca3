"""The BLISS bilevel loop (docs/method.md, "The hypergradient"), pure PyTorch: no Ray, no config layer, collectives
via ``train.dist``.

One outer step t:
  1. K inner steps: weights P from the score model (no gradient), proxy AdamW step on
     g = Σ P_i CE_i + γ KL(target ‖ proxy) + λ‖θ_p‖² (global-norm clip 1.0).
  2. ∇f on a reference micro-batch (mean over workers).
  3. z ≈ H⁻¹∇f by Q Richardson steps with HVPs of g on the outer batch (the last inner batch when
     ``reuse_inner_batch``, as the released code does with K = 1).
  4. c_i = ⟨∇CE_i, z⟩ (batched ghost products), the hypergradient −Σ P_j (c_j − c̄)∇s_j, per-tensor clip,
     score-model AdamW step.
Both optimizers follow cosine schedules with linear warm-up (``warmup_frac`` of T).

``loss_scaling="released"`` reproduces the objective the released code optimises on N = ``released_devices`` GPUs
(each rank's Σ_local P_i CE_i + γ KL_local + λ‖θ‖², gradients averaged by DDP):
(1/N)·[Σ_global P_i CE_i + N·γ·KL + N·λ‖θ‖²], i.e. g with γ → Nγ, λ → Nλ, scaled by 1/N; in practice the CE
weights are scaled by 1/N in the inner steps and the HVPs (docs/design.md). ``global`` optimises g itself.

    state = BilevelState.create(proxy, score_model, target, BilevelSettings(outer_steps=100))
    run_bilevel(state, settings, train_batch_at, ref_batch_at, end_step=100, log=print)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import get_cosine_schedule_with_warmup

from bliss_ray.bilevel.hypergrad import ci_ghost, ci_loop, make_hvp, score_hypergrad, solve_z
from bliss_ray.bilevel.losses import per_sample_ce, weighted_lower_loss
from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.bilevel.weights import Normaliser, global_softmax, stale_softmax, weight_stats
from bliss_ray.train import dist
from bliss_ray.train.loop import clip_grad_norm, make_optimizer


@dataclass
class BilevelState:
    proxy: nn.Module
    score_model: nn.Module
    target: nn.Module | None
    proxy_opt: torch.optim.Optimizer
    score_opt: torch.optim.Optimizer
    proxy_sched: torch.optim.lr_scheduler.LRScheduler
    score_sched: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    normaliser: Normaliser | None = None
    metrics: list[dict] = field(default_factory=list)

    @staticmethod
    def create(proxy, score_model, target, s: BilevelSettings) -> BilevelState:
        warmup = int(s.warmup_frac * s.outer_steps)
        p_opt = make_optimizer(proxy, s.proxy_lr, s.betas, s.weight_decay)
        s_opt = make_optimizer(score_model, s.score_lr, s.betas, s.weight_decay)
        if s.uses_kl and target is None:
            raise ValueError("bilevel.gamma > 0: the KL term needs the target model")
        if target is not None:
            target.eval().requires_grad_(False)
        return BilevelState(
            proxy,
            score_model,
            target,
            p_opt,
            s_opt,
            get_cosine_schedule_with_warmup(p_opt, warmup, s.outer_steps),
            get_cosine_schedule_with_warmup(s_opt, warmup, s.outer_steps),
        )


def _target_logits(state: BilevelState, input_ids: torch.Tensor, s: BilevelSettings) -> torch.Tensor | None:
    if not s.uses_kl:
        return None
    with torch.no_grad():
        return state.target(input_ids=input_ids).logits.detach()  # (B, T, V)


def _global_mean(value: torch.Tensor) -> float:
    t = value.detach().double().reshape(1).clone()
    dist.all_reduce_sum_(t)
    return float(t.item()) / dist.world_size()


def _inner_step(state: BilevelState, s: BilevelSettings, input_ids, scores, target_logits, global_batch) -> dict:
    """One proxy AdamW step on the weighted lower-level loss; weights are constants here."""
    if s.weight_norm == "stale":
        weights = stale_softmax(scores.detach(), state.normaliser)
    else:
        weights, _, _ = global_softmax(scores.detach())
    logits = state.proxy(input_ids=input_ids).logits  # (B, T, V)
    loss, ce, kl = weighted_lower_loss(logits, input_ids, weights * s.ce_scale, target_logits, s.gamma, global_batch)
    params = [p for p in state.proxy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    grads = [g.clone() for g in grads]
    dist.all_reduce_sum_(*grads)  # data terms are sums over the global batch; no DDP (manual, exact)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.grad = g + 2.0 * s.l2 * p  # + ∇(λ‖θ‖²), added once
    grad_norm = clip_grad_norm(params, s.grad_clip)
    state.proxy_opt.step()
    state.proxy_opt.zero_grad(set_to_none=True)
    stats = torch.stack([(weights * ce).sum().detach(), kl.sum().detach()]).double()
    dist.all_reduce_sum_(stats)
    return {"lower_loss": float(stats[0]), "kl": float(stats[1]) / global_batch, "proxy_grad_norm": float(grad_norm)}


def _inner_steps(state: BilevelState, s: BilevelSettings, train_batch_at, global_batch: int):
    """Step 1: K proxy steps with the score model's weights as constants. Returns their last metrics and the
    outer batch with its target logits: the last inner batch when ``reuse_inner_batch``, else the next one."""
    per_step, t = s.micro_batches_per_step, state.step
    inner, ids, tl = {}, None, None
    for k in range(s.inner_steps):
        ids = train_batch_at(t * per_step + k)
        with torch.no_grad():
            _, scores = state.score_model(ids)  # (B,)
        tl = _target_logits(state, ids, s)
        inner = _inner_step(state, s, ids, scores, tl, global_batch)
    if not s.reuse_inner_batch:
        ids = train_batch_at(t * per_step + s.inner_steps)  # the next, unseen batch
        tl = _target_logits(state, ids, s)
    return inner, ids, tl


def _reference_grad(state: BilevelState, proxy_params, ref_batch_at) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 2: ∇f, the proxy's gradient on a reference micro-batch (mean over workers), and the loss f."""
    ref_ids, ref_mask = ref_batch_at(state.step)
    upper = per_sample_ce(state.proxy(input_ids=ref_ids).logits, ref_ids, ref_mask).mean()
    grad_f = [g.clone() for g in torch.autograd.grad(upper, proxy_params)]
    dist.all_reduce_sum_(*grad_f)
    return [g / dist.world_size() for g in grad_f], upper


def _score_step(state: BilevelState, s: BilevelSettings, proxy_params, outer_ids, scores, p_local, z) -> tuple:
    """Step 4: c_i = ⟨∇CE_i, z⟩, the hypergradient, its per-tensor clip and the score-model AdamW step.
    Returns (the hypergradient's norm before clipping, c̄)."""
    z_map = dict(zip(proxy_params, z, strict=True))
    if s.ci_method == "ghost":
        c = ci_ghost(state.proxy, outer_ids, z_map, s.ci_chunk_seqs)
    else:
        c = ci_loop(state.proxy, outer_ids, z_map)
    state.score_opt.zero_grad(set_to_none=True)
    grads, c_bar = score_hypergrad(state.score_model, scores, p_local, c)
    hyper_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    if s.hypergrad_clip is not None:
        for q in state.score_model.parameters():
            if q.grad is not None:
                torch.nn.utils.clip_grad_norm_([q], s.hypergrad_clip)  # per tensor, as the released code
    state.score_opt.step()
    state.score_opt.zero_grad(set_to_none=True)
    return hyper_norm, c_bar


def outer_step(
    state: BilevelState,
    s: BilevelSettings,
    train_batch_at: Callable[[int], torch.Tensor],
    ref_batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
) -> dict:
    """One outer step (K inner steps + one score-model step). ``train_batch_at(i)`` is this worker's i-th
    micro-batch of training rows; ``ref_batch_at(t)`` its t-th reference micro-batch (ids, loss mask)."""
    t0 = time.perf_counter()
    global_batch = s.micro_batch_seqs * dist.world_size()
    proxy_params = [p for p in state.proxy.parameters() if p.requires_grad]
    inner, outer_ids, outer_tl = _inner_steps(state, s, train_batch_at, global_batch)
    grad_f, upper = _reference_grad(state, proxy_params, ref_batch_at)

    # 3. z ≈ (H + μI)⁻¹ ∇f with HVPs of g on the outer batch
    _, scores = state.score_model(outer_ids)  # (B,) with graph to θ_s, used again in step 4
    p_local, p_all, normaliser = global_softmax(scores)
    hvp = make_hvp(state.proxy, proxy_params, outer_ids, p_local * s.ce_scale, outer_tl, s.gamma, global_batch, s.l2)
    z = solve_z(hvp, grad_f, s.z_steps, s.z_lr, s.z_damping, s.z_init, s.z_clip)
    del hvp  # frees the double-backward graph before the next forward

    hyper_norm, c_bar = _score_step(state, s, proxy_params, outer_ids, scores, p_local, z)
    state.proxy_sched.step()
    state.score_sched.step()
    state.normaliser = normaliser
    state.step += 1
    return {
        "step": state.step,
        **inner,
        "upper_loss": _global_mean(upper),
        "hypergrad_norm": hyper_norm,
        "z_norm": math.sqrt(sum(float(v.double().pow(2).sum()) for v in z)),
        "c_bar": c_bar,
        **weight_stats(p_all),
        "proxy_lr": state.proxy_sched.get_last_lr()[0],
        "score_lr": state.score_sched.get_last_lr()[0],
        "outer_step_s": time.perf_counter() - t0,
    }


def run_bilevel(
    state: BilevelState,
    s: BilevelSettings,
    train_batch_at: Callable[[int], torch.Tensor],
    ref_batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    end_step: int,
    log: Callable[[dict], None] = lambda m: None,
    save: Callable[[BilevelState], None] = lambda st: None,
    ckpt_every_steps: int = 25,
) -> BilevelState:
    """Outer steps from ``state.step`` to ``end_step``; ``save`` every ``ckpt_every_steps`` and at the end."""
    while state.step < end_step:
        metrics = outer_step(state, s, train_batch_at, ref_batch_at)
        state.metrics.append(metrics)
        log(metrics)
        bad = [k for k in ("lower_loss", "upper_loss", "hypergrad_norm") if not math.isfinite(metrics[k])]
        if bad:
            raise FloatingPointError(f"stage 'bilevel': non-finite {', '.join(bad)} at outer step {state.step}")
        if state.step % ckpt_every_steps == 0 or state.step == end_step:
            save(state)
    return state
