"""Data layer without Ray: readers for every format, quarantine of bad rows, pre-flight checks, the tokenizer,
packing, stable row ids, sharding, the token store and step-indexed batches.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bliss_ray.config import DataConfig
from bliss_ray.data.corpus import check_file, detect_format, read_file, resolve_files
from bliss_ray.data.packing import OFFSET_BITS, pack_documents, shard_of
from bliss_ray.data.tokenize import cloze_item, tokenize_file
from bliss_ray.data.tokenizer import EOS, load_tokenizer, train_bpe
from bliss_ray.data.tokens import TokenArray, micro_batches, step_indices

CFG = DataConfig(seq_len=16, max_doc_chars=500)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It was a truth universally acknowledged.",
    "import numpy as np  # a line of code",
    "In the beginning was the word.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_bpe(iter(TEXTS), vocab_size=300)
    d = tmp_path_factory.mktemp("tok")
    t.save_pretrained(str(d))
    return load_tokenizer(d)


def _jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def test_jsonl_plain_gz_and_zst_read_the_same(tmp_path):
    rows = [{"id": i, "text": t, "domain": "d"} for i, t in enumerate(TEXTS[:4])]
    _jsonl(tmp_path / "a.jsonl", rows)
    _jsonl(tmp_path / "b.jsonl.gz", rows, gzip.open)
    with pa.CompressedOutputStream(str(tmp_path / "c.jsonl.zst"), "zstd") as f:
        f.write("\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    outs = [read_file(str(tmp_path / n), "auto", CFG) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")]
    for good, bad in outs:
        assert good.texts == TEXTS[:4] and good.ids.tolist() == [0, 1, 2, 3] and bad == []
    assert detect_format(str(tmp_path / "b.jsonl.gz")) == "jsonl"


def test_bad_jsonl_rows_are_quarantined_with_reasons(tmp_path):
    lines = [
        json.dumps({"id": 1, "text": "fine text"}),
        json.dumps({"id": 2, "text": None}),
        json.dumps({"id": 3, "text": "   "}),
        json.dumps({"id": 4, "text": "x" * 501}),
        json.dumps({"id": 5, "body": "no text field"}),
        json.dumps({"id": 6, "text": 42}),
        "{not json",
        json.dumps({"id": "seven", "text": "string id"}),
    ]
    path = tmp_path / "bad.jsonl"
    _jsonl(path, lines)
    with open(path, "ab") as f:
        f.write(b'{"id": 9, "text": "\xff\xfe broken utf-8"}\n')
    good, bad = read_file(str(path), "jsonl", CFG)
    reasons = {b["row"]: b["reason"] for b in bad}
    assert good.ids.tolist() == [1]
    assert good.source_rows == 9 == len(good) + len(bad)  # rows in (9 lines written) = out + quarantined
    assert reasons[1] == "null text" and reasons[2] == "empty text" and "max_doc_chars" in reasons[3]
    assert "missing column" in reasons[4] and "type int" in reasons[5] and reasons[6] == "invalid json"
    assert reasons[7] == "non-integer id" and reasons[8] == "invalid utf-8"


def test_parquet_text_with_bad_rows_and_missing_column(tmp_path):
    t = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "text": pa.array([b"ok text", None, b"bad \xff bytes"]),
            "domain": ["a", "b", "c"],
        }
    )
    pq.write_table(t, tmp_path / "t.parquet")
    good, bad = read_file(str(tmp_path / "t.parquet"), "parquet_text", CFG)
    assert good.texts == ["ok text"] and good.domains == ["a"]
    assert sorted(b["reason"] for b in bad) == ["invalid utf-8", "null text"]
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), tmp_path / "m.parquet")
    good, bad = read_file(str(tmp_path / "m.parquet"), "parquet_text", CFG)
    assert len(good) == 0 and len(bad) == 2 and all("missing column 'text'" in b["reason"] for b in bad)


def test_parquet_tokens_layout(tmp_path):
    t = pa.table({"input_ids": [[1, 2, 3], [], [4, -1], [5, 300]], "id": [7, 8, 9, 10]})
    pq.write_table(t, tmp_path / "tok.parquet")
    assert detect_format(str(tmp_path / "tok.parquet")) == "parquet_tokens"
    good, bad = read_file(str(tmp_path / "tok.parquet"), "auto", CFG)
    assert good.ids.tolist() == [7, 10] and [b["id"] for b in bad] == [8, 9] and good.source_rows == 4
    good, bad = read_file(str(tmp_path / "tok.parquet"), "auto", CFG, vocab_size=300)  # ids 0..299 embed
    assert good.ids.tolist() == [7] and [(b["id"], b["row"]) for b in bad] == [(8, 1), (9, 2), (10, 3)]
    assert bad[-1]["reason"] == "token id 300 ≥ vocabulary size 300"
    pq.write_table(pa.table({"id": [1, 2], "tokens": [[1], [2]]}), tmp_path / "nocol.parquet")
    good, bad = read_file(str(tmp_path / "nocol.parquet"), "parquet_tokens", CFG)
    assert len(good) == 0 and good.source_rows == 2 and {b["reason"] for b in bad} == {"missing column 'input_ids'"}


def test_synthetic_ids_are_stable_per_file_position(tmp_path):
    _jsonl(tmp_path / "x.jsonl", [{"text": "a b c"}, {"text": "d e f"}])
    good, _ = read_file(str(tmp_path / "x.jsonl"), "jsonl", CFG, file_index=3)
    assert good.ids.tolist() == [(3 << 32) | 0, (3 << 32) | 1]


def test_preflight_names_truncated_files(tmp_path):
    pq.write_table(pa.table({"id": list(range(100)), "text": ["t"] * 100}), tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    _jsonl(tmp_path / "ok.jsonl.gz", [{"text": "x" * 1000}] * 200, gzip.open)
    gz = (tmp_path / "ok.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    assert check_file(str(tmp_path / "ok.parquet"), "parquet_text") is None
    assert check_file(str(tmp_path / "ok.jsonl.gz"), "jsonl") is None
    assert check_file(str(tmp_path / "cut.parquet"), "parquet_text") is not None
    assert check_file(str(tmp_path / "cut.jsonl.gz"), "jsonl") is not None


def test_resolve_files_globs_dirs_and_bundled(tmp_path):
    for n in ("a.jsonl", "b.jsonl", "_SUCCESS"):
        (tmp_path / n).write_text("{}\n")
    assert [p.split("/")[-1] for p in resolve_files([str(tmp_path)])] == ["a.jsonl", "b.jsonl"]
    assert len(resolve_files([str(tmp_path / "*.jsonl")])) == 2
    assert len(resolve_files(["bundled:pool"])) == 8 and len(resolve_files(["bundled:pool-0000[0-1]"])) == 2
    with pytest.raises(FileNotFoundError):
        resolve_files([str(tmp_path / "nope.jsonl")])


def test_tokenizer_roundtrip_and_special_tokens(tok):
    assert tok.eos_token == EOS and tok.eos_token_id == 0 and tok.pad_token_id == 1
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"


def test_bpe_training_is_deterministic():
    a = train_bpe(iter(TEXTS), 300)
    b = train_bpe(iter(TEXTS), 300)
    assert a.get_vocab() == b.get_vocab()


def test_packing_row_ids_sources_and_tail():
    ids = np.array([10, 11])
    p = pack_documents(ids, [np.arange(1, 8), np.arange(20, 26)], ["x", "y"], eos_id=0, seq_len=5)
    # stream: 1..7 0 20..25 0 = 15 tokens -> 3 rows, no tail
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 20, 21], [22, 23, 24, 25, 0]]
    assert p.row_ids.tolist() == [10 << OFFSET_BITS, (10 << OFFSET_BITS) + 5, (11 << OFFSET_BITS) + 2]
    assert [s.tolist() for s in p.source_ids] == [[10], [10, 11], [11]]
    assert p.domains == ["x", "x", "y"] and p.dropped_tokens == 0  # majority domain per row
    again = pack_documents(ids, [np.arange(1, 8), np.arange(20, 26)], ["x", "y"], eos_id=0, seq_len=5)
    assert np.array_equal(again.row_ids, p.row_ids)


def test_input_shorter_than_one_row_packs_to_nothing_and_is_counted_as_dropped():
    ids = np.array([10, 11])
    short = pack_documents(ids, [np.arange(1, 3), np.arange(3, 4)], ["x", "y"], eos_id=0, seq_len=6)
    # stream: 1 2 0 3 0 = 5 tokens < 6 → no row, all 5 dropped
    assert len(short) == 0 and short.input_ids.shape == (0, 6) and short.source_ids == [] and short.domains == []
    assert short.dropped_tokens == 5
    exact = pack_documents(ids, [np.arange(1, 3), np.arange(3, 5)], ["x", "y"], eos_id=0, seq_len=6)
    assert exact.input_ids.tolist() == [[1, 2, 0, 3, 4, 0]] and exact.dropped_tokens == 0  # one row, no tail
    assert [s.tolist() for s in exact.source_ids] == [[10, 11]]


def test_shards_are_disjoint_balanced_and_stable():
    rows = np.arange(30000, dtype=np.int64) * 7919
    s = shard_of(rows, 5)
    assert set(np.unique(s)) == set(range(5))
    assert np.bincount(s).min() > 5500  # balanced: 6000 ± noise
    assert np.array_equal(s, shard_of(rows, 5))


def test_tokenize_file_is_idempotent_and_accounts_for_every_row(tmp_path, tok):
    _jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)] + [{"id": 999, "text": ""}])
    cfg = DataConfig(seq_len=16)
    stats = tokenize_file(str(tmp_path / "in.jsonl"), 0, "jsonl", cfg, tok, tmp_path / "out")
    assert stats["rows_in"] == len(TEXTS) + 1 == stats["docs_packed"] + stats["rows_quarantined"]
    q = pq.read_table(next((tmp_path / "out" / "quarantine").glob("*.parquet")))
    assert q.column("id").to_pylist() == [999] and q.column("reason").to_pylist() == ["empty text"]
    packed = next((tmp_path / "out" / "packed").glob("*.parquet"))
    before = packed.stat().st_mtime_ns
    assert tokenize_file(str(tmp_path / "in.jsonl"), 0, "jsonl", cfg, tok, tmp_path / "out") == stats
    assert packed.stat().st_mtime_ns == before  # done files are not redone


def test_out_of_vocabulary_token_rows_are_quarantined_and_every_row_is_accounted_for(tmp_path, tok):
    """Pre-tokenized input (``parquet_tokens``, the paper presets' pool) with an id the model cannot embed: the
    row is quarantined with its reason, and rows in (counted from the file) = packed + quarantined."""
    vocab = len(tok)
    first, last = list(range(1, 9)), [vocab - 1, *range(10, 17)]  # one 8-token sequence each
    rows = {"id": [5, 6, 7], "input_ids": [first, [9, vocab], last]}
    pq.write_table(pa.table(rows), tmp_path / "tok.parquet")
    rows_in = pq.read_metadata(tmp_path / "tok.parquet").num_rows
    out = tmp_path / "out"
    stats = tokenize_file(str(tmp_path / "tok.parquet"), 0, "parquet_tokens", DataConfig(seq_len=8), tok, out)
    assert rows_in == 3 and stats["rows_in"] == rows_in
    assert stats["docs_packed"] == 2 and stats["rows_quarantined"] == 1 and stats["dropped_tokens"] == 0
    q = pq.read_table(next((out / "quarantine").glob("*.parquet"))).to_pylist()
    reason = f"token id {vocab} ≥ vocabulary size {vocab}"
    assert q == [{"id": 6, "file": str(tmp_path / "tok.parquet"), "row": 1, "reason": reason}]
    packed = pq.read_table(next((out / "packed").glob("*.parquet")))
    assert packed.column("input_ids").to_pylist() == [first, last]  # no EOS added: the rows are already packed
    assert packed.column("source_ids").to_pylist() == [[5], [7]]


def test_a_file_shorter_than_one_row_packs_to_nothing_and_the_next_file_goes_on(tmp_path, tok):
    _jsonl(tmp_path / "short.jsonl", [{"id": 1, "text": "The quick brown fox"}])
    _jsonl(tmp_path / "long.jsonl", [{"id": 100 + i, "text": t} for i, t in enumerate(TEXTS)])
    cfg = DataConfig(seq_len=64)
    short_tokens = len(tok("The quick brown fox", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert short_tokens < 64
    stats = tokenize_file(str(tmp_path / "short.jsonl"), 0, "jsonl", cfg, tok, tmp_path / "out")
    assert stats["rows_in"] == 1 == stats["docs_packed"] and stats["seqs"] == 0 and stats["tokens"] == 0
    assert stats["dropped_tokens"] == short_tokens
    assert list((tmp_path / "out" / "packed").glob("*")) == []  # nothing for later stages to read
    assert tokenize_file(str(tmp_path / "short.jsonl"), 0, "jsonl", cfg, tok, tmp_path / "out") == stats  # done
    long = tokenize_file(str(tmp_path / "long.jsonl"), 1, "jsonl", cfg, tok, tmp_path / "out")
    assert long["seqs"] > 0 and len(list((tmp_path / "out" / "packed").glob("*.parquet"))) == 1


def test_cloze_items_mask_only_the_last_word(tok):
    ids, mask = cloze_item("It was a truth universally acknowledged.", tok, 32)
    target = ids[mask == 1].tolist()
    assert tok.decode(target) == " acknowledged"


def test_token_array_and_step_batches(tmp_path, tok):
    _jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    tokenize_file(str(tmp_path / "in.jsonl"), 0, "jsonl", DataConfig(seq_len=8), tok, tmp_path / "out")
    files = [str(p) for p in (tmp_path / "out" / "packed").glob("*.parquet")]
    arr = TokenArray.build(files, tmp_path / "arr")
    keep = arr.row_ids[::3].copy()
    sub = TokenArray.build(files, tmp_path / "sub", keep_ids=keep)
    assert np.array_equal(np.sort(sub.row_ids), np.sort(keep)) and sub.tokens.shape[1] == 8
    # every step's global batch is a slice of a per-epoch permutation: an epoch covers each row exactly once
    n = len(arr)
    seen = np.concatenate([step_indices(s, 4, n, seed=0) for s in range(n // 4)])
    assert len(np.unique(seen)) == len(seen) == (n // 4) * 4
    # 1 worker × 2 micro-batches sees the same rows as 2 workers × 1 micro-batch
    one = micro_batches(arr.tokens, 3, 8, 4, rank=0, world_size=1, seed=0)
    two = [micro_batches(arr.tokens, 3, 8, 4, rank=r, world_size=2, seed=0)[0] for r in (0, 1)]
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(one, two, strict=True))


def test_prefetcher_returns_exactly_what_load_returns():
    from bliss_ray.data.tokens import Prefetcher

    calls = []

    def load(step):
        calls.append(step)
        return [np.full((2, 3), step)]

    prefetch = Prefetcher(load, pin=False)
    got = [prefetch(s)[0][0, 0] for s in range(5, 10)]
    assert got == [5, 6, 7, 8, 9]
    prefetch.pool.shutdown(wait=True)
    assert sorted(set(calls)) == list(range(5, 11))  # each step loaded once, one step ahead
