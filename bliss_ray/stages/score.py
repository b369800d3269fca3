"""Stage r.score: score the round's pool shard with the score model, on a Ray Data actor pool.

Inputs: the packed pool (``tokenize/pool/packed/*.parquet``) and a trained score model (or, for MATES, the data
influence model). Outputs: ``scores/src=<input file>/*.parquet`` with ``{row_id, logit (fp32), score, ok,
reason}``, a ``_done/<input file>`` marker per input file, ``manifest.json`` (rows in / scored /
quarantined, rows/s, tokens/s, actors) and ``ray_data_stats.txt`` (Ray Data's per-operator timings of the last run).

``read_parquet`` with the round's shard filter fused into its tasks → ``map_batches(Scorer)`` on
``ActorPoolStrategy(min, max)`` (``num_gpus=1`` per actor when the cluster has GPUs) → ``write_parquet``
partitioned by input file. A rerun first validates every partition (distinct row ids = the file's shard rows,
no duplicates): complete files get their marker, incomplete ones are deleted and rescored, so after any crash
every row ends up scored exactly once.

    bliss-ray run experiments/demo.yaml --stage r1.score
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import ray
import ray.data

from bliss_ray import storage
from bliss_ray.config import Experiment
from bliss_ray.data.packing import file_key, shard_of
from bliss_ray.data.tokens import read_token_table
from bliss_ray.selection.scoring import Scorer
from bliss_ray.stages import _faults
from bliss_ray.stages._data_tasks import keep_shard
from bliss_ray.stages._ray import task_options, use_gpu
from bliss_ray.storage import local_copy
from bliss_ray.train.precision import inference_dtype, resolve_precision


def scoring_dtype(exp: Experiment, gpu: bool) -> str:
    """``score.dtype: bfloat16`` forces bf16; the default follows ``resources.precision`` (bf16 on GPU)."""
    if exp.score.dtype == "bfloat16":
        return "bfloat16"
    return inference_dtype(resolve_precision(exp.resources.precision, "cuda" if gpu else "cpu"))


def _expected_ids(path: str, shard: tuple[int, int] | None) -> np.ndarray:
    ids = read_token_table(path, ["row_id"]).column("row_id").to_numpy()
    return ids if shard is None else ids[shard_of(ids, shard[1]) == shard[0]]


def _partition_complete(part: str, expected: np.ndarray) -> bool:
    fs, p = storage.resolve(part)
    try:
        got = pads.dataset(p, filesystem=fs, format="parquet").to_table(columns=["row_id"])["row_id"].to_numpy()
    except Exception:  # a file half-written by a killed run
        return False
    return len(got) == len(expected) and np.array_equal(np.sort(got), np.sort(expected))


class _RayScorer(Scorer):
    """The scorer plus the source-file column the partitioned write needs, and an actor census."""

    def __init__(self, census_dir: str, model_dir: str, **kwargs):
        super().__init__(model_dir=str(local_copy(model_dir)), **kwargs)
        storage.write_bytes(storage.join(census_dir, f"{socket.gethostname()}-{self.pid}"), b"")

    def __call__(self, batch: dict) -> dict:
        _faults.hold("score")
        return super().__call__(batch) | {"src": batch["src"]}


def _partition_of(scores_dir: str, f: str) -> str:
    """The hive partition the partitioned write puts input file ``f``'s scores in."""
    return storage.join(scores_dir, f"src={file_key(f)}")


def _files_to_score(
    pool_files: list[str], expected: dict[str, np.ndarray], scores_dir: str, done_dir: str
) -> list[str]:
    """The input files still to score: validates what a previous (possibly killed) run left behind, marking complete
    files done and deleting incomplete partitions so they are rescored from scratch."""
    todo = []
    for f in pool_files:
        part, done = _partition_of(scores_dir, f), storage.join(done_dir, file_key(f))
        if storage.exists(done):
            continue
        if len(expected[f]) == 0 or _partition_complete(part, expected[f]):  # no row in the shard, or all scored
            storage.write_bytes(done, b"")
            continue
        storage.remove(part)
        todo.append(f)
    return todo


