"""What each pipeline stage does: the glue between ``pipeline.plan`` and the stage modules.

Every function takes the ``Run`` (to find its inputs), the ``Stage`` and its own local output directory, does its
work and returns a small JSON-able dict of outputs. Ray starts lazily, once per process. What a stage computes
lives in the Ray-free layer (e.g. ``data/pool.py`` for selection); this module only finds inputs and maps config
to arguments. Workers on other nodes are given store locations (``Run.uri``), never a path on this node: they
read them through ``storage.local_copy`` and write them through ``bliss_ray.storage``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bliss_ray import storage
from bliss_ray.data.corpus import iter_texts, resolve_files
from bliss_ray.data.tokenizer import load_tokenizer, train_bpe
from bliss_ray.data.tokens import TokenArray
from bliss_ray.models.arch import arch_from_preset, padded_vocab
from bliss_ray.selection.pool import pool_rows, score_column, select_round
from bliss_ray.stages import _ray

log = logging.getLogger("bliss_ray")


def _pool_files(run) -> list[str]:
    """Locations of the packed pool's files in the store (read in place by Ray Data and the driver)."""
    return storage.listdir(run.uri("tokenize", "pool", "packed"), ".parquet")


def _shard(run, r: int) -> tuple[int, int] | None:
    s = run.exp.schedule
    return (r, s.rounds + 1) if s.pool_sharding == "disjoint" else None


def _vocab(run, which: str) -> int:
    m = getattr(run.exp.models, which)
    return m.vocab_size or padded_vocab(len(load_tokenizer(run.input("tokenizer", "tokenizer"))))


def tokenizer_stage(run, st, d: Path) -> dict:
    exp = run.exp
    if exp.tokenizer.kind == "pretrained":
        tok = load_tokenizer(exp.tokenizer.name_or_path)
    else:
        files = resolve_files(exp.data.pool)
        tok = train_bpe(
            iter_texts(files, exp.data.pool_format, exp.data, exp.tokenizer.train_max_chars), exp.tokenizer.vocab_size
        )
    tok.save_pretrained(str(d / "tokenizer"))
    return {"vocab_size": len(tok), "kind": exp.tokenizer.kind}


def tokenize_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages.tokenize import build_reference, tokenize_pool

    _ray.ensure_ray(run.exp.resources)
    pool = tokenize_pool(run.exp, run.uri("tokenizer", "tokenizer"), run.uri(st.key))
    return pool | build_reference(run.exp, run.input("tokenizer", "tokenizer"), d)


def _pool_rows(run, shard) -> tuple[np.ndarray, pd.Categorical]:
    """(row ids, domains) of the packed pool, restricted to a shard (see ``data.pool.pool_rows``)."""
    return pool_rows(_pool_files(run), shard)


def select_stage(run, st, d: Path) -> dict:
    exp, r = run.exp, st.round
    row_ids, domains = _pool_rows(run, _shard(run, r))
    method = "random" if r == 0 else exp.selection.method
    values = score_column(run.uri(f"r{r}.score", "scores"), row_ids) if method in ("bliss", "mates") else None
    rule = {"bliss": exp.selection.rule, "mates": "mates", "random": "random"}[method]
    tau = exp.mates.temperature if method == "mates" else exp.selection.temperature
    seed = exp.selection.seed + 1000 * r  # a different random draw each round
    chosen, m = select_round(row_ids, domains, values, rule, exp.selection.keep_frac, seed, tau, round=r)
    pq.write_table(pa.table({"row_id": pa.array(chosen, pa.int64())}), d / "selected.parquet")
    storage.write_json(d / "manifest.json", m)
    return {"selected": len(chosen), "pool_size": m["pool_size"], "method": rule}


def _selected_array(run, st, r: int, d: Path) -> str:
    """The round's selected rows as a token array, where the Train workers can read it: built here, and in the
    store under the stage's ``data/`` when the run is remote (the stage removes it when training ends)."""
    keep = pq.read_table(run.input(f"r{r}.select") / "selected.parquet").column("row_id").to_numpy()
    return _share_array(run, st, d, "data", keep)


def _share_array(run, st, d: Path, sub: str, keep: np.ndarray) -> str:
    TokenArray.build(_pool_files(run), d / sub, keep_ids=keep)
    if not run.remote:
        return str(d / sub)
    storage.upload(d / sub, run.uri(st.key, sub))
    shutil.rmtree(d / sub)
    return run.uri(st.key, sub)


def _train_spec(run, st, d: Path, which: str, data_dir: str, init_dir, start_step: int, round_index: int):
    from bliss_ray.stages.train_lm import LMTrainSpec

    exp = run.exp
    model = getattr(exp.models, "proxy" if which == "warmup" else "target")
    train = getattr(exp, which)
    return LMTrainSpec(
        stage=st.key,
        arch=arch_from_preset(model.arch, _vocab(run, "proxy" if which == "warmup" else "target")),
        seq_len=exp.data.seq_len,
        tokenizer_dir=run.uri("tokenizer", "tokenizer"),
        data_dir=data_dir,
        init_dir=init_dir,
        start_step=start_step,
        train=train.model_dump(),
        round_index=round_index,
        seed=exp.seed,
        threads=1,
    )


