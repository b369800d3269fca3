"""What a stage reads: the packed pool's files, a round's shard of it, the vocabulary, and token arrays of chosen
rows that the stage's workers can read wherever they run.

Workers on other nodes are given store locations (``Run.uri``), never a path on this node: they read them through
``storage.local_copy`` and write them through ``bliss_ray.storage``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import ray

from bliss_ray import storage
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.data.tokens import TokenArray
from bliss_ray.models.arch import padded_vocab
from bliss_ray.pipeline import Run, Stage
from bliss_ray.selection.pool import pool_rows
from bliss_ray.stages._data_tasks import build_rows
from bliss_ray.stages._ray import task_options

# the build reads parquet and writes a memmap, one file at a time: a fraction of a CPU, so that it never waits for
# one on a small machine whose CPUs the stage's own Train workers or Data actors are about to take
BUILD_CPUS = 0.25


def pool_files(run: Run) -> list[str]:
    """Locations of the packed pool's files in the store (read in place by Ray Data and the driver)."""
    return storage.listdir(run.uri("tokenize", "pool", "packed"), ".parquet")


def round_shard(run: Run, r: int) -> tuple[int, int] | None:
    """(index, count) of round r's shard of the pool, or None when every round selects from all of it."""
    s = run.exp.schedule
    return (r, s.rounds + 1) if s.pool_sharding == "disjoint" else None


def round_rows(run: Run, r: int) -> tuple[np.ndarray, pd.Categorical]:
    """(row ids, domains) of round r's shard of the packed pool (``selection.pool.pool_rows``)."""
    return pool_rows(pool_files(run), round_shard(run, r))


def vocab_size(run: Run, which: str) -> int:
    """The vocabulary of ``models.<which>``: its own setting, else the tokenizer's size padded like Pythia's."""
    m = getattr(run.exp.models, which)
    return m.vocab_size or padded_vocab(len(load_tokenizer(run.input("tokenizer", "tokenizer"))))


def shared_rows(run: Run, st: Stage, d: Path, sub: str, keep: np.ndarray) -> str:
    """The pool rows ``keep`` as a token array where the stage's workers can read it: built in ``d/sub`` for a
    local run; for a remote one, built by a Ray task on a node with CPUs (never a 0-CPU head) that uploads it to the
    stage's directory in the store, so its tokens never pass through the driver (the stage removes it when its
    workers are done). Returns its location."""
    if not run.remote:
        TokenArray.build(pool_files(run), d / sub, keep_ids=keep)
        return str(d / sub)
    dest = run.uri(st.key, sub)
    options = task_options(run.exp.resources, st.kind, BUILD_CPUS, gpu=False)
    ray.get(ray.remote(build_rows).options(**options).remote(pool_files(run), np.asarray(keep, np.int64), dest))
    return dest
