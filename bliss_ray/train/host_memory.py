"""Keep freed host memory in the process, so CPU training steps stop paying the kernel for fresh pages.

Why: glibc serves every allocation over 128 KiB–32 MiB with its own ``mmap`` and returns it to the kernel on
``free``. A CPU training step allocates and frees its activations (a 160M model at 1024 tokens: a 206 MB
logits tensor and hundreds of smaller ones) every step, so every step the kernel hands out and zeroes those
pages again: 340,000 page faults and 0.3 s of a 3.7 s step, and 1.4 M faults per bilevel outer step of a 31M
proxy. With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them: zero page
faults in steady state. Measured by ``bench/mfu.py`` (MFU of a 160M step 0.72 → 0.78; bilevel outer step of
a 31M proxy 0.21 → 0.34). The cost: the process's RSS stays at its peak instead of shrinking between steps,
which is where a training worker's RSS is anyway.

Called once per worker process that runs torch on the CPU (Train workers, scoring actors, evaluation) and by
the benchmarks that stand in for them. It leaves the allocator alone when the user has tuned it through
glibc's own environment variables, on non-glibc systems (macOS, musl), and is idempotent.
"""

from __future__ import annotations

import ctypes
import os

import torch

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_USER_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_done = False


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return False


def retain_freed_memory(device: torch.device) -> bool:
    """For torch work on a CPU ``device``: switch glibc malloc to heap-only allocation with no trimming.
    Returns whether the setting is active (never on GPU workers, whose activations are not host memory)."""
    global _done
    if _done or device.type != "cpu":
        return _done
    if not _is_glibc() or any(k in os.environ for k in _USER_TUNABLES):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # mmap_max 0: every block comes from the heap; trim threshold -1: "disables trimming completely" (mallopt(3)).
    # A finite threshold is an int, at most 2 GiB: a 4-sequence 160M step frees more than that and re-faults it.
    _done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    return _done
