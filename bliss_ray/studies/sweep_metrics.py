"""What a sweep can optimise: its final metrics and the direction each improves in, which swept keys change the
proxy itself, the target tokens a trial's evaluated checkpoint trained on, and the chance level of the paper's
tasks. Pure; ``sweep_spec`` checks objectives with it, ``sweep_objective`` and ``sweep_report`` read results.
"""

from __future__ import annotations

from bliss_ray.config import Experiment
from bliss_ray.evaluation.harness import LOCAL_PAPER_TASKS, PAPER_GROUP

# The final metrics each objective reports, and the direction in which they improve. Proxy-level metrics are
# measured on the proxy during the bilevel stage; target-level ones on the target after selection (evaluate).
PROXY_METRICS = {"upper_loss": "min", "lower_loss": "min"}
TARGET_METRICS = {"reference_loss": "min", "paper_average": "max", "steps_to_baseline": "min"}
FINAL_METRICS = {"bilevel": PROXY_METRICS, "full": PROXY_METRICS | TARGET_METRICS}
# Keys that change the proxy itself (its size, or its training before the bilevel stage): a proxy-level metric
# compared across them measures the proxy, not the data it selects.
PROXY_KEYS = ("models.proxy.", "warmup.")
# Zero-shot chance accuracy (1 / answer choices) of the paper's tasks; ARC has a few 3- and 5-choice items.
PAPER_TASK_CHANCE = {"sciq": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "logiqa": 0.25, "openbookqa": 0.25}
PAPER_TASK_CHANCE |= {"boolq": 0.5, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5}


def proxy_keys(keys) -> list[str]:
    """The swept keys that change the proxy itself (see ``PROXY_KEYS``)."""
    return [k for k in keys if k.startswith(PROXY_KEYS)]


def target_tokens(exp: Experiment) -> int:
    """Tokens the evaluated target checkpoint trained on: every round's pretraining, then the decay branch."""
    p = exp.pretrain
    steps = (exp.schedule.rounds + 1) * p.steps + exp.schedule.final_extra_steps + p.decay_steps
    return steps * p.global_batch_seqs * exp.data.seq_len


def paper_tasks(tasks) -> list[str]:
    """Hub names of the paper tasks among evaluated task names (hub, ``*_local`` or the local paper group)."""
    hub_of = {local: hub for hub, local in LOCAL_PAPER_TASKS.items() if local}
    found: set[str] = set()
    for t in tasks:
        if t == PAPER_GROUP:
            found |= set(hub_of.values())
        elif t in LOCAL_PAPER_TASKS or t in hub_of:
            found.add(hub_of.get(t, t))
    return sorted(found)


def paper_chance(tasks) -> float | None:
    """Chance level of the paper average over these evaluated tasks (None: no paper task among them)."""
    hubs = paper_tasks(tasks)
    return sum(PAPER_TASK_CHANCE[t] for t in hubs) / len(hubs) if hubs else None
