"""The FLOPs ledger: what every stage of a BLISS / MATES / random run costs, from the configuration.

Two conventions of counting what this platform computes, named in every output:

* ``paper`` — the per-token count that reproduces the BLISS rebuttal's Table 1 (method.md §4.2): forward FLOPs
  per token F = 2·P_mm + 4·L·d·n_layer, with P_mm the matmul parameters (attention and MLP projections, plus the
  LM head d·V when the model has one; the embedding lookup is free) and the full L² attention term; training =
  3F. For the 410M recipe this gives 6.35e19 for pretraining and 0.07e19 for a true Pythia-31M proxy warm-up.
* ``6nd`` — the usual 6·N·D (training) and 2·N·D (forward) with N all parameters.

A third, ``rebuttal`` (``bliss_ray.costs.rebuttal``), reproduces the rebuttal's own rows and the assumptions
behind them, which are not what the pipeline computes.

Rows follow ``pipeline.plan``: one per stage kind the plan runs, times the number of such stages (the random
baseline has no warm-up, so it is charged none); a stage kind with no row fails loudly.

Totals are selection + target training: the pretraining row is the stable (never-decaying) run only. The decay
branches — each round's final one and its ``pretrain.eval_branches`` mid-round ones — are evaluation overhead,
the same for every method: they have their own row in the ``evaluation`` group, which totals exclude (as Table 1).

Per-stage operation counts for the bilevel step follow our implementation (``bilevel/loop.py``):
K inner steps (proxy 3F_p, target forward F_tr when γ>0, score forward F_s), the reference gradient 3F_p, the
outer score forward F_s, ∇g with create_graph 3F_p, Q HVPs at 4F_p each, ghost c_i 3F_p, score backward 2F_s.

MATES's oracle probing: each probe is one target step on one row plus one evaluation of the reference set, which
the prober trims after each batch's longest item (``mates.probe``), so LAMBADA items cost their own length, not
``seq_len``. Before a run the ledger takes that length from ``flops.reference_tokens_per_seq`` (an estimate; unset:
``seq_len``, an upper bound, said so in the row); a finished run's probe stage records the batches it really
computed (``reference_batches`` in its outputs), and ``bliss-ray report`` passes those.

``counted_train_flops_per_token`` measures one real training step with ``torch.utils.flop_counter`` on the meta
device (no compute), so tests can hold the analytic formula to it.

    bliss-ray flops experiments/paper/pythia410m.yaml [--convention paper|6nd|rebuttal]
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from bliss_ray.models.arch import BERT_MAX_POSITIONS, LMArch, arch_from_preset, influence_arch


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

    from bliss_ray.models.lm import hf_config

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


@dataclass
class Row:
    group: str  # "pretraining", "warm-up", "selection", "evaluation"
    stage: str
    flops: float
    detail: str  # how the row was counted (under ``rebuttal``: the assumption that reproduces it)
    published: float | None = None  # the rebuttal's printed value (×1e19), ``rebuttal`` convention only


# Stage kinds of ``pipeline.plan`` that cost no model FLOPs worth a row (tokenizing, sampling ids), or that Table 1
# leaves out (lm-eval's forward passes). Any other kind without a row fails loudly: the ledger charges exactly the
# stages the pipeline runs, no more (the random baseline has no warm-up) and no fewer.
_UNCHARGED_KINDS = {"tokenizer", "tokenize", "select", "evaluate", "report"}
_CHARGED_KINDS = {"pretrain", "warmup", "bilevel", "score", "probe", "influence"}


def stage_counts(exp) -> Counter:
    """How many stages of each kind ``pipeline.plan`` runs for this config: the rows' multipliers."""
    from bliss_ray.pipeline import plan  # Ray-free; imported here so that this module needs no config layer

    counts = Counter(s.kind for s in plan(exp))
    unknown = set(counts) - _UNCHARGED_KINDS - _CHARGED_KINDS
    if unknown:
        raise ValueError(f"FLOPs ledger: no row for stage kind(s) {sorted(unknown)}; add one to bliss_ray.costs.flops")
    return counts


def model_archs(exp) -> tuple[LMArch, LMArch]:
    vocab = exp.models.target.vocab_size or exp.tokenizer.vocab_size
    target = arch_from_preset(exp.models.target.arch, vocab)
    return target, arch_from_preset(exp.models.proxy.arch, exp.models.proxy.vocab_size or vocab)


def estimated_reference_batches(exp) -> tuple[list[tuple[int, float]], str]:
    """One reference evaluation of the MATES prober as (rows, tokens per row) batches, before any run, and where
    the length comes from. Passage references are whole rows; LAMBADA-style ones are trimmed after each item's
    last target token, to ``flops.reference_tokens_per_seq`` when the config states it, else ≤ ``seq_len``."""
    n_ref = min(exp.mates.reference_seqs, exp.data.max_reference_seqs)
    per_seq = exp.flops.reference_tokens_per_seq
    if exp.data.reference_loss == "passage" or per_seq is None:
        source = "whole rows" if exp.data.reference_loss == "passage" else "≤, flops.reference_tokens_per_seq unset"
        return [(n_ref, exp.data.seq_len)], source
    return [(n_ref, per_seq)], "flops.reference_tokens_per_seq, an estimate"


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


