"""Learning-rate schedules.

* Target pretraining and proxy warm-up: warmup-stable-decay (WSD). Linear warm-up over the first
  ``warmup_steps`` global steps, then constant at the round's peak; the *decay branch* kept for evaluation
  halves the LR every ``decay_steps/4`` steps, ending at peak/16 (MATES/BLISS: 200 decay steps, a halving every
  50). The main run never decays, so round r+1 continues from round r's un-decayed state. Besides the branch at
  a round's end, ``pretrain.eval_branches`` more branch off inside the round (``branch_steps``), for curves
  with more evaluated checkpoints than rounds.
* Bilevel: cosine with linear warm-up (transformers' ``get_cosine_schedule_with_warmup``), as the released code.
"""

from __future__ import annotations


def wsd_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """LR of (0-based, global) ``step`` in the warm-up/stable phase."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr


def decay_lr(decay_step: int, branch_lr: float, decay_steps: int) -> float:
    """LR of step ``decay_step`` (0-based) of a decay branch that starts at ``branch_lr``."""
    return branch_lr * 0.5 ** (4 * decay_step / decay_steps)


def round_peak_lr(lr: float, factor: float, round_index: int) -> float:
    """Peak LR of a round: lr·factor^r (factor 1 = MATES's constant LR, 0.5 = the released BLISS code)."""
    return lr * factor**round_index


def branch_steps(start_step: int, steps: int, n: int) -> list[int]:
    """Global stable steps of a round's ``n`` mid-round decay branches: evenly spaced strictly between the round's
    start and end, at ``start_step + ⌊k·steps/(n+1)⌋`` for k = 1…n (60 steps, 2 branches: +20 and +40; 6 steps,
    1 branch: +3). Spacing ≥ 1 needs n < steps."""
    if not 0 <= n < steps:
        raise ValueError(f"{n} evaluation branches do not fit strictly inside a round of {steps} steps")
    return [start_step + k * steps // (n + 1) for k in range(1, n + 1)]
