"""The storage layer on a local directory and on a local S3-compatible server (moto, loopback only), and the node
cache of store copies: its cap, least-recently-used eviction and holds.

.venv/bin/python -m pytest tests/test_storage.py -q
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bliss_ray import node_cache, storage
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_bucket):
    return str(tmp_path / "store") if request.param == "local" else storage.join(s3_bucket, "store")


def test_join_keeps_store_options_at_the_end():
    uri = "s3://bkt/runs?region=us-east-1&endpoint_override=http://127.0.0.1:9"
    assert storage.join(uri, "demo", "r0.select-ab") == (
        "s3://bkt/runs/demo/r0.select-ab?region=us-east-1&endpoint_override=http://127.0.0.1:9"
    )
    assert storage.name(storage.join(uri, "x")) == "x"
    assert storage.is_remote(uri) and not storage.is_remote("/tmp/runs") and not storage.is_remote("file:///tmp")


def test_write_read_list_remove(root):
    assert storage.read_bytes(storage.join(root, "a", "missing.json")) is None
    assert storage.listdir(storage.join(root, "nothing")) == []
    storage.write_json(storage.join(root, "a", "x.json"), {"rows": 3})
    storage.write_bytes(storage.join(root, "a", "y.parquet"), b"PAR1")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"rows": 3}
    assert [storage.name(p) for p in storage.listdir(storage.join(root, "a"), ".parquet")] == ["y.parquet"]
    assert storage.exists(storage.join(root, "a")) and storage.exists(storage.join(root, "a", "x.json"))
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.json"))


def test_upload_then_local_copy_is_cached_verified_and_rebuilt(root, tmp_path, monkeypatch):
    monkeypatch.setenv("BLISS_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 100)
    (src / "sub" / "b.txt").write_text("hello")
    dest = storage.join(root, "stage-1234")
    storage.upload(src, dest)
    local = storage.local_copy(dest)
    assert (local / "a.bin").read_bytes() == b"x" * 100 and (local / "sub" / "b.txt").read_text() == "hello"
    if not storage.is_remote(root):
        assert local == src.parent / "store" / "stage-1234"  # a local location is used in place, never copied
        return
    assert local.is_relative_to(tmp_path / "cache")
    (local / "a.bin").write_bytes(b"x")  # a damaged cache entry (wrong size) is detected and rebuilt
    assert (storage.local_copy(dest) / "a.bin").read_bytes() == b"x" * 100


def _stored(bucket: str, tmp_path: Path, names: str) -> list[str]:
    """One location in the store per letter of ``names``, each a directory with a 100-byte file of that letter."""
    locs = []
    for n in names:
        (tmp_path / "src" / n).mkdir(parents=True)
        (tmp_path / "src" / n / "f.bin").write_bytes(n.encode() * 100)
        locs.append(storage.join(bucket, tmp_path.name, n))
        storage.upload(tmp_path / "src" / n, locs[-1])
    return locs


def _holder(loc: str) -> tuple[subprocess.Popen, Path]:
    """Another process of this node that holds its copy of ``loc`` until its stdin closes, and the copy's path."""
    code = "import sys; from bliss_ray import storage\n"
    code += "print(storage.local_copy(sys.argv[1]), flush=True); sys.stdin.read()"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, loc], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    line = proc.stdout.readline().decode().strip()
    assert line, "the holding process ended without taking its copy"
    return proc, Path(line)


def test_a_full_cache_evicts_the_least_recently_used_copy_that_no_process_holds(
    s3_bucket, tmp_path, monkeypatch, caplog
):
    """Three 100-byte copies under a 350-byte cap; a fourth evicts the least recently used one, never one that
    another process holds (the oldest here) or one used since. With every copy held, a fifth is made anyway (a stage
    never fails for cache space), and a warning says the cache passed its cap."""
    monkeypatch.setenv("BLISS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BLISS_CACHE_MAX_GB", "3.5e-7")
    a, b, c, d, e = _stored(s3_bucket, tmp_path, "abcde")
    holder, held = _holder(a)
    try:
        with node_cache.holding():
            copies = {loc: storage.local_copy(loc) for loc in (b, c)}
            storage.local_copy(b)  # used again: c is now the least recently used copy no one holds
        with node_cache.holding():
            storage.local_copy(d)
        assert not copies[c].exists()
        assert (held / "f.bin").read_bytes() == b"a" * 100 and (copies[b] / "f.bin").read_bytes() == b"b" * 100
        with node_cache.holding(), caplog.at_level(logging.WARNING, logger="bliss_ray"):
            storage.local_copy(b)
            storage.local_copy(d)
            assert (storage.local_copy(e) / "f.bin").read_bytes() == b"e" * 100
        assert "passes its cap of 350 bytes" in caplog.text and held.exists() and copies[b].exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with node_cache.holding():  # nothing is held any more: copying c again makes room by evicting the oldest
        storage.local_copy(c)
    assert not held.exists()


