"""The bilevel stage's checkpoints: everything an interrupted stage needs to resume at the exact outer step.

Layout: ``proxy/`` (HF weights), ``score_model/`` (safetensors + trunk config), ``bilevel_state.pt`` (the outer
step, both AdamW states, both LR schedulers, the stale softmax normaliser, the steps earlier attempts resumed from)
and ``metrics.jsonl``. Loaded with ``weights_only=True`` and safetensors only.

    save_bilevel(state, d, resumed_from=[])
    state, resumed_from = load_bilevel(d, settings, target, device)
"""

from __future__ import annotations

from pathlib import Path

import torch

from bliss_ray.bilevel.loop import BilevelState
from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.bilevel.weights import Normaliser
from bliss_ray.models.lm import load_lm, save_lm
from bliss_ray.models.score import ScoreModel
from bliss_ray.train.checkpoint import assert_finite, read_metrics, write_metrics

STATE = "bilevel_state.pt"


def save_bilevel(state: BilevelState, d: Path, resumed_from: list[int]) -> None:
    """Write a resumable checkpoint of ``state`` into ``d``; refuses non-finite weights."""
    assert_finite(state.proxy, f"bilevel checkpoint at step {state.step}")
    assert_finite(state.score_model, f"bilevel checkpoint at step {state.step}")
    save_lm(state.proxy, d / "proxy")
    state.score_model.save(d / "score_model")
    norm = state.normaliser
    torch.save(
        {
            "step": state.step,
            "proxy_opt": state.proxy_opt.state_dict(),
            "score_opt": state.score_opt.state_dict(),
            "proxy_sched": state.proxy_sched.state_dict(),
            "score_sched": state.score_sched.state_dict(),
            "normaliser": None if norm is None else [norm.max, norm.denom],
            "resumed_from": resumed_from,
        },
        d / STATE,
    )
    write_metrics(d / "metrics.jsonl", state.metrics)


def load_bilevel(
    d: Path, s: BilevelSettings, target: torch.nn.Module | None, device: torch.device
) -> tuple[BilevelState, list[int]]:
    """The state a ``save_bilevel`` directory holds, on ``device``, and the resume record with this attempt's
    restart step appended."""
    proxy = load_lm(d / "proxy").to(device).train()
    score = ScoreModel.load(d / "score_model").to(device).train()
    state = BilevelState.create(proxy, score, target, s)
    saved = torch.load(d / STATE, map_location="cpu", weights_only=True)
    state.step = int(saved["step"])
    state.proxy_opt.load_state_dict(saved["proxy_opt"])
    state.score_opt.load_state_dict(saved["score_opt"])
    state.proxy_sched.load_state_dict(saved["proxy_sched"])
    state.score_sched.load_state_dict(saved["score_sched"])
    state.normaliser = Normaliser(*saved["normaliser"]) if saved["normaliser"] else None
    state.metrics = read_metrics(d / "metrics.jsonl")
    return state, [*saved.get("resumed_from", []), state.step]
