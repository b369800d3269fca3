"""Ray Data stages: tokenizing a junk-filled corpus loses nothing (rows in = out + quarantined), nor does a
pre-tokenized pool with out-of-vocabulary ids and a file shorter than one row; corrupt files
are named before compute (fail / skip), the bad-row budget is enforced; scoring through Ray Data equals the
scorer called directly, and a rerun after a crash scores only what is missing, each row exactly once.

    .venv/bin/python -m pytest tests/test_data_stages.py -q
"""

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from bliss_ray.data.packing import shard_of
from bliss_ray.selection.scoring import Scorer
from tests.conftest import load_tiny

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

GOOD = "It was a truth universally acknowledged, that a single man in possession of a good fortune. " * 3


def _corpus(tmp_path, corrupt: bool):
    """Three jsonl.gz files with every kind of bad row (scenario 3), optionally one truncated file (scenario 4)."""
    d = tmp_path / "corpus"
    d.mkdir()
    rows = [{"id": i, "text": GOOD + str(i)} for i in range(60)]
    bad = [
        {"id": 100, "text": None},
        {"id": 101, "text": ""},
        {"id": 102, "text": "x" * 300_000},
        {"id": 103, "body": "missing text column"},
        {"id": 104, "text": 12345},
    ]
    for k in range(3):
        with gzip.open(d / f"part-{k}.jsonl.gz", "wt") as f:
            for r in rows[k * 20 : (k + 1) * 20] + (bad if k == 1 else []):
                f.write(json.dumps(r) + "\n")
            if k == 2:
                f.write('{"id": 105, "text": "\\ud800 lone surrogate"}\n{broken json\n')
    if corrupt:
        data = (d / "part-0.jsonl.gz").read_bytes()
        (d / "part-9.jsonl.gz").write_bytes(data[: len(data) // 2])
    return d


def _exp(tmp_path, corpus, **over):
    return load_tiny(**{"data.pool": [str(corpus)], "data.pool_format": "jsonl", **over})


def test_bad_rows_are_quarantined_and_counted(ray_local, tiny_run, tmp_path):
    """Scenario 3: null / empty / huge / missing-column / wrong-type / bad-JSON rows → quarantine with ids."""
    from bliss_ray.stages.tokenize import tokenize_pool

    run, _ = tiny_run
    tok = run.dir("tokenizer") / "tokenizer"
    exp = _exp(tmp_path, _corpus(tmp_path, corrupt=False), **{"data.max_bad_frac": 0.2})
    out = tokenize_pool(exp, tok, tmp_path / "out")
    assert out["rows_in"] == 60 + 5 + 2 == out["docs_packed"] + out["rows_quarantined"]
    assert out["docs_packed"] == 60
    q = pq.read_table(tmp_path / "out" / "pool" / "quarantine").to_pylist()
    reasons = {r["id"]: r["reason"] for r in q}
    assert reasons[100] == "null text" and reasons[101] == "empty text" and "max_doc_chars" in reasons[102]
    assert "missing column" in reasons[103] and "type int" in reasons[104]
    assert len(q) == 7
    with pytest.raises(RuntimeError, match=r"7/67 rows .* more than data.max_bad_frac=5.0%"):
        tokenize_pool(_exp(tmp_path, tmp_path / "corpus", **{"data.max_bad_frac": 0.05}), tok, tmp_path / "out2")


def test_pretokenized_pool_with_oov_ids_and_a_short_file_is_counted_and_goes_on(ray_local, tmp_path):
    """The paper presets' path (``parquet_tokens``): an id ≥ the vocabulary is quarantined with its reason, a
    file shorter than one 64-token row packs to nothing with its tokens dropped, and the stage finishes."""
    from bliss_ray.data.tokenizer import train_bpe
    from bliss_ray.stages.tokenize import tokenize_pool

    tok_dir = tmp_path / "tok"
    train_bpe(iter([GOOD] * 20), vocab_size=300).save_pretrained(str(tok_dir))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [list(range(i, i + 64)) for i in range(10)]  # ten rows of exactly one sequence each
    pq.write_table(pa.table({"id": list(range(11)), "input_ids": [*good, [3, 5000, 7]]}), corpus / "a.parquet")
    pq.write_table(pa.table({"id": [50], "input_ids": [list(range(20))]}), corpus / "b.parquet")
    rows_in = sum(pq.read_metadata(f).num_rows for f in corpus.iterdir())
    exp = _exp(tmp_path, corpus, **{"data.pool_format": "parquet_tokens", "data.max_bad_frac": 0.2})
    out = tokenize_pool(exp, tok_dir, tmp_path / "out")
    assert rows_in == 12 and out["rows_in"] == rows_in and out["rows_quarantined"] == 1 and out["docs_packed"] == 11
    assert out["seqs"] == 10 and out["dropped_tokens"] == 20  # the short file's 20 tokens, no EOS on token rows
    q = pq.read_table(tmp_path / "out" / "pool" / "quarantine").to_pylist()
    assert [(r["id"], r["row"]) for r in q] == [(10, 10)] and "token id 5000 ≥ vocabulary size" in q[0]["reason"]
    assert len(list((tmp_path / "out" / "pool" / "packed").glob("*.parquet"))) == 1


def test_corrupt_file_is_named_before_compute_fail_or_skip(ray_local, tiny_run, tmp_path):
    """Scenario 4: a truncated .jsonl.gz → pre-flight names it; `skip` records it and processes the rest."""
    from bliss_ray.stages.tokenize import tokenize_pool

    run, _ = tiny_run
    tok = run.dir("tokenizer") / "tokenizer"
    corpus = _corpus(tmp_path, corrupt=True)
    with pytest.raises(RuntimeError, match=r"(?s)pre-flight: 1 unreadable.*part-9\.jsonl\.gz"):
        tokenize_pool(_exp(tmp_path, corpus, **{"data.max_bad_frac": 0.2}), tok, tmp_path / "a")
    assert not (tmp_path / "a" / "pool").exists()  # nothing computed
    out = tokenize_pool(
        _exp(tmp_path, corpus, **{"data.max_bad_frac": 0.2, "data.corrupt_files": "skip"}), tok, tmp_path / "b"
    )
    assert list(out["files_skipped"]) == [str(corpus / "part-9.jsonl.gz")] and out["docs_packed"] == 60


def _score_inputs(tiny_run):
    run, _ = tiny_run
    files = sorted(str(p) for p in (run.dir("tokenize") / "pool" / "packed").glob("*.parquet"))
    return run, files, run.dir("r1.bilevel") / "score_model"


def _scores(out_dir):
    t = pads.dataset(str(out_dir / "scores"), format="parquet", partitioning="hive").to_table()
    return dict(zip(t.column("row_id").to_pylist(), t.column("logit").to_numpy(), strict=True))


def test_ray_data_scores_equal_direct_scorer(tiny_run, tmp_path):
    from bliss_ray.stages.score import score_pool

    run, files, model = _score_inputs(tiny_run)
    out = score_pool(run.exp, model, files, (1, 2), tmp_path / "s")
    # rows in, counted from the input files (shard 1 of 2), against the rows the output holds, by their ok flag
    ids_in = np.concatenate([pq.read_table(f, columns=["row_id"]).column("row_id").to_numpy() for f in files])
    rows_in = int((shard_of(ids_in, 2) == 1).sum())
    ok = pads.dataset(str(tmp_path / "s" / "scores"), format="parquet", partitioning="hive").to_table().column("ok")
    assert rows_in == out["rows_in"] == len(ok) and out["actors_used"] >= 1
    assert (out["rows_scored"], out["rows_quarantined"]) == (ok.to_numpy().sum(), (~ok.to_numpy()).sum())
    via_ray = _scores(tmp_path / "s")
    t = pq.read_table(files[0], columns=["row_id", "input_ids"])
    direct = Scorer(str(model), batch_seqs=7)(
        {"row_id": t.column("row_id").to_numpy(), "input_ids": t.column("input_ids").to_pylist()}
    )
    in_shard = [i for i, r in enumerate(direct["row_id"]) if r in via_ray]
    assert len(in_shard) > 100
    # same rows, same model; only BLAS blocking over different batch shapes differs (~1e-7)
    np.testing.assert_allclose(
        [via_ray[direct["row_id"][i]] for i in in_shard], direct["logit"][in_shard], rtol=1e-5, atol=1e-5
    )


def test_scoring_rerun_after_a_crash_scores_only_missing_files(tiny_run, tmp_path):
    """A crash left file 0 complete, file 1 half-written (and unmarked); rerunning scores file 1 only and
    every row of the shard appears exactly once."""
    from bliss_ray.stages.score import score_pool

    run, files, model = _score_inputs(tiny_run)
    full = tmp_path / "full"
    score_pool(run.exp, model, files, (1, 2), full)
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    first, second = sorted(p.name for p in (crashed / "_done").iterdir())[:2]
    (crashed / "_done" / second).unlink()
    part = crashed / "scores" / f"src={second}"
    t = pads.dataset(str(part), format="parquet").to_table()
    shutil.rmtree(part)
    part.mkdir()
    pq.write_table(t.slice(0, t.num_rows // 2), part / "partial.parquet")
    untouched = {p: p.stat().st_mtime_ns for p in (crashed / "scores" / f"src={first}").iterdir()}
    out = score_pool(run.exp, model, files, (1, 2), crashed)
    assert out["files_scored_this_run"] == 1
    assert {p: p.stat().st_mtime_ns for p in (crashed / "scores" / f"src={first}").iterdir()} == untouched
    ids = pads.dataset(str(crashed / "scores"), format="parquet", partitioning="hive").to_table().column("row_id")
    assert len(ids) == len(set(ids.to_pylist())) == out["rows_in"]
    rescored, reference = _scores(crashed), _scores(full)
    assert rescored.keys() == reference.keys()
    # compare by row id: file order differs between runs, and batch shapes change BLAS blocking (~1e-7)
    keys = sorted(reference)
    np.testing.assert_allclose([rescored[k] for k in keys], [reference[k] for k in keys], rtol=1e-5, atol=1e-5)
