"""Packed-sequence storage and deterministic, step-indexed batching for training.

The tokenize stage writes packed rows as parquet (``row_id``, ``input_ids`` fixed-size list, ``source_ids``,
``domain``). Training reads a ``TokenArray``: the rows it needs materialised once into a ``.npy``
memmap (N, L), so every worker can index any row without a data service. In an object store, a rank that trains
on fewer rows than a large array (64 MiB or more) holds reads just those, ranged GETs per batch (``StoreRows``;
``open_for`` decides), instead of copying the array to its node. Batches are a pure function of the
step: the global batch of step s is the s-th slice of an epoch-seeded permutation, and rank r's micro-batch a
is a fixed slice of it. That gives

* exact resume: a restarted worker recomputes the batches of any step (Ray 2.60 Data has no mid-epoch resume);
* exact parity: 1 worker × 2 micro-batches sees the same sequences as 2 workers × 1 micro-batch.

    arr = TokenArray.build(files, out_dir, keep_ids=selected_ids)
    for mb in micro_batches(arr.tokens, step, global_batch=32, micro_batch=8, rank=0, world_size=2, seed=0): ...
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bliss_ray import storage
from bliss_ray.data.packing import shard_of

if TYPE_CHECKING:  # torch is imported where batches are made: building an array (a short Ray task) needs none
    import torch


def packed_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            ("row_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("source_ids", pa.list_(pa.int64())),
            ("domain", pa.string()),
        ]
    )


def read_token_table(path: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pq.read_table(f, columns=columns, filters=filters)


def tokens_of(table: pa.Table) -> np.ndarray:
    """The (N, L) int32 token matrix of a packed table, without a Python loop."""
    col = table.column("input_ids").combine_chunks()
    seq_len = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, seq_len)


@dataclass
class TokenArray:
    tokens: np.ndarray  # (N, L) int32, usually a read-only memmap
    row_ids: np.ndarray  # (N,) int64
    loss_mask: np.ndarray | None = None  # (N, L) int8, only for continuation-style reference items

    def __len__(self) -> int:
        return len(self.row_ids)

    @staticmethod
    def build(
        files: list[str], out_dir: str | Path, keep_ids: np.ndarray | None = None, shard: tuple[int, int] | None = None
    ) -> TokenArray:
        """Materialise the rows of ``files`` (optionally only ``keep_ids`` / shard (index, count)) into ``out_dir``.
        Idempotent: an existing complete array is reused. Streams file by file; memory stays flat."""
        out = Path(out_dir)
        if (out / "_SUCCESS").exists():
            return TokenArray.open(out)
        out.mkdir(parents=True, exist_ok=True)
        keep = None if keep_ids is None else np.unique(np.asarray(keep_ids, dtype=np.int64))
        masks, seq_len = [], None
        for f in files:  # pass 1: which rows of each file to keep (ids only)
            row_ids = read_token_table(f, ["row_id"]).column("row_id").to_numpy()
            m = np.ones(len(row_ids), bool)
            if keep is not None:
                m &= np.isin(row_ids, keep)
            if shard is not None:
                m &= shard_of(row_ids, shard[1]) == shard[0]
            masks.append(m)
        n = int(sum(m.sum() for m in masks))
        if n == 0:
            raise ValueError(f"no rows to materialise into {out} (keep_ids/shard filter matched nothing)")
        tmp_tokens, tmp_ids = out / "tokens.npy.tmp", out / "row_ids.npy.tmp"
        tokens = ids = None
        pos = 0
        for f, m in zip(files, masks, strict=True):  # pass 2: copy the kept rows
            if not m.any():
                continue
            t = read_token_table(f, ["row_id", "input_ids"])
            block = tokens_of(t)[m]  # (n_f, L)
            if tokens is None:
                seq_len = block.shape[1]
                tokens = np.lib.format.open_memmap(tmp_tokens, mode="w+", dtype=np.int32, shape=(n, seq_len))
                ids = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int64, shape=(n,))
            tokens[pos : pos + len(block)] = block
            ids[pos : pos + len(block)] = t.column("row_id").to_numpy()[m]
            pos += len(block)
        tokens.flush()
        ids.flush()
        del tokens, ids
        os.replace(tmp_tokens, out / "tokens.npy")
        os.replace(tmp_ids, out / "row_ids.npy")
        (out / "_SUCCESS").write_text(f"{n} rows\n")
        return TokenArray.open(out)

    @staticmethod
    def open_for(loc: str, rows_read: int, copy_below_bytes: int = 64 << 20) -> TokenArray:
        """The array at location ``loc`` for a rank that will read ``rows_read`` rows of it (re-reads counted): this
        node's copy (shared by the node's ranks) when ``loc`` is local, the array is under ``copy_below_bytes`` (one
        GET beats hundreds of small ones) or the rank reads at least as many rows as it holds; else the tokens stay
        in the store and each batch reads its rows there (``StoreRows``), so a rank of a large run moves what it
        trains on, not the whole selection, at start and on every resume."""
        if storage.is_remote(loc) and storage.size(storage.join(loc, "tokens.npy")) >= copy_below_bytes:
            rows = StoreRows(storage.join(loc, "tokens.npy"))
            if rows_read < len(rows):
                ids = np.load(io.BytesIO(storage.read_bytes(storage.join(loc, "row_ids.npy"))))
                mask = storage.read_bytes(storage.join(loc, "loss_mask.npy"))
                return TokenArray(rows, ids, None if mask is None else np.load(io.BytesIO(mask)))
        return TokenArray.open(storage.local_copy(loc))

    @staticmethod
    def open(out_dir: str | Path) -> TokenArray:
        out = Path(out_dir)
        mask = out / "loss_mask.npy"
        return TokenArray(
            np.load(out / "tokens.npy", mmap_mode="r"),
            np.load(out / "row_ids.npy", mmap_mode="r"),
            np.load(mask) if mask.exists() else None,
        )


class StoreRows:
    """The (N, L) matrix of a ``.npy`` file in an object store, indexed like the memmap it stands in for
    (``rows[int array]``): only the requested rows are read, one ranged GET per run of consecutive rows, several at
    once. The header (shape, dtype, where the data starts) is read once, with the first ranged GET."""

    HEADER_BYTES = 4096  # numpy pads headers to a multiple of 64 bytes; ours are under 128

    def __init__(self, loc: str, threads: int = 8):
        self._read = storage.range_reader(loc)
        head = io.BytesIO(self._read(0, self.HEADER_BYTES))
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read_header(head)
        if fortran or len(self.shape) != 2:
            raise ValueError(f"{loc}: expected a C-ordered 2-D array, found shape {self.shape}")
        self._start, self._row_bytes = head.tell(), self.shape[1] * self.dtype.itemsize
        self._pool = ThreadPoolExecutor(max_workers=threads)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise IndexError(f"rows {idx} out of a {self.shape} array")
        rows, back = np.unique(idx, return_inverse=True)  # sorted, so consecutive rows make one range
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
        parts = self._pool.map(
            lambda run: self._read(self._start + int(run[0]) * self._row_bytes, len(run) * self._row_bytes), runs
        )
        flat = np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(-1, self.shape[1])  # (unique rows, L)
        return flat[back]  # (len(idx), L), in the order asked


@lru_cache(maxsize=4)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_indices(step: int, global_batch: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    k = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)  # global sample counters
    epochs, pos = k // n_rows, k % n_rows
    return np.array([_epoch_permutation(n_rows, seed, int(e))[p] for e, p in zip(epochs, pos, strict=True)])


def micro_batches(
    tokens: np.ndarray, step: int, global_batch: int, micro_batch: int, rank: int, world_size: int, seed: int
) -> list[torch.Tensor]:
    """This rank's micro-batches of ``step``: micro-batch a of rank r holds global slots
    [a·m·W + r·m, a·m·W + (r+1)·m). Raises if the global batch does not split evenly."""
    import torch  # lazy: see the TYPE_CHECKING import

    per_micro = micro_batch * world_size
    if global_batch % per_micro:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro_batch·workers = {per_micro}")
    idx = step_indices(step, global_batch, len(tokens), seed)
    out = []
    for a in range(global_batch // per_micro):
        mine = np.sort(idx[a * per_micro + rank * micro_batch : a * per_micro + (rank + 1) * micro_batch])
        out.append(torch.from_numpy(np.asarray(tokens[mine], dtype=np.int64)))  # (m, L); sorted reads are faster
    return out


def rank_rows(
    array: TokenArray, step: int, micro_batch: int, rank: int, world_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's ``micro_batch`` rows of ``step`` (global batch = micro_batch · workers) and their loss mask."""
    import torch  # lazy: see the TYPE_CHECKING import

    idx = step_indices(step, micro_batch * world_size, len(array), seed)
    mine = np.sort(idx[rank * micro_batch : (rank + 1) * micro_batch])
    ids = torch.from_numpy(np.asarray(array.tokens[mine], dtype=np.int64))  # (m, L)
    mask = None if array.loss_mask is None else torch.from_numpy(np.asarray(array.loss_mask[mine], dtype=np.int64))
    return ids, mask


class Prefetcher:
    """Prepares step s+1's micro-batches on a background thread while step s computes; on CUDA the tensors are
    pinned so the copy to the device can be ``non_blocking``. A step other than the one prefetched (a branch that
    jumps back, a replay after a restart) is loaded synchronously."""

    def __init__(self, load: Callable[[int], list[torch.Tensor]], pin: bool):
        self.load, self.pin = load, pin
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, object] = {}

    def _prepare(self, step: int) -> list[torch.Tensor]:
        batches = self.load(step)
        return [b.pin_memory() for b in batches] if self.pin else batches

    def __call__(self, step: int) -> list[torch.Tensor]:
        future = self.pending.pop(step, None)
        batches = future.result() if future is not None else self._prepare(step)
        self.pending = {step + 1: self.pool.submit(self._prepare, step + 1)}
        return batches
