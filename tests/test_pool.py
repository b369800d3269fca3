"""The packed pool as the select and score stages see it, without Ray: a shard's rows and domains, the streaming
join of score files to pool rows, a round's selection and manifest, and the scoring stage's shard filter (which
must import without torch).

    .venv/bin/python -m pytest tests/test_pool.py -q
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bliss_ray.data.packing import shard_of
from bliss_ray.selection.pool import pool_rows, score_column, select_round
from bliss_ray.stages._data_tasks import keep_shard


def _domain_of(row_id: int) -> str:
    return ["web", "code", "books"][row_id % 3]


def _packed_files(tmp_path, chunks: list[np.ndarray]) -> list[str]:
    files = []
    for i, ids in enumerate(chunks):
        files.append(str(tmp_path / f"{i:05d}.parquet"))
        pq.write_table(pa.table({"row_id": ids, "domain": [_domain_of(int(r)) for r in ids]}), files[-1])
    return files


def test_pool_rows_of_a_shard_keep_file_order_and_their_own_domains(tmp_path):
    chunks = [np.arange(0, 400, 2, dtype=np.int64), np.arange(1000, 1300, 3, dtype=np.int64)]
    files = _packed_files(tmp_path, chunks)
    every, doms = pool_rows(files, None)
    assert np.array_equal(every, np.concatenate(chunks)) and len(doms) == len(every)
    shards = [pool_rows(files, (s, 3)) for s in range(3)]
    for s, (ids, doms) in enumerate(shards):
        assert len(ids) > 50 and np.all(shard_of(ids, 3) == s)
        assert list(doms.astype(str)) == [_domain_of(int(r)) for r in ids]  # each row keeps its own domain
    together = np.concatenate([ids for ids, _ in shards])
    assert len(together) == len(every) and set(together.tolist()) == set(every.tolist())  # disjoint, complete
    empty_ids, empty_doms = pool_rows([], (0, 3))
    assert len(empty_ids) == 0 and len(empty_doms) == 0


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_score_column_joins_scores_to_pool_rows_by_id(tmp_path, order):
    """The select stage's streaming join: each pool row gets its own logit, NaN when its score is not ok or
    missing; scored rows outside the pool (another shard) are ignored. Packed pools arrive sorted (fast path)."""
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
    got = score_column(tmp_path, pool)
    expect = np.where(np.isin(pool, [30, 60]), np.nan, pool * 0.5).astype(np.float32)
    np.testing.assert_array_equal(got, expect)
    assert score_column(tmp_path, np.zeros(0, np.int64)).shape == (0,)


def test_select_round_never_picks_unscored_rows_and_describes_the_selectable_pool():
    ids = np.arange(100, 120, dtype=np.int64)  # (20,)
    values = np.arange(20, dtype=np.float32)
    values[[18, 3]] = np.nan  # the second-best row and a poor one have no score
    doms = np.array(["a"] * 10 + ["b"] * 10)
    chosen, m = select_round(ids, doms, values, "topk", keep_frac=0.25, seed=7, round=2)
    # 18 selectable rows → k = int(18 · 0.25) = 4: the best scored ones, 119, 117, 116, 115
    assert chosen.tolist() == [115, 116, 117, 119]
    assert m["pool_size"] == 18 and m["selected"] == 4 and m["threshold"] == 15.0
    assert m["round"] == 2 and m["method"] == "topk" and m["seed"] == 7 and m["keep_frac"] == 0.25
    assert m["domain_share"]["a"] == {"pool": 9 / 18, "selected": 0.0}
    assert m["domain_share"]["b"] == {"pool": 9 / 18, "selected": 1.0}
    rand, mr = select_round(ids, None, None, "random", keep_frac=0.25, seed=7)
    assert len(rand) == 5 and set(rand.tolist()) <= set(ids.tolist()) and mr["pool_size"] == 20
    assert "threshold" not in mr and "domain_share" not in mr


def test_keep_shard_keeps_the_rounds_shard_and_tags_the_source_file():
    ids = np.arange(0, 3000, 7, dtype=np.int64)
    batch = {
        "row_id": ids,
        "input_ids": np.stack([ids, ids + 1], axis=1),
        "path": np.array(["s3://bucket/packed/00001-pool-00000.parquet"] * len(ids)),
    }
    out = keep_shard(dict(batch), (2, 3))
    mine = shard_of(ids, 3) == 2
    assert 100 < mine.sum() < len(ids) and np.array_equal(out["row_id"], ids[mine])
    assert np.array_equal(out["input_ids"][:, 1], ids[mine] + 1)  # rows stay whole
    assert set(out) == {"row_id", "input_ids", "src"} and set(out["src"]) == {"00001-pool-00000"}
    assert len(keep_shard(dict(batch), None)["row_id"]) == len(ids)


def test_the_shard_filter_module_imports_without_torch():
    """Ray Data imports ``keep_shard``'s module in every task worker: it must not pull in torch/transformers."""
    code = "import sys\nfor m in ('torch', 'transformers', 'ray'): sys.modules[m] = None\n"
    code += "import bliss_ray.stages._data_tasks\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
