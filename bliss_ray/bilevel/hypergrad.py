"""The implicit hypergradient of BLISS (docs/method.md, "The hypergradient"), pure PyTorch.

    ∇Φ(θ_s) = −∇²_{θ_s θ_p} g · z,   z ≈ H⁻¹ ∇_{θ_p} f,   H = ∇²_{θ_p θ_p} g

1. ``make_hvp`` builds ∇_{θ_p} g once with ``create_graph=True`` on the outer batch; each call returns H z
   (Hessian-vector product of the FULL lower objective: weighted CE + γ KL + λ‖θ‖², the last added exactly as
   2λz), summed over workers.
2. ``solve_z`` runs Q damped Richardson steps z ← z − η_z·clip(Hz − ∇f + μz) from a configurable start
   (released code: Q = 3, η_z = μ = 1e-2, constant 1/numel start, per-tensor clip 1, re-initialised every step).
3. c_i = ⟨∇_{θ_p} CE_i, z⟩ for every sample, batched (``ci_ghost``) or by the per-sample reference loop
   (``ci_loop``). Only the CE term depends on θ_s (through P_i), so KL and L2 drop out here.
4. With P = softmax(s) over the global batch, ∇_{θ_s} Σ_i P_i c_i = Σ_j P_j (c_j − c̄) ∇s_j, c̄ = Σ_j P_j c_j,
   so ``score_hypergrad`` needs one batched forward+backward of the score model on a surrogate.

Second derivatives do not exist for the flash / memory-efficient SDPA kernels (CPU flash raises "derivative for
_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so every forward whose graph is
differentiated twice runs under ``math_attention()``. First-order paths (``ci_ghost``, training, scoring) keep
the fast kernels.

``ci_ghost`` computes all c_i from ONE forward + activation-only backward per chunk, like ghost clipping: for a
linear layer y = W a + b, ⟨∇_W CE_i, Z_W⟩ + ⟨∇_b CE_i, z_b⟩ = Σ_t g_tᵀ (Z_W a_t + z_b) with a_t its input and
g_t = ∂CE_i/∂y_t; embeddings and norms have the same closed forms. Weight gradients are never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bliss_ray.bilevel.losses import per_sample_ce, weighted_lower_loss
from bliss_ray.train import dist

Tensors = list[torch.Tensor]


def math_attention():
    """Force SDPA's math backend: the only one whose backward is itself differentiable."""
    return sdpa_kernel(SDPBackend.MATH)


def hvp_of(loss: torch.Tensor, params: Tensors, l2: float = 0.0) -> Callable[[Tensors], Tensors]:
    """z ↦ (∇²loss + 2λI) z, summed over workers. Builds ∇loss once with ``create_graph``; each call is one
    double backward through it (so the forward that made ``loss`` must be twice differentiable)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(z: Tensors) -> Tensors:
        hz = [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=z, retain_graph=True)]
        dist.all_reduce_sum_(*hz)  # the data terms of g are sums over workers' samples
        return [h + 2.0 * l2 * v for h, v in zip(hz, z, strict=True)]  # + ∇²(λ‖θ‖²) z = 2λz, exact

    return hvp


def make_hvp(
    proxy: nn.Module,
    params: Tensors,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    target_logits: torch.Tensor | None,
    gamma: float,
    global_batch: int,
    l2: float,
) -> Callable[[Tensors], Tensors]:
    """z ↦ H z for the lower objective g on this outer batch (global over workers). ``weights`` are detached."""
    with math_attention():
        logits = proxy(input_ids=input_ids).logits  # (B, T, V)
        loss, _, _ = weighted_lower_loss(logits, input_ids, weights.detach(), target_logits, gamma, global_batch)
        return hvp_of(loss, params, l2)


def _clip_(t: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    if max_norm is not None:
        norm = t.norm()
        if norm > max_norm:
            t.mul_(max_norm / norm)
    return t


def solve_z(
    hvp: Callable[[Tensors], Tensors],
    grad_f: Tensors,
    steps: int,
    lr: float,
    damping: float,
    init: str = "zero",
    clip: float | None = 1.0,
) -> Tensors:
    """Q damped Richardson steps towards (H + μI) z = ∇f. ``init``: constant 1/numel, zero, or ∇f."""
    if init == "constant":
        z = [torch.full_like(g, 1.0 / g.numel()) for g in grad_f]
    elif init == "zero":
        z = [torch.zeros_like(g) for g in grad_f]
    else:
        z = [g.clone() for g in grad_f]
    for _ in range(steps):
        hz = hvp(z)
        z = [v - lr * _clip_(h - g + damping * v, clip) for v, h, g in zip(z, hz, grad_f, strict=True)]
    return z


def ci_loop(
    proxy: nn.Module,
    input_ids: torch.Tensor,
    z: dict[nn.Parameter, torch.Tensor],
    acc_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference implementation: c_i = ⟨∇CE_i, z⟩ with one batch-1 forward+backward per sample. (B,) in
    ``acc_dtype``: float64 for the reference (tests); the model's own dtype for a like-for-like speed comparison
    with ``ci_ghost``, which accumulates in it."""
    params = [p for p in proxy.parameters() if p.requires_grad]
    out = []
    for i in range(input_ids.shape[0]):
        ce = per_sample_ce(proxy(input_ids=input_ids[i : i + 1]).logits, input_ids[i : i + 1]).sum()
        grads = torch.autograd.grad(ce, params)
        out.append(sum((g.to(acc_dtype) * z[p].to(acc_dtype)).sum() for g, p in zip(grads, params, strict=True)))
    return torch.stack(out)


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight")


