"""Collectives that degrade to no-ops in a single process, so the math runs unchanged in tests and on Ray Train.

Weighted means follow "sum numerators and denominators, reduce both, divide once" so that 1 worker and N workers
compute the same objective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """In-place sum over workers of each tensor (no-op in one process)."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every worker in rank order (equal lengths per rank)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is true on any worker (so that every rank takes the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum_(t)
    return bool(t.item() > 0)
