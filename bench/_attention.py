"""Attention FLOPs as the causal SDPA kernels compute them, for MFU numbers that do not flatter the hardware.

The FLOPs ledger (``bliss_ray.costs.flops``, paper convention) charges the full L² score matrix: 4·L·d·n_layer per
token forward. Every model here calls SDPA with ``is_causal=True`` (no mask), and the kernels skip work above
the diagonal, so an MFU against the ledger's count credits FLOPs that never ran. This module subtracts them:

* CPU — ATen's flash kernel (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``) tiles queries in blocks of
  256 (L ≥ 768), 64 (L ≥ 192) or 32 rows and keys in blocks of 512 (at most L); a query block starting at row m
  computes every key block that starts below m + its size, in full (masked afterwards). Forward and backward
  share the tiling. At L = 1024 that is 75 % of L², at L ≤ 512 all of it (timing the causal kernel against the
  full one agrees): a 160M training step at L = 1024 really computes 3.3 % fewer FLOPs than counted, not the
  6.6 % of an exact causal count.
* GPU — the flash / memory-efficient kernels skip every key tile above the diagonal; counted as the exact causal
  work, (L + 1)/2 keys per query (within one 64–128-key tile of what they run).

The math backend (the bilevel forwards that are differentiated twice) materialises and masks the full L² matrix:
those passes keep the ledger's count.
"""

from __future__ import annotations

from bliss_ray.costs.flops import forward_flops_per_token


def cpu_flash_splits(seq_len: int) -> tuple[int, int]:
    """(query block, key block) of ATen's CPU flash attention for a self-attention of length ``seq_len``."""
    q_split = 256 if seq_len >= 768 else 64 if seq_len >= 192 else 32
    return min(q_split, seq_len), min(512, seq_len)


def computed_key_fraction(seq_len: int, device_type: str) -> float:
    """Fraction of the L × L score matrix the causal kernel computes (1.0 = the ledger's full count)."""
    if device_type == "cuda":
        return (seq_len + 1) / (2 * seq_len)
    q_block, kv_block = cpu_flash_splits(seq_len)
    keys = 0
    for m in range(0, seq_len, q_block):
        rows = min(q_block, seq_len - m)
        visible = min(m + rows, seq_len)  # the keys row m + rows − 1 may attend to
        keys += rows * min(-(-visible // kv_block) * kv_block, seq_len)  # whole key blocks, capped at L
    return keys / seq_len**2


def attention_flops_per_token(arch, seq_len: int) -> float:
    """The ledger's own attention term (forward, per token): its count at L minus its count at L = 0."""
    return forward_flops_per_token(arch, seq_len) - forward_flops_per_token(arch, 0)


def uncomputed_flops(arch, seq_len: int, device_type: str, passes: float, tokens: int) -> float:
    """Ledger FLOPs the causal kernel never runs over ``passes`` forward-equivalents (training: 3) of ``tokens``."""
    skipped = 1 - computed_key_fraction(seq_len, device_type)
    return skipped * attention_flops_per_token(arch, seq_len) * passes * tokens
