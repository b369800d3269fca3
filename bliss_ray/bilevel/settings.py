"""The settings of the bilevel stage, defined once: the ``bilevel`` section of an experiment and what the loop reads.

A frozen dataclass (see ``train.settings``): ``bliss_ray.config`` validates YAML into it, the stage hands it to its
Ray Train workers as it is, and facts derived from it (``uses_kl``, ``ce_scale``) are decided here only.

    BilevelSettings(outer_steps=100, gamma=0.0).uses_kl      # False: no target is loaded, no KL term
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from bliss_ray.train.settings import require


@dataclass(frozen=True)
class BilevelSettings:
    """The bilevel optimisation of the score model (docs/method.md, "The bilevel problem")."""

    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # read by pydantic where the config validates into this

    outer_steps: int = 50
    """T: outer (score-model) steps per round. Paper: 3000."""
    inner_steps: int = 1
    """K: proxy AdamW steps per outer step. Paper: 1."""
    z_steps: int = 3
    """Q: damped Richardson iterations for z ≈ H⁻¹∇f. Released code: 3."""
    z_lr: float = 1e-2
    """η_z of the Richardson update."""
    z_damping: float = 1e-2
    """μ: damping added to the Hessian (z ← z − η_z (Hz − ∇f + μz))."""
    z_init: Literal["zero", "constant", "grad"] = "zero"
    """``zero``: the textbook Richardson start (default); ``constant``: 1/numel per tensor (the released code, whose
    first c_i then carry a term ⟨∇CE_i, 1/numel⟩ unrelated to the reference set: on the demo it made the selection
    erratic across seeds, docs/design.md); ``grad``: start at ∇f."""
    z_clip: float | None = 1.0
    """Per-tensor norm clip of each Richardson update (released code: 1.0); None disables."""
    proxy_lr: float = 1e-5
    score_lr: float = 1e-5
    warmup_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    hypergrad_clip: float | None = 1.0
    """Per-tensor norm clip of the score-model hypergradient (released code: 1.0)."""
    gamma: float = 1e-2
    """γ: weight of KL(target ‖ proxy) in the lower level; 0 skips loading the target."""
    l2: float = 1e-6
    """λ: weight of ‖θ_p‖² in the lower level (on top of AdamW weight decay)."""
    micro_batch_seqs: int = 4
    """Training sequences per worker per outer step (global batch = this × workers). Paper: 4 × 8 GPUs."""
    reference_batch_seqs: int = 4
    use_sigmoid: bool = True
    """Score head ends in a sigmoid (paper); False is the rebuttal's "without sigmoid" ablation."""
    score_init: Literal["proxy_warmup", "random"] = "proxy_warmup"
    score_carry: Literal["inherit", "reset"] = "inherit"
    weight_norm: Literal["global", "stale"] = "global"
    """``global``: softmax over the global batch (paper); ``stale``: released code's previous-step normaliser."""
    loss_scaling: Literal["global", "released"] = "global"
    """``global``: g = Σ P_i CE_i + γ KL + λ‖θ‖² over the global batch; ``released``: the released code's effective
    objective on ``released_devices`` GPUs under DDP averaging, (1/N)·[Σ P_i CE_i + Nγ KL + Nλ‖θ‖²]
    (docs/design.md)."""
    released_devices: int = 8
    """N of ``released`` scaling: the released run's GPU count (run.sh: 8), independent of bilevel_workers."""
    reuse_inner_batch: bool = True
    """The outer step uses the last inner batch (what the released code does with K=1)."""
    ci_method: Literal["ghost", "loop"] = "ghost"
    """How c_i = ⟨∇CE_i, z⟩ is computed: batched ghost inner products, or the per-sample reference loop."""
    ci_chunk_seqs: int = 8
    """Sequences per ghost chunk: bounds memory (B·T·V logits); on a GPU use the whole batch."""
    log_every_steps: int = 1
    ckpt_every_steps: int = 25

    def __post_init__(self) -> None:
        require(self, "≥ 1", "outer_steps", "inner_steps", "z_steps", "micro_batch_seqs", "reference_batch_seqs")
        require(self, "≥ 1", "released_devices", "ci_chunk_seqs", "log_every_steps", "ckpt_every_steps")
        require(self, "> 0", "z_lr", "proxy_lr", "score_lr", "grad_clip")
        require(self, "≥ 0", "z_damping", "weight_decay", "gamma", "l2")
        require(self, "in [0, 1)", "warmup_frac")

    @property
    def uses_kl(self) -> bool:
        """Whether the lower level has the γ·KL(target ‖ proxy) term (and so needs the target and a shared vocab)."""
        return self.gamma > 0

    @property
    def ce_scale(self) -> float:
        """Factor on the CE weights P of the lower objective: 1/N under ``released`` scaling (N =
        ``released_devices``): (1/N)·[Σ P CE + Nγ KL + Nλ‖θ‖²] = Σ (P/N) CE + γ KL + λ‖θ‖², only the CE term
        changes."""
        return 1.0 / self.released_devices if self.loss_scaling == "released" else 1.0

    @property
    def micro_batches_per_step(self) -> int:
        """Training micro-batches one outer step consumes per worker: K, plus a fresh outer batch unless reused."""
        return self.inner_steps + (0 if self.reuse_inner_batch else 1)
