"""Checks of the bundled corpus in ``data/corpus/`` (built by ``data/build_corpus.py``, data card ``data/README.md``).

What is checked:
  * every parquet file has the columns id (int64), text (string), domain (string), optional source (string);
  * ids are unique across pool and reference, and the two id sets are disjoint;
  * no null values, no empty or whitespace-only text, no control characters or untrimmed text;
  * the pool has >= 5 snake_case domains, >= 5,000,000 characters, and every pool file mixes domains;
  * the reference set is the held-out novel (Persuasion) and is disjoint from the pool: no shared ids, no
    shared passage texts, and 50-character shingles sampled from it do not occur in the pool's Austen text;
  * manifest.json matches the files (sha256, row counts, per-domain counts);
  * passage lengths are sane (>= 95 % between 200 and 4000 characters).

Run:  .venv/bin/python -m pytest tests/test_corpus.py   (no Ray; a few seconds)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
POOL_FILES = [f"pool-{i:05d}.parquet" for i in range(8)]
ALL_FILES = [*POOL_FILES, "reference.parquet"]
REQUIRED = {"id": pa.int64(), "text": pa.string(), "domain": pa.string()}
OPTIONAL = {"source": pa.string()}
REFERENCE_NOVEL = "Persuasion"
SHINGLE = 50


@pytest.fixture(scope="module")
def manifest() -> dict:
    """The build manifest."""
    return json.loads((CORPUS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pool() -> pa.Table:
    """All eight pool files as one table."""
    return pa.concat_tables(pq.read_table(CORPUS / name) for name in POOL_FILES)


@pytest.fixture(scope="module")
def reference() -> pa.Table:
    """The held-out reference set."""
    return pq.read_table(CORPUS / "reference.parquet")


def test_expected_files_and_nothing_else():
    """Exactly eight pool shards plus the reference set (a stale extra shard would be read by loaders)."""
    assert sorted(p.name for p in CORPUS.glob("*.parquet")) == sorted(ALL_FILES)


@pytest.mark.parametrize("name", ALL_FILES)
def test_schema(name: str):
    """Required columns with exact types; only the optional ``source`` column besides them."""
    schema = pq.read_schema(CORPUS / name)
    types = {field.name: field.type for field in schema}
    for column, dtype in REQUIRED.items():
        assert types.get(column) == dtype, f"{name}: {column} is {types.get(column)}, expected {dtype}"
    extra = set(types) - set(REQUIRED)
    assert extra <= set(OPTIONAL), f"{name}: unexpected columns {extra}"
    for column in extra:
        assert types[column] == OPTIONAL[column]


def test_no_nulls_no_empty_or_unclean_text(pool: pa.Table, reference: pa.Table):
    """Every cell is set; text is non-empty, trimmed and free of control characters and carriage returns."""
    for table in (pool, reference):
        for column in table.column_names:
            assert table[column].null_count == 0, f"nulls in {column}"
        text = table["text"]
        assert pc.all(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)).as_py()
        assert pc.all(pc.equal(pc.utf8_trim_whitespace(text), text)).as_py(), "untrimmed text"
        assert not pc.any(pc.match_substring_regex(text, r"[\x00-\x08\x0b-\x1f\x7f]")).as_py()
        assert not pc.any(pc.match_substring(text, "\n\n\n")).as_py(), "runs of blank lines"


def test_ids_unique_and_disjoint(pool: pa.Table, reference: pa.Table):
    """Ids are unique within pool and reference, and no id is shared between them."""
    pool_ids, ref_ids = pool["id"].to_pylist(), reference["id"].to_pylist()
    assert len(set(pool_ids)) == len(pool_ids)
    assert len(set(ref_ids)) == len(ref_ids)
    assert set(pool_ids).isdisjoint(ref_ids)


def test_pool_domains_and_size(pool: pa.Table):
    """At least five snake_case domains and five million characters; every domain has real content."""
    counts = Counter(pool["domain"].to_pylist())
    assert len(counts) >= 5, counts
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", d) for d in counts), counts
    assert min(counts.values()) >= 20, counts
    assert pc.sum(pc.utf8_length(pool["text"])).as_py() >= 5_000_000


@pytest.mark.parametrize("name", POOL_FILES)
def test_each_pool_file_mixes_domains(name: str, pool: pa.Table):
    """The pool was shuffled before sharding, so every shard holds (almost) every domain."""
    shard = set(pq.read_table(CORPUS / name, columns=["domain"])["domain"].to_pylist())
    assert len(shard) >= len(set(pool["domain"].to_pylist())) - 1


def test_reference_is_the_held_out_novel(pool: pa.Table, reference: pa.Table):
    """The reference set is one whole Austen novel, and none of its passages is attributed to the pool."""
    assert reference.num_rows >= 100
    assert set(reference["domain"].to_pylist()) == {"austen"}
    if "source" in reference.column_names:
        assert set(reference["source"].to_pylist()) == {REFERENCE_NOVEL}
        assert REFERENCE_NOVEL not in set(pool["source"].to_pylist())


def test_reference_texts_not_in_pool(pool: pa.Table, reference: pa.Table):
    """No reference passage text appears verbatim in the pool."""
    assert set(reference["text"].to_pylist()).isdisjoint(pool["text"].to_pylist())


def _shingles(texts: list[str], per_text: int, seed: int = 0) -> list[str]:
    """Deterministically sampled 50-character substrings of ``texts``."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        for _ in range(per_text):
            start = rng.randrange(len(text) - SHINGLE)
            out.append(text[start : start + SHINGLE])
    return out