def _scoring_dataset(
    exp: Experiment, model_dir: str, todo: list[str], shard: tuple[int, int] | None, kind: str, census: str
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read ``todo`` → keep the round's shard → score on an actor pool."""
    res = exp.resources
    gpu = use_gpu(res)
    lo, hi = res.data_actors
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # The file-listing parquet read (datasource V2) starts a pool of footer-reader actors for every read (32 by
    # default): seconds of process starts per stage on a small node, to read a few footers of files this stage
    # already knows. The task-based read reads each file's footer in its own read task.
    ctx.use_datasource_v2 = False
    # Ray Data gets the store's filesystem and plain paths: it would read a URI's query string as part of a path
    fs = storage.resolve(todo[0])[0]
    paths = [storage.resolve(f)[1] for f in todo]
    # One read task per file: a read that splits its blocks further cannot fuse with what follows it. The shard
    # filter has the read's resources, so Ray Data fuses it into the read tasks: no operator, tasks and
    # object-store hop of its own, and the repartition below moves only this round's shard.
    ds = ray.data.read_parquet(
        paths, filesystem=fs, columns=["row_id", "input_ids"], include_paths=True, override_num_blocks=len(paths)
    )
    ds = ds.map_batches(keep_shard, fn_kwargs={"shard": shard}, batch_format="numpy")
    blocks = 2 * max(hi, 2)
    if len(todo) < blocks:  # a file is one block: split a few files so every actor gets work
        ds = ds.repartition(blocks)  # (a barrier: many files stream through without it)
    return ds.map_batches(
        _RayScorer,
        fn_constructor_kwargs={
            "census_dir": census,
            "model_dir": model_dir,
            "kind": kind,
            "batch_seqs": exp.score.batch_seqs,
            "dtype": scoring_dtype(exp, gpu),
            "threads": None if gpu else max(1, int(res.data_actor_cpus * 2)),
        },
        batch_size=exp.score.batch_seqs * 4,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        **_actor_resources(task_options(res, "score", res.data_actor_cpus, at_least=lo, gpu=gpu)),
    )


def _actor_resources(options: dict) -> dict:
    """Ray Data's resource arguments from ``_ray.task_options`` (Data schedules its actors itself)."""
    return {k: v for k, v in options.items() if k in ("num_cpus", "num_gpus", "accelerator_type", "runtime_env")}


def _mark_scored(todo: list[str], expected: dict[str, np.ndarray], scores_dir: str, done_dir: str) -> None:
    """Check each freshly scored file's partition holds its shard rows exactly once, then write its done marker."""
    for f in todo:
        if not _partition_complete(_partition_of(scores_dir, f), expected[f]):
            raise AssertionError(f"scoring: the output for {f} does not hold each of its rows exactly once")
        storage.write_bytes(storage.join(done_dir, file_key(f)), b"")


def _score_summary(
    exp: Experiment,
    pool_files: list[str],
    expected: dict[str, np.ndarray],
    todo: list[str],
    rows_todo: int,
    elapsed: float,
    scores_dir: str,
    census: str,
) -> dict:
    """The manifest: row counts over all of ``scores_dir`` (checked against the rows in), throughput of this run."""
    fs, root = storage.resolve(scores_dir)
    table = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table(columns=["row_id", "ok"])
    ok = table.column("ok").to_numpy(zero_copy_only=False)
    rows_in = int(sum(len(v) for v in expected.values()))
    if len(ok) != rows_in:
        raise AssertionError(f"scoring: {rows_in} rows in but {len(ok)} rows in the output")
    seq_len = read_token_table(pool_files[0], ["input_ids"]).column("input_ids").type.list_size
    return {
        "rows_in": rows_in,
        "rows_scored": int(ok.sum()),
        "rows_quarantined": int((~ok).sum()),
        "rows_scored_this_run": rows_todo,
        "files_scored_this_run": len(todo),
        "seconds": elapsed,
        "rows_per_s": rows_todo / elapsed if todo and elapsed > 0 else None,
        "tokens_per_s": rows_todo * seq_len / elapsed if todo and elapsed > 0 else None,
        "actors_used": len(storage.listdir(census)),
        "actor_pool": list(exp.resources.data_actors),
    }


def score_pool(
    exp: Experiment,
    model_dir: str,
    pool_files: list[str],
    shard: tuple[int, int] | None,
    out: str | Path,
    kind: str = "bliss",
    work_dir: Path | None = None,
) -> dict:
    """Score into ``out`` (the stage's location: scores, markers and the actor census go straight to the store);
    ``work_dir`` (default: ``out`` itself, when local) gets the local files (Ray Data's stats)."""
    work_dir = Path(work_dir or out)
    work_dir.mkdir(parents=True, exist_ok=True)
    scores_dir, done_dir, census = (storage.join(out, sub) for sub in ("scores", "_done", "_actors"))
    expected = {f: _expected_ids(f, shard) for f in pool_files}
    todo = _files_to_score(pool_files, expected, scores_dir, done_dir)
    t0 = time.perf_counter()
    rows_todo = int(sum(len(expected[f]) for f in todo))
    if todo:
        ds = _scoring_dataset(exp, model_dir, todo, shard, kind, census)
        out_fs, out_path = storage.resolve(scores_dir)
        ds.write_parquet(out_path, filesystem=out_fs, partition_cols=["src"])
        (work_dir / "ray_data_stats.txt").write_text(ds.stats())  # per-operator wall and CPU time: where it went
        _mark_scored(todo, expected, scores_dir, done_dir)
    elapsed = time.perf_counter() - t0
    return _score_summary(exp, pool_files, expected, todo, rows_todo, elapsed, scores_dir, census)
