"""Stage r.bilevel: train the score model by bilevel optimisation, on Ray Train (method.md §2.2).

Inputs: the warmed-up proxy (reset to it every round), the target's un-decayed checkpoint at the end of round
r−1 (only when γ > 0: the KL term), the previous round's score model (``score_carry: inherit``), the round's pool
shard and the reference set. Outputs: ``score_model/`` (safetensors + trunk config), ``proxy/`` and
``metrics.jsonl`` (the per-step series of the rebuttal's Figures 1–2).

Every worker holds proxy, score model and target. The global batch is ``micro_batch_seqs`` × workers; weights
are normalised over it with an all-gather of the scores; all other reductions are explicit all-reduces in
``bliss_ray.bilevel`` (no DDP: its reducer does not see ``autograd.grad`` and double backward through it is
fragile), so 1 worker × 8 sequences computes what 2 workers × 4 do.

    bliss-ray run experiments/demo.yaml --stage r1.bilevel
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train.torch import get_device

from bliss_ray.bilevel.loop import BilevelSettings, BilevelState, run_bilevel
from bliss_ray.bilevel.weights import Normaliser
from bliss_ray.config import ResourcesConfig
from bliss_ray.data.tokens import TokenArray, rank_rows
from bliss_ray.models.lm import load_lm, save_lm
from bliss_ray.models.score import ScoreModel
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
from bliss_ray.train.checkpoint import assert_finite, read_metrics, write_metrics
from bliss_ray.watch.progress import StepReporter

STATE = "bilevel_state.pt"


@dataclass
class BilevelSpec:
    stage: str
    settings: dict  # BilevelSettings fields
    proxy_dir: str  # warmed-up proxy (HF dir); every *_dir is a location, read through storage.local_copy
    target_dir: str | None  # target checkpoint for the KL term (None when γ = 0)
    score_dir: str | None  # previous round's score model to inherit, or None
    score_init: str  # "proxy_warmup" | "random"
    use_sigmoid: bool
    train_dir: str  # TokenArray of the round's pool shard
    reference_dir: str  # TokenArray of the reference set
    seed: int
    threads: int | None  # torch threads per worker; None: the node's cores ÷ its workers (set in the worker)
    ckpt_every_steps: int


def _save(state: BilevelState, d: Path, resumed_from: list[int]) -> None:
    assert_finite(state.proxy, f"bilevel checkpoint at step {state.step}")
    assert_finite(state.score_model, f"bilevel checkpoint at step {state.step}")
    save_lm(state.proxy, d / "proxy")
    state.score_model.save(d / "score_model")
    norm = state.normaliser
    torch.save(
        {
            "step": state.step,
            "proxy_opt": state.proxy_opt.state_dict(),
            "score_opt": state.score_opt.state_dict(),
            "proxy_sched": state.proxy_sched.state_dict(),
            "score_sched": state.score_sched.state_dict(),
            "normaliser": None if norm is None else [norm.max, norm.denom],
            "resumed_from": resumed_from,
        },
        d / STATE,
    )
    write_metrics(d / "metrics.jsonl", state.metrics)


def _worker(loop_config: dict) -> None:
    spec: BilevelSpec = loop_config["spec"]
    s = BilevelSettings(**spec.settings)
    set_worker_threads(spec.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    train = TokenArray.open(local_copy(spec.train_dir))
    reference = TokenArray.open(local_copy(spec.reference_dir))

    ckpt = ray.train.get_checkpoint()
    resume = Path(ckpt.to_directory(tempfile.mkdtemp(prefix="resume_"))) if ckpt is not None else None
    proxy = load_lm(resume / "proxy" if resume else local_copy(spec.proxy_dir))
    if resume:
        score = ScoreModel.load(resume / "score_model")
    elif spec.score_dir:
        score = ScoreModel.load(local_copy(spec.score_dir))  # inherit the previous round's score model
    else:
        score = ScoreModel.from_proxy(
            proxy, spec.use_sigmoid, copy_trunk=spec.score_init == "proxy_warmup", seed=spec.seed
        )
    target = load_lm(local_copy(spec.target_dir)) if spec.target_dir and s.gamma > 0 else None
    proxy.to(device).train()
    score.to(device).train()
    if target is not None:
        target.to(device)
    state = BilevelState.create(proxy, score, target, s)
    resumed_from: list[int] = []  # the outer step each resuming attempt restarts from (the record that it resumed)
    if resume:
        saved = torch.load(resume / STATE, map_location="cpu", weights_only=True)
        state.step = int(saved["step"])
        state.proxy_opt.load_state_dict(saved["proxy_opt"])
        state.score_opt.load_state_dict(saved["score_opt"])
        state.proxy_sched.load_state_dict(saved["proxy_sched"])
        state.score_sched.load_state_dict(saved["score_sched"])
        state.normaliser = Normaliser(*saved["normaliser"]) if saved["normaliser"] else None
        state.metrics = read_metrics(resume / "metrics.jsonl")
        resumed_from = [*saved.get("resumed_from", []), state.step]
        shutil.rmtree(resume)  # the local copy of the checkpoint, all loaded now

    def train_batch_at(i: int) -> torch.Tensor:
        _faults.at_step(spec.stage, i, rank)
        return rank_rows(train, i, s.micro_batch_seqs, rank, world, spec.seed)[0].to(device)

    def ref_batch_at(t: int):
        ids, mask = rank_rows(reference, t, s.reference_batch_seqs, rank, world, spec.seed + 1)
        return ids.to(device), None if mask is None else mask.to(device)

    def save(st: BilevelState) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                _save(st, Path(d), resumed_from)
            report({"step": st.step, **st.metrics[-1]}, Path(d) if rank == 0 else None)

    progress: StepReporter = loop_config["progress"]
    # training tokens one outer step consumes (global): tokens/s in the live progress view
    rows_per_step = s.micro_batch_seqs * world * (s.inner_steps + (0 if s.reuse_inner_batch else 1))
    step_tokens = rows_per_step * train.tokens.shape[1]

    def log(m: dict) -> None:
        if rank == 0:
            progress({**m, "tokens_per_s": step_tokens / m["outer_step_s"]})

    run_bilevel(
        state,
        s,
        train_batch_at,
        ref_batch_at,
        end_step=s.outer_steps,
        log=log,
        save=save,
        ckpt_every_steps=spec.ckpt_every_steps,
    )


def run(
    spec: BilevelSpec,
    out_dir: Path,
    res: ResourcesConfig,
    storage: str,
    workers: int,
    name: str | None = None,
    callbacks: list | None = None,
) -> dict:
    """Fit the stage's TorchTrainer. ``name`` (default: the stage directory's) is the Train run to resume;
    ``callbacks`` (Ray Train ``UserCallback``s) see every report, e.g. a sweep forwarding rank-0 metrics to Tune."""
    spec = dataclasses.replace(spec, threads=res.torch_threads)
    name = name or out_dir.name
    config = dataclasses.replace(run_config(name, storage, res), callbacks=callbacks or [])
    progress = StepReporter(out_dir.name, 0, spec.settings["outer_steps"])
    result = torch_trainer(_worker, {"spec": spec, "progress": progress}, res, workers, config).fit()
    gc_orphan_checkpoints(storage, name)
    copy_checkpoint(result, out_dir)
    (out_dir / STATE).unlink()  # optimizer state is only needed to resume; the outputs are the models
    return {"final_step": result.metrics.get("step"), "train_run": result.path}
