"""Per-worker memory of BLISS's steps (LM training, the bilevel outer step, inference) and the devices they run on.

Pure: the standard library, ``LMArch`` and the FLOPs ledger's parameter counts (no pydantic, no Ray), so the GPU
runbook (``bench/gpu_bench.py``) prints these numbers beside what it measures and ``bliss_ray.costs.planner`` turns
them into a launch plan. Bytes per worker; P parameters, N workers, b micro-batch sequences, s tokens per sequence,
h width, a heads, L layers, V vocabulary.

Training step (warm-up, pretraining, MATES probes, the influence model):

* states: fp32 master weights 4P, fp32 grads 4P, AdamW moments 8P — each ÷ N under FSDP, ÷ the shard group's
  size S under HSDP. FSDP / HSDP reducing gradients on the last micro-batch only (``resources.grad_sync``) keep
  every parameter's unsharded gradient until then, in fp32 (the reduce dtype): 4P more. DDP on N > 1 workers
  adds its reducer's flat gradient buckets, 4P (torch's default ``gradient_as_bucket_view=False``, which Ray's
  ``prepare_model`` keeps). Gradients count whole: with accumulation (the paper presets run 4 micro-batches a
  step) they live through every micro-batch's forward;
* 16-bit copies: autocast keeps a 16-bit copy of every matmul weight from forward to backward (2·P_mm); FSDP
  instead all-gathers one unit ahead (two units in flight) plus one unit's unsharded fp32 gradient before its
  reduce-scatter, a unit being a transformer block or the embedding / LM head, whichever is larger;
* activations kept for backward, per layer: Korthikanti et al. (arXiv:2205.05198, Eq. 1) s·b·h·(34 + 5·a·s/h)
  bytes with 16-bit activations. SDPA (flash / memory-efficient kernels, what training runs) keeps no s×s scores,
  so the 5as/h term drops; the MLP's 19 = 3 + 4·d_ff/h becomes 3 + 8·d_ff/h for SwiGLU (gate, up, activation,
  product); fp32 doubles everything. A checkpointed layer keeps only its input: the residual stream, fp32 under
  autocast (4·sbh) and bf16 under FSDP's 16-bit parameters (2·sbh);
* a transient on top: the loss or, with checkpointing, one recomputed layer, whichever is larger (the recompute
  runs after the loss's buffers are freed). HF upcasts logits to fp32 and cross-entropy keeps its log-softmax;
  its backward holds that, the incoming gradient and its own output at once: 12·b·s·V bytes in either precision
  (fp32: 3 × 4; mixed: the 16-bit logits are gone by then).

On CPU in fp32 these agree with torch's own allocation record of a real step within a few per cent
(``tests/test_plan.py``); the 16-bit terms are held to ``torch.cuda.max_memory_allocated`` by ``bench/gpu.sh``.

Inference (scoring, lm-eval): weights, one layer's working set s·b·h·(6 + 2·d_ff/h) elements (input, norm output,
q, k, v, attention output, two d_ff-wide MLP tensors) and, with an LM head, the logits and their log-softmax.

Bilevel outer step (``bilevel.loop``; replicated on every worker, fp32, math attention for second derivatives):
proxy and score model with grads and AdamW (16 B/param each), the target's weights when γ > 0, z / ∇f / Hz
(12 B per proxy parameter), the proxy's activations with the s×s term kept twice (``create_graph`` keeps the
backward's intermediates for the Hessian-vector products) and four fp32 B×s×V tensors. A rough estimate: the
double backward's graph has not been measured against it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from bliss_ray.costs.flops import matmul_params
from bliss_ray.models.arch import LMArch

GIB = 2**30
# What a worker cannot use of a GPU's memory: the CUDA context, cuBLAS / NCCL workspaces (about 1 GiB), and the
# caching allocator's fragmentation (we keep 10 % free). Assumptions, stated in every plan.
RESERVED_GIB = 1.0
ALLOCATOR_HEADROOM = 0.10


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float | None  # what torch reports as total memory; None: the host's RAM (CPU)
    bf16_flops: float | None = None  # dense 16-bit tensor-core peak, FLOP/s (no sparsity)
    fp32_flops: float | None = None  # fp32 peak without TF32, FLOP/s
    names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() that identify it
    # Ray's accelerator type of the device: nodes carry ``accelerator_type:<it>`` (Ray detects A10G, L4, H100 and
    # H200 itself; the cluster configs declare the A100s' memory variants), and stages ask for it
    ray_type: str | None = None


# GPU dense bf16 peaks (FLOP/s, no sparsity, NVIDIA's data sheets; H100/H200: SXM parts) by a substring of
# torch.cuda.get_device_name(): the one table the planner, the live console's MFU and the benchmarks read.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def gpu_bf16_peak(cuda_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its CUDA name (H100 PCIe is lower than SXM: 756 TFLOPS), None if unknown."""
    if "H100" in cuda_name and "PCIe" in cuda_name:
        return 756e12
    return next((v for k, v in GPU_BF16_PEAK.items() if k in cuda_name), None)


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("A10G-24GB", 22.5, GPU_BF16_PEAK["A10G"], 31.2e12, ("A10G",), "A10G"),  # AWS g5 (cluster/aws.yaml)
        Device("L4-24GB", 22.5, GPU_BF16_PEAK["L4"], 30.3e12, ("L4",), "L4"),  # GCP g2 (cluster/gcp.yaml)
        Device("A100-40GB", 39.6, GPU_BF16_PEAK["A100"], 19.5e12, ("A100",), "A100-40G"),
        Device("A100-80GB", 79.3, GPU_BF16_PEAK["A100"], 19.5e12, ("A100",), "A100-80G"),
        Device("H100-80GB", 79.6, GPU_BF16_PEAK["H100"], 67e12, ("H100",), "H100"),
        Device("H200-141GB", 140.4, GPU_BF16_PEAK["H200"], 67e12, ("H200",), "H200"),
        Device("CPU", None),
    )
}