def _ghost_chunk(proxy: nn.Module, input_ids: torch.Tensor, z: dict, acc_dtype: torch.dtype) -> torch.Tensor:
    captured: list[tuple[nn.Module, torch.Tensor, list]] = []

    def capture(module, inputs, output):
        slot: list = []
        captured.append((module, inputs[0].detach(), slot))
        output.register_hook(slot.append)  # receives ∂(Σ_i CE_i)/∂output; row i only depends on CE_i

    handled = [m for m in proxy.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) or _is_rmsnorm(m)]
    hooks = [m.register_forward_hook(capture) for m in handled]
    embedding = proxy.get_input_embeddings()
    params = [p for p in proxy.parameters() if p.requires_grad]
    try:
        for p in params:  # activation-only backward: weight gradients are never formed
            p.requires_grad_(False)
        with torch.no_grad():
            emb = embedding(input_ids)  # (b, T, d)
        emb.requires_grad_(True)
        logits = proxy(inputs_embeds=emb).logits  # (b, T, V)
        ce = per_sample_ce(logits, input_ids)  # (b,)
        (g_emb,) = torch.autograd.grad(ce.sum(), [emb])  # (b, T, d)
    finally:
        for p in params:
            p.requires_grad_(True)
        for h in hooks:
            h.remove()
    with torch.no_grad():
        c = (g_emb.to(acc_dtype) * z[embedding.weight].to(acc_dtype)[input_ids]).flatten(1).sum(1)  # (b,)
        for module, a, slot in captured:
            g = slot[0].to(acc_dtype)  # (b, T, d_out)
            a = a.to(acc_dtype)  # (b, T, d_in)
            if isinstance(module, nn.Linear):
                c += ((g @ z[module.weight].to(acc_dtype)) * a).flatten(1).sum(1)  # Σ_t g_tᵀ Z a_t
                if module.bias is not None:
                    c += (g * z[module.bias].to(acc_dtype)).flatten(1).sum(1)
            elif isinstance(module, nn.LayerNorm):
                n = F.layer_norm(a, module.normalized_shape, None, None, module.eps)  # normalised input
                c += (g * n * z[module.weight].to(acc_dtype)).flatten(1).sum(1)
                c += (g * z[module.bias].to(acc_dtype)).flatten(1).sum(1)
            else:  # RMSNorm: y = w ⊙ a / rms(a)
                eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
                n = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
                c += (g * n * z[module.weight].to(acc_dtype)).flatten(1).sum(1)
    return c


def ghost_supported(proxy: nn.Module) -> bool:
    """True if every trainable parameter lives in a module type ``ci_ghost`` knows the closed form for."""
    covered = {id(proxy.get_input_embeddings().weight)}
    for m in proxy.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)) or _is_rmsnorm(m):
            covered |= {id(p) for p in m.parameters(recurse=False)}
    return all(id(p) in covered for p in proxy.parameters() if p.requires_grad)


def ci_ghost(
    proxy: nn.Module, input_ids: torch.Tensor, z: dict[nn.Parameter, torch.Tensor], chunk: int = 8
) -> torch.Tensor:
    """Batched c_i = ⟨∇CE_i, z⟩ from ghost inner products, ``chunk`` sequences at a time. (B,) float64/32."""
    if not ghost_supported(proxy):
        raise NotImplementedError("ci_ghost: the proxy has parameters outside Linear/Embedding/norm layers")
    acc = torch.float64 if next(proxy.parameters()).dtype == torch.float64 else torch.float32
    return torch.cat([_ghost_chunk(proxy, input_ids[s : s + chunk], z, acc) for s in range(0, len(input_ids), chunk)])


def score_hypergrad(
    score_model: nn.Module, scores_local: torch.Tensor, p_local: torch.Tensor, c_local: torch.Tensor
) -> tuple[Tensors, float]:
    """∇Φ(θ_s) = −Σ_j P_j (c_j − c̄) ∇s_j over the global batch, summed over workers.

    ``scores_local`` must carry the graph to θ_s; ``p_local``/``c_local`` are this worker's global-softmax
    weights and c_i. Returns the gradients (also left in ``.grad``) and c̄."""
    p = p_local.detach().double()
    c = c_local.detach().double()
    c_bar = (p * c).sum().reshape(1)
    dist.all_reduce_sum_(c_bar)  # c̄ = Σ_j P_j c_j over the global batch
    coef = (p * (c - c_bar)).to(scores_local.dtype)  # (B_local,)
    params = [q for q in score_model.parameters() if q.requires_grad]
    surrogate = -(coef * scores_local).sum()
    grads = list(torch.autograd.grad(surrogate, params, allow_unused=True))
    grads = [torch.zeros_like(q) if g is None else g for g, q in zip(grads, params, strict=True)]
    dist.all_reduce_sum_(*grads)
    for q, g in zip(params, grads, strict=True):
        q.grad = g
    return grads, float(c_bar.item())
