"""Compute precision (``resources.precision``): what training, scoring and evaluation run in on a device.

``bf16-mixed`` / ``fp16-mixed``: fp32 master weights and optimizer state, matmuls in 16 bits under autocast (fp16
adds a dynamic loss scale, since its gradients underflow); ``fp32``: no autocast. ``auto`` is bf16-mixed on GPU
and fp32 on CPU (CPUs without AMX run bf16 matmuls slower than fp32).

    with autocast(resolve_precision("auto", device.type), device):
        loss = lm_loss(model, ids)

torch is imported inside the functions that build tensors' settings: ``bliss-ray plan`` resolves precisions
without it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("bf16-mixed", "fp16-mixed", "fp32")


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` → bf16-mixed on a GPU, fp32 elsewhere; any other value as given."""
    if precision == "auto":
        return "bf16-mixed" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose auto or one of {PRECISIONS}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision, torch.float32)


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    import torch

    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scale; None for bf16 and fp32 (their exponent range needs none)."""
    import torch

    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16-mixed" else None


def inference_dtype(precision: str) -> str:
    """The weight dtype name evaluation loads checkpoints in (lm-eval's ``dtype`` model argument)."""
    return {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}.get(precision, "float32")
