"""A local S3-compatible server for tests and benchmarks (moto, in this process, bound to 127.0.0.1 only).

Needs the ``dev`` extra (``moto[server]``). The yielded URI carries the store options (endpoint, region) in its
query, as a run root on a cluster would, so every process that is handed a location under it reaches the server.

    with local_s3_bucket() as bucket:      # "s3://bliss-1a2b3c4d?region=us-east-1&endpoint_override=…"
        bliss-ray run experiments/tiny.yaml --out f"{bucket}/runs"   (the URI joined with storage.join)
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from bliss_ray import storage


def use_fake_aws_credentials() -> None:
    """moto takes any key; never ask an instance-metadata endpoint for credentials (there is no network). Call it
    before Ray starts, so its workers inherit the variables."""
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@contextlib.contextmanager
def local_s3_bucket() -> Iterator[str]:
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    use_fake_aws_credentials()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        bucket = f"bliss-{uuid.uuid4().hex[:8]}"
        options = f"region=us-east-1&endpoint_override=http://127.0.0.1:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{options}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        yield f"s3://{bucket}?{options}"
    finally:
        server.stop()


def plant_scored_pool(run, files: int, rows_per_file: int, scored_round: int = 1) -> None:
    """``files`` packed pool files of random tokens and a logit for every row, where ``run``'s tokenize stage and
    round ``scored_round``'s score stage would have put them: a pool of any size for the select and array-build
    stages, without tokenizing or scoring anything."""
    rng = np.random.default_rng(files)
    seq_len = run.exp.data.seq_len
    for f in range(files):
        ids = np.arange(f * rows_per_file, (f + 1) * rows_per_file, dtype=np.int64)
        tokens = rng.integers(0, 500, (len(ids), seq_len), dtype=np.int32)  # (rows, L)
        name = f"{f:05d}-pool-00000"
        packed = {
            "row_id": ids,
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), seq_len),
            "domain": np.array(["web", "books", "code"])[ids % 3],
        }
        storage.write_table(run.uri("tokenize", "pool", "packed", f"{name}.parquet"), pa.table(packed))
        logits = rng.normal(size=len(ids)).astype(np.float32)
        scores = pa.table({"row_id": ids, "logit": logits, "ok": np.ones(len(ids), bool)})
        storage.write_table(run.uri(f"r{scored_round}.score", "scores", f"src={name}", "part-0.parquet"), scores)
