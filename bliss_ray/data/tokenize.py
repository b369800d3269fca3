"""Tokenize-and-pack one corpus file (pure Python; the Ray Data stage runs it over files on an actor pool).

Per input file, atomically and idempotently (datatrove-style: a file's ``stats/*.json`` is its completion marker):

    packed/<name>.parquet       row_id, input_ids (seq_len), source_ids, domain       — the training rows
    quarantine/<name>.parquet   id, file, row, reason                                  — every rejected row
    stats/<name>.json           rows_in = docs_packed + rows_quarantined, tokens, seqs, dropped tokens

Packing runs per file, in file order, so the output is a pure function of the file: the same row ids and the
same sequences on any machine, however Ray Data splits the work (Ray Data's ``read_*`` would coalesce small
files into one block and split big ones, which would make the packing — and every later stage — depend on
execution details).

``cloze_rows`` builds LAMBADA-style reference items (context → last word) for ``reference_loss=continuation``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bliss_ray.data.corpus import read_file
from bliss_ray.data.packing import file_key, pack_documents
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


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def output_name(path: str, file_index: int) -> str:
    return f"{file_index:05d}-{file_key(path)}"


def tokenize_file(path: str, file_index: int, fmt: str, data_cfg, tokenizer, out_dir: str | Path) -> dict:
    """Process one file into ``out_dir``; returns its stats (re-read from disk if the file was already done)."""
    out = Path(out_dir)
    name = output_name(path, file_index)
    marker = out / "stats" / f"{name}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    for sub in ("packed", "quarantine", "stats"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows, bad = read_file(path, fmt, data_cfg, file_index)
    vocab = len(tokenizer)
    if rows.tokens is not None:  # already tokenized: reject ids the model could not embed
        keep = np.array([int(t.max()) < vocab for t in rows.tokens], dtype=bool)
        bad += [
            {"id": int(i), "file": path, "row": -1, "reason": f"token id ≥ vocabulary size {vocab}"}
            for i in rows.ids[~keep]
        ]
        token_lists = [t for t, k in zip(rows.tokens, keep, strict=True) if k]
        ids, domains, eos = rows.ids[keep], [d for d, k in zip(rows.domains, keep, strict=True) if k], None
    else:
        token_lists = [np.asarray(t, np.int32) for t in tokenizer(rows.texts, add_special_tokens=False)["input_ids"]]
        ids, domains, eos = rows.ids, rows.domains, tokenizer.eos_token_id
    packed = pack_documents(ids, token_lists, domains, eos, data_cfg.seq_len)
    table = pa.table(
        {
            "row_id": pa.array(packed.row_ids, pa.int64()),
            "input_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(packed.input_ids.ravel(), pa.int32()), data_cfg.seq_len
            ),
            "source_ids": pa.array([s.tolist() for s in packed.source_ids], pa.list_(pa.int64())),
            "domain": pa.array(packed.domains, pa.string()),
        },
        schema=packed_schema(data_cfg.seq_len),
    )
    _atomic_parquet(table, out / "packed" / f"{name}.parquet")
    if bad:
        _atomic_parquet(pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA), out / "quarantine" / f"{name}.parquet")
    domain_counts: dict[str, int] = {}
    for d in packed.domains:
        domain_counts[d] = domain_counts.get(d, 0) + 1
    stats = FileStats(
        path,
        len(rows) + len(bad),
        len(ids),
        len(bad),
        len(packed),
        int(packed.input_ids.size),
        packed.dropped_tokens,
        domain_counts,
    )
    stats.check()
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(asdict(stats)))
    os.replace(tmp, marker)  # written last: the file is done
    return asdict(stats)


_WORD_END = re.compile(r"(\S+?)([\"'”’)\].,;:!?]*)\s*$")


def cloze_rows(texts: list[str], tokenizer, seq_len: int, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """LAMBADA-style items: (input_ids (N, L), loss_mask (N, L)) with the loss on the last word only.

    The context is left-truncated to fit; rows are right-padded with EOS (causal attention never looks ahead,
    so padding after the target changes nothing)."""
    ids_out, mask_out = [], []
    for text in texts:
        m = _WORD_END.search(text.strip())
        if not m or len(m.group(1)) < 2:
            continue
        context, word = text.strip()[: m.start(1)].rstrip(), m.group(1)
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not ctx or len(tgt) >= seq_len // 2:
            continue
        ctx = ctx[-(seq_len - len(tgt)) :]
        row = np.full(seq_len, tokenizer.eos_token_id, np.int32)
        mask = np.zeros(seq_len, np.int8)
        row[: len(ctx) + len(tgt)] = ctx + tgt
        mask[len(ctx) : len(ctx) + len(tgt)] = 1
        ids_out.append(row)
        mask_out.append(mask)
        if len(ids_out) >= max_items:
            break
    if not ids_out:
        raise ValueError("no usable cloze items in the reference set")
    return np.stack(ids_out), np.stack(mask_out)
