"""The reference set's held-out evaluation part, without Ray: the seeded document split, the packed-row masks,
``build_reference``'s two parts in passage and continuation mode, the evaluate task's wiring of the skip list,
and ``bliss_ref_cloze`` skipping the passages selection may see.

    .venv/bin/python -m pytest tests/test_reference_split.py -q
"""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bliss_ray.config import DataConfig, Experiment
from bliss_ray.data.reference_split import eval_doc_ids, split_rows
from bliss_ray.data.tokens import TokenArray, tokens_of
from bliss_ray.evaluation.tasks import ref_cloze
from bliss_ray.stages import evaluate
from bliss_ray.stages.tokenize import build_reference
from tests.conftest import write_reference_corpus

# fmt: off
WORDS = (
    "anne", "walked", "along", "the", "quiet", "road", "towards", "the", "old", "house", "where", "captain",
    "wentworth", "waited", "with", "his", "sister", "and", "spoke", "of", "the", "sea", "the", "navy", "the",
    "letters", "the", "evening", "rain", "and", "every", "small", "thing", "that", "had", "changed",
)
# fmt: on


def _passages(n: int = 60) -> list[dict]:
    """n passages of 3–6 sentences of 8–14 words (enough for a bliss_ref_cloze window), ids sparse, not 0..n-1."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        sentences = [
            " ".join(rng.choice(WORDS, rng.integers(8, 15))).capitalize() + "." for _ in range(rng.integers(3, 7))
        ]
        rows.append({"id": 5000 + 3 * i, "text": " ".join(sentences), "domain": "fiction"})
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(reference.parquet, tokenizer dir, passages): the same passages serve as data.reference and as the
    bliss_ref_cloze corpus (``$BLISS_CORPUS_DIR``), as the bundled corpus does."""
    return write_reference_corpus(tmp_path_factory.mktemp("corpus"), _passages())


def _build(corpus, out, **data) -> dict:
    path, tok_dir, _ = corpus
    cfg = {"reference": [str(path)], "seq_len": 32, "max_reference_seqs": 10_000} | data
    return build_reference(Experiment(name="t", data=DataConfig(**cfg)), tok_dir, out)


def _packed_sources(out) -> dict[int, set[int]]:
    tables = [pq.read_table(f) for f in sorted((out / "reference" / "packed").glob("*.parquet"))]
    return {
        int(r): set(s)
        for t in tables
        for r, s in zip(t.column("row_id").to_pylist(), t.column("source_ids").to_pylist(), strict=True)
    }


def test_eval_doc_ids_are_seeded_exact_and_independent_of_order():
    ids = np.arange(1000, 1400, dtype=np.int64) * 7
    for frac in (0.1, 0.5, 0.8):
        held = eval_doc_ids(ids, frac, seed=0)
        assert len(held) == round(frac * len(ids)) and np.isin(held, ids).all()
        assert np.array_equal(held, np.sort(held)) and len(np.unique(held)) == len(held)
    held = eval_doc_ids(ids, 0.5, seed=0)
    shuffled = np.concatenate([np.random.default_rng(1).permutation(ids), ids[:50]])  # order and repeats
    assert np.array_equal(held, eval_doc_ids(shuffled, 0.5, seed=0))
    assert not np.array_equal(held, eval_doc_ids(ids, 0.5, seed=1))
    assert len(eval_doc_ids(ids, 0.0, seed=0)) == 0
    with pytest.raises(ValueError, match="reference_eval_frac"):
        eval_doc_ids(ids, 1.0, seed=0)


def test_split_rows_drops_rows_that_mix_the_parts():
    sources = [np.array([1]), np.array([1, 2]), np.array([2, 3]), np.array([3]), np.array([4, 5, 6])]
    sel, ev = split_rows(sources, held_out=np.array([2, 3]))
    assert sel.tolist() == [True, False, False, False, True]
    assert ev.tolist() == [False, False, True, True, False]


def test_passage_parts_share_no_document_and_account_for_every_row(corpus, tmp_path):
    out = _build(corpus, tmp_path, reference_eval_frac=0.5, reference_split_seed=3)
    ref = tmp_path / "reference"
    sel, ev = TokenArray.open(ref / "array"), TokenArray.open(ref / "eval_array")
    sources = _packed_sources(tmp_path)
    held = set(np.load(ref / "eval_array" / "eval_doc_ids.npy").tolist())
    all_docs = set().union(*sources.values())
    assert len(held) == out["reference_eval_docs"] == round(0.5 * len(all_docs))
    sel_docs = set().union(*(sources[int(r)] for r in sel.row_ids))
    eval_docs = set().union(*(sources[int(r)] for r in ev.row_ids))
    assert eval_docs <= held and not sel_docs & held and not sel_docs & eval_docs
    assert not set(sel.row_ids.tolist()) & set(ev.row_ids.tolist())
    mixed = {r for r, s in sources.items() if s & held and s - held}
    assert len(mixed) == out["reference_dropped_seqs"] > 0  # short passages: some rows straddle the parts
    assert set(sel.row_ids.tolist()) | set(ev.row_ids.tolist()) | mixed == set(sources)
    assert (len(sel), len(ev)) == (out["reference_seqs"], out["reference_eval_seqs"])
    assert 0.3 < len(ev) / (len(sel) + len(ev)) < 0.7  # rows follow the document fraction roughly
    skip = np.load(ref / "eval_array" / "selection_doc_ids.npy")
    assert set(skip.tolist()) == all_docs - held
    packed = pq.read_table(next((ref / "packed").glob("*.parquet")))
    row_of = {int(r): i for i, r in enumerate(packed.column("row_id").to_pylist())}
    assert np.array_equal(ev.tokens, tokens_of(packed)[[row_of[int(r)] for r in ev.row_ids]])


