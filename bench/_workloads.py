"""The workloads the benchmarks time, built from the pure PyTorch layer only (no Ray, no pydantic config).

Each builder returns a zero-argument callable doing one unit of real work through the project's own code
(``train_lm`` for a training step, ``outer_step`` for a bilevel step, ``Scorer``/``ScoreModel`` for scoring,
``ci_ghost``/``ci_loop`` for the c_i), and the FLOPs of that unit by the FLOPs ledger (``bliss_ray.flops``,
paper convention: forward F = 2·P_mm + 4·L·d·n_layer per token, training = 3F). ``gpu_bench.py`` uses this
module on machines without Ray, so it must stay in the pure layer.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from bliss_ray.bilevel.hypergrad import ci_ghost, ci_loop
from bliss_ray.bilevel.loop import BilevelSettings, BilevelState, outer_step
from bliss_ray.flops import forward_flops_per_token, ledger
from bliss_ray.models.lm import arch_from_preset, build_lm
from bliss_ray.models.score import ScoreModel
from bliss_ray.train.host_memory import retain_freed_memory
from bliss_ray.train.loop import LoopSettings, make_optimizer, train_lm


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
    cfg = LoopSettings("bench", ckpt_every_steps=1 << 30)

    def step():
        s = next(counter)
        train_lm(model, opt, start_step=s, end_step=s + 1, lr_at=lambda _: 1e-4, batches_at=lambda _: batches, cfg=cfg)
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
    """FLOPs of ONE outer step by the ledger's own op count (``bliss_ray.flops.ledger``), fed a minimal
    stand-in for the experiment config so the ledger's formula — not a copy of it — is what we divide by."""
    exp = NS(
        data=NS(seq_len=seq_len),
        schedule=NS(rounds=1),
        tokenizer=NS(vocab_size=vocab),
        models=NS(target=NS(arch=target or proxy, vocab_size=vocab), proxy=NS(arch=proxy, vocab_size=vocab)),
        pretrain=NS(steps=0, global_batch_seqs=0, decay_steps=0),
        warmup=NS(steps=0, global_batch_seqs=0),
        selection=NS(method="bliss"),
        flops=NS(pool_rows_per_round=None),
        bilevel=NS(
            outer_steps=1,
            inner_steps=s.inner_steps,
            z_steps=s.z_steps,
            gamma=s.gamma,
            micro_batch_seqs=s.micro_batch_seqs,
            reference_batch_seqs=s.reference_batch_seqs,
            reuse_inner_batch=s.reuse_inner_batch,
        ),
        resources=NS(bilevel_workers=1),
    )
    return next(r.flops for r in ledger(exp) if r.stage == "bilevel optimisation")


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
    s = BilevelSettings(
        outer_steps=10**6,  # the cosine schedules never reach their end while we time
        micro_batch_seqs=batch,
        reference_batch_seqs=ref_batch,
        gamma=gamma if target else 0.0,
        **overrides,
    )
    state = BilevelState.create(proxy_model, score, target_model, s)
    train_ids = random_ids(vocab, batch, seq_len, device, seed=1)
    ref_ids = random_ids(vocab, ref_batch, seq_len, device, seed=2)

    def step():
        outer_step(state, s, lambda i: train_ids, lambda t: (ref_ids, None))
        sync(device)

    return step, outer_step_flops(proxy, target, vocab, seq_len, s), state


def ci_pair(preset: str, vocab: int, seq_len: int, batch: int, device: torch.device, chunk: int):
    """(per-sample loop, batched ghost) callables for c_i = ⟨∇CE_i, z⟩ on one batch, and their max relative
    disagreement (a guard: a fast wrong answer is not a speedup)."""
    retain_freed_memory(device)
    model = build_lm(arch_from_preset(preset, vocab), seq_len, seed=0).to(device).train()
    g = torch.Generator().manual_seed(3)
    z = {p: (torch.randn(p.shape, generator=g) * 1e-2).to(device) for p in model.parameters()}
    ids = random_ids(vocab, batch, seq_len, device)
    a, b = ci_loop(model, ids, z).double(), ci_ghost(model, ids, z, chunk).double()
    err = float(((a - b).abs() / a.abs().clamp(min=1e-12)).max())

    def loop():
        ci_loop(model, ids, z)
        sync(device)

    def ghost():
        ci_ghost(model, ids, z, chunk)
        sync(device)

    return loop, ghost, err
