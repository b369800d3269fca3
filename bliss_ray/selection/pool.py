"""The packed pool as a round's selection sees it (NumPy + pyarrow, no Ray; the select, bilevel and MATES
stages call it on the driver):

* ``pool_rows`` — row ids and domains of a round's shard of the packed pool, the only columns selection needs;
* ``score_column`` — the streaming join of the score stage's output to those rows: one fp32 logit per row,
  NaN where the row has no valid score;
* ``select_round`` — the rows a round keeps and its manifest: unscored rows are unselectable, k is
  ``keep_frac`` of the rest, then the selection rule (``selection.select``) and the manifest
  (``selection.manifest``).

Memory is what makes a 10 M-row pool fit on a small driver: 8 B of row id and 4 B of logit per row, domains
dictionary-encoded (a small integer per row), and no sorted copy when the ids already arrive in order.

    row_ids, domains = pool_rows(packed_files, shard=(1, 3))
    chosen, manifest = select_round(row_ids, domains, score_column(scores_dir, row_ids), "topk", 0.2, seed=1)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from bliss_ray import storage
from bliss_ray.data.packing import shard_of
from bliss_ray.data.tokens import read_token_table
from bliss_ray.selection.rules import manifest, num_selected, select


def pool_rows(files: list[str], shard: tuple[int, int] | None) -> tuple[np.ndarray, pd.Categorical]:
    """(row ids, domains) of the packed ``files``, restricted to ``shard`` (``(index, n_shards)``, None for every
    row), in file order. Domains stay dictionary-encoded: a string per row costs ~60 B each on a 10M-row pool."""
    ids, doms = [np.zeros(0, np.int64)], []
    for f in files:
        t = read_token_table(f, ["row_id", "domain"])
        i = t.column("row_id").to_numpy()
        keep = np.ones(len(i), bool) if shard is None else shard_of(i, shard[1]) == shard[0]
        ids.append(i[keep])
        doms += pc.dictionary_encode(t.column("domain").filter(keep)).chunks
    domains = pa.chunked_array(doms, pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
    row_ids, categorical = np.concatenate(ids), domains.to_pandas().array
    del ids, doms, domains
    pa.default_memory_pool().release_unused()  # else Arrow keeps the freed read buffers, a large part of the peak
    return row_ids, categorical


def score_column(score_dir: str | Path, row_ids: np.ndarray) -> np.ndarray:  # score_dir: a path or store URI
    """The fp32 logit of each pool row, NaN where it has no valid score (missing, or ``ok`` false); scored rows
    outside ``row_ids`` (another shard) are ignored. Streams the hive-partitioned score files batch by batch into
    one preallocated column: the driver holds the pool's row ids, this column and, only when the ids are not
    already in order, their sort order and a sorted copy."""
    order = None  # packed pools come in row-id order: then no sort order and no sorted copy (120 MB at 10 M rows)
    if not np.all(row_ids[1:] > row_ids[:-1]):
        order = np.argsort(row_ids)  # ids are unique: an in-place sort, no stable sort's n/2 buffer
        if len(row_ids) < 2**31:
            order = order.astype(np.int32)  # 40 MB less to hold through the join at 10 M rows
    sorted_ids = row_ids if order is None else row_ids[order]
    values = np.full(len(row_ids), np.nan, np.float32)
    if not len(row_ids):
        return values
    # file by file, not Dataset.to_batches: the scanner's readahead holds several decoded files at once
    fs, root = storage.resolve(score_dir)
    for path in pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").files:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["row_id", "logit", "ok"], use_threads=False):
                ok = batch.column("ok").to_numpy(zero_copy_only=False)
                ids, logits = batch.column("row_id").to_numpy()[ok], batch.column("logit").to_numpy()[ok]
                pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
                hit = sorted_ids[pos] == ids
                values[pos[hit] if order is None else order[pos[hit]]] = logits[hit]
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages that selection cannot use
    return values


def select_round(
    row_ids: np.ndarray,
    domains: pd.Categorical | np.ndarray | None,
    values: np.ndarray | None,
    rule: str,
    keep_frac: float,
    seed: int,
    temperature: float = 1.0,
    **settings,
) -> tuple[np.ndarray, dict]:
    """(sorted selected row ids, manifest). ``values``: one score per row (NaN = unscored, never selected) or
    None for ``random``. The manifest describes the selectable pool and records ``rule``, ``seed``,
    ``temperature``, ``keep_frac`` and any extra ``settings`` (e.g. the round)."""
    if values is not None:
        valid = np.isfinite(values)
        if not valid.all():  # (the usual case, every row scored, copies nothing)
            row_ids, values = row_ids[valid], values[valid]
            domains = None if domains is None else domains[valid]
    chosen = select(row_ids, values, num_selected(len(row_ids), keep_frac), rule, seed=seed, temperature=temperature)
    m = manifest(
        row_ids,
        values,
        chosen,
        domains,
        method=rule,
        seed=seed,
        temperature=temperature,
        keep_frac=keep_frac,
        **settings,
    )
    return chosen, m


def select_shard(
    files: list[str],
    shard: tuple[int, int] | None,
    score_dir: str | None,
    rule: str,
    keep_frac: float,
    seed: int,
    temperature: float = 1.0,
    **settings,
) -> tuple[np.ndarray, dict]:
    """``select_round`` on a round's shard of the packed ``files``, with the scores in ``score_dir`` (None for
    ``random``): what a select stage computes, wherever it runs."""
    row_ids, domains = pool_rows(files, shard)
    values = None if score_dir is None else score_column(score_dir, row_ids)
    return select_round(row_ids, domains, values, rule, keep_frac, seed, temperature, **settings)
