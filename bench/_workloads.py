"""The workloads the benchmarks time, built from the pure PyTorch layer only (no Ray, no pydantic config).

Each builder returns a zero-argument callable doing one unit of real work through the project's own code
(``train_lm`` for a training step, ``outer_step`` for a bilevel step, ``Scorer``/``ScoreModel`` for scoring,
``ci_ghost``/``ci_loop`` for the c_i), and the FLOPs of that unit by the FLOPs ledger (``bliss_ray.costs.flops``,
paper convention: forward F = 2·P_mm + 4·L·d·n_layer per token, training = 3F; ``outer_step_kernel_flops``
recounts an outer step's attention as the causal kernels compute it, ``_attention``). ``gpu_bench.py`` uses this
module on machines without Ray, so it must stay in the pure layer.
"""

from __future__ import annotations

import torch

from bliss_ray.bilevel.hypergrad import ci_ghost, ci_loop
from bliss_ray.bilevel.loop import BilevelState, outer_step
from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.costs.flops import bilevel_flops_per_token, forward_flops_per_token
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
from bliss_ray.models.score import ScoreModel
from bliss_ray.train.host_memory import retain_freed_memory
from bliss_ray.train.loop import make_optimizer, train_lm
from bliss_ray.train.settings import TrainSettings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_ids(vocab: int, batch: int, seq_len: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)