def device_of(cuda_name: str, total_bytes: int) -> str | None:
    """The table's name for a CUDA device (by its name and memory), or None when the table lacks it."""
    if "L40" in cuda_name:  # L40 / L40S are not L4s
        return None
    found = [d for d in DEVICES.values() if any(n in cuda_name for n in d.names)]
    found.sort(key=lambda d: abs(d.memory_gib - total_bytes / GIB))  # A100 40 GB vs 80 GB
    return found[0].name if found else None


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_bytes(device: str, workers_per_host: int = 1) -> float:
    """Bytes one worker may plan for: a GPU's memory less the reserve and headroom; the host RAM shared by CPU
    workers on one machine."""
    d = DEVICES[device]
    if d.memory_gib is None:
        return host_memory_bytes() * (1 - ALLOCATOR_HEADROOM) / max(1, workers_per_host)
    return (d.memory_gib - RESERVED_GIB) * GIB * (1 - ALLOCATOR_HEADROOM)


@dataclass(frozen=True)
class Shape:
    """How one worker runs a training step."""

    seq_len: int
    micro_batch_seqs: int
    workers: int = 1
    parallelism: str = "ddp"  # "ddp" | "fsdp" | "hsdp" | "replicated" (no gradient sync: probes, influence)
    checkpointing: str = "none"  # "none" | "full" | "every_k"
    checkpointing_k: int = 2
    precision: str = "fp32"  # "bf16-mixed" | "fp16-mixed" | "fp32"
    hsdp_shard_size: int = 1  # ranks per HSDP shard group
    grad_sync: str = "every_micro_batch"  # "every_micro_batch" | "last_micro_batch" (FSDP / HSDP)
    global_batch_seqs: int = 0  # sequences per optimizer step over all workers; 0: one micro-batch per step

    @property
    def sharded(self) -> bool:
        return self.parallelism in ("fsdp", "hsdp") and self.workers > 1

    @property
    def shard_size(self) -> int:
        """Ranks a parameter's states are split over."""
        if not self.sharded:
            return 1
        return self.workers if self.parallelism == "fsdp" else min(self.hsdp_shard_size, self.workers)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return max(1, self.global_batch_seqs // (self.micro_batch_seqs * self.workers))


@dataclass
class Estimate:
    """Memory of one step: what stays allocated (``kept``, by component) and the largest transient on top."""

    kept: dict[str, float] = field(default_factory=dict)
    transient: tuple[str, float] = ("none", 0.0)
    rough: bool = False  # not validated against a measurement

    @property
    def peak(self) -> float:
        return sum(self.kept.values()) + self.transient[1]

    def describe(self) -> str:
        parts = [f"{k} {v / GIB:.2f}" for k, v in self.kept.items() if v > 0]
        if self.transient[1] > 0:
            parts.append(f"+ {self.transient[0]} {self.transient[1] / GIB:.2f}")
        return ", ".join(parts) + " GiB"


def n_params(arch: LMArch, head: bool = True) -> int:
    """All parameters (untied embeddings); ``head=False`` drops the LM head (score-model trunks)."""
    d = arch.d_model
    if arch.family == "bert":  # mates.influence: learned positions (512), 2 token types, biases, a d→1 head
        per_layer = 4 * d * d + 4 * d + 2 * d * arch.d_ff + arch.d_ff + d + 4 * d
        return arch.n_layer * per_layer + (arch.vocab_size + 514) * d + 2 * d + d + 1
    return arch.n_params(embeddings=True) - (0 if head else arch.vocab_size * d)


def layer_activation_bytes(arch: LMArch, seq_len: int, batch_seqs: int, bytes_per_el: int, sdpa: bool = True) -> float:
    """Activations one layer keeps for backward (Korthikanti's count, see the module docstring)."""
    mlp = 3 + (8 if arch.family == "llama" else 4) * arch.d_ff / arch.d_model
    scores = 0.0 if sdpa else 5 * arch.n_head * seq_len / arch.d_model
    return seq_len * batch_seqs * arch.d_model * (11 + 4 + mlp + scores) * bytes_per_el / 2


def checkpointed_layers(n_layer: int, mode: str, k: int) -> int:
    """Layers recomputed in backward: all, none, or blocks 0, k, 2k, … (transformers' ``every_n_layers``)."""
    return {"full": n_layer, "none": 0}.get(mode, math.ceil(n_layer / k))


def _unit_params(arch: LMArch) -> float:
    per_layer = (n_params(arch) - 2 * arch.vocab_size * arch.d_model) / arch.n_layer
    return max(per_layer, arch.vocab_size * arch.d_model)


def train_step(arch: LMArch, shape: Shape, lm_head: bool = True) -> Estimate:
    """Peak memory of one training step of ``arch`` on one worker (module docstring)."""
    P = n_params(arch, head=lm_head)
    mixed = shape.precision != "fp32"
    sharded, shard = shape.sharded, shape.shard_size
    kept = {"weights": 4 * P / shard, "grads": 4 * P / shard, "AdamW": 8 * P / shard}
    if shape.parallelism == "ddp" and shape.workers > 1:
        kept["DDP buckets"] = 4 * P
    if sharded:
        kept["FSDP gathered units"] = _unit_params(arch) * (2 * (2 if mixed else 4) + 4)
        if shape.grad_sync == "last_micro_batch" and shape.accumulation > 1:
            kept["unsharded grads until the last micro-batch"] = 4 * P
    elif mixed:
        kept["16-bit weights"] = 2 * matmul_params(arch, head=lm_head)
    s, b, h = shape.seq_len, shape.micro_batch_seqs, arch.d_model
    layer = layer_activation_bytes(arch, s, b, 2 if mixed else 4)
    n_ckpt = checkpointed_layers(arch.n_layer, shape.checkpointing, shape.checkpointing_k)
    residual = 2 if sharded and mixed else 4
    kept["activations"] = (arch.n_layer - n_ckpt) * layer + n_ckpt * s * b * h * residual
    loss = 12 * b * s * arch.vocab_size if lm_head else 0.0
    recompute = layer if n_ckpt else 0.0
    transient = ("loss (fp32 logits)", loss) if loss >= recompute else ("recomputed layer", recompute)
    return Estimate(kept, transient)


def inference_step(arch: LMArch, seq_len: int, batch_seqs: int, precision: str, lm_head: bool) -> Estimate:
    """Peak of one forward without grad: fp32 weights under autocast (scoring) plus their 16-bit copies, or
    16-bit weights (``precision`` "bf16" / "fp16": lm-eval's ``dtype``), one layer in flight, logits."""
    P = n_params(arch, head=lm_head)
    act = 4 if precision == "fp32" else 2
    kept = {"weights": (2 if precision in ("bf16", "fp16") else 4) * P}
    if precision.endswith("-mixed"):
        kept["16-bit weights"] = 2 * matmul_params(arch, head=lm_head)
    el = seq_len * batch_seqs * arch.d_model * (6 + 2 * arch.d_ff / arch.d_model)
    kept["layer in flight"] = el * act
    logits = 2 * batch_seqs * seq_len * arch.vocab_size * act if lm_head else 0.0
    return Estimate(kept, ("logits + log-softmax", logits))


def bilevel_step(proxy: LMArch, target: LMArch | None, seq_len: int, micro_batch_seqs: int) -> Estimate:
    """Rough peak of one BLISS outer step on one worker (module docstring); always fp32 and replicated."""
    P_p = n_params(proxy)
    P_s = n_params(proxy, head=False) + proxy.d_model + 1  # trunk + Linear(d, 1)
    b = micro_batch_seqs
    kept = {
        "proxy (weights, grads, AdamW)": 16 * P_p,
        "score model (weights, grads, AdamW)": 16 * P_s,
        "z, ∇f, Hz": 12 * P_p,
        "target weights": 4 * n_params(target) if target is not None else 0.0,
        "activations + graph of ∇g": 2 * proxy.n_layer * layer_activation_bytes(proxy, seq_len, b, 4, sdpa=False),
    }
    logits = 16 * b * seq_len * proxy.vocab_size + (8 * b * seq_len * target.vocab_size if target else 0)
    return Estimate(kept, ("fp32 logits, log-softmax and their grads", logits), rough=True)


def recompute_factor(arch: LMArch, shape: Shape) -> float:
    """Training FLOPs with checkpointing ÷ without: the recomputed blocks' forward, against 3 × the forward."""
    n_ckpt = checkpointed_layers(arch.n_layer, shape.checkpointing, shape.checkpointing_k)
    if not n_ckpt:
        return 1.0
    blocks = (
        2 * (matmul_params(arch) - arch.vocab_size * arch.d_model) + 4 * shape.seq_len * arch.d_model * arch.n_layer
    )
    total = 2 * matmul_params(arch) + 4 * shape.seq_len * arch.d_model * arch.n_layer
    return 1 + (n_ckpt / arch.n_layer) * blocks / (3 * total)
