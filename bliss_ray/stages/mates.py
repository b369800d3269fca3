"""Stages r.probe and r.influence of ``selection.method: mates``, on Ray (docs/method.md, "MATES").

r.probe — oracle probing on a Ray actor pool.
  Inputs: the target's full training state at the end of round r−1 (``r{r-1}.pretrain/state``), the first
  ``mates.reference_seqs`` rows of the reference set, and ``mates.probes`` candidates: a seeded sample of round
  r's pool shard. (MATES probes a separate hold-out, C4 files 800–899, never selected from. Our pool has no such
  files: the round's own shard is the closest stand-in — the same distribution the influence model then scores.
  Probing never trains the target, so a probed row stays an ordinary candidate of the selection.)
  Each actor loads the checkpoint once (``bliss_ray.mates.probe.Prober``) and probes chunks of candidates,
  restoring the state in memory between probes; chunks are handed out dynamically (``ActorPool``). Actors take
  ``resources.data_actor_cpus`` CPUs (+1 GPU when the cluster has them), at most ``resources.data_actors[1]``
  of them, 1 torch thread each on CPU. Every finished chunk is written at once, so an interrupted stage resumes
  with the chunks still missing.
  The probe LR is ``mates.probe_lr`` or the LR the target's schedule gives the step after the checkpoint (the
  step the probe stands in for: WSD at global step r·steps with round r's peak).
  Outputs: ``probes.parquet`` {row_id, loss} (loss = reference loss after the probe step) and
  {probes, baseline_loss, lr, seconds, probes_per_s, reference_batches, …}; ``reference_batches`` (rows, tokens)
  is what one reference evaluation computed, which ``bliss-ray report``'s FLOPs ledger counts.

r.influence — the data influence model, trained on Ray Train (one TorchTrainer worker: the model is small next to
  probing; ``resources.cpus_per_worker`` CPUs, or a GPU) by ``bliss_ray.mates.influence.train_influence_model``.
  Inputs: the probes, with their token rows re-read from the packed pool by row id. Outputs:
  ``influence_model/`` (safetensors + json, what ``Scorer(kind="mates")`` loads), ``metrics.jsonl`` (per epoch:
  train/held-out MSE, held-out Spearman) and {spearman_heldout, best_epoch, …}. A restarted worker retrains from
  scratch (minutes at most); once the final checkpoint is registered a restart only re-reports it.

    bliss-ray run experiments/mates_demo.yaml --stage r1.influence
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train.torch import get_device
from ray.util import ActorPool

from bliss_ray import storage
from bliss_ray.data.tokens import TokenArray
from bliss_ray.mates.influence import train_influence_model
from bliss_ray.mates.probe import Prober
from bliss_ray.models.arch import influence_arch
from bliss_ray.stages._data_tasks import RowIds
from bliss_ray.stages._ray import (
    cluster_ceiling,
    ensure_ray,
    final_checkpoint,
    fit,
    report,
    run_config,
    start_worker,
    storage_path,
    task_options,
)
from bliss_ray.stages.inputs import shard_sample, shared_rows, vocab_size
from bliss_ray.storage import local_copy
from bliss_ray.train.checkpoint import write_metrics
from bliss_ray.train.host_memory import retain_freed_memory
from bliss_ray.train.schedule import round_peak_lr, wsd_lr

PROBES_PER_CHUNK = 16  # unit of work and of resume; fixed so that a rerun with other resources reuses chunks
REF_BATCH = 32  # MATES evaluates LAMBADA in batches of 32 (the loss does not depend on it)


@ray.remote
class _ProbeActor:
    """Holds one ``Prober``: the checkpoint is read from disk once, in the constructor."""

    def __init__(self, state_dir: str, cand_dir: str, ref_ids: np.ndarray, ref_mask, lr: float, grad_clip: float):
        torch.set_num_threads(1)  # one core per actor: the pool, not the actor, is the parallelism
        device = "cuda" if torch.cuda.is_available() else "cpu"
        retain_freed_memory(torch.device(device))
        self.tokens = TokenArray.open(local_copy(cand_dir)).tokens  # (N, L) memmap of the candidates
        self.prober = Prober(
            local_copy(state_dir),
            ref_ids,
            ref_mask,
            lr,
            grad_clip=grad_clip,
            device=device,
            reference_batch_seqs=REF_BATCH,
        )

    def info(self) -> dict:
        p = self.prober
        return {
            "baseline_loss": p.baseline_loss,
            "step": p.step,
            "reference_tokens": p.reference_tokens,
            "reference_batches": p.reference_batches,
        }

    def probe(self, chunk: int) -> tuple[int, np.ndarray]:
        rows = self.tokens[chunk * PROBES_PER_CHUNK : (chunk + 1) * PROBES_PER_CHUNK]  # (≤16, L)
        return chunk, self.prober.probe(rows)


def _capacity(per_actor: dict) -> int:
    """How many actors of this size the cluster can hold at once (on an autoscaling cluster: at its ceiling): asking
    for more would leave some pending forever with chunks queued on them."""
    ceiling = cluster_ceiling()
    total = ray.cluster_resources() if ceiling is None else ceiling
    return int(min(1 << 30 if total.get(k, 0) < 0 else total.get(k, 0) // v for k, v in per_actor.items()))


def probe_lr(run, r: int, step: int) -> float:
    """``mates.probe_lr``, else the target's WSD LR of global step ``step`` with round r's peak."""
    exp = run.exp
    if exp.mates.probe_lr is not None:
        return exp.mates.probe_lr
    p = exp.pretrain
    return wsd_lr(step, round_peak_lr(p.lr, p.lr_round_factor, r), p.warmup_steps)


def _chunk_row_ids(cand: np.ndarray, c: int) -> np.ndarray:
    """The row ids of the candidates in probe chunk ``c``."""
    return cand[c * PROBES_PER_CHUNK : (c + 1) * PROBES_PER_CHUNK]


def _sample_candidates(run, st, d: Path) -> str:
    """A seeded sample of ``mates.probes`` rows of the round's pool shard, written as a shared TokenArray."""
    rows = shard_sample(run, st.round, run.exp.mates.probes, run.exp.seed, st.round, 2)
    return shared_rows(run, st, d, "candidates", rows)[0]  # rows in pool order


