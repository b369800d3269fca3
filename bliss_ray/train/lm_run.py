"""One LM training stage on one rank, pure PyTorch: the stable run to the stage's end step, the mid-round decay
branches on the way (``pretrain.eval_branches``), then the decay branch that evaluation reads.

The stage's Ray worker (``stages/train_lm.py``) builds the model, optimizer and ``LMCheckpoint``, resumes them,
and hands over what only it knows: ``batches_at(step)`` (this rank's micro-batches), ``report(metrics, dir)`` (a
checkpoint directory to Ray Train, or None on ranks that report none) and ``progress`` (rank 0's live records).

Every checkpoint of the stable run carries the branch models finished so far (``branches/``): a resumed run
restores them and computes only the missing ones. A branch starts from the stable state at its step and leaves
it bit for bit (``train.branches.stable_state_kept``), so a run with branches trains exactly the stable
trajectory of a run without.

    LMRun(ckpt, model, settings, stage="r0.pretrain", start_step=0, ...).train()
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bliss_ray.models.lm import save_lm
from bliss_ray.train.branches import stable_state_kept
from bliss_ray.train.checkpoint import LMCheckpoint, RunRecord
from bliss_ray.train.loop import train_lm
from bliss_ray.train.precision import grad_scaler, resolve_precision
from bliss_ray.train.schedule import branch_steps, decay_lr, wsd_lr
from bliss_ray.train.settings import TrainSettings


class Branches:
    """The mid-round branch models finished so far, in a local directory of rank 0's own: those a resumed
    checkpoint carries, then each new one. (A resumed run starts after every branch its checkpoint carries.)"""

    def __init__(self, rank: int, carried: Path | None = None):
        self.rank, self.root = rank, Path(tempfile.mkdtemp(prefix="branches_"))
        if rank == 0 and carried is not None and carried.is_dir():
            shutil.copytree(carried, self.root, dirs_exist_ok=True)

    def save(self, model: torch.nn.Module, step: int, tokenizer) -> None:
        if self.rank == 0:
            save_lm(model, self.root / str(step), tokenizer)

    def close(self) -> None:
        shutil.rmtree(self.root)


@dataclass
class LMRun:
    """``model`` is what trains (``ckpt.model`` or its ``torch.compile`` wrapper); ``record`` the run so far."""

    ckpt: LMCheckpoint
    model: torch.nn.Module
    settings: TrainSettings
    stage: str
    start_step: int
    peak_lr: float
    precision: str  # resources.precision as configured ("auto" resolves per device)
    record: RunRecord
    branches: Branches
    batches_at: Callable[[int], list[torch.Tensor]]
    report: Callable[[dict, Path | None], None]
    progress: Callable[[dict], None] = lambda m: None
    loss_hook: Callable | None = None
    grad_sync: str = "every_micro_batch"  # resources.grad_sync (FSDP2 models)

    @property
    def end_step(self) -> int:
        return self.start_step + self.settings.steps

    def train(self) -> None:
        """The stable run from ``record.step``, then the final decay branch, each checkpointed."""
        t = self.settings
        pending = branch_steps(self.start_step, t.steps, t.eval_branches)
        if self.record.phase == "stable" and self.record.step < self.end_step:
            self.record.skipped = train_lm(
                self.model,
                self.ckpt.optimizer,
                start_step=self.record.step,
                end_step=self.end_step,
                lr_at=lambda s: wsd_lr(s, self.peak_lr, t.warmup_steps),
                batches_at=self.batches_at,
                settings=t,
                stage=self.stage,
                precision=self._precision,
                log=lambda m: self._log_stable(m, pending),
                save=self._save_stable,
                skipped=self.record.skipped,
                loss_hook=self.loss_hook,
                grad_scaler=self.ckpt.scaler,
                grad_sync=self.grad_sync,
            )
        if t.decay_steps > 0:
            self._final_decay()
        self.branches.close()

    @property
    def _precision(self) -> str:
        return "fp32" if self.ckpt.sharded else self.precision  # FSDP's policy casts: no autocast in the loop

    def _log(self, m: dict) -> None:
        if self.ckpt.rank != 0:
            return
        self.record.metrics.append({"phase": self.record.phase, **m})
        # live, to the console and trackers; not a mid-round branch's steps: they take a stage's steps as one
        # series that only grows (a step going back reads as a restart)
        if not self.record.phase.startswith("branch@"):
            self.progress({"phase": self.record.phase, **m})

    def _log_stable(self, m: dict, pending: list[int]) -> None:
        self._log(m)
        if m["step"] not in pending:
            return
        # train_lm logs a step after its update and before checkpointing it, so the checkpoint of a branch's step
        # carries that branch; and the stable run stays one train_lm call (fp16's loss scale carries on)
        with stable_state_kept(self.ckpt.model, self.ckpt.optimizer):
            self.record.phase = f"branch@{m['step']}"
            self._decay(m["step"])
            self.branches.save(self.model, m["step"], self.ckpt.tokenizer)
        self.record.phase = "stable"

    def _save_stable(self, next_step: int, skipped: int) -> None:
        self.record.step, self.record.skipped = next_step, skipped
        extra = {"branches": self.branches.root} if self.settings.eval_branches else None
        with tempfile.TemporaryDirectory() as d:
            mine = self.ckpt.save(Path(d), self.record, final=next_step == self.end_step, extra_dirs=extra)
            last = self.record.last() if not self.ckpt.sharded else (self.record.metrics or [{}])[-1]
            self.report({"step": next_step, "phase": self.record.phase, **last}, Path(d) if mine else None)

    def _decay(self, at: int) -> None:
        """``decay_steps`` steps of a decay branch from the stable state at global step ``at``, on the batches the
        stable run sees from ``at`` on; it starts at the stable run's loss scale and leaves it untouched."""
        t = self.settings
        branch_lr = wsd_lr(at - 1, self.peak_lr, t.warmup_steps)
        scaler = None
        if self.ckpt.scaler is not None:
            scaler = grad_scaler(resolve_precision(self.precision, self._device.type), self._device)
            scaler.load_state_dict(self.ckpt.scaler.state_dict())
        train_lm(
            self.model,
            self.ckpt.optimizer,
            start_step=at,
            end_step=at + t.decay_steps,
            lr_at=lambda s: decay_lr(s - at, branch_lr, t.decay_steps),
            batches_at=self.batches_at,
            settings=dataclasses.replace(t, ckpt_every_steps=1 << 30),
            stage=self.stage,
            precision=self._precision,
            log=self._log,
            save=lambda *a: None,
            loss_hook=self.loss_hook,
            grad_scaler=scaler,
            grad_sync=self.grad_sync,
        )

    @property
    def _device(self) -> torch.device:
        return next(self.ckpt.model.parameters()).device

    def _final_decay(self) -> None:
        """The decay branch kept for evaluation: the stable state stays the checkpoint's ``model/`` (the next round
        continues from it), the decayed weights go to ``decay/``. A failure here replays the branch from the
        stable end. The stable state waits on local disk, not in host memory as a mid-round branch's does."""
        with tempfile.TemporaryDirectory() as keep:
            self.ckpt.keep_stable(Path(keep))
            self.record.phase = "decay"
            self._decay(self.end_step)
            self.record.step, self.record.phase = self.end_step, "done"
            with tempfile.TemporaryDirectory() as d:
                branches = self.branches.root if self.settings.eval_branches else None
                mine = self.ckpt.save_final(Path(d), Path(keep), self.record, branches)
                self.report({"step": self.end_step, "phase": "done"}, Path(d) if mine else None)
