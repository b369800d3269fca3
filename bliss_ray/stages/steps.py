"""What each pipeline stage does: one function per stage kind, from ``pipeline.Stage`` to the module that runs it.

Every function takes the ``Run`` (to find its inputs), the ``Stage`` and its own local output directory, does its
work and returns a small JSON-able dict of outputs. Ray starts lazily, once per process. What a stage computes
lives in the Ray-free layer (e.g. ``selection/pool.py`` for selection); this module only finds inputs
(``stages.inputs``) and maps config to arguments.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bliss_ray import storage
from bliss_ray.data.corpus import iter_texts, resolve_files
from bliss_ray.data.tokenizer import load_tokenizer, train_bpe
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.pipeline import Run, Stage
from bliss_ray.report.build import build_report
from bliss_ray.stages import _ray, bilevel, evaluate, mates, score, tokenize, train_lm
from bliss_ray.stages._data_tasks import SelectedRows, select_rows
from bliss_ray.stages.inputs import on_worker, pool_files, round_shard, shard_sample, shared_rows, vocab_size
from bliss_ray.train.settings import TrainSettings


def tokenizer_stage(run: Run, st: Stage, d: Path) -> dict:
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


def tokenize_stage(run: Run, st: Stage, d: Path) -> dict:
    _ray.ensure_ray(run.exp.resources)
    pool = tokenize.tokenize_pool(run.exp, run.uri("tokenizer", "tokenizer"), run.uri(st.key))
    canaries = tokenize.add_canaries(run.exp, run.input("tokenizer", "tokenizer"), run.uri(st.key))
    return pool | canaries | tokenize.build_reference(run.exp, run.input("tokenizer", "tokenizer"), d)


def select_stage(run: Run, st: Stage, d: Path) -> dict:
    exp, r = run.exp, st.round
    method = "random" if r == 0 else exp.selection.method
    score_dir = run.uri(f"r{r}.score", "scores") if method in ("bliss", "mates") else None
    rule = {
        "rule": {"bliss": exp.selection.rule, "mates": "mates", "random": "random"}[method],
        "keep_frac": exp.selection.keep_frac,
        "seed": exp.selection.seed + 1000 * r,  # a different random draw each round
        "temperature": exp.mates.temperature if method == "mates" else exp.selection.temperature,
        "round": r,
    }
    if run.remote:
        _ray.ensure_ray(exp.resources)
    dest = run.uri(st.key, "selected.parquet") if run.remote else str(d / "selected.parquet")
    m = on_worker(run, st, select_rows, pool_files(run), round_shard(run, r), score_dir, dest, **rule)
    storage.write_json(d / "manifest.json", m)
    out = {"selected": m["selected"], "pool_size": m["pool_size"], "method": rule["rule"]}
    return out | ({"canaries": m["canaries"]} if "canaries" in m else {})  # for the comparison report


def _lm_spec(run: Run, st: Stage, d: Path, which: str, train: TrainSettings) -> train_lm.LMTrainSpec:
    """The Train spec of a warm-up (the proxy) or a round's pretraining (the target), on the round's selection."""
    exp, r = run.exp, st.round or 0
    model = "proxy" if which == "warmup" else "target"
    return train_lm.LMTrainSpec(
        stage=st.key,
        arch=arch_from_preset(getattr(exp.models, model).arch, vocab_size(run, model)),
        seq_len=exp.data.seq_len,
        tokenizer_dir=run.uri("tokenizer", "tokenizer"),
        data_dir=shared_rows(run, st, d, "data", SelectedRows(run.uri(f"r{r}.select", "selected.parquet")))[0],
        init_dir=run.uri(f"r{r - 1}.pretrain", "state") if which == "pretrain" and r > 0 else None,
        start_step=r * exp.pretrain.steps if which == "pretrain" else 0,
        train=train,
        round_index=r,
        seed=exp.seed,
        resources=exp.resources,
        kind=which,
    )


def warmup_stage(run: Run, st: Stage, d: Path) -> dict:
    res = run.exp.resources
    _ray.ensure_ray(res)
    # the proxy keeps its un-decayed state, and no branches
    spec = _lm_spec(run, st, d, "warmup", dataclasses.replace(run.exp.warmup, decay_steps=0, eval_branches=0))
    out = train_lm.fit_lm(spec, d, _ray.storage_path(res, run.store), res.train_workers, dest=run.uri(st.key))
    storage.remove(spec.data_dir)
    return out


def pretrain_stage(run: Run, st: Stage, d: Path) -> dict:
    exp, r = run.exp, st.round
    _ray.ensure_ray(exp.resources)
    extra = exp.schedule.final_extra_steps if r == exp.schedule.rounds else 0
    spec = _lm_spec(run, st, d, "pretrain", dataclasses.replace(exp.pretrain, steps=exp.pretrain.steps + extra))
    train_storage, workers = _ray.storage_path(exp.resources, run.store), exp.resources.train_workers
    out = train_lm.fit_lm(spec, d, train_storage, workers, dest=run.uri(st.key))
    storage.remove(spec.data_dir)
    return out | {
        "end_step": (r + 1) * exp.pretrain.steps + extra,
        "tokens_per_step": exp.pretrain.global_batch_seqs * exp.data.seq_len,
    }


def bilevel_stage(run: Run, st: Stage, d: Path, launch=bilevel.fit_bilevel) -> dict:
    """``launch`` fits the TorchTrainer; a sweep passes one that names the Train run after its trial and forwards
    its reports to Tune."""
    exp, r, b = run.exp, st.round, run.exp.bilevel
    res = exp.resources
    _ray.ensure_ray(res)
    # only the rows the loop will visit: T·K(+1)·B_global, a seeded sample of the round's shard
    need = b.outer_steps * b.micro_batches_per_step * b.micro_batch_seqs * res.bilevel_workers
    train_dir, train_rows = shared_rows(run, st, d, "train_data", shard_sample(run, r, need, exp.seed, r))
    inherit = b.score_carry == "inherit" and r > 1
    spec = bilevel.BilevelSpec(
        stage=st.key,
        settings=b,
        proxy_dir=run.uri("warmup", "state", "model"),
        target_dir=run.uri(f"r{r - 1}.pretrain", "state", "model") if b.uses_kl else None,
        score_dir=run.uri(f"r{r - 1}.bilevel", "score_model") if inherit else None,
        train_dir=train_dir,
        reference_dir=run.uri("tokenize", "reference", "array"),
        seed=exp.seed,
        resources=res,
    )
    out = launch(spec, d, _ray.storage_path(res, run.store), res.bilevel_workers, dest=run.uri(st.key))
    storage.remove(spec.train_dir)
    return out | {"train_rows": train_rows}


def score_stage(run: Run, st: Stage, d: Path) -> dict:
    _ray.ensure_ray(run.exp.resources)
    r = st.round
    if run.exp.selection.method == "mates":
        model_dir, kind = run.uri(f"r{r}.influence", "influence_model"), "mates"
    else:
        model_dir, kind = run.uri(f"r{r}.bilevel", "score_model"), "bliss"
    return score.score_pool(run.exp, model_dir, pool_files(run), round_shard(run, r), run.uri(st.key), kind, d)


def evaluate_stage(run: Run, st: Stage, d: Path) -> dict:
    _ray.ensure_ray(run.exp.resources)
    return evaluate.evaluate_checkpoints(run, st, d)


def report_stage(run: Run, st: Stage, d: Path) -> dict:
    path = build_report([run.store], d)
    return {"report": storage.join(run.uri(st.key), path.name)}


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
    "probe": mates.probe_stage,
    "influence": mates.influence_stage,
}


def run_stage(run: Run, st: Stage, d: Path, runners: dict = RUNNERS) -> dict:
    """Run one stage with its kind's function from ``runners`` (a sweep passes a table with its own bilevel)."""
    (d / "experiment.json").write_text(json.dumps(run.exp.model_dump(mode="json"), indent=2))
    return runners[st.kind](run, st, d)