def _reference_rows(run) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(ids (R, L), loss mask or None, R): the first ``mates.reference_seqs`` rows of the reference set."""
    ref = TokenArray.open(run.input("tokenize", "reference", "array"))
    n_ref = min(run.exp.mates.reference_seqs, len(ref))
    ref_ids = np.array(ref.tokens[:n_ref])  # (R, L)
    ref_mask = None if ref.loss_mask is None else np.array(ref.loss_mask[:n_ref])
    return ref_ids, ref_mask, n_ref


def _start_probe_actors(res, n_todo: int, *actor_args) -> list:
    """As many probe actors as the chunks, ``resources.data_actors[1]`` and the cluster allow (at least one)."""
    options = task_options(res, "probe", res.data_actor_cpus)
    per_actor = {"CPU": options["num_cpus"]} | ({"GPU": 1} if options["num_gpus"] else {})
    n_actors = max(1, min(res.data_actors[1], n_todo, _capacity(per_actor)))
    return [
        _ProbeActor.options(
            **options,
            max_restarts=res.max_failures,
            max_task_retries=res.max_failures,  # a probe chunk is idempotent: retrying it is always safe
        ).remote(*actor_args)
        for _ in range(n_actors)
    ]


def _probe_chunks(actors: list, todo: list[int], cand: np.ndarray, chunks: str) -> tuple[dict, float]:
    """Probe the chunks in ``todo`` on the actor pool, writing each chunk's file to the store (``chunks``, a
    location: a fresh head resumes with the chunks still missing) as soon as it is done; the actors are killed at
    the end. Returns (the first actor's ``info``, seconds spent probing)."""
    try:
        info = ray.get(actors[0].info.remote())
        t0 = time.perf_counter()
        for c, losses in ActorPool(actors).map_unordered(lambda actor, c: actor.probe.remote(c), todo):
            ids = _chunk_row_ids(cand, c)
            table = pa.table({"row_id": pa.array(ids, pa.int64()), "loss": pa.array(losses)})
            # one atomic write: a chunk is done only once its file is complete
            storage.write_table(storage.join(chunks, f"{c:06d}.parquet"), table)
        seconds = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)
    return info, seconds


