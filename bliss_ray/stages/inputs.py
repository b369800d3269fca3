"""What a stage reads: the packed pool's files, a round's shard of it, the vocabulary, and token arrays of chosen
rows that the stage's workers can read wherever they run, built where the pool's rows are read (``on_worker``).

Workers on other nodes are given store locations (``Run.uri``), never a path on this node: they read them through
``storage.local_copy`` and write them through ``bliss_ray.storage``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray

from bliss_ray import storage
from bliss_ray.data.tokenizer import load_tokenizer
from bliss_ray.models.arch import padded_vocab
from bliss_ray.pipeline import Run, Stage
from bliss_ray.stages._data_tasks import RowChoice, ShardSample, build_rows
from bliss_ray.stages._ray import task_options

# a selection or a build reads parquet and writes a file, one at a time: a fraction of a CPU, so that it never waits
# for one on a small machine whose CPUs the stage's own Train workers or Data actors are about to take
TASK_CPUS = 0.25


def pool_files(run: Run) -> list[str]:
    """Locations of the packed pool's files in the store (read in place by Ray Data and the driver)."""
    return storage.listdir(run.uri("tokenize", "pool", "packed"), ".parquet")


def round_shard(run: Run, r: int) -> tuple[int, int] | None:
    """(index, count) of round r's shard of the pool, or None when every round selects from all of it."""
    s = run.exp.schedule
    return (r, s.rounds + 1) if s.pool_sharding == "disjoint" else None


def shard_sample(run: Run, r: int, n: int, *seed: int) -> ShardSample:
    """``n`` rows of round r's shard, drawn with ``seed`` where the rows are built."""
    return ShardSample(n, round_shard(run, r), seed)


def vocab_size(run: Run, which: str) -> int:
    """The vocabulary of ``models.<which>``: its own setting, else the tokenizer's size padded like Pythia's."""
    m = getattr(run.exp.models, which)
    return m.vocab_size or padded_vocab(len(load_tokenizer(run.input("tokenizer", "tokenizer"))))


def on_worker(run: Run, st: Stage, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` here for a local run; for a remote one, a Ray task on a node with CPUs (never a
    0-CPU head), so that what ``fn`` reads (the pool's ids, scores and tokens) never reaches the driver."""
    if not run.remote:
        return fn(*args, **kwargs)
    options = task_options(run.exp.resources, st.kind, TASK_CPUS, gpu=False)
    return ray.get(ray.remote(fn).options(**options).remote(*args, **kwargs))


def shared_rows(run: Run, st: Stage, d: Path, sub: str, rows: RowChoice) -> tuple[str, int]:
    """(location, number of rows) of a token array of the pool ``rows`` that the stage's workers can read: ``d/sub``
    for a local run; the stage's directory in the store for a remote one, built and uploaded by a task on a worker
    node (the stage removes it when its workers are done)."""
    dest = run.uri(st.key, sub) if run.remote else str(d / sub)
    return dest, on_worker(run, st, build_rows, pool_files(run), rows, dest)
