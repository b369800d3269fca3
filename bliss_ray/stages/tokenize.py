"""Stage: tokenize and pack the pool and the reference set, on Ray Data.

Inputs: the pool / reference files (``data.pool``, ``data.reference``; local, ``s3://``/``gs://`` or bundled) and
the tokenizer. Outputs: ``pool/packed/*.parquet`` (the packed training rows with their source row ids),
``pool/quarantine/*.parquet`` (every rejected row with its id and reason), ``reference/array`` (the reference
set's selection part, for the bilevel stage and MATES), ``reference/eval_array`` (its held-out evaluation part,
for the evaluate stage; ``data.reference_eval_frac``) and ``manifest.json`` (counts, skipped files, per-domain
shares). With ``data.canaries`` on, a seeded sample of reference documents leaves both parts of the reference set
and joins the pool as ``pool/packed/canary_*.parquet``, one file per form (``bliss_ray.data.canaries``).

The file list streams through a Ray Data actor pool (the tokenizer loads once per actor); each actor processes
whole files with ``bliss_ray.data.tokenize.tokenize_file``, so a rerun after a crash only processes files whose
completion marker is missing. A pre-flight pass names unreadable files first (policy ``data.corrupt_files``).

    bliss-ray run experiments/demo.yaml --stage tokenize
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray
import ray.data

from bliss_ray import storage
from bliss_ray.config import Experiment
from bliss_ray.data.canaries import CANARY_DOMAINS, canary_doc_ids, canary_documents, collides
from bliss_ray.data.corpus import check_file, detect_format, read_file, resolve_files
from bliss_ray.data.reference_split import cloze_items, eval_doc_ids, split_rows
from bliss_ray.data.tokenize import pack_texts, tokenize_file
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.data.tokens import TokenArray, read_token_table
from bliss_ray.stages._ray import task_options
from bliss_ray.storage import local_copy


class _FileTokenizer:
    """Actor: holds the tokenizer, processes one file per call."""

    def __init__(self, tokenizer_dir: str, data_cfg, fmt: str, out_dir: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = load_tokenizer(local_copy(tokenizer_dir))
        self.data_cfg, self.fmt, self.out_dir = data_cfg, fmt, out_dir

    def __call__(self, batch: dict) -> dict:
        stats = [
            tokenize_file(str(p), int(i), self.fmt, self.data_cfg, self.tokenizer, self.out_dir)
            for p, i in zip(batch["path"], batch["index"], strict=True)
        ]
        return {k: np.array([s[k] for s in stats], dtype=object) for k in stats[0]}


def _preflight(files: list[str], fmt: str) -> dict[str, str]:
    """{file: reason} for unreadable files, checked in parallel as Ray tasks."""
    check = ray.remote(num_cpus=0.25)(lambda f: (f, check_file(f, detect_format(f, fmt) if fmt == "auto" else fmt)))
    return {f: why for f, why in ray.get([check.remote(f) for f in files]) if why}


def tokenize_pool(exp: Experiment, tokenizer_dir: str, out_dir: str) -> dict:
    """Tokenize + pack every pool file into ``out_dir``'s ``pool/`` (locations: the actors write to the store);
    enforce rows in = rows out + rows quarantined and the bad-row budget."""
    d, res = exp.data, exp.resources
    files = resolve_files(d.pool)
    bad_files = _preflight(files, d.pool_format)
    if bad_files and d.corrupt_files == "fail":
        listing = "\n".join(f"  {f}: {why}" for f, why in bad_files.items())
        raise RuntimeError(
            f"pre-flight: {len(bad_files)} unreadable pool file(s) (data.corrupt_files=fail):\n" + listing
        )
    todo = [{"path": f, "index": i} for i, f in enumerate(files) if f not in bad_files]  # indexes stay stable
    pool_dir = storage.join(out_dir, "pool")
    ray.data.DataContext.get_current().enable_progress_bars = False
    lo, hi = res.data_actors
    stats = (
        ray.data.from_items(todo, override_num_blocks=max(1, len(todo)))
        .map_batches(
            _FileTokenizer,
            fn_constructor_kwargs={
                "tokenizer_dir": tokenizer_dir,
                "data_cfg": d,
                "fmt": d.pool_format,
                "out_dir": pool_dir,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=min(hi, max(1, len(todo)))),
            num_cpus=task_options(res, "tokenize", res.data_actor_cpus, at_least=lo, gpu=False)["num_cpus"],
        )
        .take_all()
    )
    rows_in = sum(s["rows_in"] for s in stats)
    quarantined = sum(s["rows_quarantined"] for s in stats)
    packed = sum(s["docs_packed"] for s in stats)
    if rows_in != packed + quarantined:
        raise AssertionError(f"tokenize: rows in {rows_in} != packed {packed} + quarantined {quarantined}")
    if rows_in and quarantined / rows_in > d.max_bad_frac:
        raise RuntimeError(
            f"tokenize: {quarantined}/{rows_in} rows ({quarantined / rows_in:.1%}) were quarantined, more than "
            f"data.max_bad_frac={d.max_bad_frac:.1%}; see {storage.join(pool_dir, 'quarantine')} for ids and reasons"
        )
    domains: dict[str, int] = {}
    for s in stats:
        for k, v in s["domains"].items():
            domains[k] = domains.get(k, 0) + v
    return {
        "files": len(files),
        "files_skipped": bad_files,
        "rows_in": rows_in,
        "docs_packed": packed,
        "rows_quarantined": quarantined,
        "seqs": sum(s["seqs"] for s in stats),
        "tokens": sum(s["tokens"] for s in stats),
        "dropped_tokens": sum(s["dropped_tokens"] for s in stats),
        "seqs_per_domain": dict(sorted(domains.items())),
    }


def _save_rows(out: Path, row_ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "row_ids.npy", row_ids)
    np.save(out / "loss_mask.npy", mask)
    (out / "_SUCCESS").write_text(f"{len(row_ids)} rows\n")


def _reference_texts(d, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(document ids, texts) of the reference set's good text rows; pre-tokenized rows have no text."""
    rows = [read_file(f, d.reference_format, d, i)[0] for i, f in enumerate(files)]
    rows = [r for r in rows if r.texts]
    doc_ids = np.concatenate([r.ids for r in rows]) if rows else np.zeros(0, np.int64)
    return doc_ids, np.array([t for r in rows for t in r.texts], dtype=object)


