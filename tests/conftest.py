"""Shared test fixtures: hermetic environment, ONE local Ray instance per session, and tiny experiments.

Ray tests are marked ``ray`` and get a timeout; everything runs offline (no hub access is possible or tried).

    .venv/bin/python -m pytest tests -q                       # everything (what CI runs)
    .venv/bin/python -m pytest tests -q -m "not ray and not slow"   # the fast, Ray-free part
"""

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports Ray or transformers: isolation and no network.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="brt_", dir="/tmp"))  # short: unix socket paths
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private single-process test cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """The session's Ray instance: 4 logical CPUs on any machine, so budgets are explicit, not starved."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def load_tiny(**overrides):
    from bliss_ray.config import load_experiment

    return load_experiment(REPO / "experiments" / "tiny.yaml", overrides)


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """The tiny BLISS pipeline run once per session; several tests read its outputs."""
    from bliss_ray.pipeline import Run

    out = tmp_path_factory.mktemp("runs")
    run = Run(load_tiny(), out)
    results = run.execute()
    return run, results