def test_reference_shingles_absent_from_pool_austen(pool: pa.Table, reference: pa.Table):
    """Sampled reference shingles never occur in pool Austen text, while pool shingles do (positive control)."""
    austen = pool.filter(pc.equal(pool["domain"], "austen"))["text"].to_pylist()
    assert len(austen) >= 100
    haystack = "\n".join(austen)
    leaked = [s for s in _shingles(reference["text"].to_pylist(), per_text=3) if s in haystack]
    assert not leaked, f"{len(leaked)} reference shingles found in the pool, e.g. {leaked[0]!r}"
    # The same check on pool passages must find every shingle, or it could never fail.
    control = _shingles(austen[:200], per_text=1, seed=1)
    assert all(s in haystack for s in control)


@pytest.mark.parametrize("name", ALL_FILES)
def test_manifest_matches_file(name: str, manifest: dict):
    """The manifest's sha256 and row count are those of the committed file."""
    entry = manifest["files"][name]
    assert hashlib.sha256((CORPUS / name).read_bytes()).hexdigest() == entry["sha256"]
    assert pq.ParquetFile(CORPUS / name).metadata.num_rows == entry["rows"]


def test_manifest_counts(manifest: dict, pool: pa.Table, reference: pa.Table):
    """Per-domain passage and character counts and the package list in the manifest are accurate."""
    assert set(manifest["files"]) == set(ALL_FILES)
    lengths = pc.utf8_length(pool["text"]).to_pylist()
    stats: dict[str, list[int]] = {}
    for domain, n in zip(pool["domain"].to_pylist(), lengths, strict=True):
        stats.setdefault(domain, [0, 0])
        stats[domain][0] += 1
        stats[domain][1] += n
    assert {d: [s["passages"], s["chars"]] for d, s in manifest["pool"]["domains"].items()} == stats
    assert manifest["pool"]["passages"] == pool.num_rows
    assert manifest["reference_stats"]["passages"] == reference.num_rows
    assert all(p["version"] and len(p["sha256"]) == 64 for p in manifest["packages"].values())


def test_passage_lengths(pool: pa.Table, reference: pa.Table):
    """>= 95 % of passages are 200-4000 characters; none is near-empty (< 100) or huge (> 4000)."""
    for table in (pool, reference):
        lengths = pc.utf8_length(table["text"]).to_pylist()
        in_range = sum(200 <= n <= 4000 for n in lengths) / len(lengths)
        assert in_range >= 0.95, in_range
        assert min(lengths) >= 100 and max(lengths) <= 4000, (min(lengths), max(lengths))
