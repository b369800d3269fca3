"""Training checkpoints as plain directories (what a Ray ``Checkpoint`` wraps): what an LM training stage saves,
and how it resumes, for plain runs (one process, DDP) and sharded ones (FSDP).

Layout of a checkpoint directory:

    model/             save_pretrained directory (safetensors + config + tokenizer): plain runs, and every stage's end
    dcp/               every rank's shards of weights and AdamW state (``train.fsdp``): mid-run, sharded runs only
    train_state.pt     AdamW state (where it is not in dcp/), the next step, RNG, the run's ``RunRecord`` and fp16's
                       loss scale — tensors and plain Python only
    metrics.jsonl      rank 0's per-step records so far
    branches/<step>/   the mid-round decay branches finished so far (``pretrain.eval_branches``)
    decay/             the stage's end only: the decayed model that evaluation reads

Everything is loaded with ``weights_only=True`` or safetensors: checkpoints from elsewhere are never unpickled.

    ckpt = LMCheckpoint(model, optimizer, tokenizer, sharded=False, rank=0)
    ckpt.save(d, RunRecord(step=10))                                   # mid-run
    model, state, record = LMCheckpoint.open(d, resumed=True, build=...)   # the next attempt
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bliss_ray import storage
from bliss_ray.models.lm import load_lm, save_lm, unwrap
from bliss_ray.train import fsdp
from bliss_ray.train.loop import assert_finite

STATE_FILE = "train_state.pt"


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


def load_train_state(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """A checkpoint written by ``save_train_state``: the model, and the state dict (optimizer state included)."""
    return load_lm(Path(path) / "model"), read_state(path)


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
    blob = storage.read_bytes(path)
    return [] if blob is None else [json.loads(line) for line in blob.splitlines() if line.strip()]


@dataclass
class RunRecord:
    """What a checkpoint records of its run besides weights and optimizer state."""

    step: int  # the next (global) step to train
    phase: str = "stable"  # "stable", "branch@<step>" (a mid-round branch), "decay", "done"
    skipped: int = 0  # non-finite steps skipped so far
    # each attempt that resumes appends the step it restarts from: the record that a restarted worker group
    # continued from its checkpoint instead of starting over (tests, post-mortems)
    resumed_from: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # rank 0's per-step records

    def state(self) -> dict:
        return {"skipped": self.skipped, "phase": self.phase, "resumed_from": self.resumed_from}

    def last(self) -> dict:
        """The newest per-step record of the current phase (a mid-round branch may have logged after it)."""
        return next((m for m in reversed(self.metrics) if m["phase"] == self.phase), {})


class LMCheckpoint:
    """How one LM training stage saves on this rank: ``model`` is the module itself (never its compiled wrapper),
    ``sharded`` an FSDP2 model (every rank takes part in its saves), ``scaler`` fp16's loss scale (or None).
    ``save``/``save_final`` return whether this rank reports the directory to Ray Train."""

    def __init__(self, model, optimizer, tokenizer, *, sharded: bool, rank: int, scaler=None):
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer
        self.sharded, self.rank, self.scaler = sharded, rank, scaler

    def _extra_state(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    @staticmethod
    def open(source: Path | None, resumed: bool, build: Callable[[], torch.nn.Module]):
        """(model, state, record) a stage starts from: a checkpoint of an earlier attempt (``resumed``; a sharded
        one's weights are loaded by ``load_optimizer`` into the sharded model), the previous round's end
        (``state/``: weights and AdamW state, a fresh record), or a fresh ``build()`` with no state."""
        sharded = source is not None and (source / "dcp").is_dir()
        if source is None:
            return build(), {}, None
        model, state = (build(), read_state(source)) if sharded else load_train_state(source)
        if not resumed:
            return model, state, None
        step = int(state["step"])
        record = RunRecord(step, state.get("phase", "stable"), int(state.get("skipped", 0)))
        record.resumed_from = [*state.get("resumed_from", []), step]
        record.metrics = read_metrics(source / "metrics.jsonl")
        return model, state, record

    def load_optimizer(self, source: Path | None, state: dict, shards=None) -> None:
        """The AdamW state (and fp16's loss scale) the stage continues from, into this rank's optimizer. A sharded
        ``source`` holds its DCP ``.metadata``; its data files are read through ``shards`` (a
        ``dcp_store.StoreReader`` of them where they lie) when given, else from ``source``."""
        if source is not None and (source / "dcp").is_dir():
            fsdp.load(self.model, self.optimizer, shards or source / "dcp")
        elif "optimizer" in state and self.sharded:
            fsdp.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        elif "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def save(self, d: Path, record: RunRecord, final: bool, extra_dirs: dict[str, Path] | None = None) -> bool:
        """A checkpoint of the stable run at ``record.step`` into ``d``; ``final``: the stage's last (a sharded run
        then writes HF weights and the gathered AdamW state, as a plain run does)."""
        if self.sharded:
            return self._save_sharded(d, record, final)
        if self.rank == 0:
            save_train_state(
                d,
                self.model,
                self.optimizer,
                record.step,
                tokenizer=self.tokenizer,
                metrics=record.metrics,
                **record.state(),
                **self._extra_state(),
            )
            for name, src in (extra_dirs or {}).items():
                shutil.copytree(src, d / name)
        return self.rank == 0

    def _save_sharded(self, d: Path, record: RunRecord, final: bool) -> bool:
        """Mid-run: every rank writes its DCP shards and reports its directory (Ray merges them into one
        checkpoint). At the stage's end: HF weights and the gathered AdamW state."""
        fsdp.assert_finite_shards(self.model, f"checkpoint at step {record.step}")
        if final:
            optim = fsdp.gather_optimizer_state(self.model, self.optimizer)
            fsdp.export_hf(self.model, d / "model", self.tokenizer)
        else:
            fsdp.save(self.model, self.optimizer, d / "dcp")
        if self.rank == 0:
            state = {"step": record.step, "rng": torch.get_rng_state(), **record.state()}
            torch.save(state | ({"optimizer": optim} if final else {}), d / STATE_FILE)
            write_metrics(d / "metrics.jsonl", record.metrics)
        return self.rank == 0 or not final

    def keep_stable(self, keep: Path) -> None:
        """Before the final decay branch: the stable weights and AdamW state, on local disk (the next round
        continues from them; a paper-size target then needs no 12 B/param host copy)."""
        if self.sharded:  # collectives: every rank takes part, rank 0 writes
            optimizer = fsdp.gather_optimizer_state(self.model, self.optimizer)
            fsdp.export_hf(self.model, keep / "stable_model", self.tokenizer)
        elif self.rank == 0:
            save_lm(self.model, keep / "stable_model", self.tokenizer)
            optimizer = self.optimizer.state_dict()
        if self.rank == 0:
            torch.save(optimizer, keep / "stable_optimizer.pt")

    def save_final(self, d: Path, keep: Path, record: RunRecord, branches: Path | None) -> bool:
        """The stage's end after its decay branch: the decayed model as ``decay/``, the stable one kept by
        ``keep_stable`` as ``model/`` with its AdamW state, and the mid-round branches."""
        if self.sharded:
            fsdp.export_hf(self.model, d / "decay", self.tokenizer)
        elif self.rank == 0:
            save_lm(self.model, d / "decay", self.tokenizer)
        if self.rank != 0:
            return False
        stable = torch.load(keep / "stable_optimizer.pt", weights_only=True)
        shutil.copytree(keep / "stable_model", d / "model")
        if branches is not None:
            shutil.copytree(branches, d / "branches")
        state = {"optimizer": stable, "step": record.step, "rng": torch.get_rng_state(), **record.state()}
        torch.save(state | self._extra_state(), d / STATE_FILE)
        write_metrics(d / "metrics.jsonl", record.metrics)
        return True
