"""Pack tokenized documents into fixed-length training sequences (pure NumPy; the Ray Data stage calls this).

Documents are concatenated in order, each followed by EOS, and cut into ``seq_len``-token rows. The tail that
does not fill a row is dropped and counted (``dropped_tokens``); input shorter than one row packs to zero rows,
all of it dropped. Every packed row keeps the ids of the documents it contains and gets a stable id from where
it starts:

    row_id = start_doc_id · 2^20 + start_token_offset_in_that_doc

so the same input always yields the same row ids, whatever machine or worker packs it.

    packed = pack_documents(doc_ids, token_lists, domains, eos_id=0, seq_len=1024)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

OFFSET_BITS = 20  # a document shorter than 2^20 tokens (data.max_doc_chars keeps it so) fits the offset field
MAX_DOC_ID = 1 << (63 - OFFSET_BITS)


@dataclass
class Packed:
    row_ids: np.ndarray  # (N,) int64
    input_ids: np.ndarray  # (N, seq_len) int32
    source_ids: list[np.ndarray]  # N arrays of the document ids in each row
    domains: list[str]  # the domain contributing most tokens to each row
    dropped_tokens: int

    def __len__(self) -> int:
        return len(self.row_ids)


def pack_documents(
    doc_ids: np.ndarray, token_lists: list[np.ndarray], domains: list[str], eos_id: int | None, seq_len: int
) -> Packed:
    """Concatenate documents (+EOS unless ``eos_id`` is None, for already-packed token rows) and cut into rows."""
    if len(doc_ids) and (doc_ids.min() < 0 or doc_ids.max() >= MAX_DOC_ID):
        raise ValueError(f"document ids must lie in [0, 2^{63 - OFFSET_BITS}) to build stable row ids")
    pieces, owner, offset = [], [], []
    for i, toks in enumerate(token_lists):
        toks = np.asarray(toks, dtype=np.int32)
        if eos_id is not None:
            toks = np.append(toks, np.int32(eos_id))
        if len(toks) >= 1 << OFFSET_BITS:
            raise ValueError(f"document {doc_ids[i]} has {len(toks)} tokens (≥ 2^{OFFSET_BITS}); lower max_doc_chars")
        pieces.append(toks)
        owner.append(np.full(len(toks), i, dtype=np.int64))
        offset.append(np.arange(len(toks), dtype=np.int64))
    total_tokens = sum(len(p) for p in pieces)
    n_rows = total_tokens // seq_len
    if n_rows == 0:  # np.split below would return one empty piece for zero rows
        return Packed(np.zeros(0, np.int64), np.zeros((0, seq_len), np.int32), [], [], total_tokens)
    stream = np.concatenate(pieces)  # (total_tokens,)
    owner_all = np.concatenate(owner)  # (total_tokens,) index of the document each token comes from
    offset_all = np.concatenate(offset)  # (total_tokens,) position of the token inside its document
    used = n_rows * seq_len
    input_ids = stream[:used].reshape(n_rows, seq_len)  # (N, L)
    row_owner = owner_all[:used].reshape(n_rows, seq_len)  # (N, L)
    starts = np.arange(n_rows) * seq_len
    row_ids = doc_ids[owner_all[starts]].astype(np.int64) * (1 << OFFSET_BITS) + offset_all[starts]
    # owners are non-decreasing along the stream, so a row's documents are where its owner index changes
    change = np.ones_like(row_owner, dtype=bool)  # (N, L)
    change[:, 1:] = row_owner[:, 1:] != row_owner[:, :-1]
    source_ids = np.split(doc_ids[row_owner[change]].astype(np.int64), np.cumsum(change.sum(1))[:-1])
    names = sorted(set(domains)) if domains else ["unknown"]
    doc_code = np.array([names.index(d) for d in domains] if domains else [0] * len(token_lists))
    tok_code = doc_code[row_owner]  # (N, L) domain code of every token
    per_row = np.bincount((np.arange(n_rows)[:, None] * len(names) + tok_code).ravel(), minlength=n_rows * len(names))
    row_domains = [names[c] for c in per_row.reshape(n_rows, len(names)).argmax(1)]  # majority domain per row
    return Packed(row_ids, input_ids, source_ids, row_domains, int(len(stream) - used))


def shard_of(row_ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Deterministic pool shard of each row (a splitmix64-style hash of the row id, mod n): disjoint, balanced, and
    independent of how the pool is split into files."""
    x = row_ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_shards)).astype(np.int32)


def file_key(path: str) -> str:
    """An input file's filesystem-safe key: the stem of its tokenized output and of its scores' partition."""
    name = path.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]  # a store URI's options are not part of its name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.split(".")[0])
