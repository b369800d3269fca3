"""``bliss-ray compare COMPARE.yaml``: every variant × seed of a method comparison, then one report (Table 4 and
Figure 3 at equal target steps and at equal FLOPs).

Variants run seed by seed, in the order ``CompareSpec.order`` gives (a FLOPs-matched variant after the one it
matches, whose measured pool rows fix the ledger's inference row). All of them live in one run root
(``<out>/<name>``), so stages they share are computed once, and rerunning the command skips every finished stage:
an interrupted comparison resumes where it stopped.

    bliss-ray compare experiments/compare/demo.yaml --out runs --report docs/demo_results.md
    bliss-ray compare experiments/compare/tiny.yaml --seeds 0          # the CI-sized version
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from bliss_ray import storage
from bliss_ray.config import Experiment
from bliss_ray.costs.ledger import ledger, totals
from bliss_ray.report.canaries import canary_lines
from bliss_ray.report.collect import pool_rows_per_round
from bliss_ray.stages.executor import run_experiment
from bliss_ray.studies import compare_report as report
from bliss_ray.studies.compare_curves import curve_of
from bliss_ray.studies.compare_spec import CompareSpec, matching_extra_steps
from bliss_ray.watch.console import StageConsole, clock

log = logging.getLogger("bliss_ray")


@dataclass
class Member:
    """One variant × seed of the comparison, once it has run."""

    variant: str
    seed: int
    exp: Experiment
    results: dict  # each stage's outputs


def pool_rows_of(results: dict) -> int | None:
    """The ledger's pool rows per round of a finished run, from its scoring stages' outputs."""
    return pool_rows_per_round([out for key, out in results.items() if key.endswith(".score")])


def total_flops(member: Member) -> float:
    return totals(ledger(member.exp, pool_rows_per_round=pool_rows_of(member.results)))["total"]


def run_compare(spec: CompareSpec, out, verbose: bool = False) -> list[Member]:
    """Run every variant × seed (skipping finished stages), each with ``bliss-ray run``'s console between a start
    and an end line of its own; raises ``RuntimeError`` naming the first that fails."""
    members: list[Member] = []
    console = StageConsole()
    ray_was_up = ray.is_initialized()
    try:
        for seed in spec.seeds:
            done: dict[str, Member] = {}
            for name in spec.order():
                exp = _variant_experiment(spec, name, seed, done)
                console.line(f"variant {name}, seed {seed} ({len(members) + 1} of {spec.size}): start")
                t0 = time.monotonic()
                # one Ray for all of them; the last shuts it down while Ray's late lines still go to its log
                last = len(members) + 1 == spec.size
                code, results = run_experiment(exp, out, verbose=verbose, keep_ray=not last, owns_ray=not ray_was_up)
                if code:
                    raise RuntimeError(
                        f"variant {name}, seed {seed} failed (its log is under {storage.join(out, spec.name)})"
                    )
                done[name] = Member(name, seed, exp, results)
                members.append(done[name])
                console.line(
                    f"variant {name}, seed {seed}: done in {clock(time.monotonic() - t0)}; {_headline(results)}"
                )
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    return members


def _variant_experiment(spec: CompareSpec, name: str, seed: int, done: dict[str, Member]) -> Experiment:
    """A variant × seed's experiment; a FLOPs-matched one gets the extra last-round steps its goal's FLOPs need."""
    exp = spec.experiment(name, seed)
    goal = spec.variants[name].match_flops
    if goal is None:
        return exp
    extra = matching_extra_steps(exp, total_flops(done[goal]), pool_rows_of(done[goal].results))
    log.info("%s seed %d: %d extra target steps match %s's FLOPs", name, seed, extra, goal)
    return spec.experiment(name, seed, extra_steps=extra)


def _headline(results: dict) -> str:
    """A finished variant in a few words: its last checkpoint's held-out reference loss."""
    last = max(results["evaluate"]["checkpoints"], key=lambda c: c["steps"])
    return f"held-out reference loss {last['reference_loss']:.4f} at step {last['steps']}"


def write_report(spec: CompareSpec, members: list[Member], path: Path, command: str, out) -> Path:
    curves = [curve_of(m.variant, m.seed, m.exp, m.results["evaluate"], pool_rows_of(m.results)) for m in members]
    tuning, check = report.tuning_and_check(spec, out, curves)
    canaries = canary_lines(
        [
            (m.variant, int(key.split(".")[0][1:]), result["canaries"])
            for m in members
            for key, result in m.results.items()
            if key.endswith(".select") and "canaries" in result
        ]
    )
    written = report.write_markdown(spec, curves, path, command, tuning, canaries)
    if check is not None:  # for a later comparison's tuning.check
        (written.parent / "heldout_check.json").write_text(json.dumps(check | {"command": command}, indent=1) + "\n")
    return written


def publish_report(spec: CompareSpec, members: list[Member], where: str, command: str, out) -> str:
    """The report at ``where``, a local path or a store location: with a store, written to a local directory and
    uploaded with its figures and held-out check, so that a cluster's head keeps nothing of it."""
    if not storage.is_remote(where):
        return str(write_report(spec, members, Path(where), command, out))
    with tempfile.TemporaryDirectory() as local:
        written = write_report(spec, members, Path(local) / storage.name(where), command, out)
        storage.upload(local, storage.parent(where))
    return storage.join(storage.parent(where), written.name)
