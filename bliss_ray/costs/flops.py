"""Model FLOPs per token: what one token costs a forward, a training step or a bilevel outer step.

Two conventions of counting what this platform computes, named in every output:

* ``paper`` — the per-token count that reproduces the BLISS rebuttal's Table 1 (docs/method.md, "FLOPs"): forward
  FLOPs per token F = 2·P_mm + 4·L·d·n_layer, with P_mm the matmul parameters (attention and MLP projections, plus
  the LM head d·V when the model has one; the embedding lookup is free) and the full L² attention term; training =
  3F. For the 410M recipe this gives 6.35e19 for pretraining and 0.07e19 for a true Pythia-31M proxy warm-up.
* ``6nd`` — the usual 6·N·D (training) and 2·N·D (forward) with N all parameters.

The bilevel outer step's count follows our implementation (``bilevel/loop.py``): K inner steps (proxy 3F_p,
target forward F_tr when γ > 0, score forward F_s), the reference gradient 3F_p, the outer score forward F_s, ∇g
with create_graph 3F_p, Q HVPs at 4F_p each, ghost c_i 3F_p, score backward 2F_s.

``counted_train_flops_per_token`` measures one real training step with ``torch.utils.flop_counter`` on the meta
device (no compute), so tests can hold the analytic formula to it. Pure arithmetic otherwise: the GPU runbook
imports this module without pydantic or Ray. ``bliss_ray.costs.ledger`` charges these per stage of a run.
"""

from __future__ import annotations

from bliss_ray.models.arch import BERT_MAX_POSITIONS, LMArch


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
    """FLOPs of one forward+backward of a (1, L) batch, counted by FlopCounterMode on meta tensors (torch and
    transformers are imported here only: the ledger itself is arithmetic and starts in a second)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from bliss_ray.models.lm import hf_config  # lazy: torch, transformers (the rest is arithmetic)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch, seq_len, attn="sdpa"))
        ids = torch.zeros(1, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    return counter.get_total_flops() / seq_len


def influence_forward_flops_per_token(arch: LMArch, seq_len: int, convention: str = "paper") -> float:
    """Forward FLOPs per token of the influence model on rows of ``seq_len`` tokens (``bliss_ray.costs.flops``'s
    conventions; the model is ``mates/influence.py``'s). ``paper``: 2·P_mm + 4·c·d·n_layer with
    P_mm = n_layer·(4d² + 2·d·d_ff) (BERT's MLP is GeLU, two matrices) + the d→1 head, and attention over
    c = min(L, 512) tokens, since chunks attend only within themselves. ``6nd``: 2·N with N all parameters
    (embeddings included, pooler excluded)."""
    d, f, n = arch.d_model, arch.d_ff, arch.n_layer
    if convention == "6nd":
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # q, k, v, o (+biases), MLP (+biases), 2 norms
        emb = (arch.vocab_size + BERT_MAX_POSITIONS + 2) * d + 2 * d
        return 2.0 * (n * per_layer + emb + d + 1)
    chunk = min(seq_len, BERT_MAX_POSITIONS)
    return 2.0 * (n * (4 * d * d + 2 * d * f) + d) + 4.0 * chunk * d * n


def bilevel_flops_per_token(b, proxy: LMArch, target: LMArch | None, seq_len: int, convention: str = "paper") -> float:
    """One outer step's FLOPs per token of its global batch (``bilevel/loop.py``'s op count); ``target`` is None
    when γ = 0 (no target forward). ``b`` is the bilevel section of a config (or anything with its fields)."""

    def fwd(a, head=True):
        return forward_flops_per_token(a, seq_len, head, convention)

    f_p, f_s = fwd(proxy), fwd(proxy, head=False)
    f_tr = fwd(target) if target is not None else 0.0
    return (
        b.inner_steps * (3 * f_p + f_tr + f_s)
        + 3 * f_p * b.reference_batch_seqs / b.micro_batch_seqs  # ∇f on the reference batch
        + (0 if b.reuse_inner_batch else f_tr)
        + f_s
        + 3 * f_p
        + 4 * b.z_steps * f_p
        + 3 * f_p
        + 2 * f_s
    )
