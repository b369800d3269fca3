"""Language-model architectures: Pythia (GPT-NeoX) and LLaMA-style presets, built with ``transformers``.

Target and proxy are two sizes of the same code: a preset name → ``LMArch`` → a randomly initialised
``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``. No weights are ever downloaded; checkpoints are
``save_pretrained`` directories (safetensors + tokenizer) that stock ``transformers`` and ``lm_eval --model hf``
load directly.

    from bliss_ray.models.lm import arch_from_preset, build_lm
    model = build_lm(arch_from_preset("pythia-160m", vocab_size=50304), max_seq_len=1024)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)


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
        d, f = self.d_model, self.d_ff
        kv = (self.n_kv_head or self.n_head) * (d // self.n_head)
        if self.family == "gpt_neox":
            per_layer = 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d  # qkv, dense, mlp, 2 layernorms
            final = 2 * d
        else:
            per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d  # q, k, v, o, gated mlp, 2 rmsnorms
            final = d
        emb = 2 * self.vocab_size * d if embeddings else 0
        return self.n_layer * per_layer + final + emb


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


def hf_config(
    arch: LMArch, max_seq_len: int, bos_token_id: int = 0, eos_token_id: int = 0, attn: str = "sdpa"
) -> PretrainedConfig:
    """The transformers config for an architecture. ``attn`` picks the attention kernel: SDPA for training and
    scoring (flash/efficient kernels); code that takes second derivatives switches to the math backend."""
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.d_model,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        intermediate_size=arch.d_ff,
        max_position_embeddings=max(2048, max_seq_len),  # RoPE: longer limit is free and lm-eval needs it
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    if arch.family == "gpt_neox":
        return GPTNeoXConfig(
            rotary_pct=arch.rotary_pct,
            use_parallel_residual=arch.parallel_residual,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            initializer_range=0.02,
            **common,
        )
    if arch.family == "llama":
        return LlamaConfig(num_key_value_heads=arch.n_kv_head or arch.n_head, rms_norm_eps=1e-5, **common)
    raise ValueError(f"unknown model family '{arch.family}'")


def build_lm(arch: LMArch, max_seq_len: int, seed: int = 0, bos_token_id: int = 0, eos_token_id: int = 0):
    """A randomly initialised causal LM (fp32 master weights), seeded for reproducibility."""
    config = hf_config(arch, max_seq_len, bos_token_id, eos_token_id)
    torch.manual_seed(seed)
    cls = GPTNeoXForCausalLM if arch.family == "gpt_neox" else LlamaForCausalLM
    return cls(config)


def load_lm(path: str | Path, attn: str = "sdpa") -> PreTrainedModel:
    """Load a saved checkpoint directory (safetensors only; never pickles)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation=attn, use_safetensors=True, dtype=torch.float32
    )


def set_activation_checkpointing(model: PreTrainedModel, mode: str, k: int = 2) -> None:
    """``resources.activation_checkpointing``: recompute every block (``full``), blocks 0, k, 2k, … (``every_k``)
    or none in backward. transformers checkpoints each block's ``forward``, so FSDP2's hooks on the block stay
    outside the recompute; non-reentrant ``torch.utils.checkpoint``, so gradients equal those without it."""
    if mode != "none":
        model.activation_checkpointing_enable(every_n_layers=1 if mode == "full" else k)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP (``.module``) and/or ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_lm(model: PreTrainedModel, path: str | Path, tokenizer=None) -> None:
    """Save as a stock HF directory (safetensors), with the tokenizer so ``lm_eval --model hf`` works on it."""
    model = unwrap(model)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
