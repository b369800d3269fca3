"""One LM training stage on one rank without Ray (``train.lm_run.LMRun`` over ``train.checkpoint.LMCheckpoint``):
what a checkpoint holds, and that a run interrupted anywhere — inside a mid-round branch included — and resumed
from its last reported checkpoint ends bit for bit where an uninterrupted run ends.

    .venv/bin/python -m pytest tests/test_lm_run.py -q
"""

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
from bliss_ray.train.checkpoint import STATE_FILE, LMCheckpoint, RunRecord, read_metrics, read_state
from bliss_ray.train.lm_run import Branches, LMRun
from bliss_ray.train.loop import make_optimizer
from bliss_ray.train.settings import TrainSettings
from tests.conftest import assert_same_state, without_timings

ARCH = arch_from_preset("pythia-micro", 64)
DATA = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(0))
# a round of 8 steps from global step 6, two mid-round branches (at 8 and 11), 3-step decay branches
SETTINGS = TrainSettings(steps=8, warmup_steps=2, decay_steps=3, eval_branches=2, lr=3e-3, ckpt_every_steps=2)


class Interrupted(Exception):
    pass


def _run(tmp_path: Path, name: str, resume: Path | None = None, die_at_fetch: int | None = None) -> Path:
    """One attempt of the stage; every reported checkpoint is kept as ``<name>/<step>``. ``die_at_fetch``: the
    attempt dies at its n-th fetch of a step's batches (0-based; a worker killed there); ``resume``: an earlier
    attempt's checkpoint. The fetches of an uninterrupted run: 6 7 | branch@8: 8 9 10 | 8 9 | 10 | branch@11: 11
    12 13 | 11 12 13 | decay: 14 15 16; checkpoints after steps 8 (with branch 8), 10, 12, 14 and at the end."""
    kept = tmp_path / name
    model, state, record = LMCheckpoint.open(resume, resumed=resume is not None, build=lambda: build_lm(ARCH, 16))
    branches = Branches(0, resume / "branches" if resume is not None else None)
    optimizer = make_optimizer(model, SETTINGS.lr, SETTINGS.betas, SETTINGS.weight_decay)
    ckpt = LMCheckpoint(model, optimizer, None, sharded=False, rank=0)
    ckpt.load_optimizer(resume, state)

    fetches = iter(range(1 << 20))

    def batches_at(step: int) -> list[torch.Tensor]:
        if next(fetches) == die_at_fetch:
            raise Interrupted(step)
        i = (step * 8) % 88
        return [DATA[i : i + 4], DATA[i + 4 : i + 8]]

    def report(metrics: dict, d: Path | None) -> None:
        assert d is not None and metrics["step"] == read_state(d)["step"]
        shutil.copytree(d, kept / str(metrics["step"]), dirs_exist_ok=True)

    run = LMRun(ckpt, model, SETTINGS, "r1.pretrain", 6, SETTINGS.lr, "fp32", record or RunRecord(6), branches,
                batches_at, report)  # fmt: skip
    with contextlib.suppress(Interrupted):
        run.train()
    return kept


def test_a_checkpoint_holds_weights_optimizer_record_and_finished_branches(tmp_path):
    kept = _run(tmp_path, "plain")
    assert sorted(int(p.name) for p in kept.iterdir()) == [8, 10, 12, 14]  # every 2 steps; the end rewrites 14
    mid = kept / "10"
    assert {p.name for p in mid.iterdir()} == {"model", STATE_FILE, "metrics.jsonl", "branches"}
    assert sorted(p.name for p in (mid / "branches").iterdir()) == ["8"]  # the branch at 11 is not taken yet
    state = read_state(mid)
    assert state["step"] == 10 and state["phase"] == "stable" and state["resumed_from"] == []
    assert {"state", "param_groups"} <= state["optimizer"].keys()
    end = kept / "14"
    assert sorted(p.name for p in (end / "branches").iterdir()) == ["11", "8"]
    assert (end / "decay" / "model.safetensors").exists() and read_state(end)["phase"] == "done"
    phases = [m["phase"] for m in read_metrics(end / "metrics.jsonl")]
    assert phases.count("branch@8") == phases.count("branch@11") == phases.count("decay") == 3


# dies in the stable run at step 10, inside the branch at 11 (its step 12), inside the final decay branch
@pytest.mark.parametrize("die_at_fetch,resumes_at", [(7, 10), (9, 10), (15, 14)])
def test_a_run_resumed_from_its_last_checkpoint_ends_as_an_uninterrupted_one(tmp_path, die_at_fetch, resumes_at):
    """The interrupted attempt resumes from the last checkpoint it reported (one that carries the finished branch
    at 8, which is restored, not recomputed); it ends with the same stable weights, AdamW state, decayed and
    branch models and per-step records as a run that was never interrupted, bit for bit."""
    ref = _run(tmp_path, "ref") / "14"
    first = _run(tmp_path, "first", die_at_fetch=die_at_fetch)
    last = max(first.iterdir(), key=lambda p: int(p.name))
    assert int(last.name) == resumes_at and not (last / "decay").exists()
    end = _run(tmp_path, "second", resume=last) / "14"
    assert read_state(end)["resumed_from"] == [resumes_at]
    for part in ("model", "decay", "branches/8", "branches/11"):
        assert_same_state(load_file(end / part / "model.safetensors"), load_file(ref / part / "model.safetensors"))
    assert_same_state(read_state(end)["optimizer"], read_state(ref)["optimizer"], "optimizer")
    records = without_timings(read_metrics(end / "metrics.jsonl"))
    assert records == without_timings(read_metrics(ref / "metrics.jsonl"))
    assert [m["step"] for m in records if m["phase"] == "branch@8"] == [9, 10, 11]  # once: carried, not rerun
