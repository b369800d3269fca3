"""Canaries, without Ray: they never reach the reference set's selection part nor its held-out evaluation part
(passage and continuation mode), the corrupted forms are what they claim and seeded, the pool file of each form,
the manifest's shares recounted by hand from the selection with the flag firing only on a selector that prefers a
corrupted form, the report's table and console headlines, and the setting: off by default, identities unchanged while
off, bad values named.

    .venv/bin/python -m pytest tests/test_canaries.py -q
"""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bliss_ray.config import ConfigError, DataConfig, Experiment, load_experiment, parse_experiment
from bliss_ray.data.canaries import (
    CANARY_DOMAINS,
    CANARY_ID_BASE,
    SCRAMBLED,
    SHUFFLED,
    SOURCE,
    canary_doc_ids,
    canary_documents,
    scramble_chars,
    shuffle_words,
)
from bliss_ray.data.packing import MAX_DOC_ID, OFFSET_BITS
from bliss_ray.data.reference_split import split_rows
from bliss_ray.data.tokens import TokenArray
from bliss_ray.pipeline import Run
from bliss_ray.report.canaries import canary_lines
from bliss_ray.selection.rules import manifest, select
from bliss_ray.stages.tokenize import add_canaries, build_reference
from bliss_ray.studies.compare_spec import load_compare
from bliss_ray.watch.status import headline
from tests.conftest import write_reference_corpus
from tests.test_reference_split import _packed_sources, _passages

