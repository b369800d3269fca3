"""The shared LM training loop without Ray: it learns, fails loudly on non-finite values (naming stage and
step), can skip bad batches, never checkpoints non-finite weights, and resumes exactly; LR schedules.

    .venv/bin/python -m pytest tests/test_train_loop.py -q
"""

import itertools

import pytest
import torch

from bliss_ray.models.lm import arch_from_preset, build_lm
from bliss_ray.train.checkpoint import NonFiniteCheckpointError, load_train_state, read_state, save_train_state
from bliss_ray.train.loop import LoopSettings, NonFiniteLossError, make_optimizer, train_lm
from bliss_ray.train.schedule import decay_lr, round_peak_lr, wsd_lr

DATA = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))


def _setup(seed=0):
    model = build_lm(arch_from_preset("pythia-micro", 64), 16, seed=seed)
    return model, make_optimizer(model, 1e-2, (0.9, 0.95), 0.1)


def _batches(step):
    i = (step * 8) % 64
    return [DATA[i : i + 4], DATA[i + 4 : i + 8]]  # two micro-batches: gradient accumulation


def test_loop_learns_and_logs():
    model, opt = _setup()
    logs = []
    train_lm(
        model,
        opt,
        start_step=0,
        end_step=40,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        cfg=LoopSettings("test"),
        log=logs.append,
    )
    assert [m["step"] for m in logs] == list(range(1, 41))
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5
    assert logs[-1]["tokens_seen"] == 40 * 8 * 16


def test_nonfinite_loss_fails_naming_stage_and_step_and_saves_nothing():
    """Scenario 5: NaN injected at step 3 → clear error, the save callback never ran after it."""
    model, opt = _setup()
    saved = []
    hook = lambda step, loss: loss * float("nan") if step == 2 else loss  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"stage 'warmup'.*step 3"):
        train_lm(
            model,
            opt,
            start_step=0,
            end_step=10,
            lr_at=lambda s: 1e-2,
            batches_at=_batches,
            cfg=LoopSettings("warmup", ckpt_every_steps=1),
            save=lambda s, k: saved.append(s),
            loss_hook=hook,
        )
    assert saved == [1, 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was never applied


def test_skip_batch_policy_skips_then_gives_up():
    model, opt = _setup()
    logs = []
    hook = lambda step, loss: loss * float("inf") if step in (1, 4) else loss  # noqa: E731
    cfg = LoopSettings("t", nonfinite_policy="skip_batch", max_skipped_steps=2)
    skipped = train_lm(
        model,
        opt,
        start_step=0,
        end_step=6,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        cfg=cfg,
        log=logs.append,
        loss_hook=hook,
    )
    assert skipped == 2 and [m["step"] for m in logs if m.get("skipped_step")] == [2, 5]
    with pytest.raises(NonFiniteLossError):
        train_lm(
            model,
            opt,
            start_step=0,
            end_step=6,
            lr_at=lambda s: 1e-2,
            batches_at=_batches,
            cfg=LoopSettings("t", nonfinite_policy="skip_batch", max_skipped_steps=1),
            loss_hook=hook,
        )


def test_checkpoint_resume_is_exact(tmp_path):
    """Train 10 steps straight vs 5 + save + load (weights_only) + 5: identical weights."""
    model_a, opt_a = _setup()
    train_lm(
        model_a, opt_a, start_step=0, end_step=10, lr_at=lambda s: 1e-2, batches_at=_batches, cfg=LoopSettings("t")
    )
    model_b, opt_b = _setup()
    train_lm(
        model_b, opt_b, start_step=0, end_step=5, lr_at=lambda s: 1e-2, batches_at=_batches, cfg=LoopSettings("t")
    )
    save_train_state(tmp_path / "ck", model_b, opt_b, 5, metrics=[{"step": 5}])
    model_c, state = load_train_state(tmp_path / "ck")
    opt_c = make_optimizer(model_c, 1e-2, (0.9, 0.95), 0.1)
    opt_c.load_state_dict(state["optimizer"])
    train_lm(
        model_c,
        opt_c,
        start_step=state["step"],
        end_step=10,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        cfg=LoopSettings("t"),
    )
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert read_state(tmp_path / "ck")["step"] == 5


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, opt = _setup()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError):
        save_train_state(tmp_path / "bad", model, opt, 1)
    assert not (tmp_path / "bad" / "train_state.pt").exists()


def test_schedules():
    assert wsd_lr(0, 1.0, 10) == pytest.approx(0.1) and wsd_lr(9, 1.0, 10) == 1.0 and wsd_lr(500, 1.0, 10) == 1.0
    # the decay branch halves every decay_steps/4 steps: 200 steps end at peak/16 (MATES/BLISS)
    assert decay_lr(0, 1.0, 200) == 1.0 and decay_lr(50, 1.0, 200) == pytest.approx(0.5)
    assert decay_lr(200, 1.0, 200) == pytest.approx(1 / 16)
    assert round_peak_lr(1e-3, 0.5, 3) == pytest.approx(1.25e-4) and round_peak_lr(1e-3, 1.0, 4) == 1e-3
    lrs = [decay_lr(s, 1.0, 200) for s in range(200)]
    assert all(a > b for a, b in itertools.pairwise(lrs))  # strictly decreasing