def warmup_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages import train_lm

    _ray.ensure_ray(run.exp.resources)
    data = _selected_array(run, st, 0, d)
    spec = _train_spec(run, st, d, "warmup", data, None, 0, 0)
    spec.train |= {"decay_steps": 0, "eval_branches": 0}  # the proxy keeps its un-decayed state, and no branches
    res = run.exp.resources
    out = train_lm.run(spec, d, res, _ray.storage_path(res, run.store), res.train_workers)
    storage.remove(data)
    return out


def pretrain_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages import train_lm

    exp, r = run.exp, st.round
    _ray.ensure_ray(exp.resources)
    data = _selected_array(run, st, r, d)
    init = run.uri(f"r{r - 1}.pretrain", "state") if r > 0 else None
    spec = _train_spec(run, st, d, "pretrain", data, init, r * exp.pretrain.steps, r)
    extra = exp.schedule.final_extra_steps if r == exp.schedule.rounds else 0
    spec.train["steps"] += extra
    out = train_lm.run(
        spec, d, exp.resources, _ray.storage_path(exp.resources, run.store), exp.resources.train_workers
    )
    storage.remove(data)
    return out | {
        "end_step": (r + 1) * exp.pretrain.steps + extra,
        "tokens_per_step": exp.pretrain.global_batch_seqs * exp.data.seq_len,
    }


def bilevel_stage(run, st, d: Path, launch=None) -> dict:
    """``launch`` (default ``stages.bilevel.run``) fits the TorchTrainer; a sweep passes one that names the Train
    run after its trial and forwards its reports to Tune."""
    from bliss_ray.bilevel.loop import BilevelSettings
    from bliss_ray.stages import bilevel

    exp, r, b = run.exp, st.round, run.exp.bilevel
    res = exp.resources
    _ray.ensure_ray(res)
    # only the rows the loop will visit: T·K(+1)·B_global, a seeded sample of the round's shard
    per_step = b.inner_steps + (0 if b.reuse_inner_batch else 1)
    need = b.outer_steps * per_step * b.micro_batch_seqs * res.bilevel_workers
    shard_ids, _ = _pool_rows(run, _shard(run, r))
    keep = np.random.default_rng([exp.seed, r]).choice(shard_ids, min(need, len(shard_ids)), replace=False)
    train_dir = _share_array(run, st, d, "train_data", keep)
    settings = {k: v for k, v in b.model_dump().items() if k in BilevelSettings.__dataclass_fields__}
    inherit = b.score_carry == "inherit" and r > 1
    spec = bilevel.BilevelSpec(
        stage=st.key,
        settings=settings,
        proxy_dir=run.uri("warmup", "state", "model"),
        target_dir=run.uri(f"r{r - 1}.pretrain", "state", "model") if b.gamma > 0 else None,
        score_dir=run.uri(f"r{r - 1}.bilevel", "score_model") if inherit else None,
        score_init=b.score_init,
        use_sigmoid=b.use_sigmoid,
        train_dir=train_dir,
        reference_dir=run.uri("tokenize", "reference", "array"),
        seed=exp.seed,
        threads=1,
        ckpt_every_steps=b.ckpt_every_steps,
    )
    out = (launch or bilevel.run)(spec, d, res, _ray.storage_path(res, run.store), res.bilevel_workers)
    storage.remove(train_dir)
    return out | {"train_rows": len(keep)}


def score_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages.score import score_pool

    _ray.ensure_ray(run.exp.resources)
    r = st.round
    if run.exp.selection.method == "mates":
        model_dir, kind = run.uri(f"r{r}.influence", "influence_model"), "mates"
    else:
        model_dir, kind = run.uri(f"r{r}.bilevel", "score_model"), "bliss"
    return score_pool(run.exp, model_dir, _pool_files(run), _shard(run, r), run.uri(st.key), kind, work_dir=d)


def evaluate_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages.evaluate import evaluate_checkpoints

    _ray.ensure_ray(run.exp.resources)
    return evaluate_checkpoints(run, st, d)


def report_stage(run, st, d: Path) -> dict:
    from bliss_ray.report.build import build_report

    path = build_report([run.store], d)
    return {"report": storage.join(run.uri(st.key), path.name)}


def probe_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages.mates import probe_stage as probe

    _ray.ensure_ray(run.exp.resources)
    return probe(run, st, d)


def influence_stage(run, st, d: Path) -> dict:
    from bliss_ray.stages.mates import influence_stage as influence

    _ray.ensure_ray(run.exp.resources)
    return influence(run, st, d)


RUNNERS = {
    "tokenizer": tokenizer_stage,
    "tokenize": tokenize_stage,
    "select": select_stage,
    "warmup": warmup_stage,
    "pretrain": pretrain_stage,
    "bilevel": bilevel_stage,
    "score": score_stage,
    "evaluate": evaluate_stage,
    "report": report_stage,
    "probe": probe_stage,
    "influence": influence_stage,
}


def run_stage(run, st, d: Path, runners: dict = RUNNERS) -> dict:
    """Run one stage with its kind's function from ``runners`` (a sweep passes a table with its own bilevel)."""
    (d / "experiment.json").write_text(json.dumps(run.exp.model_dump(mode="json"), indent=2))
    return runners[st.kind](run, st, d)