def _gather_probes(chunks: str, n_cand: int, d: Path) -> pa.Table:
    """Merge the chunk files into ``probes.parquet`` (sorted by row id), checking every candidate has a result."""
    parts = [pq.read_table(pa.BufferReader(storage.read_bytes(c))) for c in storage.listdir(chunks, ".parquet")]
    table = pa.concat_tables(parts).sort_by("row_id")
    if len(table) != n_cand:
        raise AssertionError(f"probing: {n_cand} candidates but {len(table)} probe results")
    pq.write_table(table, d / "probes.parquet")
    storage.remove(chunks)
    return table


def probe_stage(run, st, d: Path) -> dict:
    exp, r, res = run.exp, st.round, run.exp.resources
    ensure_ray(res)
    state_dir = run.uri(f"r{r - 1}.pretrain", "state")
    step = int(run.outputs(f"r{r - 1}.pretrain")["end_step"])  # its state/ is at that step, and continues from it
    lr = probe_lr(run, r, step)
    cand_dir = _sample_candidates(run, st, d)
    # the candidates' row ids in the array's order: the driver reads its ids, never its tokens or the target's state
    cand = np.load(io.BytesIO(storage.read_bytes(storage.join(cand_dir, "row_ids.npy"))))
    ref_ids, ref_mask, n_ref = _reference_rows(run)

    chunks = run.uri(st.key, "_chunks")
    done = {storage.name(c) for c in storage.listdir(chunks, ".parquet")}
    todo = [c for c in range(math.ceil(len(cand) / PROBES_PER_CHUNK)) if f"{c:06d}.parquet" not in done]
    actors = _start_probe_actors(res, len(todo), state_dir, cand_dir, ref_ids, ref_mask, lr, exp.pretrain.grad_clip)
    info, seconds = _probe_chunks(actors, todo, cand, chunks)

    table = _gather_probes(chunks, len(cand), d)
    storage.remove(cand_dir)
    loss = table.column("loss").to_numpy()
    finite = np.isfinite(loss)
    probed = sum(len(_chunk_row_ids(cand, c)) for c in todo)
    return {
        "probes": len(table),
        "probes_finite": int(finite.sum()),
        "baseline_loss": info["baseline_loss"],
        "loss_mean": float(loss[finite].mean()) if finite.any() else None,
        "loss_std": float(loss[finite].std()) if finite.any() else None,
        "lr": lr,
        "target_step": step,
        "reference_seqs": n_ref,
        "reference_tokens": info["reference_tokens"],
        # [rows, tokens] per batch, the FLOPs ledger's input; lists, so the result equals its outputs.json
        "reference_batches": [list(b) for b in info["reference_batches"]],
        "candidates_from": f"round {r} pool shard (seeded sample)",
        "actors": len(actors),
        "probe_seconds": seconds,  # probing proper, after the first actor loaded the checkpoint
        "probes_per_s": probed / seconds if probed and seconds > 0 else None,
    }


@dataclass
class InfluenceSpec:
    """Everything the Train worker needs (plain, picklable)."""

    stage: str
    data_dir: str  # TokenArray of the probed rows
    probes_path: str  # probes.parquet {row_id, loss}
    arch: str
    vocab_size: int
    lr: float
    epochs: int
    batch_seqs: int
    weight_decay: float
    heldout_frac: float
    pretrained_dir: str | None
    seed: int
    threads: int | None  # torch threads per worker; None: the node's cores ÷ its workers (set in the worker)