def canary_sample(d, files: list[str]) -> tuple[np.ndarray, list[str]]:
    """(ids, texts) of the reference documents that become canaries (``data.canaries``; none when off)."""
    if not d.canaries.on:
        return np.zeros(0, np.int64), []
    doc_ids, texts = _reference_texts(d, files)
    if not len(doc_ids):
        raise ValueError("data.canaries needs reference documents with text (data.reference has none)")
    chosen = canary_doc_ids(doc_ids, d.canaries.docs, d.canaries.seed)
    first = {int(i): t for i, t in zip(doc_ids[::-1], texts[::-1], strict=True)}  # a repeated id: its first text
    return chosen, [first[int(i)] for i in chosen]


def add_canaries(exp: Experiment, tokenizer_dir: Path, out_dir: str) -> dict:
    """The canary documents packed into ``out_dir``'s ``pool/packed/<domain>.parquet``, one file (and so only whole
    rows of one form) per domain; {} when ``data.canaries`` is off. Refuses a pool whose document ids reach the
    canaries' id range."""
    d = exp.data
    if not d.canaries.on:
        return {}
    ids, texts = canary_sample(d, resolve_files(d.reference))
    packed_dir = storage.join(out_dir, "pool", "packed")
    pool = [f for f in storage.listdir(packed_dir, ".parquet") if not storage.name(f).startswith("canary_")]
    if any(collides(read_token_table(f, ["row_id"]).column("row_id").to_numpy()) for f in pool):
        raise ValueError("data.canaries: the pool has document ids in the range kept for canaries; turn them off")
    tokenizer = load_tokenizer(tokenizer_dir)
    doc_ids, docs, domains = canary_documents(ids, texts, d.canaries.seed)
    seqs = {}
    for name in CANARY_DOMAINS:
        mine = [i for i, dom in enumerate(domains) if dom == name]
        loc = storage.join(packed_dir, f"{name}.parquet")
        seqs[name] = len(pack_texts(doc_ids[mine], [docs[i] for i in mine], name, tokenizer, d.seq_len, loc))
    return {"canaries": {"docs": len(ids), "source_doc_ids": ids.tolist(), "seqs_per_domain": seqs}}


