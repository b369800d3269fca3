"""The settings of one LM training run, defined once: the ``warmup`` and ``pretrain`` sections of an experiment and
what the training loop reads.

A frozen dataclass, not a pydantic model, so that the pure-PyTorch layer (and the GPU runbook, which has no
pydantic) builds it directly; ``bliss_ray.config`` validates YAML into it (types, unknown keys), and its own
``__post_init__`` checks the ranges, naming the field.

    TrainSettings(steps=60, lr=3e-3)                          # the loop's settings
    dataclasses.replace(settings, decay_steps=0)               # a changed copy; nothing is mutated
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

_RULES = {
    "≥ 0": lambda v: v >= 0,
    "≥ 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
}


def require(settings, rule: str, *names: str) -> None:
    """Raise ``ValueError("<field>: must be <rule> …")`` for the first named field (not None) that breaks ``rule``."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and not _RULES[rule](value):
            raise ValueError(f"{name}: must be {rule} (got {value!r})")


@dataclass(frozen=True)
class TrainSettings:
    """One LM training run (proxy warm-up, or one round of target pretraining)."""

    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # read by pydantic where the config validates into this

    steps: int = 100
    """Optimizer steps (per round for target pretraining)."""
    warmup_steps: int = 10
    """Linear LR warm-up at the very start (counted in global steps across rounds)."""
    decay_steps: int = 0
    """Length of the decay branch kept for evaluation (paper: 200); 0 = none. The main run never decays."""
    eval_branches: int = 0
    """Extra decay branches inside each round, at evenly spaced stable steps strictly between its start and end
    (``train.schedule.branch_steps``: 60 steps, 2 branches → steps 20 and 40 of the round), each evaluated like
    the round's final one: more checkpoints per curve. Target pretraining only; needs ``decay_steps`` > 0."""
    lr: float = 1e-3
    lr_round_factor: float = 1.0
    """Peak LR of round r is lr·factor^r. MATES: 1.0; the released BLISS code uses 0.5."""
    micro_batch_seqs: int = 8
    global_batch_seqs: int = 16
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ckpt_every_steps: int = 50
    nonfinite_policy: Literal["fail", "skip_batch"] = "fail"
    """``fail``: raise naming stage and step; ``skip_batch``: drop that update (at most ``max_skipped_steps``)."""
    max_skipped_steps: int = 3

    def __post_init__(self) -> None:
        require(self, "≥ 1", "steps", "micro_batch_seqs", "global_batch_seqs", "ckpt_every_steps")
        require(self, "≥ 0", "warmup_steps", "decay_steps", "eval_branches", "weight_decay", "max_skipped_steps")
        require(self, "> 0", "lr", "grad_clip")
        require(self, "in (0, 1]", "lr_round_factor")
        if self.global_batch_seqs % self.micro_batch_seqs:
            raise ValueError("global_batch_seqs: must be a multiple of micro_batch_seqs")
