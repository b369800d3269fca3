"""Stages: proxy warm-up and target pretraining (one round), on Ray Train.

Inputs: a materialised ``TokenArray`` of training rows, the tokenizer, and optionally the previous round's full
training state. Outputs (in the stage directory): ``state/`` (HF model + optimizer + step: round r+1 continues
from it), ``decay/`` (the decay-branch model that evaluation uses, when ``decay_steps`` > 0), ``branches/<step>/``
(the models of the mid-round decay branches, ``eval_branches`` of them, each from the stable state at that global
step) and ``metrics.jsonl`` (branch steps under ``phase: "branch@<step>"``). The worker loop is
``bliss_ray.train.loop.train_lm``; this module only adapts Ray to it.

Fault tolerance: rank 0 checkpoints every ``ckpt_every_steps``; a restarted worker group resumes from the last
registered checkpoint (possibly older than the last reported one, ray.md §3.4 #1) and recomputes the batches of
every later step, so the run ends at exactly ``end_step`` with every step's data seen once after the replay.
Every checkpoint carries the branch models finished so far (``branches/``); a resumed run restores them and
computes only the missing ones.

    bliss-ray run experiments/demo.yaml --stage r0.pretrain
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train.torch import get_device, prepare_model

from bliss_ray.config import ResourcesConfig, TrainConfig
from bliss_ray.costs.flops import forward_flops_per_token
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.data.tokens import Prefetcher, TokenArray, micro_batches
from bliss_ray.models.arch import LMArch
from bliss_ray.models.lm import build_lm, save_lm, set_activation_checkpointing
from bliss_ray.stages import _faults
from bliss_ray.stages._ray import (
    copy_checkpoint,
    gc_orphan_checkpoints,
    report,
    run_config,
    set_worker_threads,
    torch_trainer,
)
from bliss_ray.storage import local_copy
from bliss_ray.train import fsdp
from bliss_ray.train.branches import stable_state_kept
from bliss_ray.train.checkpoint import (
    STATE_FILE,
    load_train_state,
    read_metrics,
    read_state,
    save_train_state,
    write_metrics,
)
from bliss_ray.train.loop import LoopSettings, make_optimizer, train_lm
from bliss_ray.train.precision import grad_scaler, resolve
from bliss_ray.train.schedule import branch_steps, decay_lr, round_peak_lr, wsd_lr
from bliss_ray.watch.progress import StepReporter


@dataclass
class LMTrainSpec:
    """Everything a worker needs (plain, picklable)."""

    stage: str
    arch: LMArch
    seq_len: int
    tokenizer_dir: str  # locations (local paths or store URIs), read through storage.local_copy on each node
    data_dir: str
    init_dir: str | None  # previous round's state/ (continue) or None (random init)
    start_step: int  # global step at which this stage starts (round r·steps for the target)
    train: dict  # TrainConfig fields
    round_index: int
    seed: int
    threads: int | None  # torch threads per worker; None: the node's cores ÷ its workers (set in the worker)
    compile: bool = False  # torch.compile the model (resources.compile; off by default on CPU)
    precision: str = "auto"  # resources.precision
    parallelism: str = "ddp"  # resources.parallelism: "fsdp" shards on 2+ workers (bliss_ray.train.fsdp)
    activation_checkpointing: str = "none"  # resources.activation_checkpointing (with its k)
    activation_checkpointing_k: int = 2


def _worker(loop_config: dict) -> None:
    spec: LMTrainSpec = loop_config["spec"]
    progress: StepReporter = loop_config["progress"]
    t = TrainConfig(**spec.train)
    set_worker_threads(spec.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokenizer = load_tokenizer(local_copy(spec.tokenizer_dir))
    tokens = TokenArray.open(local_copy(spec.data_dir)).tokens
    end_step = spec.start_step + t.steps
    peak = round_peak_lr(t.lr, t.lr_round_factor, spec.round_index)

    # resume > continue from the previous round > random init
    ckpt = ray.train.get_checkpoint()
    source = None
    if ckpt is not None:
        source = ckpt.to_directory(tempfile.mkdtemp(prefix="resume_"))
    elif spec.init_dir is not None:
        source = local_copy(spec.init_dir)
    dcp_dir = Path(source) / "dcp" if source is not None and (Path(source) / "dcp").is_dir() else None
    if dcp_dir is not None:  # a sharded mid-run checkpoint: weights and AdamW state come from its shards below
        model, state = build_lm(spec.arch, spec.seq_len, eos_token_id=tokenizer.eos_token_id), read_state(source)
    elif source is not None:
        model, state = load_train_state(source)
    else:
        model, state = build_lm(spec.arch, spec.seq_len, seed=spec.seed, eos_token_id=tokenizer.eos_token_id), {}
    resumed = ckpt is not None
    step = int(state.get("step", spec.start_step)) if resumed else spec.start_step
    phase = state.get("phase", "stable") if resumed else "stable"
    history = read_metrics(Path(source) / "metrics.jsonl") if resumed else []
    skipped = int(state.get("skipped", 0)) if resumed else 0
    # each attempt that resumes appends the step it restarts from, kept in every later checkpoint: the record that
    # a restarted worker group continued from its checkpoint instead of starting over (tests, post-mortems)
    resumed_from = [*state.get("resumed_from", []), step] if resumed else []
    # finished mid-round branch models (rank 0 keeps them; each checkpoint carries them all as branches/)
    branch_root = Path(tempfile.mkdtemp(prefix="branches_"))
    carried = Path(source) / "branches" if resumed else None
    if carried is not None and carried.is_dir():
        if rank == 0:
            shutil.copytree(carried, branch_root, dirs_exist_ok=True)
        done = {int(p.name) for p in carried.iterdir()}  # every rank reads the same checkpoint: the same branches
    else:
        done = set()
    pending = [s for s in branch_steps(spec.start_step, t.steps, t.eval_branches) if s not in done]

    set_activation_checkpointing(model, spec.activation_checkpointing, spec.activation_checkpointing_k)
    sharded = spec.parallelism == "fsdp" and world > 1
    precision = resolve(spec.precision, get_device().type)
    # FSDP: its mixed-precision policy casts the parameters, so the loop runs without autocast
    model = fsdp.shard(model, get_device(), precision) if sharded else prepare_model(model)  # (DDP when world > 1)
    optimizer = make_optimizer(model, peak, t.betas, t.weight_decay)
    if dcp_dir is not None:
        fsdp.load(model, optimizer, dcp_dir)
    elif "optimizer" in state and sharded:
        fsdp.load_full_optimizer_state(model, optimizer, state["optimizer"])
    elif "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    # fp16's loss scale (None otherwise) continues from the checkpoint or the previous round, as AdamW's state does
    scaler = grad_scaler("fp32" if sharded else precision, get_device())
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    scaler_state = (lambda: {"grad_scaler": scaler.state_dict()}) if scaler is not None else dict
    if resumed:
        shutil.rmtree(source)  # the local copy of the checkpoint (a 1B model's is ~12 GB with optimizer state)
    base = model  # what checkpoints read: the module itself, never its compiled wrapper
    if spec.compile:
        model = torch.compile(model)
    loop = LoopSettings(
        spec.stage,
        t.grad_clip,
        t.ckpt_every_steps,
        t.nonfinite_policy,
        t.max_skipped_steps,
        "fp32" if sharded else spec.precision,
    )

    def load(global_step: int) -> list[torch.Tensor]:
        local = global_step - spec.start_step  # this stage's data stream starts at 0
        return micro_batches(tokens, local, t.global_batch_seqs, t.micro_batch_seqs, rank, world, spec.seed)

    prefetch = Prefetcher(load, pin=torch.cuda.is_available())

    def batches_at(global_step: int) -> list[torch.Tensor]:
        _faults.at_step(spec.stage, global_step, rank)
        return prefetch(global_step)

    def log(m: dict) -> None:
        if rank == 0:
            history.append({"phase": phase, **m})
            # live, to the driver's console and TensorBoard. Not a mid-round branch's steps: the live consumers
            # take a stage's steps as one series that only grows (a step going back reads as a restart)
            if not phase.startswith("branch@"):
                progress({"phase": phase, **m})

    def save_stable(next_step: int, n_skipped: int) -> None:
        save(next_step, n_skipped, {"branches": branch_root} if t.eval_branches else None)

    def save(next_step: int, n_skipped: int, extra_dirs: dict | None = None) -> None:
        if sharded:
            return save_sharded(next_step, n_skipped)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_train_state(
                    d,
                    model,
                    optimizer,
                    next_step,
                    tokenizer=tokenizer,
                    metrics=history,
                    skipped=n_skipped,
                    phase=phase,
                    resumed_from=resumed_from,
                    **scaler_state(),
                )
                for name, src in (extra_dirs or {}).items():
                    shutil.copytree(src, Path(d) / name)
            # the step's own record: a mid-round branch taken at this step has logged after it
            last = next((m for m in reversed(history) if m["phase"] == phase), {})
            report({"step": next_step, "phase": phase, **last}, Path(d) if rank == 0 else None)

    def save_sharded(next_step: int, n_skipped: int) -> None:
        """Mid-run: every rank writes its DCP shards and reports its directory (Ray merges them into one
        checkpoint). At the stage's end: HF weights and the gathered AdamW state, as a plain run writes them."""
        fsdp.assert_finite_shards(base, f"checkpoint at step {next_step}")
        final = next_step == end_step
        with tempfile.TemporaryDirectory() as d:
            if final:
                optim = fsdp.gather_optimizer_state(base, optimizer)
                fsdp.export_hf(base, Path(d) / "model", tokenizer)
            else:
                fsdp.save(base, optimizer, Path(d) / "dcp")
            if rank == 0:
                extra = {"skipped": n_skipped, "phase": phase, "resumed_from": resumed_from}
                torch.save(
                    {"step": next_step, "rng": torch.get_rng_state(), **extra}
                    | ({"optimizer": optim} if final else {}),
                    Path(d) / STATE_FILE,
                )
                write_metrics(Path(d) / "metrics.jsonl", history)
            metrics = {"step": next_step, "phase": phase, **(history[-1] if history else {})}
            report(metrics, Path(d) if rank == 0 or not final else None)

    def decay(at: int) -> None:
        """``decay_steps`` steps of a decay branch from the stable state at global step ``at``, on the batches
        the stable run sees from ``at`` on (the Prefetcher serves a step requested out of order by loading it)."""
        branch_lr = wsd_lr(at - 1, peak, t.warmup_steps)
        train_lm(
            model,
            optimizer,
            start_step=at,
            end_step=at + t.decay_steps,
            lr_at=lambda s: decay_lr(s - at, branch_lr, t.decay_steps),
            batches_at=batches_at,
            cfg=dataclasses.replace(loop, ckpt_every_steps=1 << 30),
            log=log,
            save=lambda *a: None,
            loss_hook=_faults.nonfinite_hook(spec.stage),
            grad_scaler=branch_scaler(),
        )

    def branch_scaler():
        """A branch starts at the stable run's loss scale and leaves it untouched."""
        if scaler is None:
            return None
        copy = grad_scaler(precision, get_device())
        copy.load_state_dict(scaler.state_dict())
        return copy

    def log_stable(m: dict) -> None:
        nonlocal phase
        log(m)
        if m["step"] not in pending:
            return
        # train_lm logs a step after its update and before checkpointing it, so the checkpoint of a branch's step
        # carries that branch; and the stable run stays one train_lm call (fp16's loss scale carries on)
        with stable_state_kept(base, optimizer):
            phase = f"branch@{m['step']}"
            decay(m["step"])
            if rank == 0:
                save_lm(model, branch_root / str(m["step"]), tokenizer)
        phase = "stable"

    if phase == "stable" and step < end_step:
        skipped = train_lm(
            model,
            optimizer,
            start_step=step,
            end_step=end_step,
            lr_at=lambda s: wsd_lr(s, peak, t.warmup_steps),
            batches_at=batches_at,
            cfg=loop,
            log=log_stable,
            save=save_stable,
            skipped=skipped,
            loss_hook=_faults.nonfinite_hook(spec.stage),
            grad_scaler=scaler,
        )
    if t.decay_steps > 0:
        # decay branch for evaluation: the stable state stays the checkpoint's model/ (next round continues
        # from it); the decayed weights go to decay/. A failure here replays the branch from the stable end.
        # The stable state waits on local disk, not in host memory as a mid-round branch's does
        # (stable_state_kept): it is written out for the checkpoint anyway, and a paper-size target without
        # mid-round branches then needs no 12 B/param host copy.
        with tempfile.TemporaryDirectory() as keep:
            if sharded:  # collectives: every rank takes part, rank 0 writes
                stable_optimizer = fsdp.gather_optimizer_state(base, optimizer)
                fsdp.export_hf(base, Path(keep) / "stable_model", tokenizer)
            elif rank == 0:
                save_lm(model, Path(keep) / "stable_model", tokenizer)
                stable_optimizer = optimizer.state_dict()
            if rank == 0:
                torch.save(stable_optimizer, Path(keep) / "stable_optimizer.pt")
            phase = "decay"
            decay(end_step)
            with tempfile.TemporaryDirectory() as d:
                if sharded:
                    fsdp.export_hf(base, Path(d) / "decay", tokenizer)
                elif rank == 0:
                    save_lm(model, Path(d) / "decay", tokenizer)
                if rank == 0:
                    stable = torch.load(Path(keep) / "stable_optimizer.pt", weights_only=True)
                    shutil.copytree(Path(keep) / "stable_model", Path(d) / "model")
                    if t.eval_branches:
                        shutil.copytree(branch_root, Path(d) / "branches")
                    torch.save(
                        {
                            "optimizer": stable,
                            "step": end_step,
                            "rng": torch.get_rng_state(),
                            "skipped": skipped,
                            "phase": "done",
                            "resumed_from": resumed_from,
                            **scaler_state(),
                        },
                        Path(d) / "train_state.pt",
                    )
                    write_metrics(Path(d) / "metrics.jsonl", history)
                report({"step": end_step, "phase": "done"}, Path(d) if rank == 0 else None)
    shutil.rmtree(branch_root)


