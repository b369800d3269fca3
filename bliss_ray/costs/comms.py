"""Communication of one data-parallel training step: the bytes each rank sends per optimizer step under DDP, FSDP and
HSDP, and the seconds they take on a node type's links.

Pure Python, numbers in and numbers out (no torch, no Ray): ``costs.layouts`` prices each layout of a training
stage with it, and ``bliss-ray plan`` prints the result. P parameters, of which P_root sit in FSDP's root unit
(embedding, final norm, LM head) and the rest in the blocks; N workers; A micro-batches per optimizer step; b bytes
per parameter of the all-gather (2 under a 16-bit mixed-precision policy, else 4); gradients reduce in fp32 (4 B:
FSDP's reduce dtype, DDP's fp32 gradients).

Ring collectives over n ranks of a tensor of S bytes; what each rank sends (and receives):
all-gather and reduce-scatter (n − 1)/n · S, all-reduce 2 (n − 1)/n · S. Per optimizer step:

* DDP: one all-reduce of 4P over all N (``no_sync`` on all but the last micro-batch).
* FSDP over N, per micro-batch: an all-gather of b·P in forward and of b·(P − P_root) in backward (FSDP2 keeps
  the root unit gathered from its forward to its backward); a reduce-scatter of 4P per micro-batch
  (``grad_sync: every_micro_batch``) or once per step (``last_micro_batch``).
* HSDP, groups of S ranks sharding, R = N/S replicas: the same all-gathers and reduce-scatters within the group,
  and with each reduce-scatter an all-reduce of the rank's 4P/S shard across the R replicas.

Time: a collective's bytes per rank ÷ the bandwidth its group gets per rank: the intra-node link when the group
sits in one node; else the node's network, shared by the groups that cross it from that node at once (a ring
over consecutive ranks sends one rank's worth through each node, so 1 group; HSDP's replica all-reduces run one
per rank of the node at once). Nothing overlaps: an upper bound, since FSDP2 prefetches the next unit's
all-gather and DDP reduces buckets during backward.

    link = INTERCONNECTS["A100-40GB"]
    step_comm(Layout("hsdp", 16, 8, "last_micro_batch", 4), 1_011_781_632, 206_049_280, 2, link, 8).seconds
"""

from __future__ import annotations

from dataclasses import dataclass

GBIT_BYTES = 1e9 / 8  # one Gb/s in bytes per second
REDUCE_BYTES = 4  # gradients reduce in fp32


@dataclass(frozen=True)
class Interconnect:
    """The links of the node type a GPU type trains on."""

    node: str  # the node type (cluster/ configs, or the usual cloud one)
    gpus_per_node: int | None  # None: every worker on one host (CPU: the embedded Ray's machine)
    link: str  # what connects GPUs inside the node
    intra_bytes_per_s: float  # per GPU, each direction, inside the node
    network_bytes_per_s: float  # per node, each direction, between nodes


# The node behind each GPU type and its bandwidth, from the vendors' data sheets; assumptions printed with every plan.
# Intra-node figures are per direction (NVIDIA quotes NVLink both ways added: A100 600 GB/s, H100 900 GB/s). PCIe
# nodes (g5, g2) have no NVLink: NCCL's rings cross the host bridge, taken as half of PCIe 4.0 x16's 32 GB/s.
INTERCONNECTS: dict[str, Interconnect] = {
    "A10G-24GB": Interconnect("g5.12xlarge", 4, "PCIe 4.0", 16e9, 40 * GBIT_BYTES),
    "L4-24GB": Interconnect("g2-standard-48", 4, "PCIe 4.0", 16e9, 50 * GBIT_BYTES),
    "A100-40GB": Interconnect("p4d.24xlarge", 8, "NVLink 3", 300e9, 400 * GBIT_BYTES),  # 4 × 100 Gb/s EFA
    "A100-80GB": Interconnect("p4de.24xlarge", 8, "NVLink 3", 300e9, 400 * GBIT_BYTES),
    "H100-80GB": Interconnect("p5.48xlarge", 8, "NVLink 4", 450e9, 3200 * GBIT_BYTES),  # 32 × 100 Gb/s EFA
    "H200-141GB": Interconnect("p5e.48xlarge", 8, "NVLink 4", 450e9, 3200 * GBIT_BYTES),
    "CPU": Interconnect("one host", None, "gloo over loopback", 5e9, 10 * GBIT_BYTES),
}


@dataclass(frozen=True)
class Layout:
    """How N workers split a training step's parameters and reduce its gradients."""

    parallelism: str  # "ddp" | "fsdp" | "hsdp"
    workers: int
    shard_size: int  # ranks a parameter is sharded over: N (fsdp), the group (hsdp), 1 (ddp)
    grad_sync: str  # "every_micro_batch" | "last_micro_batch"; DDP always reduces on the last
    accumulation: int  # micro-batches per optimizer step


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a step: ``per_step`` calls, each sending ``bytes_per_rank`` from every rank of
    a group of ``group`` ranks ``stride`` apart (1: consecutive ranks; S: one rank of each HSDP shard group)."""

    what: str
    per_step: int
    bytes_per_rank: float
    group: int
    stride: int = 1


def collectives(layout: Layout, n_params: int, root_params: int, gather_bytes: int) -> list[Collective]:
    """What ``layout`` runs per optimizer step (module docstring); ``gather_bytes``: b."""
    n, a = layout.workers, layout.accumulation
    grads = REDUCE_BYTES * n_params
    if n == 1:
        return []
    if layout.parallelism == "ddp":
        return [Collective("all-reduce of gradients", 1, 2 * (n - 1) / n * grads, n)]
    s = layout.shard_size
    reduces = a if layout.grad_sync == "every_micro_batch" else 1
    out = [
        Collective("all-gather, forward", a, (s - 1) / s * gather_bytes * n_params, s),
        Collective("all-gather, backward", a, (s - 1) / s * gather_bytes * (n_params - root_params), s),
        Collective("reduce-scatter of gradients", reduces, (s - 1) / s * grads, s),
    ]
    r = n // s
    if r > 1:
        out.append(Collective("all-reduce across replicas", reduces, 2 * (r - 1) / r * grads / s, r, stride=s))
    return out


@dataclass(frozen=True)
class StepComm:
    """A layout's communication per optimizer step, per rank."""

    collectives: list[Collective]
    bytes: float
    seconds: float


def step_comm(
    layout: Layout, n_params: int, root_params: int, gather_bytes: int, link: Interconnect, per_node: int
) -> StepComm:
    """The collectives of one optimizer step of ``layout``, the bytes each rank sends and the seconds they take
    with ``per_node`` workers on each node."""
    colls = collectives(layout, n_params, root_params, gather_bytes)
    per_node = min(per_node, layout.workers)
    sent = sum(c.per_step * c.bytes_per_rank for c in colls)
    seconds = sum(c.per_step * c.bytes_per_rank / bandwidth_bytes_per_s(c, link, per_node) for c in colls)
    return StepComm(colls, sent, seconds)


def bandwidth_bytes_per_s(c: Collective, link: Interconnect, per_node: int) -> float:
    """What one rank of ``c``'s group gets: the intra-node link when the group sits inside one node of
    ``per_node`` consecutive ranks; else the node's network, shared by the groups crossing it at once."""
    width = c.group * c.stride  # consecutive ranks the group and its sibling groups cover
    if width <= per_node and per_node % width == 0:
        return link.intra_bytes_per_s
    sharing = min(c.stride, per_node)
    return min(link.intra_bytes_per_s, link.network_bytes_per_s / sharing)
