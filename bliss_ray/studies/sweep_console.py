"""What a person sees while a sweep runs: a start and an end line per trial with its headline, and every
``interval_s`` seconds a line of what is running (each running trial's stage, as its runner posts it on the
progress board, with the step of its last report when that stage reports to Tune), and a line for each node lost
(Tune and Train rerun what ran on it). Tune's own table and every Ray process's output go to the sweep's log file
(``watch.console.route_logs``); the trials' stage lines too, since each trial runs its pipeline in a Ray process of
its own.

A Tune callback, kept with the sweep's state (it holds settings, and what it last read, never a live handle), so a
sweep resumed by a new driver prints the same lines on that driver's console (``watch.console.console_line``).
"""

from __future__ import annotations

import time

from ray import tune

from bliss_ray.stages._ray import LostNodes
from bliss_ray.studies.sweep_spec import SweepSpec, variant_label
from bliss_ray.watch.console import clock, console_line
from bliss_ray.watch.progress import BoardReader, board


def post_stage(trial_id: str, stage: str) -> None:
    """A trial's runner, at each stage start: the sweep's console shows the stage (fire-and-forget)."""
    board().put.remote(_board_key(trial_id), [{"stage": stage}])


def _board_key(trial_id: str) -> str:
    return f"sweep-trial-{trial_id}"


class SweepConsole(tune.Callback):
    """The console lines of the sweep ``spec``: each trial named by its variant, its end by the sweep's metric."""

    def __init__(self, spec: SweepSpec, interval_s: float = 30.0):
        self.spec, self.metric, self.interval_s = spec, spec.metric, interval_s
        self.last_line = self.last_nodes = 0.0
        self.lost_nodes = LostNodes()
        self.stages: dict[str, str] = {}  # trial id → the stage its runner last posted
        self._reader = None

    def __getstate__(self):  # kept with the sweep's state: the reader holds object refs of this driver's session
        return {k: v for k, v in self.__dict__.items() if k != "_reader"} | {"_reader": None}

    def _posted_stage(self, trial_id: str) -> str | None:
        self._reader = self._reader or BoardReader(timeout_s=0.2)
        for record in self._reader(_board_key(trial_id)):
            self.stages[trial_id] = record["stage"]
        return self.stages.get(trial_id)

    def _name(self, trial) -> str:
        config = trial.config or {}
        seed = f", seed {config['seed']}" if "seed" in config else ""
        return f"trial {trial.trial_id} ({variant_label(self.spec, config)}{seed})"

    def on_trial_start(self, iteration, trials, trial, **info):
        console_line(f"start {self._name(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4g}" if isinstance(value, int | float) else f"no {self.metric}"
        console_line(f"done  {self._name(trial)} {clock(result.get('time_total_s', 0.0))}  {shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        console_line(f"FAILED {self._name(trial)}; details: {trial.local_path or trial.path}")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_nodes >= 2.0:  # Tune's loop steps far more often than nodes are lost
            self.last_nodes = time.monotonic()
            for text in self.lost_nodes():
                console_line(f"      {text}")
        if time.monotonic() - self.last_line < self.interval_s:
            return
        self.last_line = time.monotonic()
        states = [t.status for t in trials]
        running = [t for t in trials if t.status == "RUNNING"]
        where = "; ".join(
            f"{t.trial_id}: {where_trial(t.last_result or {}, self._posted_stage(t.trial_id))}" for t in running
        )
        counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("RUNNING", "TERMINATED", "PENDING", "ERROR"))
        console_line(f"      {counts}" + (f"  ({where})" if where else ""))


def where_trial(result: dict, posted: str | None) -> str:
    """A running trial's stage (``posted`` by its runner): with the step of its last report to Tune when that report
    came from the same stage; the report's stage and step when nothing was posted."""
    reported = result.get("stage") if "step" in result else None
    if posted is not None and posted != reported:
        return posted
    return f"{reported} step {result['step']}" if reported else "starting"
