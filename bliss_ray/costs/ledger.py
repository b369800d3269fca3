"""The FLOPs ledger: what every stage of a BLISS / MATES / random run costs, from the configuration.

Rows follow ``pipeline.stages_of``: one per stage kind the plan runs, times the number of such stages (the random
baseline has no warm-up, so it is charged none); a stage kind with no row fails loudly. Per-token counts and the
two conventions (``paper``, ``6nd``) are ``bliss_ray.costs.flops``'s; a third, ``rebuttal``
(``bliss_ray.costs.rebuttal``), reproduces the rebuttal's own rows, which are not what the pipeline computes.

Totals are selection + target training: the pretraining row is the stable (never-decaying) run only. The decay
branches — each round's final one and its ``pretrain.eval_branches`` mid-round ones — are evaluation overhead,
the same for every method: they have their own row in the ``evaluation`` group, which totals exclude (as Table 1).

MATES's oracle probing: each probe is one target step on one row plus one evaluation of the reference set, which
the prober trims after each batch's longest item (``mates.probe``), so LAMBADA items cost their own length, not
``seq_len``. Before a run the ledger takes that length from ``flops.reference_tokens_per_seq`` (an estimate; unset:
``seq_len``, an upper bound, said so in the row); a finished run's probe stage records the batches it really
computed (``reference_batches`` in its outputs), and ``bliss-ray report`` passes those.

    bliss-ray flops experiments/paper/pythia410m.yaml [--convention paper|6nd|rebuttal]
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from bliss_ray.costs.flops import (
    bilevel_flops_per_token,
    forward_flops_per_token,
    influence_forward_flops_per_token,
)
from bliss_ray.models.arch import LMArch, arch_from_preset, influence_arch
from bliss_ray.pipeline import stages_of


@dataclass
class Row:
    group: str  # "pretraining", "warm-up", "selection", "evaluation"
    stage: str
    flops: float
    detail: str  # how the row was counted (under ``rebuttal``: the assumption that reproduces it)
    published: float | None = None  # the rebuttal's printed value (×1e19), ``rebuttal`` convention only


# Stage kinds of ``pipeline.stages_of`` that cost no model FLOPs worth a row (tokenizing, sampling ids), or that
# Table 1 leaves out (lm-eval's forward passes). Any other kind without a row fails loudly: the ledger charges
# exactly the stages the pipeline runs, no more (the random baseline has no warm-up) and no fewer.
_UNCHARGED_KINDS = {"tokenizer", "tokenize", "select", "evaluate", "report"}
_CHARGED_KINDS = {"pretrain", "warmup", "bilevel", "score", "probe", "influence"}


def stage_counts(exp) -> Counter:
    """How many stages of each kind ``pipeline.stages_of`` runs for this config: the rows' multipliers."""
    counts = Counter(s.kind for s in stages_of(exp))
    unknown = set(counts) - _UNCHARGED_KINDS - _CHARGED_KINDS
    if unknown:
        raise ValueError(
            f"FLOPs ledger: no row for stage kind(s) {sorted(unknown)}; add one to bliss_ray.costs.ledger"
        )
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


def _train_tokens(t, seq_len: int) -> int:
    """Tokens one stage of a training config (``pretrain``, ``warmup``) trains on: steps × global batch × length."""
    return t.steps * t.global_batch_seqs * seq_len


def _pretraining_row(exp, n, fwd, target) -> Row:
    """The target's stable pretraining over all rounds, plus the last round's FLOPs-matching extra steps."""
    L, p = exp.data.seq_len, exp.pretrain
    extra = exp.schedule.final_extra_steps  # the last round's extra steps (a FLOPs-matched baseline)
    return Row(
        "pretraining",
        "target pretraining",
        3 * fwd(target) * (_train_tokens(p, L) * n["pretrain"] + extra * p.global_batch_seqs * L),
        f"{n['pretrain']} rounds × {p.steps} steps × {p.global_batch_seqs}×{L} tokens"
        + (f" + {extra} steps in the last round" if extra else ""),
    )


