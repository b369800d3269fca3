"""The layouts a training stage can run its workers in — DDP, FSDP and HSDP, gradients reduced after every
micro-batch or the last — each with its memory per worker, communication and step time; the fastest that fits.

A step's time on a worker = compute + communication, nothing overlapped. Compute: the ledger's training FLOPs of
the step's tokens on one worker (3 × forward, ``costs.flops``) × the recompute factor of activation checkpointing,
÷ the achieved FLOP/s (``costs.throughput``), and an assumed 5 % of MFU lost per halving of the micro-batch under
8192 tokens. Communication: ``costs.comms`` on the GPU type's node. Memory: ``costs.memory``. A layout that does
not fit as configured takes its fastest fit among more activation checkpointing (every 4th, every 2nd, every
block) and smaller micro-batches with more accumulation.

    costs = layout_costs(StageLoad(arch, shape, "pretrain", capacity, rate, link, per_node))
    best = fastest(costs)  # None when no layout fits
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from bliss_ray.config import ConfigError
from bliss_ray.costs import comms, memory
from bliss_ray.costs.flops import forward_flops_per_token
from bliss_ray.costs.memory import Estimate, Shape
from bliss_ray.models.arch import LMArch

MICRO_HALVING_COST, FULL_MICRO_TOKENS = 1.05, 8192
SYNCS = ("every_micro_batch", "last_micro_batch")


@dataclass(frozen=True)
class StageLoad:
    """A training stage as the layouts see it: its model, its configured shape, where it runs."""

    arch: LMArch
    shape: Shape  # as configured
    section: str  # the config section of its micro-batch: "warmup" | "pretrain"
    capacity_bytes: float  # usable per worker
    rate_flops: float  # achieved model FLOP/s per worker
    link: comms.Interconnect
    per_node: int  # workers on one node

    @property
    def bare_compute_s(self) -> float:
        """Seconds of one step's training FLOPs on one worker at the configured micro-batch, no recompute."""
        s = self.shape
        tokens = s.global_batch_seqs * s.seq_len / s.workers
        return 3 * forward_flops_per_token(self.arch, s.seq_len) * tokens / self.rate_flops


@dataclass(frozen=True)
class LayoutCost:
    """One layout of a stage: its shape (the configured one, or its fastest fit), memory and step time."""

    shape: Shape
    estimate: Estimate
    fits: bool
    fix: dict  # dotted overrides from the configured shape to this one
    comm: comms.StepComm
    compute_s: float
    bare_compute_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm.seconds

    @property
    def time_factor(self) -> float:
        """Step time ÷ the step's bare compute: what GPU-hours by FLOPs alone are multiplied by."""
        return self.step_s / self.bare_compute_s

    @property
    def key(self) -> tuple[str, str]:
        """(parallelism, grad_sync): DDP has one gradient sync whatever the setting says."""
        return self.shape.parallelism, "last_micro_batch" if self.shape.parallelism == "ddp" else self.shape.grad_sync


def label(shape: Shape) -> str:
    """The layout's name: ``ddp``, ``fsdp``, or ``hsdp R × S`` (replicas × ranks per shard group)."""
    if shape.parallelism == "hsdp" and shape.workers > 1:
        return f"hsdp {shape.workers // shape.shard_size} × {shape.shard_size}"
    return shape.parallelism


def _ac(shape: Shape) -> str:
    return {"none": "no AC", "full": "AC full"}.get(shape.checkpointing, f"AC every {shape.checkpointing_k}")


def steps_of(shape: Shape) -> str:
    """Activation checkpointing and micro-batching of a shape."""
    return f"{_ac(shape)}, micro {shape.micro_batch_seqs} × {shape.accumulation} acc"


def describe(shape: Shape) -> str:
    sync = ", grads synced on the last micro-batch" if shape.sharded and shape.grad_sync == "last_micro_batch" else ""
    micro = f"micro {shape.micro_batch_seqs} × {shape.accumulation} acc"
    return f"{label(shape)}, {_ac(shape)}, {shape.precision}, {micro}{sync}"


def shard_size(parallelism: str, configured: int | None, workers: int, per_node: int) -> int:
    """Ranks per HSDP shard group: ``resources.hsdp_shard_size``, else a node's workers; raises naming the setting
    when HSDP is configured with a size that does not divide the workers."""
    size = configured or min(per_node, workers)
    if parallelism == "hsdp" and workers % size:
        raise ConfigError(
            f"resources.hsdp_shard_size: {size} does not divide the {workers} workers planned for (HSDP replicates "
            "whole shard groups); set it, or --gpus-per-node / --gpus, so that it does"
        )
    return size