def _influence_worker(loop_config: dict) -> None:
    spec: InfluenceSpec = loop_config["spec"]
    start_worker(spec.threads)
    if ray.train.get_checkpoint() is not None:  # the final checkpoint is registered: nothing left to do
        report({"resumed": 1}, None)
        return
    arr = TokenArray.open(local_copy(spec.data_dir))
    fs, probes_path = storage.resolve(spec.probes_path)
    probes = pq.read_table(probes_path, filesystem=fs)
    by_id = dict(zip(probes.column("row_id").to_numpy().tolist(), probes.column("loss").to_numpy(), strict=True))
    losses = np.array([by_id[int(i)] for i in arr.row_ids])  # (N,) aligned with the array's rows
    history = []

    def on_epoch(entry: dict) -> None:
        history.append(entry)
        report(entry, None)

    t0 = time.perf_counter()
    fit = train_influence_model(
        arr.tokens,
        losses,
        arch=influence_arch(spec.arch, spec.vocab_size),
        lr=spec.lr,
        epochs=spec.epochs,
        batch_seqs=spec.batch_seqs,
        weight_decay=spec.weight_decay,
        heldout_frac=spec.heldout_frac,
        seed=spec.seed,
        device=get_device(),
        pretrained_dir=local_copy(spec.pretrained_dir) if spec.pretrained_dir else None,  # any node, any store
        on_epoch=on_epoch,
    )
    summary = {
        "spearman_heldout": fit.spearman_heldout,
        "best_epoch": fit.best_epoch,
        "train_rows": fit.train_rows,
        "heldout_rows": fit.heldout_rows,
        "target_mean": fit.target_mean,
        "target_std": fit.target_std,
        "pretrained_tensors": fit.pretrained.get("loaded", 0),
        "fit_seconds": time.perf_counter() - t0,  # training proper, without the worker group's start
    }
    with tempfile.TemporaryDirectory() as tmp:
        fit.model.save(Path(tmp) / "influence_model")
        write_metrics(Path(tmp) / "metrics.jsonl", history)
        storage.write_json(Path(tmp) / "summary.json", summary)
        report({"final": 1, **summary}, Path(tmp))


def influence_stage(run, st, d: Path) -> dict:
    exp, r, m, res = run.exp, st.round, run.exp.mates, run.exp.resources
    ensure_ray(res)
    probes_path = run.uri(f"r{r}.probe", "probes.parquet")
    probes = storage.read_table(probes_path)  # not the probe stage's whole directory
    loss = probes.column("loss").to_numpy()
    row_ids = probes.column("row_id").to_numpy()[np.isfinite(loss)]  # a non-finite probe has no target
    data_dir, _ = shared_rows(run, st, d, "train_data", RowIds(row_ids))
    spec = InfluenceSpec(
        stage=st.key,
        data_dir=data_dir,
        probes_path=probes_path,
        arch=m.influence_arch,
        vocab_size=vocab_size(run, "target"),
        lr=m.influence_lr,
        epochs=m.influence_epochs,
        batch_seqs=m.influence_batch_seqs,
        weight_decay=m.influence_weight_decay,
        heldout_frac=m.influence_heldout_frac,
        pretrained_dir=m.pretrained_bert,
        seed=exp.seed,
        threads=res.torch_threads,
    )
    train_storage = storage_path(res, run.store)
    t0 = time.perf_counter()
    result = fit(_influence_worker, {"spec": spec}, res, 1, run_config(d.name, train_storage, res), "influence")
    storage.copy_tree(final_checkpoint(result, train_storage, d.name), run.uri(st.key))  # store-to-store
    storage.remove(data_dir)
    summary = storage.read_json(run.uri(st.key, "summary.json"))
    return summary | {"probes_used": len(row_ids), "train_seconds": time.perf_counter() - t0, "train_run": result.path}
