"""The shared LM training loop without Ray: it learns, fails loudly on non-finite values (naming stage and
step), can skip bad batches, never checkpoints non-finite weights, and resumes exactly; gradient clipping
equals torch's; LR schedules; the CPU allocator setting (``train.host_memory``) stops steady-state page faults.

    .venv/bin/python -m pytest tests/test_train_loop.py -q
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
from bliss_ray.train.checkpoint import load_train_state, read_state, save_train_state
from bliss_ray.train.host_memory import worker_env
from bliss_ray.train.loop import NonFiniteCheckpointError, NonFiniteLossError, clip_grad_norm, make_optimizer, train_lm
from bliss_ray.train.schedule import decay_lr, round_peak_lr, wsd_lr
from bliss_ray.train.settings import TrainSettings

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
        settings=TrainSettings(),
        stage="test",
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
            settings=TrainSettings(ckpt_every_steps=1),
            stage="warmup",
            save=lambda s, k: saved.append(s),
            loss_hook=hook,
        )
    assert saved == [1, 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was never applied


def test_skip_batch_policy_skips_then_gives_up():
    model, opt = _setup()
    logs = []
    hook = lambda step, loss: loss * float("inf") if step in (1, 4) else loss  # noqa: E731
    settings = TrainSettings(nonfinite_policy="skip_batch", max_skipped_steps=2)
    skipped = train_lm(
        model,
        opt,
        start_step=0,
        end_step=6,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        settings=settings,
        stage="t",
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
            settings=TrainSettings(nonfinite_policy="skip_batch", max_skipped_steps=1),
            stage="t",
            loss_hook=hook,
        )


def test_checkpoint_resume_is_exact(tmp_path):
    """Train 10 steps straight vs 5 + save + load (weights_only) + 5: identical weights."""
    model_a, opt_a = _setup()
    train_lm(
        model_a,
        opt_a,
        start_step=0,
        end_step=10,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        settings=TrainSettings(),
        stage="t",
    )
    model_b, opt_b = _setup()
    train_lm(
        model_b,
        opt_b,
        start_step=0,
        end_step=5,
        lr_at=lambda s: 1e-2,
        batches_at=_batches,
        settings=TrainSettings(),
        stage="t",
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
        settings=TrainSettings(),
        stage="t",
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


@pytest.mark.parametrize("scale", [1e-3, 1e3])  # under and over the clip threshold
def test_clip_grad_norm_equals_torch_bit_for_bit(scale):
    grads = [torch.randn(7, 5, generator=torch.Generator().manual_seed(i)) * scale for i in range(3)]
    ours = [torch.nn.Parameter(torch.zeros(7, 5)) for _ in grads]
    theirs = [torch.nn.Parameter(torch.zeros(7, 5)) for _ in grads]
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    norm = clip_grad_norm(ours, 1.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert (norm > 1.0) == (scale > 1)  # both branches were taken


_FAULTS = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from bliss_ray.train.host_memory import retain_freed_memory
    on = retain_freed_memory(torch.device(sys.argv[1])) if sys.argv[1] != "off" else False
    def touch():  # a step's worth of large activations, one over a thread arena's 64 MiB: allocate, write, free
        for mib in (80, 16, 16):
            torch.ones(mib * 2**20 // 4).sum()
    def run(out):
        for _ in range(4):  # the heap settles within a few steps (as in training: two)
            touch()
        for _ in range(3):  # the fewest faults of 3 steps: now and then the heap still grows by a block
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            touch()
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out = []
    if sys.argv[2] == "thread":  # as Ray Train runs the loop: in a thread
        t = threading.Thread(target=run, args=(out,)); t.start(); t.join()
    else:
        run(out)
    print(on, min(out))
    """
)


def _steady_state_faults(mode: str, where: str = "main", **tuning: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))} | tuning
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode, where], capture_output=True, text=True, check=True, env=env, timeout=120
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only")
def test_retained_host_memory_stops_page_faults_in_steady_state():
    """A 'step' of 80 + 2 × 16 MiB blocks: glibc's defaults mmap the 80 MiB one and fault it in again every
    step (20,480 faults of 4 KiB). With the setting, steps after the first few reuse the heap: in the process's
    main thread after ``retain_freed_memory``, and in a training thread (as Ray Train runs the loop) under
    ``worker_env``'s variables. A user's own malloc tuning wins; GPU workers are left alone."""
    off, on = _steady_state_faults("off", "thread")[1], _steady_state_faults("cpu")
    assert off > 16_000 and on[0] and on[1] < 1_000, (off, on)
    threaded = _steady_state_faults("off", "thread", **worker_env(gpu=False))
    assert threaded[1] < 1_000, threaded
    tuned = _steady_state_faults("cpu", MALLOC_TRIM_THRESHOLD_="0")
    assert tuned[0] is False and tuned[1] > 16_000, tuned
    assert _steady_state_faults("meta")[0] is False  # only for work on the CPU
    assert worker_env(gpu=True) == {}
