"""The light channel that carries a Train stage's per-step metrics from rank 0 to the driver, live.

Why not ``ray.train.report``: every report is a barrier across ranks and Train V2 keeps only checkpoint-attached
metrics (docs/ray.md, "Reports"), so the pipeline reports at checkpoint cadence. Instead rank 0 buffers its
per-step records and every ``flush_s`` seconds (and at its first step, so the console shows life early) sends
them, fire-and-forget, to one small named actor, the ``ProgressBoard``; the driver reads it about once a second
for the console and TensorBoard (``bliss_ray.watch.console``, ``bliss_ray.watch.tracking``). The board holds plain
dicts keyed by the stage directory's name, costs no CPU reservation and lives as long as the driver's job: no
file on a shared filesystem is needed, so it works when rank 0 runs on another node.

    reporter = StepReporter(stage_dir.name, start_step=0, total_steps=60)  # driver: passed to the workers
    reporter({"step": 1, "loss": 9.1, "tokens_per_s": 4e3})               # rank 0, every step
    records = BoardReader()(stage_dir.name)                               # driver: what arrived since last time
"""

from __future__ import annotations

import logging
import os
import time

import psutil
import ray

from bliss_ray.costs.memory import gpu_bf16_peak

BOARD_NAME = "bliss_ray_progress"


@ray.remote(num_cpus=0, max_restarts=-1)
class ProgressBoard:
    """Per-stage queues of step records: workers append; the driver reads and acknowledges what it has read.

    A read can time out on the driver while the board still answers it later: so a read never consumes. It drops
    only the records the driver says it already received (``received``, a count since the stage began) and
    returns the rest with the index of the first, and the driver keeps its own count."""

    def __init__(self):
        self.records: dict[str, list[dict]] = {}
        self.dropped: dict[str, int] = {}

    def put(self, key: str, records: list[dict]) -> None:
        self.records.setdefault(key, []).extend(records)

    def read(self, key: str, received: int) -> tuple[int, list[dict]]:
        base = self.dropped.get(key, 0)
        queue = self.records.get(key, [])
        if received > base:
            del queue[: received - base]
            base = self.dropped[key] = received
        return base, list(queue)


_handles: dict[str, ray.actor.ActorHandle] = {}  # per Ray job: a new ray.init in this process gets a new board


def board():
    """The job's board, created on first use (by the driver: it must outlive the worker groups). The handle is
    kept for the process's lifetime: a non-detached actor dies when its creator drops its last handle, so a
    temporary handle per call would make Ray destroy and recreate the board every few seconds, losing its records."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _handles:
        _handles[job] = ProgressBoard.options(name=BOARD_NAME, get_if_exists=True, lifetime=None).remote()
    return _handles[job]


class BoardReader:
    """The driver's poll: ``reader(key)`` returns the records of stage ``key`` not returned before, [] while Ray
    is not up. One read per key is in flight at a time; a slow board (its worker still starting on a loaded
    machine) only delays records, never loses them."""

    def __init__(self, timeout_s: float = 1.0):
        self.timeout_s = timeout_s
        self.received: dict[str, int] = {}
        self.pending: dict[str, ray.ObjectRef] = {}

    def __call__(self, key: str) -> list[dict]:
        if not ray.is_initialized():
            return []
        try:
            if key not in self.pending:
                self.pending[key] = board().read.remote(key, self.received.get(key, 0))
            ready, _ = ray.wait([self.pending[key]], timeout=self.timeout_s)
            if not ready:
                return []
            start, records = ray.get(self.pending.pop(key))
        except ray.exceptions.RayError:
            self.pending.pop(key, None)
            return []  # a restarting board: the next poll asks again
        new = records[max(self.received.get(key, 0) - start, 0) :]
        self.received[key] = start + len(records)
        return new

    def final(self, key: str, timeout_s: float = 15.0) -> list[dict]:
        """After the stage: everything rank 0 sent that has not been read yet (its last flush races the end):
        waits for the read in flight, then reads once more."""
        deadline, out = time.monotonic() + timeout_s, []
        for _ in range(2):
            while key in self.pending and time.monotonic() < deadline:
                out += self(key)
            if key in self.pending:
                break
            out += self(key)  # issues a fresh read (and returns at once if the board answers within timeout_s)
        self.received.pop(key, None)
        self.pending.pop(key, None)
        return out


def device_peak_flops() -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None) of this worker's accelerator; ("cpu", None) without one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, gpu_bf16_peak(name)  # MFU is printed only where the peak is known


def memory_gb() -> float:
    """Peak accelerator memory of this process, or its resident host memory on CPU (GB)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return psutil.Process(os.getpid()).memory_info().rss / 1e9


class StepReporter:
    """Rank 0's sender (picklable: the driver builds it; Ray ships it to the workers with the worker function).

    ``flops_per_token``: model FLOPs of one trained token (the FLOPs ledger's 3 × forward), for MFU and FLOP/s;
    None where the ledger has no per-token figure (the bilevel step)."""

    def __init__(
        self, key: str, start_step: int, total_steps: int, flops_per_token: float | None = None, flush_s: float = 2.0
    ):
        self.key, self.start_step, self.total_steps = key, start_step, total_steps
        self.flops_per_token, self.flush_s = flops_per_token, flush_s
        self._buffer: list[dict] = []
        self._last_flush = 0.0  # 0: the first record goes out at once
        self._board = None
        self._device: tuple[str, float | None] | None = None
        self._failed = False
        board()  # created (and held) here, on the driver, so that it outlives the worker groups that write to it

    def __getstate__(self):
        return self.__dict__ | {"_board": None, "_buffer": []}  # an actor handle per process, made on first flush

    def __setstate__(self, state: dict) -> None:
        self.__dict__ = state
        self._received = time.time()  # on a worker: its train function has just been handed this reporter

    def __call__(self, metrics: dict) -> None:
        try:
            self._record(metrics)
        except Exception as e:  # the progress view must never fail a training step
            if not self._failed:
                logging.getLogger("bliss_ray").warning("progress reporting off for %s: %r", self.key, e)
            self._failed = True

    def _record(self, metrics: dict) -> None:
        if self._device is None:
            self._device = device_peak_flops()
        name, peak = self._device
        record = {
            **metrics,
            "done_steps": int(metrics["step"]) - self.start_step,
            "total_steps": self.total_steps,
            "memory_gb": memory_gb(),
            "device": name,
            "time": time.time(),
        }
        if self.flops_per_token and metrics.get("tokens_per_s"):
            record["flops_per_s"] = metrics["tokens_per_s"] * self.flops_per_token
            if peak:
                record["mfu"] = record["flops_per_s"] / peak
        if getattr(self, "_received", None) is not None:  # the first record: when the worker's function started
            record["worker_start_time"], self._received = self._received, None
        self._buffer.append(record)
        last = record["done_steps"] >= self.total_steps
        if last or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush(wait=last)

    def flush(self, wait: bool = False) -> None:
        """Send the buffer: fire-and-forget (never blocks a training step), except with ``wait`` at the stage's
        last step: a worker that exits right after would drop the calls its core worker had not sent yet (on a
        loaded machine, every record of a short stage)."""
        if not self._buffer:
            return
        if self._board is None:
            self._board = board()
        ref = self._board.put.remote(self.key, self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()
        if wait:
            ray.get(ref, timeout=60)