def cost(load: StageLoad, shape: Shape) -> LayoutCost:
    """Memory and step time of ``shape`` (module docstring)."""
    est = memory.train_step(load.arch, shape)
    halvings = lambda m: max(0.0, math.log2(FULL_MICRO_TOKENS / (m * shape.seq_len)))  # noqa: E731
    micro = MICRO_HALVING_COST ** (halvings(shape.micro_batch_seqs) - halvings(load.shape.micro_batch_seqs))
    compute_s = load.bare_compute_s * memory.recompute_factor(load.arch, shape) * micro
    layout = comms.Layout(shape.parallelism, shape.workers, shape.shard_size, shape.grad_sync, shape.accumulation)
    gather = 4 if shape.precision == "fp32" else 2
    link = comms.step_comm(
        layout, memory.n_params(load.arch), load.arch.root_params(), gather, load.link, load.per_node
    )
    fits = est.peak <= load.capacity_bytes
    return LayoutCost(shape, est, fits, _fix(load, shape), link, compute_s, load.bare_compute_s)


def _fix(load: StageLoad, shape: Shape) -> dict:
    """The dotted overrides that turn the configured shape into ``shape``."""
    was, fix = load.shape, {}
    if shape.parallelism != was.parallelism:
        fix["resources.parallelism"] = shape.parallelism
    if shape.sharded and shape.grad_sync != was.grad_sync:
        fix["resources.grad_sync"] = shape.grad_sync
    if (shape.checkpointing, shape.checkpointing_k) != (was.checkpointing, was.checkpointing_k):
        fix["resources.activation_checkpointing"] = shape.checkpointing
        if shape.checkpointing == "every_k":
            fix["resources.activation_checkpointing_k"] = shape.checkpointing_k
    if shape.micro_batch_seqs != was.micro_batch_seqs:
        fix[f"{load.section}.micro_batch_seqs"] = shape.micro_batch_seqs
    return fix


def layouts(load: StageLoad) -> list[Shape]:
    """The configured shape in every layout its workers allow: DDP; FSDP and HSDP (on 2+ nodes of whole shard
    groups) with either gradient sync."""
    s = load.shape
    if s.workers == 1:
        return [s]
    out = [dataclasses.replace(s, parallelism="ddp")]
    hsdp = 1 < s.hsdp_shard_size < s.workers and s.workers % s.hsdp_shard_size == 0
    for par in ("fsdp", "hsdp") if hsdp or s.parallelism == "hsdp" else ("fsdp",):
        out += [dataclasses.replace(s, parallelism=par, grad_sync=sync) for sync in SYNCS]
    return out


def _fastest_fit(load: StageLoad, shape: Shape) -> LayoutCost | None:
    """The fastest fitting variant of ``shape``'s layout: at least as much checkpointing, a micro-batch that
    divides the configured one."""
    now = memory.checkpointed_layers(load.arch.n_layer, shape.checkpointing, shape.checkpointing_k)
    ladder = [(shape.checkpointing, shape.checkpointing_k), ("every_k", 4), ("every_k", 2), ("full", 2)]
    acs = [(m, k) for m, k in ladder if memory.checkpointed_layers(load.arch.n_layer, m, k) >= now]
    micros = [m for m in range(shape.micro_batch_seqs, 0, -1) if shape.micro_batch_seqs % m == 0]
    best = None
    for (mode, k), m in itertools.product(acs, micros):
        cand = dataclasses.replace(shape, checkpointing=mode, checkpointing_k=k, micro_batch_seqs=m)
        c = cost(load, cand)
        if c.fits and (best is None or (c.step_s, len(c.fix)) < (best.step_s, len(best.fix))):
            best = c
    return best


def layout_costs(load: StageLoad) -> list[LayoutCost]:
    """Every layout of the stage (``layouts``), as configured when it fits, else its fastest fit, else as
    configured (not fitting)."""
    out = []
    for shape in layouts(load):
        as_is = cost(load, shape)
        out.append(as_is if as_is.fits else (_fastest_fit(load, shape) or as_is))
    return out


def fastest(costs: list[LayoutCost]) -> LayoutCost | None:
    """The layout with the least step time among those that fit (the fewer changes on a tie)."""
    fitting = [c for c in costs if c.fits]
    return min(fitting, key=lambda c: (c.step_s, len(c.fix))) if fitting else None
