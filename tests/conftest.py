"""Shared test fixtures: hermetic environment, ONE local Ray instance per session, and tiny experiments.

Ray tests are marked ``ray`` and get a timeout; everything runs offline (no hub access is possible or tried).

    .venv/bin/python -m pytest tests -q                       # everything (what CI runs)
    .venv/bin/python -m pytest tests -q -m "not ray and not slow"   # the fast, Ray-free part
"""

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bliss_ray.testing import use_fake_aws_credentials

# Before anything imports Ray or transformers: isolation and no network.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="brt_", dir="/tmp"))  # short: unix socket paths
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private single-process test cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's settings for trainers a test builds itself; stages._ray.fit sets a stage's own (train_env)
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
use_fake_aws_credentials()  # for the local S3 server, before Ray starts: its workers inherit them

REPO = Path(__file__).resolve().parents[1]
# What must never reach a person's console: Ray's and lm-eval's own output (it belongs in the command's log file)
RAY_INTERNALS = (
    r"core_worker\.cc|PlacementGroupCleaner|Failed to query Ray Train Controller|TrainingReport\(|TrainController"
    r"|RayTrainWorker|\(raylet\)|State API|lm_eval\.|Tune Status|Trial status|ray\.tune\."
)


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


@pytest.fixture(scope="session")
def s3_bucket():
    """A local S3-compatible server (moto, bound to 127.0.0.1 only) and an empty bucket: the URI of its root with
    the store options in the query (``bliss_ray.testing.local_s3_bucket``)."""
    from bliss_ray.testing import local_s3_bucket

    with local_s3_bucket() as bucket:
        yield bucket


def micro_lm_spec(stage: str, tokenizer_dir: str, data_dir: str, train, vocab: int, seq_len: int, resources=None):
    """A Train-stage spec for the 2-layer ``pythia-micro`` LM from scratch: the Ray Train tests' model (``train``: a
    ``TrainSettings``; ``resources``: default one thread per worker)."""
    from bliss_ray.config import ResourcesConfig
    from bliss_ray.models.arch import arch_from_preset
    from bliss_ray.stages.train_lm import LMTrainSpec

    return LMTrainSpec(
        stage=stage,
        arch=arch_from_preset("pythia-micro", vocab),
        seq_len=seq_len,
        tokenizer_dir=tokenizer_dir,
        data_dir=data_dir,
        init_dir=None,
        start_step=0,
        train=train,
        round_index=0,
        seed=0,
        resources=resources or ResourcesConfig(torch_threads=1),
    )


def load_tiny(**overrides):
    from bliss_ray.config import load_experiment

    return load_experiment(REPO / "experiments" / "tiny.yaml", overrides)


def private_ray_env() -> dict:
    """The environment of a ``bliss-ray`` subprocess: offline, with a private short Ray temp dir (it starts its own
    embedded Ray; unix socket paths stay under 107 bytes)."""
    ray_tmp = tempfile.mkdtemp(prefix="brc_", dir="/tmp")
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """The tiny BLISS pipeline, run once per session as a user runs it: ``bliss-ray run experiments/tiny.yaml`` in a
    pseudo-terminal (``script(1)`` records what the terminal showed, in ``<out>/typescript``, for
    test_console_e2e). Several tests read its outputs; ``results`` are the stages' ``outputs.json``."""
    import subprocess
    import sys

    from bliss_ray.pipeline import Run

    out = tmp_path_factory.mktemp("runs")
    bliss_ray = Path(sys.executable).with_name("bliss-ray")
    cmd = f"{bliss_ray} run {REPO / 'experiments' / 'tiny.yaml'} --out {out}"
    proc = subprocess.run(
        ["script", "-q", "-e", "-f", "-c", cmd, str(out / "typescript")],
        env=private_ray_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=1400,
    )
    screen = (out / "typescript").read_bytes().decode(errors="replace")
    assert proc.returncode == 0, screen[-3000:]
    run = Run(load_tiny(), out)
    return run, {st.key: run.outputs(st.key) for st in run.stages}


def without_timings(metrics: list[dict]) -> list[dict]:
    """Per-step metrics without wall-clock values (keys in seconds end in ``_s``): those differ between runs."""
    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in metrics]


def assert_same_state(a, b, where="state"):
    """Recursive equality of checkpoint state (dicts, lists, tensors), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def write_reference_corpus(d: Path, rows: list[dict]) -> tuple[Path, Path, list[dict]]:
    """(reference.parquet, tokenizer dir, rows): ``rows`` as a reference file in ``d`` and a small BPE trained on
    their texts."""
    from bliss_ray.data.tokenizer import train_bpe  # transformers: after the environment above is set

    pq.write_table(pa.Table.from_pylist(rows), d / "reference.parquet")
    tok = train_bpe(iter([r["text"] for r in rows]), vocab_size=300)
    tok.save_pretrained(str(d / "tok"))
    return d / "reference.parquet", d / "tok", rows
