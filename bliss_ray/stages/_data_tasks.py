"""Functions that run in Ray task workers (not actors): the scoring stage's shard filter (a Ray Data map), a
round's selection and the build of a stage's training array on a worker node (tasks). A remote run's driver sends
them locations and seeds, never a list of rows: what they read grows with the pool, what the driver reads does not.

Kept apart from the stage modules on purpose: Ray imports a mapped function's module in every task worker, and
``stages/score.py`` (the scorer) and ``stages/_ray.py`` (Train glue) import torch, which would cost each
short-lived task worker seconds and hundreds of MB. This module needs only NumPy, pyarrow and the data layer's
torch-free parts (``data/packing.py``, ``data/tokens.py``, ``storage``); a test imports it with torch and
transformers made unimportable.

    ds = ds.map_batches(keep_shard, fn_kwargs={"shard": (r, n)}, batch_format="numpy")
    ray.remote(num_cpus=0.25)(build_rows).remote(files, SelectedRows(sel), "s3://bkt/run/r0.warmup-ab12/data")
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bliss_ray import storage
from bliss_ray.data.packing import file_key, shard_of
from bliss_ray.data.tokens import TokenArray
from bliss_ray.selection.pool import pool_rows, select_shard


@dataclass(frozen=True)
class RowIds:
    """Explicit pool rows: a few, e.g. MATES's probes."""

    ids: np.ndarray

    def resolve(self, files: list[str]) -> np.ndarray:
        return np.asarray(self.ids, np.int64)


@dataclass(frozen=True)
class SelectedRows:
    """The rows a select stage chose: the ids of its ``selected.parquet``, read where the array is built."""

    selected: str

    def resolve(self, files: list[str]) -> np.ndarray:
        return storage.read_table(self.selected).column("row_id").to_numpy()


@dataclass(frozen=True)
class ShardSample:
    """``n`` rows drawn without replacement from the round's ``shard`` of the pool with ``seed``."""

    n: int
    shard: tuple[int, int] | None
    seed: tuple[int, ...]

    def resolve(self, files: list[str]) -> np.ndarray:
        shard_ids, _ = pool_rows(files, self.shard)
        return np.random.default_rng(list(self.seed)).choice(shard_ids, min(self.n, len(shard_ids)), replace=False)


RowChoice = RowIds | SelectedRows | ShardSample  # which pool rows a stage's token array holds


def keep_shard(batch: dict, shard: tuple[int, int] | None) -> dict:
    """Map over packed rows read with ``include_paths``: keep the round's shard (``(index, n_shards)``, None for
    all rows) and tag each row with its input file's key (``src``, the partition of its scores)."""
    src = np.array([file_key(p) for p in batch.pop("path")])
    keep = slice(None) if shard is None else shard_of(batch["row_id"], shard[1]) == shard[0]
    return {k: v[keep] for k, v in batch.items()} | {"src": src[keep]}


def build_rows(files: list[str], rows: RowChoice, dest: str) -> int:
    """Materialise the pool ``rows`` of ``files`` into a ``TokenArray`` at ``dest``; returns its number of rows.
    For a store location it is built in a temporary directory of this node, uploaded and removed: run as a task on
    a worker node, the rows' ids and tokens pass through neither the driver nor its disk."""
    keep_ids = rows.resolve(files)
    if not storage.is_remote(dest):
        return len(TokenArray.build(files, dest, keep_ids=keep_ids))
    scratch = storage.cache_root()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rows_", dir=scratch) as tmp:
        array = TokenArray.build(files, f"{tmp}/array", keep_ids=keep_ids)
        storage.upload(f"{tmp}/array", dest)
        return len(array)


def select_rows(files: list[str], shard: tuple[int, int] | None, score_dir: str | None, dest: str, **rule) -> dict:
    """A round's selection (``selection.pool.select_shard`` with the ``rule`` settings): the chosen row ids written
    to ``dest`` (a parquet file), the manifest returned. The pool's ids, domains and scores stay in this process."""
    chosen, manifest = select_shard(files, shard, score_dir, **rule)
    storage.write_table(dest, pa.table({"row_id": pa.array(chosen, pa.int64())}))
    return manifest
