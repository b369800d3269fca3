"""Corpus readers: one code path for local and ``s3://``/``gs://`` files, row validation and quarantine.

Formats (``DataConfig.pool_format``):

* ``jsonl`` — one JSON object per line with a ``text`` field, optionally ``.gz``/``.zst`` (the ``allenai/c4``
  ``en/c4-train.*.json.gz`` layout);
* ``parquet_text`` — parquet with a ``text`` column (the bundled corpus);
* ``parquet_tokens`` — parquet with already-tokenized ``input_ids`` (the DsDm/MATES C4 candidate-pool layout).

Bad rows are never dropped silently: ``read_file`` returns the good rows and a list of quarantined rows with
their ids and reasons, and counts the file's records apart from validation (``Rows.source_rows``: parquet rows,
jsonl lines), so every stage can assert rows in = rows out + rows quarantined. ``check_file`` is the
cheap pre-flight test that names truncated or corrupt files before any compute.

    rows, bad = read_file("data/corpus/pool-00000.parquet", "parquet_text", DataConfig())
"""

from __future__ import annotations

import fnmatch
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bliss_ray import storage

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = {"pool": "data/corpus/pool-*.parquet", "reference": "data/corpus/reference.parquet"}


@dataclass
class Rows:
    """Good rows of one file: stable ids, and either texts or token lists."""

    ids: np.ndarray  # (N,) int64
    texts: list[str] | None = None
    tokens: list[np.ndarray] | None = None
    domains: list[str] = field(default_factory=list)
    # records in the source file, counted apart from validation (parquet rows, jsonl lines): the rows in that
    # good + quarantined rows must add up to, so a row lost by a reader or a caller cannot go unnoticed
    source_rows: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def resolve_files(patterns: list[str]) -> list[str]:
    """Expand ``bundled:NAME``, directories and globs into a sorted, de-duplicated list of file URIs/paths."""
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("bundled:"):  # bundled:pool, bundled:reference, or bundled:<file glob> in data/corpus
            name = pat.split(":", 1)[1]
            pat = str(REPO_ROOT / BUNDLED.get(name, f"data/corpus/{name}.parquet"))
        fs, path = storage.resolve(pat)
        remote = storage.is_remote(pat)
        scheme = pat.split("://", 1)[0] + "://" if remote else ""
        query = "?" + pat.partition("?")[2] if remote and "?" in pat else ""  # store options stay with every file
        if any(ch in path for ch in "*?["):
            base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        elif fs.get_file_info(path).type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and Path(i.path).name[0] not in "_."]
        elif fs.get_file_info(path).type == pafs.FileType.File:
            found = [path]
        else:
            raise FileNotFoundError(f"no such file or directory: {pat}")
        if not found:
            raise FileNotFoundError(f"pattern matched no files: {pat}")
        out += [scheme + p + query for p in found]
    return sorted(set(out))


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = storage.name(path).lower()  # without a URI's store options
    if any(name.endswith(s) for s in (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            names = pq.read_schema(f).names
        return "parquet_tokens" if "input_ids" in names else "parquet_text"
    raise ValueError(f"cannot infer the format of {path}; set data.pool_format")


def _open_text_stream(path: str):
    fs, p = storage.resolve(path)
    compression = "gzip" if p.endswith(".gz") else "zstd" if p.endswith(".zst") else None
    return fs.open_input_stream(p, compression=compression)


def check_file(path: str, fmt: str) -> str | None:
    """Pre-flight: None if the file is readable, else the reason. Parquet: footer + schema; jsonl: the whole
    compressed stream decodes (a truncated .gz/.zst only fails at its end)."""
    try:
        if fmt.startswith("parquet"):
            fs, p = storage.resolve(path)
            with fs.open_input_file(p) as f:
                meta = pq.read_metadata(f)
                for i in range(meta.num_row_groups):  # a truncated body can keep a valid-looking footer
                    if meta.row_group(i).total_byte_size < 0:
                        return f"row group {i} has a negative size"
            return None
        with _open_text_stream(path) as s:
            while s.read(1 << 24):
                pass
        return None
    except (OSError, pa.ArrowException, EOFError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _decode_text(value) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for one raw text value."""
    if value is None:
        return None, "null text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid utf-8"
    if not isinstance(value, str):
        return None, f"text has type {type(value).__name__}"
    if "\ufffd" in value:  # Arrow readers replace invalid UTF-8 with U+FFFD: junk bytes in the source
        return None, "invalid utf-8"
    try:
        value.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates that no tokenizer can encode
    except UnicodeEncodeError:
        return None, "invalid utf-8 (lone surrogate)"
    if not value.strip():
        return None, "empty text"
    return value, None


def _synthetic_id(file_index: int, row: int) -> int:
    return (file_index << 32) | row


def _finish(
    ids, values, domains, cfg, file_index: int, path: str, source_rows: int, reasons=None
) -> tuple[Rows, list[dict]]:
    """Validate raw (id, text, domain) triples; ``reasons[row]`` pre-marks rows already known to be bad."""
    good_ids, good_texts, good_domains, bad = [], [], [], []
    for row, (rid, value, dom) in enumerate(zip(ids, values, domains, strict=True)):
        rid = _synthetic_id(file_index, row) if rid is None else rid
        reason = (reasons or {}).get(row)
        if reason is None and (not isinstance(rid, (int, np.integer)) or isinstance(rid, bool)):
            rid, reason = _synthetic_id(file_index, row), "non-integer id"
        if reason is None:
            text, reason = _decode_text(value)
        if reason is None and len(text) > cfg.max_doc_chars:
            reason = f"document longer than data.max_doc_chars={cfg.max_doc_chars}"
        if reason:
            bad.append({"id": int(rid), "file": path, "row": row, "reason": reason})
            continue
        good_ids.append(int(rid))
        good_texts.append(text)
        good_domains.append(dom if isinstance(dom, str) else "unknown")
    rows = Rows(np.asarray(good_ids, dtype=np.int64), texts=good_texts, domains=good_domains, source_rows=source_rows)
    return rows, bad


def _read_jsonl(path: str, cfg, file_index: int) -> tuple[Rows, list[dict]]:
    ids, values, domains, reasons = [], [], [], {}
    with _open_text_stream(path) as s:
        data = s.read()
    source_rows = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)  # the last line may lack \n
    for row, line in enumerate(io.BytesIO(data)):
        obj: dict = {}
        try:
            parsed = json.loads(line.decode("utf-8"))
            if isinstance(parsed, dict):
                obj = parsed
            else:
                reasons[row] = "line is not a JSON object"
        except UnicodeDecodeError:
            reasons[row] = "invalid utf-8"
        except ValueError:
            reasons[row] = "invalid json"
        if obj and cfg.text_column not in obj:
            reasons[row] = f"missing column '{cfg.text_column}'"
        ids.append(obj.get(cfg.id_column))
        values.append(obj.get(cfg.text_column))
        domains.append(obj.get(cfg.domain_column) if cfg.domain_column else None)
    return _finish(ids, values, domains, cfg, file_index, path, source_rows, reasons)


def _read_parquet(path: str, fmt: str, cfg, file_index: int, vocab_size: int | None) -> tuple[Rows, list[dict]]:
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        table = pq.read_table(f)
    n = table.num_rows
    ids = table.column(cfg.id_column).to_pylist() if cfg.id_column in table.column_names else [None] * n
    dom_col = cfg.domain_column
    domains = table.column(dom_col).to_pylist() if dom_col and dom_col in table.column_names else [None] * n
    column = "input_ids" if fmt == "parquet_tokens" else cfg.text_column
    if column not in table.column_names:
        bad = [
            {
                "id": int(i) if isinstance(i, int) else _synthetic_id(file_index, r),
                "file": path,
                "row": r,
                "reason": f"missing column '{column}'",
            }
            for r, i in enumerate(ids)
        ]
        empty = {"tokens": []} if fmt == "parquet_tokens" else {"texts": []}
        return Rows(np.zeros(0, np.int64), domains=[], source_rows=n, **empty), bad
    if fmt == "parquet_tokens":
        return _token_rows(table, ids, domains, path, file_index, vocab_size)
    col = table.column(cfg.text_column)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.cast(pa.large_binary())  # decode ourselves: Arrow does not validate UTF-8 on read
    return _finish(ids, col.to_pylist(), domains, cfg, file_index, path, n)


def _token_rows(
    table: pa.Table, ids, domains, path: str, file_index: int, vocab_size: int | None
) -> tuple[Rows, list[dict]]:
    tokens, good_ids, good_domains, bad = [], [], [], []
    for row, (rid, toks, dom) in enumerate(zip(ids, table.column("input_ids").to_pylist(), domains, strict=True)):
        rid = _synthetic_id(file_index, row) if rid is None else rid
        reason = None
        if not isinstance(toks, list) or not toks or not all(isinstance(t, int) and t >= 0 for t in toks):
            reason = "input_ids missing, empty or invalid"
        elif vocab_size is not None and max(toks) >= vocab_size:  # the model could not embed it
            reason = f"token id {max(toks)} ≥ vocabulary size {vocab_size}"
        if reason:
            bad.append({"id": int(rid), "file": path, "row": row, "reason": reason})
            continue
        tokens.append(np.asarray(toks, dtype=np.int32))
        good_ids.append(int(rid))
        good_domains.append(dom if isinstance(dom, str) else "unknown")
    rows = Rows(np.asarray(good_ids, dtype=np.int64), tokens=tokens, domains=good_domains, source_rows=table.num_rows)
    return rows, bad


def read_file(path: str, fmt: str, cfg, file_index: int = 0, vocab_size: int | None = None) -> tuple[Rows, list[dict]]:
    """All rows of one file → (good rows, quarantined rows as {id, file, row, reason}).

    ``file_index`` (the file's position in the sorted file list) makes synthetic ids stable when the source
    has no id column. ``vocab_size`` quarantines pre-tokenized rows holding an id the model cannot embed."""
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        return _read_jsonl(path, cfg, file_index)
    return _read_parquet(path, fmt, cfg, file_index, vocab_size)


def iter_texts(files: list[str], fmt: str, cfg, max_chars: int):
    """Texts of the good rows, file by file, until ``max_chars`` (tokenizer training sample)."""
    seen = 0
    for i, path in enumerate(files):
        rows, _ = read_file(path, fmt, cfg, i)
        for text in rows.texts or []:
            yield text
            seen += len(text)
            if seen >= max_chars:
                return
