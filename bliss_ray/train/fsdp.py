"""FSDP2 for LM training (``resources.parallelism: fsdp`` or ``hsdp``): sharding, sharded checkpoints, full HF
exports.

Pure PyTorch (no Ray): the stage (``stages/train_lm.py``) calls these inside its Ray Train workers, whose default
process group is already up (gloo on CPU, NCCL on GPU).

* ``shard``: ``fully_shard`` on every transformer block, then on the root (embedding, final norm and LM head
  form one unit), on an explicit mesh of the process group's device type (a CPU mesh for gloo: the default
  mesh is CUDA's on a GPU machine, pytorch#132471): 1-D over every rank (FSDP), or 2-D ``("replicate",
  "shard")`` (HSDP: ``mesh_shape``; consecutive ranks, one node's under Ray Train, share a shard group, and a
  gradient's shard is all-reduced across the groups). On 16-bit precisions a ``MixedPrecisionPolicy`` casts
  parameters to 16 bits for compute and reduces gradients in fp32; master weights and AdamW stay fp32 and
  sharded. Activation checkpointing is set on the blocks before (transformers checkpoints each block's
  ``forward``, so FSDP's hooks stay outside the recompute); the optimizer must be built after.
* ``save`` / ``load``: model and optimizer state through ``torch.distributed.checkpoint`` — every rank writes its
  own shard (``__<rank>_0.distcp``, rank 0 the ``.metadata``), every rank reads what its sharding needs, so a
  checkpoint written by N workers loads on M workers, or into an unsharded model (DDP, one process). Under HSDP
  the replica groups hold equal shards: DCP's planner writes each once (one replica's rank writes it), and every
  replica reads it back.
* ``export_hf``: the full weights gathered to rank 0 (a collective) and saved as a stock ``save_pretrained``
  directory, what evaluation, the bilevel stage and users read.
* ``gather_optimizer_state`` / ``load_full_optimizer_state``: the end of a stage is written as a plain run writes
  it (HF weights + an index-keyed AdamW state dict gathered to rank 0), so the next round, MATES's prober and DDP
  runs read it unchanged, and an FSDP round continues from either kind.
"""

from __future__ import annotations

import math

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM

from bliss_ray.models.lm import save_lm
from bliss_ray.train import dist
from bliss_ray.train.loop import NonFiniteCheckpointError
from bliss_ray.train.precision import compute_dtype


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a GPT-NeoX (Pythia) or LLaMA causal LM: FSDP's units."""
    inner = getattr(model, "gpt_neox", None) or model.model
    return inner.layers


def node_shard_size(local_world_sizes: list[int]) -> int:
    """The HSDP shard group size that never spans two nodes, given each rank's count of ranks on its node: their
    greatest common divisor (Ray Train numbers one node's ranks consecutively, so equal nodes give the node)."""
    return math.gcd(*local_world_sizes)


def mesh_shape(world: int, shard_size: int) -> tuple[int, int]:
    """(replicas, ranks per shard group) of HSDP on ``world`` ranks; raises naming the setting when it does not
    divide them."""
    if shard_size < 1 or world % shard_size:
        raise ValueError(
            f"resources.hsdp_shard_size: {shard_size} does not divide the {world} training workers (HSDP replicates "
            "whole shard groups); set it to a divisor, e.g. the workers per node"
        )
    return world // shard_size, shard_size


def shard(
    model: torch.nn.Module, device: torch.device, precision: str, shard_size: int | None = None
) -> torch.nn.Module:
    """Shard ``model`` over the default process group (see the module docstring): over every rank (FSDP), or
    within groups of ``shard_size`` consecutive ranks, replicated across groups (HSDP). Returns the same object."""
    if shard_size is None:
        mesh = init_device_mesh(device.type, (dist.world_size(),), mesh_dim_names=("fsdp",))
    else:
        shape = mesh_shape(dist.world_size(), shard_size)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    half = compute_dtype(precision)
    mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half != torch.float32 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def assert_finite_shards(model: torch.nn.Module, what: str) -> None:
    """Every rank checks its own shards; all raise together if any shard anywhere is not finite."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = not all(bool(torch.isfinite(t).all()) for t in local)
    if dist.any_true(bad, local[0].device):
        raise NonFiniteCheckpointError(f"{what}: a parameter shard is not finite; no checkpoint written")


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Every rank: write its shards of the model and optimizer state to ``path`` (a directory)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, source) -> None:
    """Every rank: read a ``save`` directory (a local path, or a ``dcp_store.StoreReader`` that reads only this
    rank's shards where they lie) into this (sharded or unsharded) model and its optimizer."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if isinstance(source, StorageReader):
        dcp.load(state, storage_reader=source)
    else:
        dcp.load(state, checkpoint_id=str(source))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export_hf(model: torch.nn.Module, path, tokenizer=None) -> dict | None:
    """Collective: gather the full fp32 weights to rank 0, which saves a stock HF directory at ``path``.
    Returns the full state dict on rank 0, None elsewhere. (``save_pretrained`` of the sharded module would
    write shards: transformers gathers only models it sharded itself, docs/ray.md, "FSDP2 inside Ray Train".)"""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank() != 0:
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(full, assign=True)
    save_lm(plain, path, tokenizer)
    return full


def full_optimizer_state(model: torch.nn.Module, index_keyed: dict) -> dict:
    """An ``optimizer.state_dict()`` of a plain model (parameter indices in ``named_parameters`` order, as
    ``make_optimizer`` lists them) keyed by parameter name instead, the full-state format of
    ``set_optimizer_state_dict``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in index_keyed["param_groups"]]
    return {"state": {names[i]: s for i, s in index_keyed["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, index_keyed: dict) -> None:
    """Every rank: load a plain run's AdamW state (every rank holds it) into the sharded optimizer."""
    set_optimizer_state_dict(
        model,
        optimizer,
        full_optimizer_state(model, index_keyed),
        options=StateDictOptions(full_state_dict=True),
    )


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Collective: the full AdamW state on rank 0 in a plain run's index-keyed format (what ``save_train_state``
    writes, so the next round, MATES's prober and a DDP run read it unchanged); None on other ranks."""
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank() != 0:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}
