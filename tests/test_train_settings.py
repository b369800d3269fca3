"""Training's memory and precision settings on CPU: activation checkpointing changes no gradient, ``precision``
picks the autocast, and fp16's loss scale drops an overflowing step instead of failing the run.

    .venv/bin/python -m pytest tests/test_train_settings.py -q
"""

import pytest
import torch

from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm, set_activation_checkpointing
from bliss_ray.train.loop import autocast_for, lm_loss, make_optimizer, train_lm
from bliss_ray.train.precision import resolve_precision
from bliss_ray.train.settings import TrainSettings


def _grads(preset: str, mode: str, k: int = 2) -> dict[str, torch.Tensor]:
    model = build_lm(arch_from_preset(preset, 512), 64, seed=3).train()
    set_activation_checkpointing(model, mode, k)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    lm_loss(model, ids).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["pythia-tiny", "llama-tiny"])
@pytest.mark.parametrize("mode,k", [("full", 2), ("every_k", 2)])
def test_activation_checkpointing_gives_the_gradients_of_none(preset, mode, k):
    """Non-reentrant checkpointing replays each block's forward with the same ops on the same inputs, so on CPU
    the recomputed activations, and hence every gradient, are bit-identical to keeping them."""
    plain, ckpt = _grads(preset, "none"), _grads(preset, mode, k)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_checkpointing_really_recomputes():
    """The test above is not vacuous: with ``full`` every block's forward runs twice per step, with every_k=2
    only blocks 0, 2, …; with ``none`` once."""
    ids = torch.randint(0, 512, (2, 64))
    for mode, expected in (("none", [0, 1]), ("every_k", [0, 1, 0]), ("full", [0, 1, 1, 0])):
        model = build_lm(arch_from_preset("pythia-tiny", 512), 64).train()
        calls = []
        for i, layer in enumerate(model.gpt_neox.layers):  # (module hooks do not fire in the recompute: wrap)
            linear = layer.mlp.dense_h_to_4h
            linear.forward = lambda x, f=linear.forward, i=i, seen=calls: (seen.append(i), f(x))[1]
        set_activation_checkpointing(model, mode, 2)
        lm_loss(model, ids).backward()
        assert calls == expected, mode


def test_precision_resolves_by_device_and_sets_the_autocast():
    assert resolve_precision("auto", "cuda") == "bf16-mixed" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp16-mixed", "cpu") == "fp16-mixed"
    a = torch.randn(8, 8)
    with autocast_for(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
    with autocast_for(torch.device("cpu"), "bf16-mixed"):
        assert (a @ a).dtype == torch.bfloat16


def _fp16_run(start: int, hook=None):
    torch.manual_seed(0)
    model = build_lm(arch_from_preset("pythia-micro", 256), 32, seed=1)
    opt = make_optimizer(model, 1e-3, (0.9, 0.95), 0.0)
    batches = {s: [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(s))] for s in range(3)}
    log = []
    train_lm(
        model,
        opt,
        start_step=start,
        end_step=3,
        lr_at=lambda s: 1e-3,
        batches_at=lambda s: batches[s],
        settings=TrainSettings(),
        stage="t",
        precision="fp16-mixed",
        log=log.append,
        loss_hook=hook,
    )
    return model, log


def test_fp16_overflow_drops_the_step_and_training_goes_on():
    """A loss scaled past fp32's range overflows every gradient although the loss is finite: that step's update
    is dropped (not a non-finite failure) and the next steps are those of a run that never took it. Not bit for
    bit: this run continues at half the loss scale, so gradients in fp16's subnormal range round differently —
    a few 1e-9 on weights of 0.07, against 1e-3 for one AdamW step (lr 1e-3), hence atol 1e-7."""
    inflate = lambda step, loss: loss * 1e35 if step == 0 else loss  # noqa: E731  ×65536 scale → inf grads
    model, log = _fp16_run(0, inflate)
    assert log[0] == {"step": 1, "fp16_overflow": 1, "lr": 1e-3}
    assert [m["step"] for m in log[1:]] == [2, 3] and all("loss" in m for m in log[1:])
    reference, _ = _fp16_run(1)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_fp16_loss_scale_is_the_callers_and_survives_a_checkpoint(tmp_path):
    """The loop updates the caller's GradScaler in place (an overflow halves its scale), so the stage can save its
    state with the checkpoint and a resumed run continues at the calibrated scale instead of re-learning it."""
    from bliss_ray.train.checkpoint import read_state, save_train_state
    from bliss_ray.train.precision import grad_scaler

    torch.manual_seed(0)
    model = build_lm(arch_from_preset("pythia-micro", 256), 32, seed=1)
    opt = make_optimizer(model, 1e-3, (0.9, 0.95), 0.0)
    scaler = grad_scaler("fp16-mixed", "cpu")
    start_scale = scaler.get_scale()
    inflate = lambda step, loss: loss * 1e35 if step == 0 else loss  # noqa: E731  one overflowing step
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    train_lm(
        model,
        opt,
        start_step=0,
        end_step=3,
        lr_at=lambda s: 1e-3,
        batches_at=lambda s: [batches[s]],
        settings=TrainSettings(),
        stage="t",
        precision="fp16-mixed",
        loss_hook=inflate,
        grad_scaler=scaler,
    )
    assert scaler.get_scale() == start_scale / 2  # the overflow lowered the caller's scale
    save_train_state(tmp_path, model, opt, 3, grad_scaler=scaler.state_dict())
    resumed = grad_scaler("fp16-mixed", "cpu")
    resumed.load_state_dict(read_state(tmp_path)["grad_scaler"])  # weights_only: plain values
    assert resumed.get_scale() == start_scale / 2