def ledger(
    exp,
    convention: str = "paper",
    pool_rows_per_round: int | None = None,
    reference_batches: list[tuple[int, float]] | None = None,
) -> list[Row]:
    """Every stage's FLOPs for an experiment config, one row per stage kind that ``pipeline.plan`` runs.

    ``pool_rows_per_round`` overrides the config's pool size, ``reference_batches`` the config's estimate of one
    MATES reference evaluation (``estimated_reference_batches``) with what a probe stage measured (its outputs'
    ``reference_batches``): reports of finished runs pass both."""
    L = exp.data.seq_len
    target, proxy = model_archs(exp)
    n = stage_counts(exp)

    def fwd(a, head=True, seq_len=L):
        return forward_flops_per_token(a, seq_len, head, convention)

    tr_tokens = lambda t: t.steps * t.global_batch_seqs * L  # noqa: E731
    p = exp.pretrain
    extra = exp.schedule.final_extra_steps  # the last round's extra steps (a FLOPs-matched baseline)
    rows = [
        Row(
            "pretraining",
            "target pretraining",
            3 * fwd(target) * (tr_tokens(p) * n["pretrain"] + extra * p.global_batch_seqs * L),
            f"{n['pretrain']} rounds × {p.steps} steps × {p.global_batch_seqs}×{L} tokens"
            + (f" + {extra} steps in the last round" if extra else ""),
        ),
    ]
    pool_rows = pool_rows_per_round or exp.flops.pool_rows_per_round
    if n["warmup"]:
        rows.append(
            Row(
                "warm-up",
                "proxy warm-up",
                3 * fwd(proxy) * tr_tokens(exp.warmup) * n["warmup"],
                f"{exp.warmup.steps} steps × {exp.warmup.global_batch_seqs}×{L} tokens",
            )
        )
    if n["bilevel"]:
        b = exp.bilevel
        global_batch = b.micro_batch_seqs * exp.resources.bilevel_workers
        per_token = bilevel_flops_per_token(b, proxy, target if b.gamma > 0 else None, L, convention)
        rows.append(
            Row(
                "selection",
                "bilevel optimisation",
                per_token * b.outer_steps * global_batch * L * n["bilevel"],
                f"{n['bilevel']} rounds × T={b.outer_steps} × B={global_batch}×{L}, K={b.inner_steps}, Q={b.z_steps}",
            )
        )
    if n["score"] and pool_rows and exp.selection.method == "bliss":
        rows.append(
            Row(
                "selection",
                "score-model inference",
                fwd(proxy, head=False) * pool_rows * L * n["score"],
                f"{n['score']} rounds × {pool_rows:,} rows × {L} tokens (trunk only)",
            )
        )
    if n["probe"]:
        rows += _mates_rows(exp, n, pool_rows, fwd, target, reference_batches, convention)
    if p.decay_steps:
        branches = 1 + p.eval_branches  # per round: the final decay branch and the mid-round ones
        per_round = f"{branches} branches × " if p.eval_branches else ""
        rows.append(
            Row(
                "evaluation",
                "decay branches",
                3 * fwd(target) * branches * p.decay_steps * p.global_batch_seqs * L * n["pretrain"],
                f"{per_round}{p.decay_steps} decay steps per round, for evaluation only (not in the total)",
            )
        )
    return rows


def _mates_rows(exp, n, pool_rows, fwd, target, reference_batches, convention) -> list[Row]:
    """MATES (method.md §5.1, §4.2's formula). Probing: per probe one target training step on 1 row (3F·L) plus
    one reference evaluation: Σ over its batches of rows × tokens × F at that length, the batches as the prober
    computes them (trimmed after each batch's longest item). The baseline evaluation (one per probe actor) is left
    out: 1 in ``mates.probes``. The influence model (BERT family, GeLU MLP, attention within 512-token chunks:
    ``influence_forward_flops_per_token``) trains for E epochs on the (1 − held-out) split, evaluates the
    held-out split every epoch, and scores the pool."""
    L, m = exp.data.seq_len, exp.mates
    vocab = exp.models.target.vocab_size or exp.tokenizer.vocab_size
    if reference_batches:
        source = "measured by the probe stage"
    else:
        reference_batches, source = estimated_reference_batches(exp)
    ref_rows = sum(r for r, _ in reference_batches)
    ref_tokens = sum(r * t for r, t in reference_batches)
    reference = sum(r * t * fwd(target, seq_len=t) for r, t in reference_batches)
    bert = influence_arch(m.influence_arch, vocab)
    f_b = influence_forward_flops_per_token(bert, L, convention)
    rows = [
        Row(
            "selection",
            "oracle probing",
            (3 * fwd(target) * L + reference) * m.probes * n["probe"],
            f"{n['probe']} rounds × {m.probes} probes × (1 step on 1×{L} + reference {ref_rows} items, "
            f"{ref_tokens / ref_rows:.4g} tokens each: {source})",
        )
    ]
    train_rows = m.probes * (1 - m.influence_heldout_frac)
    held_rows = m.probes * m.influence_heldout_frac
    rows.append(
        Row(
            "selection",
            "influence-model training",
            (3 * train_rows + held_rows) * f_b * L * m.influence_epochs * n["influence"],
            f"{n['influence']} rounds × {m.influence_epochs} epochs × {m.probes} probes ({m.influence_arch}, "
            f"{held_rows / m.probes:.0%} held out)",
        )
    )
    if pool_rows and n["score"]:
        rows.append(
            Row(
                "selection",
                "influence-model inference",
                f_b * pool_rows * L * n["score"],
                f"{n['score']} rounds × {pool_rows:,} rows × {L} tokens ({m.influence_arch})",
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
