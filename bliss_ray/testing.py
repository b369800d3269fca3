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