def train_step(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, micro: int | None = None):
    """One optimizer step of ``train_lm`` (bf16 autocast on GPU, fp32 on CPU, fused AdamW, grad clip,
    finiteness checks): the path proxy warm-up and target pretraining run. Returns (step, flops, model)."""
    retain_freed_memory(device)  # the allocator setting every CPU stage worker runs with
    arch = arch_from_preset(preset, vocab)
    model = build_lm(arch, seq_len).to(device).train()
    opt = make_optimizer(model, 1e-4, (0.9, 0.95), 0.1)
    micro = micro or batch
    # batches stay on the CPU, as the stage's memmap rows do: train_lm's own host-to-device copy is timed too
    batches = [random_ids(vocab, micro, seq_len, "cpu", seed=i) for i in range(batch // micro)]
    counter = iter(range(10**9))
    settings = TrainSettings(ckpt_every_steps=1 << 30, global_batch_seqs=batch, micro_batch_seqs=micro)

    def step():
        s = next(counter)
        train_lm(
            model, opt, start_step=s, end_step=s + 1, lr_at=lambda _: 1e-4, batches_at=lambda _: batches,
            settings=settings, stage="bench",
        )  # fmt: skip
        sync(device)

    return step, 3 * forward_flops_per_token(arch, seq_len) * batch * seq_len, model


def score_forward(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, bf16: bool):
    """One batched score-model forward (trunk + mean-pool + head), as ``Scorer`` runs it. (fn, flops, model)"""
    retain_freed_memory(device)
    arch = arch_from_preset(preset, vocab)
    model = ScoreModel.from_proxy(build_lm(arch, seq_len), use_sigmoid=True).to(device).eval()
    ids = random_ids(vocab, batch, seq_len, device)

    def fwd():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(ids)[0].float()
        sync(device)

    return fwd, forward_flops_per_token(arch, seq_len, head=False) * batch * seq_len, model


def outer_step_flops(proxy: str, target: str | None, vocab: int, seq_len: int, s: BilevelSettings) -> float:
    """FLOPs of ONE outer step on one worker by the ledger's own op count (``bliss_ray.costs.flops``), so the ledger's
    formula — not a copy of it — is what we divide by."""
    per_token = bilevel_flops_per_token(
        s,
        arch_from_preset(proxy, vocab),
        arch_from_preset(target, vocab) if target and s.gamma > 0 else None,
        seq_len,
    )
    return per_token * s.micro_batch_seqs * seq_len


def outer_step_kernel_flops(
    proxy: str, target: str | None, vocab: int, seq_len: int, s: BilevelSettings, device_type: str
) -> float:
    """``outer_step_flops`` with attention counted as the kernels run it (``_attention``): the passes that use
    the fast causal kernels — K inner steps (proxy 3F, target F when γ > 0, score F), ∇f on the reference batch
    (3F), the outer score forward (F) and its backward (2F), ghost c_i (3F) — lose the tiles they skip; ∇g and
    the Q HVPs run the math backend and keep the full L². The ledger's own attention passes (the slope of its
    count in L) must equal this split, so a change in its op count fails here instead of skewing MFU."""
    from _attention import attention_flops_per_token, uncomputed_flops

    p_arch = arch_from_preset(proxy, vocab)
    t_arch = arch_from_preset(target, vocab) if target and s.gamma > 0 else None
    ref = s.reference_batch_seqs / s.micro_batch_seqs  # ∇f's rows per outer-batch row
    fast = {"proxy": 3 * s.inner_steps + 3 * ref + 3 + (s.inner_steps + 3)}  # + the score model's trunk passes
    fast["target"] = (s.inner_steps + (0 if s.reuse_inner_batch else 1)) if t_arch else 0
    math_passes = 3 + 4 * s.z_steps

    def per_token(length: int) -> float:
        return outer_step_flops(proxy, target, vocab, length, s) / (s.micro_batch_seqs * length)

    slope = per_token(seq_len + 1) - per_token(seq_len)  # Σ passes × 4·d·n_layer
    want = (fast["proxy"] + math_passes) * attention_flops_per_token(p_arch, 1)
    want += fast["target"] * attention_flops_per_token(t_arch, 1) if t_arch else 0.0
    if abs(slope - want) > 1e-6 * want:
        raise AssertionError(f"the ledger's outer step: {slope:.4g} attention FLOPs per token·L; we split {want:.4g}")
    tokens = s.micro_batch_seqs * seq_len
    skipped = uncomputed_flops(p_arch, seq_len, device_type, fast["proxy"], tokens)
    skipped += uncomputed_flops(t_arch, seq_len, device_type, fast["target"], tokens) if t_arch else 0.0
    return outer_step_flops(proxy, target, vocab, seq_len, s) - skipped


def bilevel_settings(target: str | None, batch: int, ref_batch: int, gamma: float = 1e-2, **overrides):
    """The ``BilevelSettings`` of ``bilevel_step`` (K = 1, Q = 3 by default; γ > 0 only with a target)."""
    return BilevelSettings(
        outer_steps=10**6,  # the cosine schedules never reach their end while we time
        micro_batch_seqs=batch,
        reference_batch_seqs=ref_batch,
        gamma=gamma if target else 0.0,
        **overrides,
    )


def bilevel_step(
    proxy: str,
    target: str | None,
    vocab: int,
    seq_len: int,
    batch: int,
    ref_batch: int,
    device: torch.device,
    gamma: float = 1e-2,
    **overrides,
):
    """One BLISS outer step (K=1, Q=3 by default) on a fixed batch, the way the bilevel stage runs it.
    γ > 0 only with a target (its forward for the KL term). Returns (step, flops, state)."""
    retain_freed_memory(device)
    p_arch = arch_from_preset(proxy, vocab)
    proxy_model = build_lm(p_arch, seq_len, seed=0).to(device).train()
    score = ScoreModel.from_proxy(proxy_model, use_sigmoid=True).to(device).train()
    target_model = build_lm(arch_from_preset(target, vocab), seq_len, seed=1).to(device) if target else None
    s = bilevel_settings(target, batch, ref_batch, gamma, **overrides)
    state = BilevelState.create(proxy_model, score, target_model, s)
    train_ids = random_ids(vocab, batch, seq_len, device, seed=1)
    ref_ids = random_ids(vocab, ref_batch, seq_len, device, seed=2)

    def step():
        outer_step(state, s, lambda i: train_ids, lambda t: (ref_ids, None))
        sync(device)

    return step, outer_step_flops(proxy, target, vocab, seq_len, s), state


def ci_pair(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, chunk: int):
    """(per-sample loop, batched ghost) callables for c_i = ⟨∇CE_i, z⟩ on one batch, and the max relative
    disagreement of each with the float64 per-sample reference (a guard: a fast wrong answer is not a speedup).

    Both timed sides accumulate in the model's own dtype (float32 here), as ``ci_ghost`` does: a loop that
    casts every gradient to float64 would be slower for a reason that has nothing to do with batching."""
    retain_freed_memory(device)
    model = build_lm(arch_from_preset(preset, vocab), seq_len, seed=0).to(device).train()
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(3)
    z = {p: (torch.randn(p.shape, generator=g) * 1e-2).to(device) for p in model.parameters()}
    ids = random_ids(vocab, batch, seq_len, device)
    ref = ci_loop(model, ids, z, acc_dtype=torch.float64)

    def rel_err(c: torch.Tensor) -> float:
        return float(((c.double() - ref).abs() / ref.abs().clamp(min=1e-12)).max())

    errors = {
        "loop": rel_err(ci_loop(model, ids, z, acc_dtype=dtype)),
        "ghost": rel_err(ci_ghost(model, ids, z, chunk)),
    }

    def loop():
        ci_loop(model, ids, z, acc_dtype=dtype)
        sync(device)

    def ghost():
        ci_ghost(model, ids, z, chunk)
        sync(device)

    return loop, ghost, errors
