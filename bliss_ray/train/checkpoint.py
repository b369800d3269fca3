"""Full training-state checkpoints as plain directories (what a Ray ``Checkpoint`` wraps).

Layout of a checkpoint directory:

    model/             save_pretrained directory (safetensors + config [+ tokenizer])
    train_state.pt     optimizer state, step, skipped steps, RNG state — tensors and plain Python only
    extra/             optional sub-directories (e.g. the decay branch model, a score model)
    metrics.jsonl      the metrics history so far (rank 0's)

Everything is loaded with ``weights_only=True`` or safetensors: checkpoints from elsewhere are never unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bliss_ray.models.lm import load_lm, save_lm, unwrap

STATE_FILE = "train_state.pt"


class NonFiniteCheckpointError(RuntimeError):
    """Refusing to write a checkpoint whose weights are not all finite."""


def assert_finite(module: torch.nn.Module, what: str) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteCheckpointError(f"{what}: parameter '{name}' is not finite; no checkpoint written")


def save_train_state(
    path: str | Path, model, optimizer, step: int, *, tokenizer=None, metrics: list[dict] | None = None, **extra
) -> Path:
    """Write a full checkpoint of (model, optimizer, step, RNG) to ``path``; ``extra`` holds plain values."""
    path = Path(path)
    module = unwrap(model)
    assert_finite(module, f"checkpoint at step {step}")
    save_lm(module, path / "model", tokenizer)
    state = {"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state(), **extra}
    torch.save(state, path / STATE_FILE)
    if metrics is not None:
        write_metrics(path / "metrics.jsonl", metrics)
    return path


def load_train_state(path: str | Path, optimizer=None) -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint written by ``save_train_state``: the model, and the state dict (optimizer loaded in place)."""
    path = Path(path)
    model = load_lm(path / "model")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return model, state


def read_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def write_metrics(path: str | Path, metrics: list[dict]) -> None:
    lines = [
        json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()})
        for m in metrics
    ]
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))


def read_metrics(path: str | Path) -> list[dict]:
    """A ``metrics.jsonl`` (a local path or a store URI) as one dict per line; [] when it does not exist."""
    from bliss_ray import storage

    blob = storage.read_bytes(path)
    return [] if blob is None else [json.loads(line) for line in blob.splitlines() if line.strip()]
