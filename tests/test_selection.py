"""Selection rules: exact top-k with row-id tie-break, reproducibility, uniformity of `random`, Gumbel limits,
MATES's convention, the manifest, and flat memory at 10 M scores.

    .venv/bin/python -m pytest tests/test_selection.py -q
"""

import numpy as np
import pytest

from bliss_ray.selection import gumbel_of, jaccard, manifest, num_selected, select, uniform_of


def test_topk_picks_exactly_the_k_highest_with_row_id_tie_break():
    ids = np.array([50, 10, 40, 20, 30, 60])
    logits = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.9], dtype=np.float32)
    # 0.9 ties (50, 60) both in; among the 0.5 ties (10, 20, 40) the two smallest ids win
    assert select(ids, logits, 4, "topk").tolist() == [10, 20, 50, 60]
    perm = np.random.default_rng(0).permutation(len(ids))  # row order never matters
    assert select(ids[perm], logits[perm], 4, "topk").tolist() == [10, 20, 50, 60]


def test_same_seed_same_rows_other_seed_other_rows():
    ids = np.arange(10_000, dtype=np.int64) * 3 + 7
    vals = np.random.default_rng(1).normal(size=ids.size)
    for method in ("random", "gumbel_topk", "mates"):
        a = select(ids, vals, 500, method, seed=5)
        assert np.array_equal(a, select(ids, vals, 500, method, seed=5))
        assert not np.array_equal(a, select(ids, vals, 500, method, seed=6))
        assert len(a) == 500 and len(np.unique(a)) == 500


def test_random_is_uniform():
    """Each of 100 rows is kept in 20 % of 4000 seeded draws: inclusion counts pass a chi-square test, and the
    first rows are not favoured (the released BLISS 'random' took the first 20 % of rows)."""
    ids = np.arange(100, dtype=np.int64)
    counts = np.zeros(100)
    for seed in range(4000):
        counts[select(ids, None, 20, "random", seed=seed)] += 1
    expected = 4000 * 0.2
    chi2 = (((counts - expected) ** 2) / expected).sum()
    assert chi2 < 148.2  # the 99.9 % quantile of chi-square with 99 degrees of freedom
    assert abs(counts[:20].mean() - expected) < 0.1 * expected
    u = uniform_of(np.arange(200_000), seed=0)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert abs(np.median(gumbel_of(np.arange(200_000), 0)) - (-np.log(np.log(2)))) < 0.01


def test_gumbel_tau_to_zero_is_topk_and_mates_is_bottom_k():
    ids = np.arange(1000, dtype=np.int64)
    vals = np.random.default_rng(2).normal(size=1000)
    assert np.array_equal(select(ids, vals, 100, "gumbel_topk", temperature=1e-9), select(ids, vals, 100, "topk"))
    bottom = np.sort(ids[np.argsort(vals)[:100]])
    assert np.array_equal(select(ids, vals, 100, "mates", temperature=1e-9), bottom)
    # at τ = 1 the noise matters, but high scores are still preferred
    noisy = select(ids, vals, 100, "gumbel_topk", temperature=1.0, seed=0)
    assert 0.1 < jaccard(noisy, select(ids, vals, 100, "topk")) < 0.9


def test_manifest_counts_threshold_histogram_and_domains():
    ids = np.arange(10)
    vals = np.linspace(0, 1, 10)
    doms = np.array(["a"] * 5 + ["b"] * 5)
    chosen = select(ids, vals, num_selected(10, 0.2), "topk")
    m = manifest(ids, vals, chosen, doms, method="topk", seed=0, keep_frac=0.2)
    assert m["pool_size"] == 10 and m["selected"] == 2 and m["threshold"] == pytest.approx(vals[8])
    assert sum(m["histogram"]["pool"]) == 10 and sum(m["histogram"]["selected"]) == 2
    assert m["domain_share"]["b"] == {"pool": 0.5, "selected": 1.0}


def test_selection_of_10m_scores_stays_small():
    """Only the score column is held: 10 M (row id, logit) pairs select in well under 1 GB of extra memory."""
    import resource

    ids = np.arange(10_000_000, dtype=np.int64)
    vals = np.random.default_rng(0).random(10_000_000, dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chosen = select(ids, vals, 2_000_000, "topk")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(chosen) == 2_000_000 and grown_mb < 600, grown_mb


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_score_column_joins_scores_to_pool_rows_by_id(tmp_path, order):
    """The select stage's streaming join: each pool row gets its own logit, NaN when its score is not ok or
    missing; scored rows outside the pool (another shard) are ignored. Packed pools arrive sorted (fast path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bliss_ray.stages.steps import _scores_of

    pool = np.arange(0, 100, 3, dtype=np.int64)  # (34,)
    if order == "shuffled":
        pool = np.random.default_rng(0).permutation(pool)
    scored = np.concatenate([pool[pool != 30], [1, 2]])  # row 30 missing; 1 and 2 are not in this pool
    logits = (scored * 0.5).astype(np.float32)
    ok = scored != 60  # row 60 was quarantined
    for part, half in enumerate(np.array_split(np.arange(len(scored)), 2)):  # two files, in any order
        d = tmp_path / f"src=f{part}"
        d.mkdir()
        pq.write_table(pa.table({"row_id": scored[half], "logit": logits[half], "ok": ok[half]}), d / "0.parquet")
    got = _scores_of(tmp_path, pool)
    expect = np.where(np.isin(pool, [30, 60]), np.nan, pool * 0.5).astype(np.float32)
    np.testing.assert_array_equal(got, expect)
