"""Stages: proxy warm-up and target pretraining (one round), on Ray Train.

Inputs: a materialised ``TokenArray`` of training rows, the tokenizer, and optionally the previous round's full
training state. Outputs (in the stage directory): ``state/`` (HF model + optimizer + step: round r+1 continues
from it), ``decay/`` (the decay-branch model that evaluation uses, when ``decay_steps`` > 0), ``branches/<step>/``
(the models of the mid-round decay branches, ``eval_branches`` of them, each from the stable state at that global
step) and ``metrics.jsonl`` (branch steps under ``phase: "branch@<step>"``). What a worker trains and saves is
``bliss_ray.train.lm_run.LMRun`` and ``train.checkpoint.LMCheckpoint``; this module adapts Ray Train to them.

Fault tolerance: rank 0 checkpoints every ``ckpt_every_steps``; a restarted worker group resumes from the last
registered checkpoint (possibly older than the last reported one: docs/ray.md, "Checkpoints") and recomputes the
batches of every later step, so the run ends at exactly ``end_step`` with every step's data seen once after the
replay.

    bliss-ray run experiments/demo.yaml --stage r0.pretrain
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train.torch import get_device, prepare_model

from bliss_ray import storage as store
from bliss_ray.config import ResourcesConfig
from bliss_ray.costs.flops import forward_flops_per_token
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.data.tokens import Prefetcher, TokenArray, micro_batches
from bliss_ray.models.arch import LMArch
from bliss_ray.models.lm import build_lm, set_activation_checkpointing
from bliss_ray.stages import _faults
from bliss_ray.stages._ray import (
    final_checkpoint,
    fit,
    report,
    resumed_checkpoint,
    resumed_shards,
    run_config,
    start_worker,
)
from bliss_ray.storage import local_copy
from bliss_ray.train import dist, fsdp
from bliss_ray.train.checkpoint import STATE_FILE, LMCheckpoint, RunRecord
from bliss_ray.train.lm_run import Branches, LMRun
from bliss_ray.train.loop import make_optimizer
from bliss_ray.train.precision import grad_scaler, resolve_precision
from bliss_ray.train.schedule import round_peak_lr
from bliss_ray.train.settings import TrainSettings
from bliss_ray.watch.progress import StepReporter


@dataclass(frozen=True)
class LMTrainSpec:
    """Everything a worker needs (plain, picklable, frozen)."""

    stage: str
    arch: LMArch
    seq_len: int
    tokenizer_dir: str  # locations (local paths or store URIs), read through storage.local_copy on each node
    data_dir: str
    init_dir: str | None  # previous round's state/ (continue) or None (random init)
    start_step: int  # global step at which this stage starts (round r·steps for the target)
    train: TrainSettings
    round_index: int
    seed: int
    resources: ResourcesConfig
    kind: str = "pretrain"  # or "warmup": the stage kind, which resources.gpu_types may place apart


def _shard_size(res: ResourcesConfig, device: torch.device) -> int | None:
    """Ranks per shard group: None for FSDP (all of them); for HSDP ``resources.hsdp_shard_size``, else the
    largest group inside every node (a collective: each rank's count of ranks on its node)."""
    if res.parallelism != "hsdp":
        return None
    if res.hsdp_shard_size is not None:
        return res.hsdp_shard_size
    local = torch.tensor([ray.train.get_context().get_local_world_size()], device=device)  # (1,)
    return fsdp.node_shard_size([int(n) for n in dist.all_gather_cat(local).tolist()])


def _prepare(model, spec: LMTrainSpec, peak_lr: float, tokenizer, rank: int, world: int):
    """(the model as this rank trains it: activation checkpointing, DDP, FSDP2 or HSDP, ``torch.compile``; the
    checkpoint object around the module, its AdamW at ``peak_lr`` and fp16's loss scale)."""
    res, device = spec.resources, get_device()
    set_activation_checkpointing(model, res.activation_checkpointing, res.activation_checkpointing_k)
    sharded = res.sharded and world > 1
    precision = resolve_precision(res.precision, device.type)
    # FSDP: its mixed-precision policy casts the parameters, so the loop runs without autocast
    model = fsdp.shard(model, device, precision, _shard_size(res, device)) if sharded else prepare_model(model)
    optimizer = make_optimizer(model, peak_lr, spec.train.betas, spec.train.weight_decay)
    scaler = grad_scaler("fp32" if sharded else precision, device)
    ckpt = LMCheckpoint(model, optimizer, tokenizer, sharded=sharded, rank=rank, scaler=scaler)
    return (torch.compile(model) if res.compile else model), ckpt


def _worker(loop_config: dict) -> None:
    spec: LMTrainSpec = loop_config["spec"]
    t = spec.train
    rank, world = start_worker(spec.resources.torch_threads)
    peak_lr = round_peak_lr(t.lr, t.lr_round_factor, spec.round_index)
    tokenizer = load_tokenizer(local_copy(spec.tokenizer_dir))
    steps = t.steps + (t.eval_branches + 1) * t.decay_steps  # decay branches read their steps' rows again
    tokens = TokenArray.open_for(spec.data_dir, steps * t.global_batch_seqs // world).tokens
    with resumed_checkpoint() as resume:  # an earlier attempt's checkpoint, else the previous round's state
        source = resume or (local_copy(spec.init_dir) if spec.init_dir is not None else None)
        build = functools.partial(
            build_lm, spec.arch, spec.seq_len, seed=spec.seed, eos_token_id=tokenizer.eos_token_id
        )
        model, state, record = LMCheckpoint.open(source, resumed=resume is not None, build=build)
        branches = Branches(rank, resume / "branches" if resume is not None else None)
        model, ckpt = _prepare(model, spec, peak_lr, tokenizer, rank, world)
        ckpt.load_optimizer(source, state, shards=resumed_shards() if resume is not None else None)

    def load(global_step: int) -> list[torch.Tensor]:  # this stage's data stream starts at 0
        local = global_step - spec.start_step
        return micro_batches(tokens, local, t.global_batch_seqs, t.micro_batch_seqs, rank, world, spec.seed)

    prefetch = Prefetcher(load, pin=torch.cuda.is_available())

    def batches_at(global_step: int) -> list[torch.Tensor]:
        _faults.at_step(spec.stage, global_step, rank)
        return prefetch(global_step)

    LMRun(
        ckpt,
        model,
        t,
        stage=spec.stage,
        start_step=spec.start_step,
        peak_lr=peak_lr,
        precision=spec.resources.precision,
        record=record or RunRecord(spec.start_step),
        branches=branches,
        batches_at=batches_at,
        report=report,
        progress=loop_config["progress"],
        loss_hook=_faults.nonfinite_hook(spec.stage),
        grad_sync=spec.resources.grad_sync,
    ).train()


def fit_lm(spec: LMTrainSpec, out_dir: Path, storage: str, workers: int, dest: str | None = None) -> dict:
    """Run the stage on Ray Train and copy the final checkpoint's files to the stage's location ``dest`` (default
    ``out_dir``; a store URI for a remote run): state/, decay/, branches/, metrics.jsonl. The copy goes
    store-to-store (``publish_checkpoint``): nothing of it passes through this process. Returns the final step, the
    Train run's path and the global steps of the branches."""
    res = spec.resources
    if spec.train.eval_branches and res.sharded and workers > 1:
        raise ValueError(  # the config refuses it too; this guards callers that build a spec themselves
            f"pretrain.eval_branches needs a replicated model: not supported with resources.parallelism "
            f"{res.parallelism} on 2+ workers"
        )
    total = spec.train.steps + spec.train.decay_steps
    fpt = 3 * forward_flops_per_token(spec.arch, spec.seq_len)  # the FLOPs ledger's training FLOPs per token
    progress = StepReporter(out_dir.name, spec.start_step, total, flops_per_token=fpt)
    config = run_config(out_dir.name, storage, res)
    result = fit(_worker, {"spec": spec, "progress": progress}, res, workers, config, spec.kind)
    dest = dest or str(out_dir)
    publish_checkpoint(final_checkpoint(result, storage, config.name), dest)
    steps = sorted(int(store.name(p)) for p in store.listdir(store.join(dest, "branches"), dirs=True))
    return {"final_step": result.metrics.get("step"), "train_run": result.path, "branch_steps": steps}


def publish_checkpoint(ckpt: str, dest: str) -> None:
    """The final checkpoint at ``ckpt`` as the stage's outputs at ``dest``: its model and training state in
    ``state/`` (what round r+1 continues from), its decay model, branches and metrics beside them. A previous
    attempt's outputs there are removed first, never mixed with this one's."""
    for item in ("state", "decay", "branches", "metrics.jsonl"):
        store.remove(store.join(dest, item))
    for item in ("model", STATE_FILE):
        store.copy_tree(store.join(ckpt, item), store.join(dest, "state", item))
    for item in ("decay", "branches"):
        if store.exists(store.join(ckpt, item)):
            store.copy_tree(store.join(ckpt, item), store.join(dest, item))
    store.copy_tree(store.join(ckpt, "metrics.jsonl"), store.join(dest, "metrics.jsonl"))
