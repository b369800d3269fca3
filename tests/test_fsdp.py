"""FSDP2 inside Ray Train on CPU (gloo, 2 workers): the same training as DDP and as one worker, sharded
checkpoints that a killed worker resumes from, and plain HF / AdamW exports at the end of the stage.

    .venv/bin/python -m pytest tests/test_fsdp.py -q
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bliss_ray.config import ResourcesConfig
from bliss_ray.data.tokenizer import train_bpe
from bliss_ray.train.checkpoint import read_metrics
from bliss_ray.train.settings import TrainSettings
from tests.conftest import micro_lm_spec, without_timings

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

VOCAB, SEQ_LEN, ROWS = 512, 32, 256


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A TokenArray of random rows and a small tokenizer (the stage saves it beside every checkpoint)."""
    d = tmp_path_factory.mktemp("fsdp_data")
    (d / "arr").mkdir()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (ROWS, SEQ_LEN), dtype=np.int32)
    np.save(d / "arr" / "tokens.npy", tokens)
    np.save(d / "arr" / "row_ids.npy", np.arange(ROWS, dtype=np.int64))
    (d / "arr" / "_SUCCESS").write_text(f"{ROWS} rows\n")
    train_bpe(["a tiny corpus for a tiny tokenizer"] * 20, vocab_size=300).save_pretrained(str(d / "tok"))
    return d


def _spec(data, stage: str, resources, steps: int = 6, decay: int = 2):
    train = TrainSettings(
        steps=steps,
        warmup_steps=1,
        decay_steps=decay,
        lr=1e-3,
        micro_batch_seqs=4,
        global_batch_seqs=8,
        ckpt_every_steps=2,
    )
    return micro_lm_spec(stage, str(data / "tok"), str(data / "arr"), train, VOCAB, SEQ_LEN, resources)


def _run(data, root, name, workers, parallelism):
    from bliss_ray.stages import train_lm

    res = ResourcesConfig(cpus_per_worker=1.0, torch_threads=1, max_failures=2, parallelism=parallelism)
    out = root / name
    out.mkdir()
    # 1 worker: 2 micro-batches of 4 per step; 2 workers: one of 4 each (the same global batch of 8)
    result = train_lm.fit_lm(_spec(data, name, res), out, str(root / "ray"), workers)
    return out, result


@pytest.fixture(scope="module")
def runs(ray_local, data, tmp_path_factory):
    """The same 6-step stage (checkpoints every 2 steps, then a 2-step decay branch) on 1 worker, 2 DDP workers
    and 2 FSDP workers: the parity test compares them, and the FSDP one is the killed run's uninterrupted twin."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    return root, {
        k: _run(data, root, k, w, p)[0] for k, w, p in (("one", 1, "ddp"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp"))
    }


def test_fsdp_trains_as_ddp_and_as_one_worker(runs):
    """Same global batch of 8 rows: 1 worker × 2 micro-batches of 4, 2 DDP workers × 4, 2 FSDP workers × 4. The
    rows are identical by construction; only fp32 summation order differs (accumulation vs all-reduce vs
    reduce-scatter), so per-step losses agree to ~1e-6 relative, and rtol 1e-4 leaves room for the steps' drift.
    Weights: AdamW moves a coordinate by ≈ lr·g/(|g| + eps), so a coordinate whose gradient is ~eps moves by a
    rounding-dependent fraction of lr (1e-3); atol 1e-5 = 1 % of lr per step. A wrong reduction (summed instead
    of averaged, pytorch#162338; a missing shard) moves whole tensors by ~lr and fails both. This is also the
    1-vs-2-worker parity of DDP."""
    _, runs = runs
    losses = {
        k: [m["loss"] for m in read_metrics(d / "metrics.jsonl") if m["phase"] == "stable"] for k, d in runs.items()
    }
    weights = {k: load_file(d / "state" / "model" / "model.safetensors") for k, d in runs.items()}
    assert len(losses["fsdp"]) == 6 and not (runs["fsdp"] / "state" / "dcp").exists()  # a plain HF export
    for other in ("one", "ddp"):
        np.testing.assert_allclose(losses["fsdp"], losses[other], rtol=1e-4)
        for name, w in weights[other].items():
            torch.testing.assert_close(weights["fsdp"][name], w, rtol=0, atol=1e-5, msg=name)
    # the stage's end holds the AdamW state in a plain run's format: a DDP round (or MATES's prober) reads it
    opt = {k: torch.load(d / "state" / "train_state.pt", weights_only=True)["optimizer"] for k, d in runs.items()}
    assert opt["fsdp"]["state"].keys() == opt["ddp"]["state"].keys()
    torch.testing.assert_close(
        opt["fsdp"]["state"][0]["exp_avg"], opt["ddp"]["state"][0]["exp_avg"], atol=1e-6, rtol=1e-4
    )


def test_killed_fsdp_worker_resumes_from_the_sharded_checkpoint(runs, data, monkeypatch):
    """SIGKILL rank 1 while it fetches step 5's batches: Ray Train restarts both workers from the last registered
    checkpoint (DCP shards of step 4, or 2), which every rank reads back. The run ends at exactly step 6 with each
    step logged once and equals the uninterrupted FSDP run bit for bit (weights, AdamW state, losses): the same
    float operations replay on the same shards, and DCP restores fp32 tensors unrounded. A decay branch follows,
    exported as HF weights like the stable ones. An orphan checkpoint directory planted in the run's storage (what a
    worker that dies right after uploading leaves behind) is deleted; registered ones stay."""
    root, runs = runs
    ref = runs["fsdp"]
    marker = root / "killed"
    fault = {"kill": {"stage": "killme", "step": 4, "rank": 1, "once": str(marker)}}
    monkeypatch.setenv("BLISS_FAULTS", json.dumps(fault))
    orphan = root / "ray" / "killme" / "checkpoint_2000-01-01_00-00-00.000000"  # the Train run is named after out/
    orphan.mkdir(parents=True)
    (orphan / "train_state.pt").write_bytes(b"a partial upload")
    out, result = _run(data, root, "killme", 2, "fsdp")
    assert marker.exists(), "the fault was not injected"
    run_dir = Path(result["train_run"])
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    dirs = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert not orphan.exists(), "gc_orphan_checkpoints left an unregistered checkpoint directory"
    assert dirs and all(d in snapshot for d in dirs), (dirs, snapshot)
    state = torch.load(out / "state" / "train_state.pt", weights_only=True)
    ref_state = torch.load(ref / "state" / "train_state.pt", weights_only=True)
    assert result["final_step"] == 6 and state["step"] == 6
    assert ref_state["resumed_from"] == [] and len(state["resumed_from"]) == 1
    assert state["resumed_from"][0] in (2, 4)  # resumed from a sharded checkpoint, not restarted from 0
    stable = [m for m in read_metrics(out / "metrics.jsonl") if m["phase"] == "stable"]
    assert [m["step"] for m in stable] == list(range(1, 7))
    for part in ("state/model", "decay"):
        a, b = load_file(out / part / "model.safetensors"), load_file(ref / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for i, s in ref_state["optimizer"]["state"].items():
        assert all(torch.equal(s[k], state["optimizer"]["state"][i][k]) for k in s), i
    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(read_metrics(ref / "metrics.jsonl"))
