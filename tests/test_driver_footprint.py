"""The driver of a remote run only orchestrates: a round's selection and the token arrays its Train stages read are
computed by tasks, so the bytes the driver moves to and from the store do not grow with the pool.

Synthetic packed pools (×1 and ×4 the files) and scores in a local S3 server; the select stage and the pretraining
stage's array build, as the executor runs them, with the driver's traffic counted by ``storage.bytes_moved``.

    .venv/bin/python -m pytest tests/test_driver_footprint.py -q
"""

import pytest

from bliss_ray import storage
from bliss_ray.pipeline import Run
from bliss_ray.stages.executor import select_and_share
from bliss_ray.testing import plant_scored_pool
from tests.conftest import load_tiny

pytestmark = pytest.mark.ray

ROWS_PER_FILE = 1500


def _select_and_build(run: Run) -> tuple[dict, dict]:
    """(the driver's store traffic, the sizes of what the tasks wrote) for round 1's select stage and the array of
    its selected rows that r1.pretrain's workers read."""
    before = storage.bytes_moved()
    out, data, rows = select_and_share(run, 1)
    after = storage.bytes_moved()
    driver = {k: after.get(k, 0) - before.get(k, 0) for k in ("read", "written")}
    assert rows == out["selected"] and storage.exists(storage.join(data, "_SUCCESS"))
    # the driver's disk holds the manifest it reports from, and neither the selection nor the array
    assert sorted(p.name for p in run.dir("r1.select").iterdir()) == ["manifest.json"]
    assert not any(run.dir("r1.pretrain").iterdir())
    sizes = {"selected": storage.size(run.uri("r1.select", "selected.parquet")), "data": storage.size(data)}
    return driver, sizes


@pytest.mark.timeout(240)
def test_the_driver_moves_the_same_bytes_whatever_the_pool_size(ray_local, s3_bucket):
    driver, tasks = {}, {}
    for scale in (1, 4):
        run = Run(load_tiny(), storage.join(s3_bucket, f"pool_x{scale}"))
        plant_scored_pool(run, files=3 * scale, rows_per_file=ROWS_PER_FILE)
        driver[scale], tasks[scale] = _select_and_build(run)
    for k in ("selected", "data"):  # what the tasks read and wrote grew with the pool...
        assert tasks[4][k] > 3 * tasks[1][k], (k, tasks)
    for k in ("read", "written"):  # ...what the driver moved did not
        assert driver[4][k] == pytest.approx(driver[1][k], rel=0.1, abs=256), (k, driver)
    # a small fraction of the pool's ids alone (8 bytes a row): the old driver read ids, domains and scores
    assert driver[4]["read"] + driver[4]["written"] < 0.1 * 8 * 12 * ROWS_PER_FILE, driver
