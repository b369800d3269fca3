"""The FLOPs ledger: what every stage of a BLISS / MATES / random run costs, from the configuration.

Two conventions, named in every output:

* ``paper`` — what reproduces the BLISS rebuttal's Table 1 (method.md §4.2): forward FLOPs per token
  F = 2·P_mm + 4·L·d·n_layer, with P_mm the matmul parameters (attention and MLP projections, plus the LM head
  d·V when the model has one; the embedding lookup is free) and the full L² attention term; training = 3F.
  For the 410M recipe this gives 6.35e19 for pretraining and 0.07e19 for a true Pythia-31M proxy warm-up.
* ``6nd`` — the usual 6·N·D (training) and 2·N·D (forward) with N all parameters.

Per-stage operation counts for the bilevel step follow our implementation (``bilevel/loop.py``):
K inner steps (proxy 3F_p, target forward F_tr when γ>0, score forward F_s), the reference gradient 3F_p, the
outer score forward F_s, ∇g with create_graph 3F_p, Q HVPs at 4F_p each, ghost c_i 3F_p, score backward 2F_s.

``counted_train_flops_per_token`` measures one real training step with ``torch.utils.flop_counter`` on the meta
device (no compute), so tests can hold the analytic formula to it.

    bliss-ray flops experiments/paper/pythia410m.yaml
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bliss_ray.models.lm import LMArch, arch_from_preset, hf_config


def matmul_params(arch: LMArch, head: bool = True) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded, LM head optional)."""
    d, f = arch.d_model, arch.d_ff
    kv = (arch.n_kv_head or arch.n_head) * (d // arch.n_head)
    mlp = 2 * d * f if arch.family == "gpt_neox" else 3 * d * f  # GeLU MLP vs SwiGLU
    per_layer = d * d + 2 * d * kv + d * d + mlp  # q, k, v, output projection, MLP
    return arch.n_layer * per_layer + (d * arch.vocab_size if head else 0)


def forward_flops_per_token(arch: LMArch, seq_len: int, head: bool = True, convention: str = "paper") -> float:
    if convention == "6nd":
        return 2.0 * arch.n_params(embeddings=True) - (0 if head else 2.0 * arch.d_model * arch.vocab_size)
    return 2.0 * matmul_params(arch, head) + 4.0 * seq_len * arch.d_model * arch.n_layer


def counted_train_flops_per_token(arch: LMArch, seq_len: int) -> float:
    """FLOPs of one forward+backward of a (1, L) batch, counted by FlopCounterMode on meta tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch, seq_len, attn="sdpa"))
        ids = torch.zeros(1, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    return counter.get_total_flops() / seq_len


@dataclass
class Row:
    group: str  # "pretraining", "warm-up", "selection", "evaluation"
    stage: str
    flops: float
    detail: str


def ledger(exp, convention: str = "paper", pool_rows_per_round: int | None = None) -> list[Row]:
    """Every stage's FLOPs for an experiment config. ``pool_rows_per_round`` overrides the config's pool size."""
    L, R = exp.data.seq_len, exp.schedule.rounds
    vocab = exp.models.target.vocab_size or exp.tokenizer.vocab_size
    target = arch_from_preset(exp.models.target.arch, vocab)
    proxy = arch_from_preset(exp.models.proxy.arch, exp.models.proxy.vocab_size or vocab)

    def fwd(a, head=True):
        return forward_flops_per_token(a, L, head, convention)

    tr_tokens = lambda t: t.steps * t.global_batch_seqs * L  # noqa: E731
    rows = [
        Row(
            "pretraining",
            "target pretraining",
            3 * fwd(target) * tr_tokens(exp.pretrain) * (R + 1),
            f"{R + 1} rounds × {exp.pretrain.steps} steps × {exp.pretrain.global_batch_seqs}×{L} tokens",
        ),
    ]
    method = exp.selection.method
    pool_rows = pool_rows_per_round or exp.flops.pool_rows_per_round
    if method in ("bliss", "random"):
        rows.append(
            Row(
                "warm-up",
                "proxy warm-up",
                3 * fwd(proxy) * tr_tokens(exp.warmup),
                f"{exp.warmup.steps} steps × {exp.warmup.global_batch_seqs}×{L} tokens",
            )
        )
    if method == "bliss":
        b = exp.bilevel
        f_p, f_s = fwd(proxy), fwd(proxy, head=False)
        f_tr = fwd(target) if b.gamma > 0 else 0.0
        global_batch = b.micro_batch_seqs * exp.resources.bilevel_workers
        per_token = (
            b.inner_steps * (3 * f_p + f_tr + f_s)
            + 3 * f_p * b.reference_batch_seqs / b.micro_batch_seqs  # ∇f on the reference batch
            + (0 if b.reuse_inner_batch else f_tr)
            + f_s
            + 3 * f_p
            + 4 * b.z_steps * f_p
            + 3 * f_p
            + 2 * f_s
        )
        rows.append(
            Row(
                "selection",
                "bilevel optimisation",
                per_token * b.outer_steps * global_batch * L * R,
                f"{R} rounds × T={b.outer_steps} × B={global_batch}×{L}, K={b.inner_steps}, Q={b.z_steps}",
            )
        )
        if pool_rows:
            rows.append(
                Row(
                    "selection",
                    "score-model inference",
                    f_s * pool_rows * L * R,
                    f"{R} rounds × {pool_rows:,} rows × {L} tokens (trunk only)",
                )
            )
    if method == "mates":
        # MATES (method.md §5.1, §4.2's formula). Probing: per probe one target training step on 1 row (3F·L)
        # plus one reference forward (F per token; the prober trims padding after each item's last target token,
        # so for LAMBADA-style references this counts up to L tokens per item, an upper bound). The influence
        # model (BERT family, GeLU MLP, attention within 512-token chunks: ``mates.influence``'s own per-token
        # count) trains for E epochs on the (1 − held-out) split, evaluates the held-out split every epoch, and
        # scores the pool. MATES's own total at 410M is 8.11e19 (method.md §4.1): see experiments/paper/
        # pythia410m_mates.yaml for what that implies about its reference length and pool size.
        from bliss_ray.mates.influence import forward_flops_per_token as influence_fwd
        from bliss_ray.mates.influence import influence_arch

        m = exp.mates
        bert = influence_arch(m.influence_arch, vocab)
        f_b = influence_fwd(bert, L, convention)
        probe = 3 * fwd(target) * L + fwd(target) * m.reference_seqs * L  # one step on {x} + reference loss
        rows.append(
            Row(
                "selection",
                "oracle probing",
                probe * m.probes * R,
                f"{R} rounds × {m.probes} probes × (1 step on 1×{L} + reference ≤{m.reference_seqs}×{L} tokens)",
            )
        )
        train_rows = m.probes * (1 - m.influence_heldout_frac)
        held_rows = m.probes * m.influence_heldout_frac
        rows.append(
            Row(
                "selection",
                "influence-model training",
                (3 * train_rows + held_rows) * f_b * L * m.influence_epochs * R,
                f"{R} rounds × {m.influence_epochs} epochs × {m.probes} probes ({m.influence_arch}, "
                f"{held_rows / m.probes:.0%} held out)",
            )
        )
        if pool_rows:
            rows.append(
                Row(
                    "selection",
                    "influence-model inference",
                    f_b * pool_rows * L * R,
                    f"{R} rounds × {pool_rows:,} rows × {L} tokens ({m.influence_arch})",
                )
            )
    if exp.pretrain.decay_steps:
        rows.append(
            Row(
                "evaluation",
                "decay branches",
                3 * fwd(target) * exp.pretrain.decay_steps * exp.pretrain.global_batch_seqs * L * (R + 1),
                f"{exp.pretrain.decay_steps} decay steps per round, for evaluation only",
            )
        )
    return rows


def totals(rows: list[Row]) -> dict[str, float]:
    """Total FLOPs (evaluation excluded, as the paper's Table 1) and by group."""
    out: dict[str, float] = {}
    for r in rows:
        out[r.group] = out.get(r.group, 0.0) + r.flops
    out["total"] = sum(v for k, v in out.items() if k != "evaluation")
    return out


def unit_of(total: float) -> int:
    """The power of ten to print FLOPs in: 19 for paper-scale runs (as Table 1), smaller for demos."""
    return 19 if total >= 1e18 else math.floor(math.log10(max(total, 1.0)))


def format_ledger(rows: list[Row], convention: str = "paper") -> str:
    total = totals(rows)["total"]
    exponent = unit_of(total)
    unit = 10.0**exponent
    lines = [
        f"FLOPs ({convention} convention, ×1e{exponent})",
        "",
        f"| {'process':<28} | {'FLOPs':>10} | {'share':>7} | detail |",
        f"|{'-' * 30}|{'-' * 12}|{'-' * 9}|---|",
    ]
    for r in rows:
        share = f"{100 * r.flops / total:6.2f}%" if r.group != "evaluation" else "  (sep.)"
        lines.append(f"| {r.stage:<28} | {r.flops / unit:10.4g} | {share:>7} | {r.detail} |")
    lines.append(f"| {'total (excl. evaluation)':<28} | {total / unit:10.4g} | {'100%':>7} | |")
    return "\n".join(lines)