def _warmup_row(exp, n, fwd, proxy) -> Row:
    """The proxy's warm-up training, once per warm-up stage the plan runs."""
    L = exp.data.seq_len
    return Row(
        "warm-up",
        "proxy warm-up",
        3 * fwd(proxy) * _train_tokens(exp.warmup, L) * n["warmup"],
        f"{exp.warmup.steps} steps × {exp.warmup.global_batch_seqs}×{L} tokens",
    )


def _bilevel_row(exp, n, proxy, target, convention: str) -> Row:
    """BLISS's bilevel optimisation, the target's term counted only when ``gamma`` > 0 uses it."""
    L, b = exp.data.seq_len, exp.bilevel
    global_batch = b.micro_batch_seqs * exp.resources.bilevel_workers
    per_token = bilevel_flops_per_token(b, proxy, target if b.gamma > 0 else None, L, convention)
    return Row(
        "selection",
        "bilevel optimisation",
        per_token * b.outer_steps * global_batch * L * n["bilevel"],
        f"{n['bilevel']} rounds × T={b.outer_steps} × B={global_batch}×{L}, K={b.inner_steps}, Q={b.z_steps}",
    )


def _score_row(exp, n, fwd, proxy, pool_rows: int) -> Row:
    """BLISS's score-model inference over each round's pool: the proxy's trunk, no LM head."""
    L = exp.data.seq_len
    return Row(
        "selection",
        "score-model inference",
        fwd(proxy, head=False) * pool_rows * L * n["score"],
        f"{n['score']} rounds × {pool_rows:,} rows × {L} tokens (trunk only)",
    )


def _decay_row(exp, n, fwd, target) -> Row:
    """The decay branches (each round's final one and its mid-round ones): evaluation overhead, not in the total."""
    L, p = exp.data.seq_len, exp.pretrain
    branches = 1 + p.eval_branches  # per round: the final decay branch and the mid-round ones
    per_round = f"{branches} branches × " if p.eval_branches else ""
    return Row(
        "evaluation",
        "decay branches",
        3 * fwd(target) * branches * p.decay_steps * p.global_batch_seqs * L * n["pretrain"],
        f"{per_round}{p.decay_steps} decay steps per round, for evaluation only (not in the total)",
    )


def ledger(
    exp,
    convention: str = "paper",
    pool_rows_per_round: int | None = None,
    reference_batches: list[tuple[int, float]] | None = None,
) -> list[Row]:
    """Every stage's FLOPs for an experiment config, one row per stage kind that ``pipeline.stages_of`` runs.

    ``pool_rows_per_round`` overrides the config's pool size, ``reference_batches`` the config's estimate of one
    MATES reference evaluation (``estimated_reference_batches``) with what a probe stage measured (its outputs'
    ``reference_batches``): reports of finished runs pass both."""
    L = exp.data.seq_len
    target, proxy = model_archs(exp)
    n = stage_counts(exp)

    def fwd(a, head=True, seq_len=L):
        return forward_flops_per_token(a, seq_len, head, convention)

    rows = [_pretraining_row(exp, n, fwd, target)]
    pool_rows = pool_rows_per_round or exp.flops.pool_rows_per_round
    if n["warmup"]:
        rows.append(_warmup_row(exp, n, fwd, proxy))
    if n["bilevel"]:
        rows.append(_bilevel_row(exp, n, proxy, target, convention))
    if n["score"] and pool_rows and exp.selection.method == "bliss":
        rows.append(_score_row(exp, n, fwd, proxy, pool_rows))
    if n["probe"]:
        rows += _mates_rows(exp, n, pool_rows, fwd, target, reference_batches, convention)
    if exp.pretrain.decay_steps:
        rows.append(_decay_row(exp, n, fwd, target))
    return rows


def _mates_rows(exp, n, pool_rows, fwd, target, reference_batches, convention) -> list[Row]:
    """MATES (docs/method.md, "MATES"). Probing: per probe one target training step on 1 row (3F·L) plus
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


def selection_share(rows: list[Row]) -> float:
    """Selection's part of the total: the proxy warm-up, the bilevel loop and scoring (or MATES's probes and
    influence model), as the paper's Table 1 splits BLISS's 8.08 into 6.35 of pretraining and 1.73 of the rest."""
    total = totals(rows)
    return (total.get("selection", 0.0) + total.get("warm-up", 0.0)) / total["total"]


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
