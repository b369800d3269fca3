"""A sweep trial's objective, read from its finished run directory: the proxy's upper/lower loss over the objective
bilevel stage's last steps, the target's final evaluation, and for ``steps_to_baseline`` sweeps the target steps
needed to reach the baseline's final held-out loss. No Ray; ``bliss_ray.studies.sweep`` reports these to Tune.

    from bliss_ray.studies.sweep_objective import steps_to_baseline
    steps_to_baseline(checkpoints, {"steps": 180, "reference_loss": 5.69})   # → (133.0, True)
"""

from __future__ import annotations

import math

from bliss_ray.pipeline import Run
from bliss_ray.report.collect import reach_step
from bliss_ray.studies.sweep_metrics import paper_chance, target_tokens
from bliss_ray.studies.sweep_spec import SweepSpec
from bliss_ray.train.checkpoint import read_metrics


def _nan(value):
    return math.nan if value is None else value  # Tune and Optuna reject results that lack the sweep metric


def baseline_final(evaluate: dict) -> dict:
    """What a ``steps_to_baseline`` trial must reach: the baseline's final checkpoint's steps and held-out loss."""
    last = max(evaluate["checkpoints"], key=lambda c: c["steps"])
    return {"steps": last["steps"], "reference_loss": last["reference_loss"]}


def steps_to_baseline(checkpoints: list[dict], baseline: dict) -> tuple[float, bool]:
    """Target steps at which a trial's held-out reference loss first reaches the baseline's final loss (linear
    interpolation between evaluated checkpoints), and whether it does. A trial that never reaches it still gets a
    number, because Optuna learns nothing from a missing value: its final steps × (1 + relative loss gap), larger
    than any reaching trial's and growing with how far it ends from the goal."""
    cks = sorted(checkpoints, key=lambda c: c["steps"])
    goal = baseline["reference_loss"]
    at = reach_step([c["steps"] for c in cks], [c["reference_loss"] for c in cks], goal, higher_is_better=False)
    if at is not None:
        return float(at), True
    last = cks[-1]
    return float(last["steps"] * (1 + (last["reference_loss"] - goal) / goal)), False


def objective(spec: SweepSpec, run: Run, results: dict, baseline: dict | None = None) -> dict:
    """The trial's final metrics: upper/lower loss averaged over the objective bilevel stage's last steps, and for
    full trials the final checkpoint's evaluation (reference loss, paper average with its stderr and chance level)
    and the tokens the target trained on; with ``baseline`` (``baseline_final`` of this seed's baseline run), the
    steps to reach its final loss and the speed-up (baseline's steps ÷ those)."""
    rounds = run.exp.schedule.rounds if spec.stage == "full" else spec.round
    out: dict = {"final": 1}
    key = f"r{rounds}.bilevel"
    if key in run.by_key:
        m = read_metrics(run.uri(key, "metrics.jsonl"))
        tail = m[-spec.last_steps :]
        out |= {
            "objective_stage": key,
            "bilevel_steps": len(m),
            "upper_loss": sum(x["upper_loss"] for x in tail) / len(tail),
            "lower_loss": sum(x["lower_loss"] for x in tail) / len(tail),
            "upper_loss_first": m[0]["upper_loss"],
            "upper_loss_last": m[-1]["upper_loss"],
        }
    if spec.stage == "full":  # the target after selection, at the tokens load_sweep made equal for every trial
        last = max(results["evaluate"]["checkpoints"], key=lambda c: c["steps"])
        chance = paper_chance(last.get("tasks", {}))
        out |= {"paper_average": _nan(last.get("paper_average")), "reference_loss": last["reference_loss"]}
        out |= {"paper_average_stderr": _nan(last.get("paper_average_stderr")), "paper_average_chance": _nan(chance)}
        out |= {"target_steps": last["steps"], "target_tokens": target_tokens(run.exp)}
    if baseline is not None:
        steps, reached = steps_to_baseline(results["evaluate"]["checkpoints"], baseline)
        out |= {"steps_to_baseline": steps, "reached_baseline": reached}
        out |= {"speedup": baseline["steps"] / steps if reached else math.nan}
        out |= {"baseline_steps": baseline["steps"], "baseline_reference_loss": baseline["reference_loss"]}
    return out