def _continuation_parts(
    d, files: list[str], tokenizer, ref_dir: Path, canary: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Cloze items (one per document, row id = document id) of the selection and evaluation parts."""
    doc_ids, texts = _reference_texts(d, files)  # pre-tokenized rows have no last word to cut
    held_out = eval_doc_ids(np.setdiff1d(doc_ids, canary), d.reference_eval_frac, d.reference_split_seed)
    is_eval, is_sel = np.isin(doc_ids, held_out), ~np.isin(doc_ids, held_out) & ~np.isin(doc_ids, canary)
    sel = cloze_items(doc_ids[is_sel], list(texts[is_sel]), tokenizer, d.seq_len, d.max_reference_seqs)
    ev = cloze_items(doc_ids[is_eval], list(texts[is_eval]), tokenizer, d.seq_len, d.max_reference_seqs)
    ev = ev if len(held_out) else sel
    if not len(sel[0]) or not len(ev[0]):
        raise ValueError(
            f"no usable cloze items in the reference set's {'selection' if not len(sel[0]) else 'evaluation'} "
            f"part (data.reference_eval_frac={d.reference_eval_frac})"
        )
    _save_rows(ref_dir / "array", *sel)
    _save_rows(ref_dir / "eval_array", *ev)
    return doc_ids, held_out, len(sel[0]), len(ev[0]), 0


def _passage_parts(
    d, seed: int, files: list[str], tokenizer, ref_dir: Path, canary: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Packed passage rows of the selection and evaluation parts; rows mixing both parts are dropped."""
    for i, f in enumerate(files):
        tokenize_file(f, i, d.reference_format, d, tokenizer, ref_dir)
    packed = [str(f) for f in sorted((ref_dir / "packed").glob("*.parquet"))]
    tables = [read_token_table(f, ["row_id", "source_ids"]) for f in packed]
    row_ids = np.concatenate([t.column("row_id").to_numpy() for t in tables])
    sources = [np.asarray(s, np.int64) for t in tables for s in t.column("source_ids").to_pylist()]
    doc_ids = np.concatenate(sources)
    held_out = eval_doc_ids(np.setdiff1d(doc_ids, canary), d.reference_eval_frac, d.reference_split_seed)
    sel, ev = split_rows(sources, held_out, excluded=canary)
    if not sel.any() or (len(held_out) and not ev.any()):
        raise ValueError(
            f"the reference split (data.reference_eval_frac={d.reference_eval_frac}) left the "
            f"{'selection' if not sel.any() else 'evaluation'} part without a whole packed row; use more "
            "reference documents or a lower fraction"
        )
    keep = row_ids[sel]
    if len(keep) > d.max_reference_seqs:  # a fixed, seeded subset
        keep = np.random.default_rng(seed).choice(keep, d.max_reference_seqs, replace=False)
    arr = TokenArray.build(packed, ref_dir / "array", keep_ids=keep)
    keep_eval = row_ids[ev] if len(held_out) else keep
    if len(keep_eval) > d.max_reference_seqs:  # seeded by the split, so every seed is measured on the same rows
        rng = np.random.default_rng(d.reference_split_seed)
        keep_eval = rng.choice(keep_eval, d.max_reference_seqs, replace=False)
    eval_arr = TokenArray.build(packed, ref_dir / "eval_array", keep_ids=keep_eval)
    return doc_ids, held_out, len(arr), len(eval_arr), int((~sel & ~ev).sum())


def build_reference(exp: Experiment, tokenizer_dir: Path, out_dir: Path) -> dict:
    """The reference set's selection part (``reference/array``) and held-out evaluation part
    (``reference/eval_array``) as ``TokenArray``s (+ loss mask for continuation items); see
    ``bliss_ray.data.reference_split``. Small: built on the driver.

    Next to the evaluation rows (``local_copy`` copies directories, so the evaluate task gets them in one copy):
    ``eval_doc_ids.npy``, the held-out document ids, and, when there is a split, ``selection_doc_ids.npy``, the
    documents selection may see (the canaries among them: they are in the pool), which ``bliss_ref_cloze`` skips."""
    d = exp.data
    tokenizer = load_tokenizer(tokenizer_dir)
    files = resolve_files(d.reference)
    ref_dir = out_dir / "reference"
    canary, _ = canary_sample(d, files)
    if d.reference_loss == "continuation":
        doc_ids, held_out, n_sel, n_eval, dropped = _continuation_parts(d, files, tokenizer, ref_dir, canary)
    else:
        doc_ids, held_out, n_sel, n_eval, dropped = _passage_parts(d, exp.seed, files, tokenizer, ref_dir, canary)
    np.save(ref_dir / "eval_array" / "eval_doc_ids.npy", held_out)
    # bliss_ref_cloze reads the bundled passages whatever data.reference is: skipping the documents selection may
    # see (rather than keeping only held-out ones) stays right when the reference set is another corpus
    if len(held_out) or len(canary):
        seen = np.union1d(np.setdiff1d(doc_ids, held_out) if len(held_out) else [], canary).astype(np.int64)
        np.save(ref_dir / "eval_array" / "selection_doc_ids.npy", seen)
    return {
        "reference_seqs": n_sel,
        "reference_eval_seqs": n_eval,
        "reference_eval_docs": len(held_out),
        "reference_dropped_seqs": dropped,
        "reference_loss": d.reference_loss,
    }