N_CANARIES = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(reference.parquet, tokenizer dir, passages) of 60 synthetic passages."""
    return write_reference_corpus(tmp_path_factory.mktemp("canary_corpus"), _passages())


def _exp(corpus, **data) -> Experiment:
    path, _, _ = corpus
    cfg = {"reference": [str(path)], "seq_len": 32, "max_reference_seqs": 10_000} | data
    return Experiment(name="t", data=DataConfig(**cfg))


def _canaries(rows) -> set[int]:
    return set(canary_doc_ids(np.array([r["id"] for r in rows]), N_CANARIES, seed=0).tolist())


def test_split_rows_drops_rows_holding_an_excluded_document():
    sources = [np.array([1]), np.array([1, 9]), np.array([2]), np.array([9]), np.array([2, 3])]
    sel, ev = split_rows(sources, held_out=np.array([2, 3, 9]), excluded=np.array([9]))
    assert sel.tolist() == [True, False, False, False, False]
    assert ev.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("frac", [0.5, 0.0])
def test_passage_parts_never_hold_a_canary(corpus, tmp_path, frac):
    _, tok_dir, rows = corpus
    canary = _canaries(rows)
    build_reference(_exp(corpus, reference_eval_frac=frac, canaries={"docs": N_CANARIES}), tok_dir, tmp_path)
    ref, sources = tmp_path / "reference", _packed_sources(tmp_path)
    for part in ("array", "eval_array"):
        docs = set().union(*(sources[int(r)] for r in TokenArray.open(ref / part).row_ids))
        assert docs and not docs & canary, part
    held = set(np.load(ref / "eval_array" / "eval_doc_ids.npy").tolist())
    assert not held & canary
    # bliss_ref_cloze skips them too: they are in the pool
    assert canary <= set(np.load(ref / "eval_array" / "selection_doc_ids.npy").tolist())
    if frac:  # the split is drawn from the other documents only
        assert len(held) == round(frac * (len(rows) - N_CANARIES))


def test_continuation_parts_never_hold_a_canary(corpus, tmp_path):
    _, tok_dir, rows = corpus
    canary = _canaries(rows)
    exp = _exp(corpus, reference_loss="continuation", reference_eval_frac=0.3, canaries={"docs": N_CANARIES})
    build_reference(exp, tok_dir, tmp_path)
    sel = set(TokenArray.open(tmp_path / "reference" / "array").row_ids.tolist())  # row id = document id
    ev = set(TokenArray.open(tmp_path / "reference" / "eval_array").row_ids.tolist())
    assert not sel & canary and not ev & canary
    assert sel | ev | canary == {r["id"] for r in rows}  # every other passage is in one part


def test_corrupted_forms_are_what_they_claim_and_seeded():
    text = "Anne walked  along the quiet road,\ntowards the old house; the sea."
    rng = lambda s: np.random.default_rng(s)  # noqa: E731
    shuffled = shuffle_words(text, rng(0))
    assert Counter(shuffled.split(" ")) == Counter(text.split()) and shuffled != " ".join(text.split())
    scrambled = scramble_chars(text, rng(0))
    assert [len(w) for w in scrambled.split(" ")] == [len(w) for w in text.split(" ")]  # spacing kept
    assert [c.isspace() for c in scrambled] == [c.isspace() for c in text]
    pairs = list(zip(scrambled.split(), text.split(), strict=True))
    assert all(sorted(a) == sorted(b) for a, b in pairs) and any(a != b for a, b in pairs)
    assert shuffle_words(text, rng(0)) == shuffled and shuffle_words(text, rng(1)) != shuffled
    assert scramble_chars(text, rng(0)) == scrambled and scramble_chars(text, rng(1)) != scrambled


def test_canary_documents_ids_forms_and_independence_of_the_sample():
    docs, texts = np.array([10, 42, 7]), ["one two three four five", "six seven eight nine ten", "a b c d e f g"]
    ids, out, domains = canary_documents(docs, texts, seed=3)
    assert len(ids) == len(set(ids.tolist())) == 9
    assert ids.min() >= CANARY_ID_BASE and ids.max() < MAX_DOC_ID
    assert domains == [d for d in CANARY_DOMAINS for _ in docs]
    assert out[:3] == texts  # the source form is the document itself
    # a document's canaries do not depend on which other documents were sampled
    _, alone, _ = canary_documents(docs[1:2], texts[1:2], seed=3)
    assert alone == [out[1], out[4], out[7]]
    assert canary_documents(docs, texts, seed=4)[1] != out
    sample = canary_doc_ids(np.array([5, 3, 9, 3, 1]), 2, seed=0)
    assert len(sample) == 2 and set(sample.tolist()) <= {1, 3, 5, 9}
    with pytest.raises(ValueError, match=r"data\.canaries\.docs"):
        canary_doc_ids(np.array([1, 2]), 2, seed=0)


def test_add_canaries_packs_one_file_per_form_and_refuses_colliding_ids(corpus, tmp_path):
    _, tok_dir, _ = corpus
    exp = _exp(corpus, canaries={"docs": N_CANARIES})
    assert add_canaries(_exp(corpus), tok_dir, str(tmp_path)) == {}  # off: nothing
    out = add_canaries(exp, tok_dir, str(tmp_path))["canaries"]
    assert out["docs"] == N_CANARIES and set(out["seqs_per_domain"]) == set(CANARY_DOMAINS)
    for name in CANARY_DOMAINS:
        t = pq.read_table(tmp_path / "pool" / "packed" / f"{name}.parquet")
        assert set(t.column("domain").to_pylist()) == {name}
        assert (t.column("row_id").to_numpy() >> OFFSET_BITS).min() >= CANARY_ID_BASE
        assert t.num_rows == out["seqs_per_domain"][name] > 0
    bad = pa.table({"row_id": pa.array([CANARY_ID_BASE << OFFSET_BITS], pa.int64())})
    pq.write_table(bad, tmp_path / "pool" / "packed" / "00000-pool.parquet")
    with pytest.raises(ValueError, match="range kept for canaries"):
        add_canaries(exp, tok_dir, str(tmp_path))


def _pool(n_each: int = 200, n_other: int = 4000):
    """Row ids, domains and scores of a pool with canaries: other rows N(0, 1), canary rows N(shift, 1)."""
    domains = np.array(["web"] * n_other + [d for d in CANARY_DOMAINS for _ in range(n_each)])
    return np.arange(len(domains), dtype=np.int64) * 7 + 3, domains


def _by_hand(m: dict, ids, domains, chosen) -> None:
    """The manifest's canary shares and rows, counted here from the arrays alone."""
    kept = np.isin(ids, chosen)
    for name in CANARY_DOMAINS:
        form = m["canaries"]["forms"][name]
        mine = domains == name
        assert form["pool_rows"] == mine.sum() and form["selected_rows"] == (mine & kept).sum()
        assert form["pool_share"] == pytest.approx(mine.sum() / len(ids))
        assert form["selected_share"] == pytest.approx((mine & kept).sum() / kept.sum())
        assert form["ratio"] == pytest.approx(form["selected_share"] / form["pool_share"])


