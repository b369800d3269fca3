"""Ray Data functions that run in task workers (not actors): the scoring stage's shard filter.

Kept apart from the stage modules on purpose: Ray imports a mapped function's module in every task worker, and
``stages/score.py`` (the scorer) and ``stages/_ray.py`` (Train glue) import torch, which would cost each
short-lived task worker seconds and hundreds of MB. This module needs only NumPy and ``data/packing.py``; a
test imports it with torch and transformers made unimportable.

    ds = ds.map_batches(keep_shard, fn_kwargs={"shard": (r, n)}, batch_format="numpy")
"""

from __future__ import annotations

import numpy as np

from bliss_ray.data.packing import file_key, shard_of


def keep_shard(batch: dict, shard: tuple[int, int] | None) -> dict:
    """Map over packed rows read with ``include_paths``: keep the round's shard (``(index, n_shards)``, None for
    all rows) and tag each row with its input file's key (``src``, the partition of its scores)."""
    src = np.array([file_key(p) for p in batch.pop("path")])
    keep = slice(None) if shard is None else shard_of(batch["row_id"], shard[1]) == shard[0]
    return {k: v[keep] for k, v in batch.items()} | {"src": src[keep]}
