"""The BLISS pipeline: every stage, in order, with what it reads and what it writes. Start reading here.

    tokenizer ─► tokenize ─► r0.select (random) ─► warmup (proxy) ─► r0.pretrain (target)
        for r = 1..R, method bliss:  r.bilevel ─► r.score ─► r.select (top-k) ─► r.pretrain (+ decay branch)
                      method random: r.select (random) ─► r.pretrain
                      method mates:  r.probe ─► r.influence ─► r.score ─► r.select (MATES Gumbel) ─► r.pretrain
    ─► evaluate (lm-eval on every decay branch, Ray tasks) ─► report

Each stage writes into ``<out>/<experiment>/<key>-<identity>/``: ``config.json`` (the settings that define it),
its outputs, ``outputs.json`` and finally ``_SUCCESS``. The identity hashes the stage's own settings and its
inputs' identities, never ``resources``: rerunning a finished experiment is a no-op, changing one setting reruns
exactly the stages downstream of it, and an interrupted stage resumes in the same directory (Ray Train picks up
its checkpoints there).

    from bliss_ray.pipeline import Run
    Run(load_experiment("experiments/demo.yaml"), Path("runs")).execute()
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bliss_ray.config import Experiment, identity
from bliss_ray.data.corpus import filesystem, resolve_files
from bliss_ray.status import write_json

log = logging.getLogger("bliss_ray")


@dataclass(frozen=True)
class Stage:
    key: str  # unique, e.g. "r1.bilevel"
    kind: str  # what it does, e.g. "bilevel"
    round: int | None
    deps: tuple[str, ...]
    settings: tuple[str, ...]  # dotted config sections that change this stage's result


def plan(exp: Experiment) -> list[Stage]:
    """The whole data flow of one experiment, in execution order."""
    method, rounds = exp.selection.method, exp.schedule.rounds
    st = [
        Stage("tokenizer", "tokenizer", None, (), ("tokenizer", "data.pool", "data.pool_format", "data.text_column")),
        Stage("tokenize", "tokenize", None, ("tokenizer",), ("data",)),
        Stage("r0.select", "select", 0, ("tokenize",), ("selection.keep_frac", "selection.seed", "schedule", "seed")),
    ]
    if method == "bliss":  # only BLISS has a proxy to warm up
        st.append(Stage("warmup", "warmup", None, ("tokenizer", "r0.select"), ("models.proxy", "warmup", "seed")))
    st.append(Stage("r0.pretrain", "pretrain", 0, ("tokenizer", "r0.select"), ("models.target", "pretrain", "seed")))
    for r in range(1, rounds + 1):
        prev = f"r{r - 1}.pretrain"
        if method == "bliss":
            deps = ("tokenize", "warmup", prev)
            if exp.bilevel.score_carry == "inherit" and r > 1:
                deps += (f"r{r - 1}.bilevel",)
            st += [
                Stage(f"r{r}.bilevel", "bilevel", r, deps, ("bilevel", "models.proxy", "schedule", "seed")),
                Stage(f"r{r}.score", "score", r, (f"r{r}.bilevel", "tokenize"), ("score",)),
            ]
            select_deps = (f"r{r}.score", "tokenize")
        elif method == "mates":
            st += [
                Stage(f"r{r}.probe", "probe", r, ("tokenize", prev), ("mates", "schedule", "seed")),
                Stage(f"r{r}.influence", "influence", r, (f"r{r}.probe", "tokenizer"), ("mates", "seed")),
                Stage(f"r{r}.score", "score", r, (f"r{r}.influence", "tokenize"), ("score",)),
            ]
            select_deps = (f"r{r}.score", "tokenize")
        else:
            select_deps = ("tokenize",)
        st += [
            Stage(f"r{r}.select", "select", r, select_deps, ("selection", "mates.temperature", "schedule", "seed")),
            Stage(
                f"r{r}.pretrain",
                "pretrain",
                r,
                ("tokenizer", f"r{r}.select", prev),
                ("models.target", "pretrain", "seed"),
            ),
        ]
    pretrains = tuple(s.key for s in st if s.kind == "pretrain")
    st += [
        Stage("evaluate", "evaluate", None, pretrains, ("eval",)),
        Stage("report", "report", None, (*(s.key for s in st), "evaluate"), ()),
    ]
    return st


def _section(exp: Experiment, dotted: str):
    node = exp
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def pool_fingerprint(exp: Experiment) -> str:
    """Identity of the pool's bytes: content hashes for local files, (path, size) for remote ones."""
    parts = []
    for f in resolve_files(exp.data.pool):
        fs, p = filesystem(f)
        info = fs.get_file_info(p)
        parts.append([Path(f).name, info.size, info.mtime_ns if not f.startswith(("s3://", "gs://")) else None])
    return identity(parts)