def test_the_cap_applies_to_each_part_and_stays_inside_it(corpus, tmp_path):
    full = _build(corpus, tmp_path / "full")
    capped = _build(corpus, tmp_path / "capped", max_reference_seqs=5)
    assert capped["reference_seqs"] == 5 < full["reference_seqs"]
    assert capped["reference_eval_seqs"] == 5 < full["reference_eval_seqs"]
    for part in ("array", "eval_array"):  # a capped part is a subset of the same part uncapped
        rows = set(TokenArray.open(tmp_path / "capped" / "reference" / part).row_ids.tolist())
        assert rows <= set(TokenArray.open(tmp_path / "full" / "reference" / part).row_ids.tolist())


def test_same_split_seed_same_split_other_seed_other_split(corpus, tmp_path):
    def held(name, **data):
        _build(corpus, tmp_path / name, **data)
        return np.load(tmp_path / name / "reference" / "eval_array" / "eval_doc_ids.npy")

    a = held("a", reference_split_seed=0)
    assert np.array_equal(a, held("b", reference_split_seed=0))
    assert not np.array_equal(a, held("c", reference_split_seed=1))
    # the split is a function of the documents: the cloze mode holds out the same ones
    assert np.array_equal(a, held("d", reference_split_seed=0, reference_loss="continuation"))


def test_fraction_zero_is_no_split(corpus, tmp_path):
    out = _build(corpus, tmp_path, reference_eval_frac=0.0)
    ref = tmp_path / "reference"
    sel, ev = TokenArray.open(ref / "array"), TokenArray.open(ref / "eval_array")
    assert np.array_equal(sel.row_ids, ev.row_ids) and np.array_equal(sel.tokens, ev.tokens)
    assert set(sel.row_ids.tolist()) == set(_packed_sources(tmp_path))  # every packed row, as before the split
    assert out["reference_eval_docs"] == out["reference_dropped_seqs"] == 0
    assert not (ref / "eval_array" / "selection_doc_ids.npy").exists()  # bliss_ref_cloze keeps every passage


def test_continuation_items_are_one_document_each_in_exactly_one_part(corpus, tmp_path):
    _, _, rows = corpus
    out = _build(corpus, tmp_path, reference_loss="continuation", reference_eval_frac=0.3)
    ref = tmp_path / "reference"
    sel, ev = TokenArray.open(ref / "array"), TokenArray.open(ref / "eval_array")
    held = set(np.load(ref / "eval_array" / "eval_doc_ids.npy").tolist())
    assert len(held) == round(0.3 * len(rows)) == out["reference_eval_docs"]
    assert set(ev.row_ids.tolist()) == held  # every passage here has a usable last word
    assert set(sel.row_ids.tolist()) == {r["id"] for r in rows} - held
    assert out["reference_dropped_seqs"] == 0 and (len(sel), len(ev)) == (out["reference_seqs"], len(held))
    assert sel.loss_mask is not None and ev.loss_mask is not None
    assert (ev.loss_mask.sum(1) > 0).all()  # each item scores its last word


def test_ref_cloze_skips_the_selection_documents(corpus, tmp_path, monkeypatch):
    path, _, rows = corpus
    monkeypatch.setenv("BLISS_CORPUS_DIR", str(path.parent))
    monkeypatch.delenv(ref_cloze.SKIP_IDS_ENV, raising=False)
    everything = {it["passage_id"] for it in ref_cloze.load_ref_cloze()["test"]}
    assert everything == {r["id"] for r in rows}
    _build(corpus, tmp_path)
    skip = tmp_path / "reference" / "eval_array" / "selection_doc_ids.npy"
    monkeypatch.setenv(ref_cloze.SKIP_IDS_ENV, str(skip))
    held = set(np.load(tmp_path / "reference" / "eval_array" / "eval_doc_ids.npy").tolist())
    kept = {it["passage_id"] for it in ref_cloze.load_ref_cloze()["test"]}
    assert kept == held  # all passages packed into some row, so exactly the held-out ones remain
    monkeypatch.setenv(ref_cloze.SKIP_IDS_ENV, str(tmp_path / "all.npy"))
    np.save(tmp_path / "all.npy", np.array([r["id"] for r in rows]))
    with pytest.raises(ValueError, match="after skipping"):
        ref_cloze.load_ref_cloze()


@pytest.mark.parametrize("frac", [0.5, 0.0])
def test_evaluate_task_sets_the_skip_list_only_when_there_is_a_split(corpus, tmp_path, monkeypatch, frac):
    """``_evaluate`` (called directly, without Ray) points bliss_ref_cloze at the selection documents, and clears
    a stale setting a reused worker may hold when the reference set has no split."""
    _build(corpus, tmp_path, reference_eval_frac=frac)
    monkeypatch.setattr(os, "environ", dict(os.environ) | {ref_cloze.SKIP_IDS_ENV: "stale"})
    seen = {}

    def fake_checkpoint(model_dir, tasks, **kw):
        seen["skip"] = os.environ.get(ref_cloze.SKIP_IDS_ENV)
        return {"tasks": {}}

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_checkpoint)
    monkeypatch.setattr(evaluate, "reference_loss", lambda model_dir, reference_dir, dtype: reference_dir)
    eval_dir = tmp_path / "reference" / "eval_array"
    threads = torch.get_num_threads()  # _evaluate sets it for the whole process: keep this one's
    out = evaluate._evaluate(str(tmp_path), str(eval_dir), ["bliss_ref_cloze"], None, 1, 0, threads, "cpu")
    assert out["reference_loss"] == str(eval_dir)
    assert seen["skip"] == (str(eval_dir / "selection_doc_ids.npy") if frac else None)
