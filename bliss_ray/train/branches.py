"""Mid-round evaluation branches (``pretrain.eval_branches``): leave the stable run for a decay branch, then
return to it bit for bit, so that a run with branches trains exactly the stable trajectory of a run without.

    with stable_state_kept(model, optimizer):
        train_lm(model, optimizer, ...)  # the decay branch
        save_lm(model, "branches/20")
    # model, optimizer and RNG are back where the stable run left them
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _host_copy(obj):
    """A copy of a (nested) state dict with every tensor copied to host memory: the device keeps no second copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


@contextmanager
def stable_state_kept(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Inside the block the model and optimizer may train on; on leaving it normally, the weights, the optimizer
    state and the CPU/CUDA RNG states are what they were on entering, bit for bit. The copy lives in host memory
    (weights and AdamW moments: 12 B/param). The weights are restored in place, so the parameters stay the same
    tensors that DDP's buckets and the optimizer's param groups point at. An exception leaves the state as the
    block left it: the stage fails anyway."""
    weights, optim = _host_copy(model.state_dict()), _host_copy(optimizer.state_dict())
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    model.load_state_dict(weights)
    optimizer.load_state_dict(optim)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
