"""Stage: tokenize and pack the pool and the reference set, on Ray Data.

Inputs: the pool / reference files (``data.pool``, ``data.reference``; local, ``s3://``/``gs://`` or bundled) and
the tokenizer. Outputs: ``pool/packed/*.parquet`` (the packed training rows with their source row ids),
``pool/quarantine/*.parquet`` (every rejected row with its id and reason), ``reference/array`` (the reference
rows, ready for the bilevel stage) and ``manifest.json`` (counts, skipped files, per-domain shares).

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
from bliss_ray.data.corpus import check_file, detect_format, iter_texts, resolve_files
from bliss_ray.data.tokenize import cloze_rows, tokenize_file
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.data.tokens import TokenArray, read_token_table
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
            num_cpus=res.data_actor_cpus,
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


def build_reference(exp: Experiment, tokenizer_dir: Path, out_dir: Path) -> dict:
    """The reference set as a ``TokenArray`` (+ loss mask for continuation items). Small: built on the driver."""
    d = exp.data
    tokenizer = load_tokenizer(tokenizer_dir)
    files = resolve_files(d.reference)
    ref_dir = out_dir / "reference"
    array_dir = ref_dir / "array"
    if d.reference_loss == "continuation":
        texts = list(iter_texts(files, d.reference_format, d, max_chars=1 << 62))
        ids, mask = cloze_rows(texts, tokenizer, d.seq_len, d.max_reference_seqs)
        array_dir.mkdir(parents=True, exist_ok=True)
        np.save(array_dir / "tokens.npy", ids)
        np.save(array_dir / "row_ids.npy", np.arange(len(ids), dtype=np.int64))
        np.save(array_dir / "loss_mask.npy", mask)
        (array_dir / "_SUCCESS").write_text(f"{len(ids)} rows\n")
        return {"reference_seqs": len(ids), "reference_loss": "continuation"}
    for i, f in enumerate(files):
        tokenize_file(f, i, d.reference_format, d, tokenizer, ref_dir)
    packed = sorted((ref_dir / "packed").glob("*.parquet"))
    all_ids = np.concatenate([read_token_table(str(f), ["row_id"]).column("row_id").to_numpy() for f in packed])
    keep = None
    if len(all_ids) > d.max_reference_seqs:  # a fixed, seeded subset
        keep = np.random.default_rng(exp.seed).choice(all_ids, d.max_reference_seqs, replace=False)
    arr = TokenArray.build([str(f) for f in packed], array_dir, keep_ids=keep)
    return {"reference_seqs": len(arr), "reference_loss": "passage"}
