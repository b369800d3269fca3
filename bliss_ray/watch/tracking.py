"""Experiment tracking: TensorBoard event files for every Train stage and every round, written by the driver.

The driver receives each Train stage's per-step records live from rank 0 (``bliss_ray.watch.progress``) and
writes them here, so the event files land in the run directory whichever node rank 0 ran on:

    <run>/tb/<variant>/<stage key>/   per step: loss, lr, grad norm, tokens/s, FLOP/s, memory (warm-up,
        pretraining with its decay branch as ``decay/…``); upper/lower loss, KL, weight entropy, norms (bilevel)
    <run>/tb/<variant>/rounds/        per round: selection domain shares (``selection/share/<domain>``, step =
        round); per evaluated checkpoint (step = target steps): ``eval/<task>``, ``eval/reference_loss`` (on the
        held-out part of the reference set), ``eval/paper_average``

``tensorboard --logdir runs/<experiment>/tb`` shows the whole experiment. ``<variant>`` (``Run.variant``: label or
method, and the identity of its evaluation) keeps apart the variants that share a run root (a method comparison).
A stage whose workers restart replays steps from its last checkpoint: the writer is reopened with ``purge_step``
so the replayed steps replace the dead attempt's (tensorboardX's own mechanism), and likewise when a rerun of the
pipeline resumes a stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bliss_ray import storage
from bliss_ray.pipeline import flat_settings

# record fields that are bookkeeping, not metrics
_NOT_SCALARS = {"step", "done_steps", "total_steps", "time", "round", "worker_start_time"}


def stage_params(d: Path) -> dict[str, str]:
    """The settings a stage's ``config.json`` records, as an MLflow/W&B run's parameters: dotted key → text."""
    config = d / "config.json"
    settings = json.loads(config.read_text()).get("settings", {}) if config.exists() else {}
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in flat_settings(settings).items()}


def _scalars(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _NOT_SCALARS and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardTracker:
    """Per-stage ``SummaryWriter``s under ``<run_root>/tb`` (tensorboardX: no TensorFlow, no tensorboard needed)."""

    def __init__(self, run_root: Path, variant: str = ""):
        self.root = Path(run_root) / "tb" / variant  # variants sharing a run root never write into each other's files
        self.writers: dict[str, object] = {}
        self.last_step: dict[str, int] = {}
        self.opened = 0

    def _writer(self, name: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        if name in self.writers and purge_step is not None:
            self.writers.pop(name).close()
        if name not in self.writers:
            self.opened += 1  # a suffix: two writers opened in the same second must not share a file name
            self.writers[name] = SummaryWriter(
                str(self.root / name), purge_step=purge_step, flush_secs=10, filename_suffix=f".{self.opened:04d}"
            )
        return self.writers[name]

    def steps(self, key: str, kind: str, records: list[dict]) -> None:
        for rec in records:
            step = int(rec["step"])
            first = key not in self.last_step
            restarted = not first and step <= self.last_step[key]
            writer = self._writer(key, purge_step=step if first or restarted else None)
            for name, value in _scalars(rec).items():
                writer.add_scalar(phase_prefix(rec) + name, value, step)
            self.last_step[key] = step

    def stage_start(self, key: str, kind: str, d: Path) -> None:
        pass  # a stage's writer opens with its first record (its step decides purge_step)

    def stage_end(self, key: str, kind: str, round_index: int | None, outputs: dict, d: str | Path) -> None:
        self.steps(key, kind, unseen_steps(d, self.last_step.get(key)))
        if key in self.writers:
            self.writers.pop(key).close()
            self.last_step.pop(key, None)
        summary = round_summary(kind, round_index, outputs, d)
        if summary:
            writer = self._writer("rounds")
            for name, value, step in summary:
                writer.add_scalar(name, value, step)
            writer.flush()

    def stage_failed(self, key: str) -> None:
        if key in self.writers:
            self.writers.pop(key).close()  # a rerun reopens it with purge_step at its first record
            self.last_step.pop(key, None)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def phase_prefix(record: dict) -> str:
    """Tag prefix of a record's phase: the decay branch at a round's end (``decay/``) and the mid-round
    evaluation branches (``branch/``) are apart from the stable run they share steps with."""
    phase = str(record.get("phase", ""))
    return "decay/" if phase == "decay" else "branch/" if phase.startswith("branch") else ""


def unseen_steps(d: str | Path, last_step: int | None) -> list[dict]:
    """The records of a finished Train stage's ``metrics.jsonl`` (``d``: its location, local or in the store)
    after ``last_step``: what the live channel did not deliver (a board busy on a loaded machine, a driver that
    restarted mid-stage) still reaches the trackers."""
    data = storage.read_bytes(storage.join(d, "metrics.jsonl"))
    if data is None:
        return []
    records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return [r for r in records if "step" in r and (last_step is None or int(r["step"]) > last_step)]


def round_summary(kind: str, round_index: int | None, outputs: dict, d: str | Path) -> list[tuple[str, float, int]]:
    """(tag, value, round) of a finished stage (``d``: its location): selection domain shares, evaluation results
    per checkpoint."""
    out = []
    manifest = storage.read_json(storage.join(d, "manifest.json")) if kind == "select" else None
    if round_index is not None and manifest is not None:
        for domain, share in (manifest.get("domain_share") or {}).items():
            out.append((f"selection/share/{domain}", float(share["selected"]), round_index))
    elif kind == "evaluate":
        for c in outputs.get("checkpoints", []):
            values = {name: c.get(name) for name in ("reference_loss", "paper_average")}
            values |= {task: v.get("value") for task, v in (c.get("tasks") or {}).items()}
            # by target steps: a round has several evaluated checkpoints (its mid-round branches and its end)
            out += [(f"eval/{name}", float(v), int(c["steps"])) for name, v in values.items() if v is not None]
    return out
