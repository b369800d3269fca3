"""Keep freed host memory in the process, so CPU training steps stop paying the kernel for fresh pages.

Why: glibc serves every allocation above its mmap threshold (128 KiB, raised as it sees larger frees, up to
32 MiB) with its own ``mmap`` and returns it to the kernel on ``free``. A CPU training step allocates and frees
its activations every step (a 160M model at 1024 tokens: a 206 MB logits tensor and hundreds of smaller ones),
so every step the kernel hands out and zeroes those pages again, hundreds of thousands of page faults per step.
With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them: no page faults in
steady state, and a higher MFU in ``bench/mfu.py`` (docs/design.md, "Measurements behind choices in the code").
The cost: the process's RSS stays at its peak instead of shrinking between steps, which is where a training
worker's RSS is anyway.

Ray Train workers (warm-up, pretraining, bilevel, MATES) get it through their environment (``worker_env``);
scoring and probing actors, and the benchmarks that stand in for the workers, call ``retain_freed_memory``.
Neither touches the allocator when the user has tuned it through glibc's own environment variables
(``MALLOC_*``, ``GLIBC_TUNABLES``), nor on non-glibc systems (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters, from glibc's <malloc.h>
# The same three settings as glibc tunables, for processes configured before they start (see ``worker_env``).
_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"
_done = False


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return False


def _applies() -> bool:
    return _is_glibc() and not any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ)


def retain_freed_memory(device: torch.device) -> bool:
    """For torch work on a CPU ``device``, in this process: heap-only allocation, no trimming, and one arena.

    One arena because a thread's own arena cannot hold a block over 64 MiB and mmaps it again on every step;
    the setting reaches the main thread and threads that first allocate after the call (Ray Data runs a map
    actor's batches in such a thread). A Ray Train worker runs the training loop in a thread that exists before
    any user code, so Train workers get ``worker_env()`` instead. Returns whether the setting is active."""
    global _done
    if _done or device.type != "cpu":
        return _done
    if not _applies():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # trim threshold -1 "disables trimming completely" (mallopt(3)); a finite one is an int, at most 2 GiB,
    # and a 4-sequence 160M step frees more than that and would fault it in again
    _done = all(libc.mallopt(k, v) for k, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    return _done


def worker_env(gpu: bool) -> dict[str, str]:
    """Environment for a worker process started to run torch on the CPU: the same setting, read by glibc when
    the process starts, so it covers every thread. Empty for GPU workers and when the user tuned malloc."""
    return {} if gpu or not _applies() else {"GLIBC_TUNABLES": _TUNABLES}
