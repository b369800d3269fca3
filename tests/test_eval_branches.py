"""Mid-round evaluation branches without Ray: where they sit in a round (``train.schedule.branch_steps``), that
a branch taken inside ``stable_state_kept`` leaves the stable run bit for bit as without it, and the config rules.

    .venv/bin/python -m pytest tests/test_eval_branches.py -q
"""

import itertools
import re

import pytest
import torch

from bliss_ray.config import ConfigError, load_experiment
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
from bliss_ray.train.branches import stable_state_kept
from bliss_ray.train.loop import make_optimizer, train_lm
from bliss_ray.train.schedule import branch_steps, decay_lr
from bliss_ray.train.settings import TrainSettings
from tests.conftest import REPO


def test_branch_steps_sit_evenly_strictly_inside_the_round():
    assert branch_steps(0, 60, 2) == [20, 40]  # the demo: 60 steps per round, 2 branches
    assert branch_steps(120, 60, 2) == [140, 160]  # round 2 of the demo: global steps
    assert branch_steps(6, 6, 1) == [9]  # tiny, round 1
    assert branch_steps(0, 10, 3) == [2, 5, 7]  # ⌊k·10/4⌋: rounded down
    assert branch_steps(0, 5, 0) == []
    for steps, n in itertools.product(range(1, 40), range(0, 12)):
        if n >= steps:
            with pytest.raises(ValueError, match="do not fit"):
                branch_steps(0, steps, n)
            continue
        at = branch_steps(100, steps, n)
        gaps = [b - a for a, b in itertools.pairwise([100, *at, 100 + steps])]
        assert len(at) == n and min(gaps) >= 1, (steps, n, at)  # distinct, strictly between start and end
        assert max(gaps) - min(gaps) <= 1, (steps, n, at)  # as even as whole steps allow


DATA = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))


def _batches(step):
    i = (step * 8) % 64
    return [DATA[i : i + 4], DATA[i + 4 : i + 8]]


def _train(model, opt, start, end, lr_at, log=lambda m: None):
    train_lm(
        model,
        opt,
        start_step=start,
        end_step=end,
        lr_at=lr_at,
        batches_at=_batches,
        settings=TrainSettings(),
        stage="t",
        log=log,
    )


def test_a_branch_inside_stable_state_kept_leaves_the_stable_run_bit_identical():
    """8 stable steps straight vs 4 + a 3-step decay branch (which moves the weights) + 4: same weights, AdamW
    state and RNG stream bit for bit. The branch's first loss is the stable run's loss of that step (same
    weights, same batch): it starts from the stable state."""
    torch.manual_seed(1)
    model_a = build_lm(arch_from_preset("pythia-micro", 64), 16, seed=0)
    opt_a = make_optimizer(model_a, 1e-2, (0.9, 0.95), 0.1)
    ref_log = []
    _train(model_a, opt_a, 0, 8, lambda s: 1e-2, ref_log.append)
    ref_draw = torch.rand(4)

    torch.manual_seed(1)
    model_b = build_lm(arch_from_preset("pythia-micro", 64), 16, seed=0)
    opt_b = make_optimizer(model_b, 1e-2, (0.9, 0.95), 0.1)
    _train(model_b, opt_b, 0, 4, lambda s: 1e-2)
    stable = {k: v.clone() for k, v in model_b.state_dict().items()}
    branch_log = []
    with stable_state_kept(model_b, opt_b):
        _train(model_b, opt_b, 4, 7, lambda s: decay_lr(s - 4, 1e-2, 3), branch_log.append)
        torch.rand(10)  # the branch draws random numbers (dropout would): the stable run must not see it
        moved = max((model_b.state_dict()[k] - v).abs().max().item() for k, v in stable.items())
    _train(model_b, opt_b, 4, 8, lambda s: 1e-2)

    assert moved > 1e-4  # the branch trained
    assert branch_log[0]["loss"] == ref_log[4]["loss"]
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert torch.equal(torch.rand(4), ref_draw)


@pytest.mark.parametrize(
    "overrides",
    [
        ["pretrain.decay_steps=0"],  # a branch is a decay
        ["pretrain.eval_branches=60"],  # 60 steps per round hold at most 59
        ["resources.parallelism=fsdp", "resources.train_workers=2"],  # sharded: not supported
    ],
)
def test_impossible_eval_branches_fail_at_load_naming_the_field(overrides):
    with pytest.raises(ConfigError, match=re.escape("pretrain.eval_branches")):
        load_experiment(REPO / "experiments" / "demo.yaml", overrides)


def test_eval_branches_are_fine_with_fsdp_on_one_worker_or_without_branches():
    base = ["resources.parallelism=fsdp"]
    assert load_experiment(REPO / "experiments" / "demo.yaml", base).pretrain.eval_branches == 2
    off = [*base, "resources.train_workers=2", "pretrain.eval_branches=0"]
    assert load_experiment(REPO / "experiments" / "demo.yaml", off).pretrain.eval_branches == 0
