"""Functions that run in Ray task workers (not actors): the scoring stage's shard filter (a Ray Data map) and the
build of a stage's training array on a worker node (a task).

Kept apart from the stage modules on purpose: Ray imports a mapped function's module in every task worker, and
``stages/score.py`` (the scorer) and ``stages/_ray.py`` (Train glue) import torch, which would cost each
short-lived task worker seconds and hundreds of MB. This module needs only NumPy, pyarrow and the data layer's
torch-free parts (``data/packing.py``, ``data/tokens.py``, ``storage``); a test imports it with torch and
transformers made unimportable.

    ds = ds.map_batches(keep_shard, fn_kwargs={"shard": (r, n)}, batch_format="numpy")
    ray.remote(num_cpus=0.25)(build_rows).remote(files, keep_ids, "s3://bkt/run/r0.warmup-ab12/data")
"""

from __future__ import annotations

import tempfile

import numpy as np

from bliss_ray import storage
from bliss_ray.data.packing import file_key, shard_of
from bliss_ray.data.tokens import TokenArray


def keep_shard(batch: dict, shard: tuple[int, int] | None) -> dict:
    """Map over packed rows read with ``include_paths``: keep the round's shard (``(index, n_shards)``, None for
    all rows) and tag each row with its input file's key (``src``, the partition of its scores)."""
    src = np.array([file_key(p) for p in batch.pop("path")])
    keep = slice(None) if shard is None else shard_of(batch["row_id"], shard[1]) == shard[0]
    return {k: v[keep] for k, v in batch.items()} | {"src": src[keep]}


def build_rows(files: list[str], keep_ids: np.ndarray, dest: str) -> int:
    """Materialise the pool rows ``keep_ids`` of ``files`` into a ``TokenArray`` in a temporary directory of this
    node, upload it to ``dest`` and remove the local copy; returns its number of rows. Runs where the task lands
    (a worker node), so the array's tokens pass through neither the driver nor its disk."""
    scratch = storage.cache_root()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rows_", dir=scratch) as tmp:
        array = TokenArray.build(files, f"{tmp}/array", keep_ids=keep_ids)
        storage.upload(f"{tmp}/array", dest)
        return len(array)
