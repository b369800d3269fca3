"""Tokenize-and-pack one corpus file (pure Python; the Ray Data stage runs it over files on an actor pool).

Per input file, atomically and idempotently (datatrove-style: a file's ``stats/*.json`` is its completion marker):

    packed/<name>.parquet       row_id, input_ids (seq_len), source_ids, domain       — the training rows
    quarantine/<name>.parquet   id, file, row, reason                                  — every rejected row
    stats/<name>.json           rows_in = docs_packed + rows_quarantined, tokens, seqs, dropped tokens

``rows_in`` is the file's record count taken apart from validation (parquet rows, jsonl lines), so a row that
validation loses or counts twice fails the check. Pre-tokenized rows with an id ≥ the vocabulary are quarantined.
A file whose documents fill no whole ``seq_len`` row (a short file) packs to zero sequences: it writes no
``packed/`` file, its tokens count as dropped, and the stage goes on.

Packing runs per file, in file order, so the output is a pure function of the file: the same row ids and the
same sequences on any machine, however Ray Data splits the work (Ray Data's ``read_*`` would coalesce small
files into one block and split big ones, which would make the packing — and every later stage — depend on
execution details).

``pack_texts`` packs documents that come from no file (the canaries) the same way. ``cloze_item`` builds a
LAMBADA-style reference item (context → last word) for ``reference_loss=continuation``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bliss_ray import storage
from bliss_ray.data.corpus import read_file
from bliss_ray.data.packing import Packed, file_key, pack_documents
from bliss_ray.data.tokens import packed_schema

QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.int64()), ("file", pa.string()), ("row", pa.int64()), ("reason", pa.string())]
)


@dataclass
class FileStats:
    file: str
    rows_in: int
    docs_packed: int
    rows_quarantined: int
    seqs: int
    tokens: int
    dropped_tokens: int
    domains: dict

    def check(self) -> None:
        if self.rows_in != self.docs_packed + self.rows_quarantined:
            raise AssertionError(
                f"{self.file}: rows in {self.rows_in} != packed {self.docs_packed} + "
                f"quarantined {self.rows_quarantined}"
            )


def packed_table(packed: Packed, seq_len: int) -> pa.Table:
    """Packed rows as the pool's parquet layout (``tokens.packed_schema``)."""
    return pa.table(
        {
            "row_id": pa.array(packed.row_ids, pa.int64()),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(packed.input_ids.ravel(), pa.int32()), seq_len),
            "source_ids": pa.array([s.tolist() for s in packed.source_ids], pa.list_(pa.int64())),
            "domain": pa.array(packed.domains, pa.string()),
        },
        schema=packed_schema(seq_len),
    )


def pack_texts(doc_ids: np.ndarray, texts: list[str], domain: str, tokenizer, seq_len: int, loc: str) -> Packed:
    """Tokenize and pack documents of one domain, as ``tokenize_file`` packs a file, into the parquet file ``loc``
    (a local path or a store URI; none when they fill no row). Returns the packed rows."""
    token_lists = [np.asarray(t, np.int32) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    packed = pack_documents(doc_ids, token_lists, [domain] * len(texts), tokenizer.eos_token_id, seq_len)
    if len(packed):
        storage.write_table(loc, packed_table(packed, seq_len), compression="zstd")
    return packed


def output_name(path: str, file_index: int) -> str:
    return f"{file_index:05d}-{file_key(path)}"


def tokenize_file(path: str, file_index: int, fmt: str, data_cfg, tokenizer, out_dir: str | Path) -> dict:
    """Process one file into ``out_dir`` (a local path or a store URI); returns its stats (re-read from the
    store if the file was already done)."""
    name = output_name(path, file_index)
    marker = storage.join(out_dir, "stats", f"{name}.json")
    done = storage.read_json(marker)
    if done is not None:
        return done
    # already-tokenized rows with an id the model could not embed are quarantined by the reader
    rows, bad = read_file(path, fmt, data_cfg, file_index, vocab_size=len(tokenizer))
    if rows.tokens is not None:
        token_lists, eos = rows.tokens, None
    else:
        token_lists = [np.asarray(t, np.int32) for t in tokenizer(rows.texts, add_special_tokens=False)["input_ids"]]
        eos = tokenizer.eos_token_id
    packed = pack_documents(rows.ids, token_lists, rows.domains, eos, data_cfg.seq_len)
    if len(packed):  # no empty file for later stages to special-case
        packed_loc = storage.join(out_dir, "packed", f"{name}.parquet")
        storage.write_table(packed_loc, packed_table(packed, data_cfg.seq_len), compression="zstd")
    if bad:
        quarantine = pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)
        storage.write_table(storage.join(out_dir, "quarantine", f"{name}.parquet"), quarantine, compression="zstd")
    domain_counts: dict[str, int] = {}
    for d in packed.domains:
        domain_counts[d] = domain_counts.get(d, 0) + 1
    stats = FileStats(
        path,
        rows.source_rows,
        len(rows),
        len(bad),
        len(packed),
        int(packed.input_ids.size),
        packed.dropped_tokens,
        domain_counts,
    )
    stats.check()
    storage.write_json(marker, asdict(stats))  # written last: the file is done
    return asdict(stats)


_WORD_END = re.compile(r"(\S+?)([\"'”’)\].,;:!?]*)\s*$")


def cloze_item(text: str, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One LAMBADA-style item: (input_ids (L,), loss_mask (L,)) with the loss on the last word only; None when the
    text has no usable last word. The context is left-truncated to fit; the row is right-padded with EOS (causal
    attention never looks ahead, so padding after the target changes nothing)."""
    m = _WORD_END.search(text.strip())
    if not m or len(m.group(1)) < 2:
        return None
    context, word = text.strip()[: m.start(1)].rstrip(), m.group(1)
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ctx or len(tgt) >= seq_len // 2:
        return None
    ctx = ctx[-(seq_len - len(tgt)) :]
    row = np.full(seq_len, tokenizer.eos_token_id, np.int32)
    mask = np.zeros(seq_len, np.int8)
    row[: len(ctx) + len(tgt)] = ctx + tgt
    mask[len(ctx) : len(ctx) + len(tgt)] = 1
    return row, mask
