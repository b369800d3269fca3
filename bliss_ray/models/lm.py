"""Language-model architectures: Pythia (GPT-NeoX) and LLaMA-style presets, built with ``transformers``.

Target and proxy are two sizes of the same code: a preset name → ``LMArch`` (``models/arch.py``) → a randomly
initialised ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``. No weights are ever downloaded; checkpoints are
``save_pretrained`` directories (safetensors + tokenizer) that stock ``transformers`` and ``lm_eval --model hf``
load directly.

    from bliss_ray.models.arch import arch_from_preset
    from bliss_ray.models.lm import build_lm
    model = build_lm(arch_from_preset("pythia-160m", vocab_size=50304), max_seq_len=1024)
"""

from __future__ import annotations

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

from bliss_ray.models.arch import LMArch


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