def run(spec: LMTrainSpec, out_dir: Path, res: ResourcesConfig, storage: str, workers: int) -> dict:
    """Run the stage on Ray Train and copy the final checkpoint to ``out_dir`` (state/, decay/, branches/,
    metrics.jsonl). Returns the final step, the Train run's path and the global steps of the branches."""
    if spec.train.get("eval_branches") and res.parallelism == "fsdp" and workers > 1:
        raise ValueError(  # the config refuses it too; this guards callers that build a spec themselves
            "pretrain.eval_branches needs a replicated model: not supported with resources.parallelism fsdp on "
            "2+ workers"
        )
    spec = dataclasses.replace(
        spec,
        threads=res.torch_threads,
        compile=res.compile,
        precision=res.precision,
        parallelism=res.parallelism,
        activation_checkpointing=res.activation_checkpointing,
        activation_checkpointing_k=res.activation_checkpointing_k,
    )
    name = out_dir.name
    total = spec.train["steps"] + spec.train["decay_steps"]
    fpt = 3 * forward_flops_per_token(spec.arch, spec.seq_len)  # the FLOPs ledger's training FLOPs per token
    progress = StepReporter(out_dir.name, spec.start_step, total, flops_per_token=fpt)
    config = run_config(name, storage, res)
    result = torch_trainer(_worker, {"spec": spec, "progress": progress}, res, workers, config).fit()
    gc_orphan_checkpoints(storage, name)
    tmp = out_dir / "_final"
    copy_checkpoint(result, tmp)
    state = out_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    for item in ("model", "train_state.pt"):
        shutil.move(str(tmp / item), str(state / item))
    for item in ("decay", "branches"):
        shutil.rmtree(out_dir / item, ignore_errors=True)  # a previous attempt's, never mixed with this one's
        if (tmp / item).exists():
            shutil.move(str(tmp / item), str(out_dir / item))
    shutil.move(str(tmp / "metrics.jsonl"), str(out_dir / "metrics.jsonl"))
    shutil.rmtree(tmp)
    branches = out_dir / "branches"
    steps = sorted(int(p.name) for p in branches.iterdir()) if branches.is_dir() else []
    return {"final_step": result.metrics.get("step"), "train_run": result.path, "branch_steps": steps}