def test_the_cap_defaults_to_half_the_disk_the_cache_could_have(s3_bucket, tmp_path, monkeypatch):
    """Without ``BLISS_CACHE_MAX_GB`` the cap is half of the free disk at the cache plus the cache's own bytes (so
    it holds still as the cache fills); the setting, in GB of 10^9 bytes, overrides it, and a bad one is refused."""
    monkeypatch.setenv("BLISS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BLISS_CACHE_MAX_GB", raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 300, free=300))
    copies_dir = tmp_path / "cache" / "copies"
    assert node_cache.cap_bytes(copies_dir, 0) == 150 and node_cache.cap_bytes(copies_dir, 200) == 250
    a, b, c = _stored(s3_bucket, tmp_path, "abc")
    with node_cache.holding():
        copies = [storage.local_copy(loc) for loc in (a, b)]  # 100 cached + 100 fit (300 + 100) / 2
    with node_cache.holding():
        storage.local_copy(c)  # 200 cached + 100 do not fit (300 + 200) / 2: the oldest goes
    assert not copies[0].exists() and copies[1].exists()
    monkeypatch.setenv("BLISS_CACHE_MAX_GB", "1e-6")
    assert node_cache.cap_bytes(copies_dir, 200) == 1000
    monkeypatch.setenv("BLISS_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="BLISS_CACHE_MAX_GB='lots'"):
        node_cache.cap_bytes(copies_dir, 0)


def test_a_missing_location_and_an_unwritable_root_fail_naming_the_location(s3_bucket, tmp_path):
    with pytest.raises(storage.StorageError, match="nothing there"):
        storage.local_copy(storage.join(s3_bucket, "never-written"))
    no_bucket = s3_bucket.replace("s3://", "s3://no-such-bucket-", 1).split("?")[0] + "?" + s3_bucket.split("?")[1]
    with pytest.raises(storage.StorageError, match="no-such-bucket"):
        storage.check_writable(storage.join(no_bucket, "runs"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(storage.StorageError, match=str(blocked)):
        storage.check_writable(blocked / "runs")


def test_names_and_file_keys_of_uris_ignore_the_store_options():
    from bliss_ray.data.packing import file_key

    uri = "s3://bkt/pool/00001-pool-00001.parquet?region=us-east-1&endpoint_override=http://127.0.0.1:9"
    assert storage.name(uri) == "00001-pool-00001.parquet" and file_key(uri) == "00001-pool-00001"
    assert storage.parent(uri) == "s3://bkt/pool?region=us-east-1&endpoint_override=http://127.0.0.1:9"
    from bliss_ray.data.corpus import detect_format

    assert detect_format("s3://bkt/docs.jsonl.gz?region=us-east-1&endpoint_override=http://127.0.0.1:9") == "jsonl"


def test_pool_fingerprint_follows_the_bytes_of_local_files_not_their_paths_or_times(tmp_path):
    """A fresh clone, a copy or a touched pool file keeps every stage's identity; a changed byte does not."""
    import os

    from bliss_ray.config import parse_experiment
    from bliss_ray.pipeline import pool_fingerprint

    def fingerprint(d):
        return pool_fingerprint(parse_experiment({"name": "fp", "data": {"pool": [str(d / "a.jsonl")]}}))

    first, second = tmp_path / "clone1", tmp_path / "clone2"
    for d in (first, second):
        d.mkdir()
        (d / "a.jsonl").write_text('{"id": "1", "text": "the same bytes"}\n')
    os.utime(second / "a.jsonl", ns=(1, 1))
    assert fingerprint(first) == fingerprint(second)
    (second / "a.jsonl").write_text('{"id": "1", "text": "the same bytez"}\n')
    assert fingerprint(first) != fingerprint(second)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/runs/demo?region=us-east-1",
        "gs://bucket/runs/demo",
        "abfs://container@account.dfs.core.windows.net/runs/demo",  # the authority is not the path's first part
        "abfss://container@account.dfs.core.windows.net/runs/demo",
    ],
)
def test_a_store_location_resolves_to_the_path_pyarrow_gives_it(uri):
    """Every scheme pyarrow knows maps its authority its own way (abfs: ``container@account`` → ``container``);
    ``storage.resolve`` takes pyarrow's mapping, whatever the scheme, for a location and its sub-locations."""
    import pyarrow.fs as pafs

    assert storage.resolve(uri)[1] == pafs.FileSystem.from_uri(uri)[1]
    sub = storage.join(uri, "r1.score", "scores")
    assert storage.resolve(sub)[1] == pafs.FileSystem.from_uri(sub)[1]


def test_a_remote_runs_tracker_files_reach_the_store(s3_bucket, tmp_path):
    """MLflow's SQLite file and W&B's offline runs, written in the driver's working copy of a remote run root, are
    copied to the store with the console log and TensorBoard files: a fresh head, or anyone with the bucket, has
    them."""
    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run
    from bliss_ray.stages.executor import sync_side_files

    run = Run(load_experiment(REPO / "experiments" / "tiny.yaml"), storage.join(s3_bucket, "tracked"))
    (run.root / "wandb" / "offline-run-1").mkdir(parents=True)
    (run.root / "wandb" / "offline-run-1" / "run.wandb").write_bytes(b"records")
    (run.root / "mlflow.db").write_bytes(b"sqlite")
    (run.root / "logs").mkdir()
    (run.root / "logs" / "run.log").write_text("console")
    sync_side_files(run)
    assert storage.read_bytes(storage.join(run.store, "mlflow.db")) == b"sqlite"
    assert storage.read_bytes(storage.join(run.store, "wandb", "offline-run-1", "run.wandb")) == b"records"
    assert storage.read_bytes(storage.join(run.store, "logs", "run.log")) == b"console"


def test_copy_tree_copies_a_tree_or_a_file_inside_a_store_without_moving_its_bytes(root, tmp_path):
    """Within one store ``copy_tree`` copies each file where it is (S3: CopyObject): the bytes this process moved
    do not grow, whatever it copies. Between this disk and a store they stream through it and are counted."""
    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.safetensors").write_bytes(b"w" * 1000)
    (src / "train_state.pt").write_bytes(b"s" * 500)
    ckpt = storage.join(root, "_ray", "checkpoint_0")
    before = storage.bytes_moved()
    storage.copy_tree(src, ckpt)
    moved = storage.bytes_moved()
    assert moved["written"] - before["written"] == (1500 if storage.is_remote(root) else 0)
    stage = storage.join(root, "stage-ab12")
    assert storage.copy_tree(ckpt, stage, keep=lambda rel: rel != "train_state.pt") == 1000
    assert storage.copy_tree(storage.join(ckpt, "train_state.pt"), storage.join(stage, "state", "s.pt")) == 500
    assert storage.bytes_moved() == moved
    assert storage.read_bytes(storage.join(stage, "model", "w.safetensors")) == b"w" * 1000
    assert storage.read_bytes(storage.join(stage, "state", "s.pt")) == b"s" * 500
    assert not storage.exists(storage.join(stage, "train_state.pt"))
    with pytest.raises(storage.StorageError, match="nothing there"):
        storage.copy_tree(storage.join(root, "absent"), stage)


def test_bytes_moved_counts_what_passes_between_this_process_and_a_store(s3_bucket, tmp_path):
    before = storage.bytes_moved()
    storage.write_bytes(storage.join(s3_bucket, "a", "x.bin"), b"x" * 300)
    assert storage.read_bytes(storage.join(s3_bucket, "a", "x.bin")) == b"x" * 300
    storage.download(storage.join(s3_bucket, "a"), tmp_path / "copy")
    storage.write_bytes(tmp_path / "local.bin", b"y" * 50)  # a local file is no traffic
    after = storage.bytes_moved()
    assert (after["read"] - before["read"], after["written"] - before["written"]) == (600, 300)


def test_a_rank_reads_only_its_rows_of_a_large_array_in_a_store(root, tmp_path):
    """A rank that trains on fewer rows than the array holds reads them from the store as batches need them: the
    same batches as from a node copy, and (in a store) exactly their bytes; one that needs them all gets a copy."""
    from bliss_ray.data.tokens import StoreRows, TokenArray, micro_batches

    n, seq_len = 400, 16
    tokens = np.random.default_rng(0).integers(0, 50_000, size=(n, seq_len), dtype=np.int32)  # (N, L)
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "row_ids.npy", np.arange(n, dtype=np.int64) * 3)
    loc = storage.join(root, "data")
    storage.upload(tmp_path, loc)
    for copy in (TokenArray.open_for(loc, rows_read=n, copy_below_bytes=0), TokenArray.open_for(loc, rows_read=1)):
        assert not isinstance(copy.tokens, StoreRows) and np.array_equal(copy.tokens, tokens)  # all rows, or small
    array = TokenArray.open_for(loc, rows_read=n // 4, copy_below_bytes=0)
    assert isinstance(array.tokens, StoreRows) is storage.is_remote(loc)
    assert np.array_equal(array.row_ids, np.arange(n) * 3) and array.loss_mask is None
    before, expected = storage.bytes_moved()["read"], 0
    for step in (0, 7, 31):  # step 31 wraps into the second epoch
        for rank in (0, 1):
            got = micro_batches(array.tokens, step, 16, 4, rank, 2, seed=5)
            want = micro_batches(tokens, step, 16, 4, rank, 2, seed=5)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            expected += sum(len(np.unique(b.numpy(), axis=0)) for b in got) * seq_len * 4
    if storage.is_remote(loc):
        assert storage.bytes_moved()["read"] - before == expected
        assert array.tokens[[5, 3, 5]].tolist() == tokens[[5, 3, 5]].tolist()  # any order, repeats
