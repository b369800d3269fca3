"""Model architectures as numbers, with no torch or transformers import: what the FLOPs ledger, the memory
planner and the configs need, so that ``bliss-ray flops`` / ``plan`` / ``validate`` start in a second.

``LMArch`` holds the dimensions of a decoder-only LM; ``PRESETS`` the Pythia and LLaMA-style sizes
(``arch_from_preset``); ``influence_arch`` the BERT sizes of MATES's influence model. ``models/lm.py`` builds the
``transformers`` model of an ``LMArch``; ``mates/influence.py`` the BERT regressor.

    from bliss_ray.models.arch import arch_from_preset
    arch_from_preset("pythia-160m", vocab_size=50304).n_params()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LMArch:
    """The numbers that define a decoder-only LM (what FLOPs accounting and model building need)."""

    family: str  # "gpt_neox" (Pythia) or "llama"
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int = 50304  # Pythia's padded GPT-NeoX vocabulary
    rotary_pct: float = 0.25  # Pythia rotates a quarter of each head; LLaMA rotates all of it
    parallel_residual: bool = True
    n_kv_head: int | None = None  # LLaMA grouped-query attention; None = n_head

    def n_params(self, embeddings: bool = True) -> int:
        """Parameter count with untied input/output embeddings (both Pythia and our LLaMA presets untie)."""
        emb = 2 * self.vocab_size * self.d_model if embeddings else 0
        return self.n_layer * self.block_params() + self._final_norm_params() + emb

    def block_params(self) -> int:
        """Parameters of one transformer block (FSDP's unit of sharding)."""
        d, f = self.d_model, self.d_ff
        kv = (self.n_kv_head or self.n_head) * (d // self.n_head)
        if self.family == "gpt_neox":
            return 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d  # qkv, dense, mlp, 2 layernorms
        return d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d  # q, k, v, o, gated mlp, 2 rmsnorms

    def root_params(self) -> int:
        """Parameters outside the blocks: embedding, final norm and LM head (FSDP's root unit)."""
        return self.n_params() - self.n_layer * self.block_params()

    def _final_norm_params(self) -> int:
        return 2 * self.d_model if self.family == "gpt_neox" else self.d_model  # LayerNorm has a bias, RMSNorm none


# Published EleutherAI Pythia architectures (layers, width, heads; d_ff = 4·d) plus tiny debug sizes for CPU.
_PYTHIA = {
    "pythia-14m": (6, 128, 4),
    "pythia-31m": (6, 256, 8),
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
    "pythia-1.4b": (24, 2048, 16),
    "pythia-2.8b": (32, 2560, 32),
    # debug sizes: same family, small enough for a 2-core CPU
    "pythia-tiny": (2, 128, 4),
    "pythia-tiny-proxy": (2, 64, 4),
    "pythia-micro": (1, 32, 2),
}
# LLaMA-style presets (RMSNorm, SwiGLU, full rotary, sequential residual). The paper's LLaMA-0.5B config is
# unpublished; "llama-0.5b" is 24 × 1152 with d_ff 3072 (≈ 8/3·d), 0.50 B parameters with a 50304 vocabulary.
_LLAMA = {
    "llama-0.5b": (24, 1152, 18, 3072),
    "llama-tiny": (2, 128, 4, 352),
}
PRESETS: dict[str, LMArch] = {
    **{n: LMArch("gpt_neox", layer, d, h, 4 * d) for n, (layer, d, h) in _PYTHIA.items()},
    **{
        n: LMArch("llama", layer, d, h, f, rotary_pct=1.0, parallel_residual=False)
        for n, (layer, d, h, f) in _LLAMA.items()
    },
}


def arch_from_preset(name: str, vocab_size: int | None = None) -> LMArch:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    arch = PRESETS[name]
    return dataclasses.replace(arch, vocab_size=vocab_size) if vocab_size else arch


def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Round a tokenizer size up to a multiple (Pythia: 50277 → 50304) for efficient matmuls."""
    return -(-n_tokens // multiple) * multiple


BERT_MAX_POSITIONS = 512  # bert-base-uncased's position table: longer rows are cut into chunks of this size
BERT_VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary (used only for FLOPs of the published model)
# (layers, width, heads) of the BERT family (Turc et al. 2019 for the small ones); d_ff = 4·d as in BERT
_BERT = {
    "bert-base": (12, 768, 12),
    "bert-medium": (8, 512, 8),
    "bert-small": (4, 512, 8),
    "bert-mini": (4, 256, 4),
    "bert-tiny": (2, 128, 2),
}


def influence_arch(name: str, vocab_size: int | None = None) -> LMArch:
    """The ``LMArch`` of an influence-model preset (family "bert": GeLU MLP, learned positions, no LM head)."""
    if name not in _BERT:
        raise KeyError(f"unknown influence-model preset '{name}'; choose one of {sorted(_BERT)}")
    n_layer, d, h = _BERT[name]
    return LMArch("bert", n_layer, d, h, 4 * d, vocab_size or BERT_VOCAB, rotary_pct=0.0, parallel_residual=False)
