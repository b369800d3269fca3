"""The storage layer on a local directory and on a local S3-compatible server (moto, loopback only).

.venv/bin/python -m pytest tests/test_storage.py -q
"""

import pytest

from bliss_ray import storage
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