class Run:
    """One experiment's run directory and the execution of its stages."""

    def __init__(self, exp: Experiment, out_root: Path):
        self.exp = exp
        self.root = Path(out_root).resolve() / exp.name  # absolute: Ray workers run in other directories
        self.stages = plan(exp)
        self.by_key = {s.key: s for s in self.stages}
        self.ids: dict[str, str] = {}
        extra = {"tokenizer": pool_fingerprint(exp)}
        for s in self.stages:
            own = {d: _section(exp, d) for d in s.settings}
            self.ids[s.key] = identity(s.key, own, extra.get(s.key), [self.ids[d] for d in s.deps])

    def dir(self, key: str) -> Path:
        return self.root / f"{key}-{self.ids[key]}"

    def done(self, key: str) -> bool:
        return (self.dir(key) / "_SUCCESS").exists()

    def outputs(self, key: str) -> dict:
        return json.loads((self.dir(key) / "outputs.json").read_text())

    def select_until(self, until: str | None) -> list[Stage]:
        if until is None:
            return self.stages
        keys = [s.key for s in self.stages]
        if until in keys:
            return self.stages[: keys.index(until) + 1]
        kinds = [i for i, s in enumerate(self.stages) if s.kind == until]
        if not kinds:
            raise ValueError(f"--stage {until}: no such stage; choose from {keys} or a kind")
        return self.stages[: kinds[-1] + 1]

    def execute(self, until: str | None = None, runner: Callable | None = None, console=None) -> dict[str, dict]:
        """Run (or skip, when done) every stage up to ``until``; returns each stage's outputs. ``console``
        (``bliss_ray.console.StageConsole``; default: plain lines on stderr, TensorBoard files) shows progress."""
        from bliss_ray.stages.steps import run_stage  # orchestration layer: imports Ray

        runner = runner or run_stage
        console = console or default_console(self)
        results = {}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "experiment.json").write_text(self.exp.model_dump_json(indent=2))
        for st in self.select_until(until):
            d = self.dir(st.key)
            if self.done(st.key):
                results[st.key] = self.outputs(st.key)
                console.skipped(st, d, results[st.key])
                continue
            d.mkdir(parents=True, exist_ok=True)
            config = {
                "stage": st.key,
                "identity": self.ids[st.key],
                "deps": {k: self.ids[k] for k in st.deps},
                "settings": {s: _section(self.exp, s) for s in st.settings},
            }
            (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            with console.stage(st, d) as finished:
                t0 = time.perf_counter()
                out = runner(self, st, d)
                out = {"stage": st.key, "kind": st.kind, "round": st.round, "seconds": time.perf_counter() - t0, **out}
                write_json(d / "outputs.json", out)
                (d / "_SUCCESS").write_text("")
                finished(out)
            results[st.key] = out
        return results


def default_console(run: Run):
    """Plain progress lines on stderr and the experiment's trackers (library and test use)."""
    from bliss_ray.console import StageConsole
    from bliss_ray.stages._progress import BoardReader
    from bliss_ray.tracking import trackers

    return StageConsole(poll=BoardReader(), trackers=trackers(run.exp.tracking, run.root, run.exp.name))
