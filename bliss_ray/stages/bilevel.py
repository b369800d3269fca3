"""Stage r.bilevel: train the score model by bilevel optimisation, on Ray Train.

What it computes: docs/method.md, "The bilevel problem" and "The hypergradient".

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

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from ray.train.torch import get_device

from bliss_ray.bilevel.checkpoint import STATE, load_bilevel, save_bilevel
from bliss_ray.bilevel.loop import BilevelState, run_bilevel
from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.config import ResourcesConfig
from bliss_ray.data.tokens import TokenArray, rank_rows
from bliss_ray.models.lm import load_lm
from bliss_ray.models.score import ScoreModel
from bliss_ray.stages import _faults
from bliss_ray.stages._ray import final_checkpoint, fit, report, resumed_checkpoint, run_config, start_worker
from bliss_ray.storage import copy_tree, local_copy
from bliss_ray.watch.progress import StepReporter


@dataclass(frozen=True)
class BilevelSpec:
    stage: str
    settings: BilevelSettings
    proxy_dir: str  # warmed-up proxy (HF dir); every *_dir is a location, read through storage.local_copy
    target_dir: str | None  # target checkpoint for the KL term (None when γ = 0)
    score_dir: str | None  # previous round's score model to inherit, or None
    train_dir: str  # TokenArray of the round's pool shard
    reference_dir: str  # TokenArray of the reference set
    seed: int
    resources: ResourcesConfig


def _start_state(spec: BilevelSpec, device: torch.device) -> tuple[BilevelState, list[int]]:
    """An earlier attempt's checkpoint, else the warmed-up proxy and the score model the settings start from."""
    s = spec.settings
    target = load_lm(local_copy(spec.target_dir)).to(device) if s.uses_kl else None
    with resumed_checkpoint() as resume:
        if resume is not None:
            return load_bilevel(resume, s, target, device)
    proxy = load_lm(local_copy(spec.proxy_dir))
    if spec.score_dir:
        score = ScoreModel.load(local_copy(spec.score_dir))  # inherit the previous round's score model
    else:
        score = ScoreModel.from_proxy(proxy, s.use_sigmoid, copy_trunk=s.score_init == "proxy_warmup", seed=spec.seed)
    return BilevelState.create(proxy.to(device).train(), score.to(device).train(), target, s), []


def _worker(loop_config: dict) -> None:
    spec: BilevelSpec = loop_config["spec"]
    s, device = spec.settings, get_device()
    rank, world = start_worker(spec.resources.torch_threads)
    train = TokenArray.open_for(spec.train_dir, s.outer_steps * s.micro_batches_per_step * s.micro_batch_seqs)
    reference = TokenArray.open(local_copy(spec.reference_dir))  # read again every outer step: a node copy
    state, resumed_from = _start_state(spec, device)

    def train_batch_at(i: int) -> torch.Tensor:
        _faults.at_step(spec.stage, i, rank)
        return rank_rows(train, i, s.micro_batch_seqs, rank, world, spec.seed)[0].to(device)

    def ref_batch_at(t: int):
        ids, mask = rank_rows(reference, t, s.reference_batch_seqs, rank, world, spec.seed + 1)
        return ids.to(device), None if mask is None else mask.to(device)

    def save(st: BilevelState) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_bilevel(st, Path(d), resumed_from)
            report({"step": st.step, **st.metrics[-1]}, Path(d) if rank == 0 else None)

    progress: StepReporter = loop_config["progress"]
    # training tokens one outer step consumes (global): tokens/s in the live progress view
    step_tokens = s.micro_batch_seqs * world * s.micro_batches_per_step * train.tokens.shape[1]

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
        ckpt_every_steps=s.ckpt_every_steps,
    )


def fit_bilevel(
    spec: BilevelSpec,
    out_dir: Path,
    storage: str,
    workers: int,
    name: str | None = None,
    callbacks=None,
    dest: str | None = None,
) -> dict:
    """Fit the stage's TorchTrainer and copy its final checkpoint's models and metrics to the stage's location
    ``dest`` (default ``out_dir``; a store URI for a remote run), store-to-store. ``name`` (default: the stage
    directory's) is the Train run to resume; ``callbacks`` (Ray Train ``UserCallback``s) see every report, e.g. a
    sweep forwarding rank-0 metrics to Tune."""
    res = spec.resources
    config = run_config(name or out_dir.name, storage, res, callbacks=callbacks)
    progress = StepReporter(out_dir.name, 0, spec.settings.outer_steps)
    result = fit(_worker, {"spec": spec, "progress": progress}, res, workers, config, "bilevel")
    # optimizer state is only needed to resume; the outputs are the models
    copy_tree(final_checkpoint(result, storage, config.name), dest or str(out_dir), keep=lambda rel: rel != STATE)
    return {"final_step": result.metrics.get("step"), "train_run": result.path}