@pytest.mark.parametrize(
    ("favoured", "flagged"),
    [(SHUFFLED, [SHUFFLED]), (SCRAMBLED, [SCRAMBLED]), (SOURCE, []), (None, [])],
)
def test_manifest_counts_canary_shares_and_flags_only_a_preferred_corruption(favoured, flagged):
    ids, domains = _pool()
    scores = np.random.default_rng(0).normal(size=len(ids))
    if favoured:
        scores[domains == favoured] += 2.0
    chosen = select(ids, scores, len(ids) // 5, "topk")
    m = manifest(ids, scores, chosen, domains, method="topk")
    _by_hand(m, ids, domains, chosen)
    assert m["canaries"]["prefers_corrupted"] == flagged


def test_random_selection_rarely_trips_the_flag():
    ids, domains = _pool(n_each=40)
    trips = sum(
        bool(
            manifest(ids, None, select(ids, None, len(ids) // 5, "random", seed=s), domains)["canaries"][
                "prefers_corrupted"
            ]
        )
        for s in range(100)
    )
    assert trips <= 12  # two forms at two standard errors: about 5 in 100


def test_no_canaries_no_section_and_no_table():
    ids = np.arange(100, dtype=np.int64)
    m = manifest(ids, None, ids[:20], np.array(["web"] * 100))
    assert "canaries" not in m and canary_lines([("random", 1, m.get("canaries"))]) == []


def test_report_table_counts_flags_over_seeds():
    ids, domains = _pool()
    scores = np.where(domains == SHUFFLED, 3.0, 0.0) + np.random.default_rng(1).normal(size=len(ids))
    flagged = manifest(ids, scores, select(ids, scores, 800, "topk"), domains, method="topk")["canaries"]
    calm = manifest(ids, None, select(ids, None, 800, "random"), domains)["canaries"]
    lines = canary_lines([("bliss", 1, flagged), ("bliss", 1, calm), ("random", 1, calm)])
    text = "\n".join(lines)
    assert "| bliss | 1 |" in text and "**yes** (shuffled), 1 of 2 runs" in text
    assert next(line for line in lines if line.startswith("| random")).endswith("| no |")


def test_setting_is_off_by_default_and_invisible_to_identities_while_off():
    exp = load_experiment("experiments/tiny.yaml")
    assert not exp.data.canaries.on and "canaries" not in exp.model_dump(mode="json")["data"]
    same = load_experiment("experiments/tiny.yaml", ["data.canaries.docs=0", "data.canaries.seed=0"])
    on = load_experiment("experiments/tiny.yaml", ["data.canaries.docs=4"])
    base, off, with_canaries = (Run(e, "/tmp/unused").ids for e in (exp, same, on))
    assert base == off
    assert with_canaries["tokenizer"] == base["tokenizer"]  # the tokenizer never sees them
    assert all(with_canaries[k] != base[k] for k in base if k != "tokenizer")


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"docs": -1}, "data.canaries.docs"),
        ({"docs": "many"}, "data.canaries.docs"),
        ({"seed": -3}, "data.canaries.seed"),
        ({"rate": 1}, "data.canaries.rate"),
    ],
)
def test_bad_values_fail_naming_the_field(value, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_experiment({"name": "t", "data": {"canaries": value}})


def test_the_demo_comparison_turns_canaries_on_and_nothing_else_does():
    spec = load_compare("experiments/compare/demo.yaml")
    assert all(e.data.canaries.on for e in spec.arms().values())
    for path in ("experiments/demo.yaml", "experiments/tiny.yaml"):
        assert not load_experiment(path).data.canaries.on
    assert not any(e.data.canaries.on for e in load_compare("experiments/compare/tiny.yaml").arms().values())


def test_console_headlines_name_the_canaries_only_when_present(tmp_path):
    tokenized = {"rows_in": 3, "seqs": 4, "tokens": 5}
    assert "canary" not in headline("tokenize", tokenized, tmp_path)
    assert "16 canary docs" in headline("tokenize", tokenized | {"canaries": {"docs": 16}}, tmp_path)
    selected = {"selected": 1, "pool_size": 5, "method": "topk"}
    assert "canaries" not in headline("select", selected | {"canaries": {"prefers_corrupted": []}}, tmp_path)
    flagged = selected | {"canaries": {"prefers_corrupted": [SHUFFLED]}}
    assert headline("select", flagged, tmp_path).endswith(f"prefers corrupted canaries: {SHUFFLED}")
