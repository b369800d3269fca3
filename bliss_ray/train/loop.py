"""The one LM training loop, shared by proxy warm-up and target pretraining (pure PyTorch; Ray Train wraps it).

Each optimizer step takes this rank's micro-batches of the step (``batches_at(step)``), accumulates gradients
with DDP's ``no_sync`` on all but the last micro-batch (one all-reduce per step) and, for an FSDP2 model, reduces
them after every micro-batch or only the last (``grad_sync``, ``resources.grad_sync``), clips the global grad norm,
checks that loss and grad norm are finite on every rank, and steps AdamW. ``log`` receives per-step metrics;
``save`` is called every ``ckpt_every_steps`` and at the end, never after a non-finite step.

    train_lm(model, opt, start_step=0, end_step=100, lr_at=lambda s: 1e-3, batches_at=..., settings=TrainSettings(),
             stage="warmup")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from bliss_ray.train import dist
from bliss_ray.train import precision as precision_
from bliss_ray.train.settings import TrainSettings


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient; the message names the stage and step."""


class NonFiniteCheckpointError(RuntimeError):
    """Refusing to write a checkpoint whose weights are not all finite."""


def assert_finite(module: torch.nn.Module, what: str) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteCheckpointError(f"{what}: parameter '{name}' is not finite; no checkpoint written")


def make_optimizer(model: torch.nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over all parameters (as lit-gpt/MATES) with the fused kernel: on CPU the for-loop implementation
    costs a sizeable share of a training step."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=_fused_ok(params))


def _fused_ok(params: list[torch.nn.Parameter]) -> bool | None:
    """Whether torch's fused AdamW kernel applies: float parameters, all on one CPU or CUDA device type."""
    kinds = {p.device.type for p in params}
    ok = len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return True if ok else None  # None: torch's default implementation


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` without its no-op pass: when the total norm is under ``max_norm`` the
    clip coefficient is exactly 1, and torch would still rewrite every gradient. Same coefficient, same results;
    callers already synchronise on the norm."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not bool(max_norm / (norm + 1e-6) >= 1.0):  # torch's coefficient; NaN norms go through, as in torch
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of packed rows (no padding: every position is a real token)."""
    return model(input_ids=input_ids, labels=input_ids).loss  # HF shifts labels and upcasts logits to fp32


def autocast_for(device: torch.device, precision: str = "auto"):
    """The autocast of ``resources.precision`` on ``device`` (fp32 master weights; auto: bf16 on GPU, fp32 on CPU)."""
    return precision_.autocast(precision_.resolve_precision(precision, device.type), device)


def train_lm(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    start_step: int,
    end_step: int,
    lr_at: Callable[[int], float],
    batches_at: Callable[[int], list[torch.Tensor]],
    settings: TrainSettings,
    stage: str,
    precision: str = "auto",
    log: Callable[[dict], None] = lambda m: None,
    save: Callable[[int, int], None] = lambda step, skipped: None,
    skipped: int = 0,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    grad_sync: str = "every_micro_batch",
) -> int:
    """Train steps [start_step, end_step). Returns the number of skipped (non-finite) steps so far. ``stage``
    names the stage in errors; ``precision`` is ``resources.precision`` (auto: bf16-mixed on GPU, fp32 on CPU);
    ``grad_sync`` is ``resources.grad_sync`` (FSDP2 models only: DDP always reduces on the last micro-batch).

    ``save(next_step, skipped)`` must persist everything needed to resume at ``next_step``; with fp16, that
    includes ``grad_scaler``'s state (the caller's scaler, updated in place; None: a fresh one for this call)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = grad_scaler or precision_.grad_scaler(precision_.resolve_precision(precision, device.type), device)
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = batches_at(step)
        loss_sum, n_tokens = _forward_backward(model, micro, step, precision, scaler, loss_hook, grad_sync)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(params, settings.grad_clip)
        dropped, skipped = _dropped_update(loss_sum / len(micro), grad_norm, scaler, skipped, settings, stage, step)
        if dropped is not None:
            optimizer.zero_grad(set_to_none=True)
            log({"step": step + 1, **dropped, "lr": lr})
            if "fp16_overflow" in dropped and ((step + 1) % settings.ckpt_every_steps == 0 or step + 1 == end_step):
                save(step + 1, skipped)
            continue
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([loss_sum / len(micro), torch.tensor(float(n_tokens), device=device)])
        dist.all_reduce_sum_(stats)  # sum of per-rank mean losses, total tokens of the step
        step_s = time.perf_counter() - t0
        log(
            {
                "step": step + 1,
                "loss": stats[0].item() / dist.world_size(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": stats[1].item() / step_s,
                "tokens_seen": stats[1].item() * (step + 1),
                "step_s": step_s,
            }
        )
        if (step + 1) % settings.ckpt_every_steps == 0 or step + 1 == end_step:
            save(step + 1, skipped)
    return skipped


def _gradient_sync(model: torch.nn.Module, last: bool, grad_sync: str):
    """The context of one micro-batch's forward and backward: whether its backward reduces gradients across ranks.
    DDP: only the last micro-batch's (``no_sync`` before). FSDP2: every one's, or with ``last_micro_batch`` only
    the last's (``set_requires_gradient_sync``: unsharded gradients accumulate locally until then)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last or grad_sync == "every_micro_batch")
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def _forward_backward(
    model, micro: list[torch.Tensor], step: int, precision: str, scaler, loss_hook, grad_sync: str
) -> tuple[torch.Tensor, int]:
    """This rank's micro-batches of one step, forward and backward, reducing gradients as ``_gradient_sync``
    says. Returns (the sum of their mean losses, tokens)."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    n_tokens = 0
    for i, input_ids in enumerate(micro):
        input_ids = input_ids.to(device, non_blocking=True)  # (m, L)
        sync = _gradient_sync(model, i == len(micro) - 1, grad_sync)
        with sync, autocast_for(device, precision):
            loss = lm_loss(model, input_ids)
            if loss_hook is not None:
                loss = loss_hook(step, loss)
        (loss / len(micro) if scaler is None else scaler.scale(loss / len(micro))).backward()
        loss_sum += loss.detach().float()
        n_tokens += input_ids.numel()
    return loss_sum, n_tokens


def _dropped_update(loss, grad_norm, scaler, skipped: int, settings: TrainSettings, stage: str, step: int):
    """Whether this step's update is dropped, and the skipped count: (None, skipped) for a finite step; an fp16
    overflow lowers the loss scale ({"fp16_overflow": 1}); a non-finite loss or gradient is skipped under
    ``skip_batch`` ({"skipped_step": 1}) and fails the stage under ``fail`` or past ``max_skipped_steps``. Every
    rank takes the same branch: both flags are reduced over workers."""
    device = loss.device
    overflow = scaler is not None and dist.any_true(not torch.isfinite(grad_norm), device)
    if overflow and not dist.any_true(not torch.isfinite(loss), device):
        scaler.update()  # an fp16 overflow, not a divergence: lower the scale and drop this step's update
        return {"fp16_overflow": 1}, skipped
    if not dist.any_true(not (torch.isfinite(loss) and torch.isfinite(grad_norm)), device):
        return None, skipped
    skipped += 1
    if settings.nonfinite_policy == "fail" or skipped > settings.max_skipped_steps:
        raise NonFiniteLossError(
            f"stage '{stage}': non-finite loss or gradient at step {step + 1} "
            f"(loss={loss.item():.4g}, grad_norm={grad_norm.item():.4g}); "
            f"policy={settings.nonfinite_policy}, skipped so far={skipped}"
        )
    return {"skipped_step": 1}, skipped
