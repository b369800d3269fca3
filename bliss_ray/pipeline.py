"""The BLISS pipeline: every stage, in order, with what it reads and what it writes. Start reading here.

    tokenizer ─► tokenize ─► r0.select (random) ─► warmup (proxy) ─► r0.pretrain (target)
        for r = 1..R, method bliss:  r.bilevel ─► r.score ─► r.select (top-k) ─► r.pretrain (+ decay branch)
                      method random: r.select (random) ─► r.pretrain
                      method mates:  r.probe ─► r.influence ─► r.score ─► r.select (MATES Gumbel) ─► r.pretrain
    ─► evaluate (lm-eval on every decay branch, Ray tasks) ─► report

Each stage writes into ``<out>/<experiment>/<key>-<identity>/``: ``config.json`` (the settings that define it),
its outputs, ``outputs.json`` and finally ``_SUCCESS``. The identity hashes the stage's own settings and its
inputs' identities, never ``resources``: rerunning a finished experiment is a no-op, changing one setting reruns
exactly the stages downstream of it, and an interrupted stage resumes (Ray Train picks up its checkpoints).

``<out>`` is a local path or an object-store URI (``s3://bucket/runs?region=…``; ``bliss_ray.storage``). With a URI
the store is the only source of truth: a stage works in a node-local directory (``Run.dir``), its outputs are
uploaded, then ``outputs.json`` and ``_SUCCESS`` are written to the store, and the local copy is deleted; inputs
come from the store (``Run.input``: a node-local copy keyed by location). So a fresh driver with an empty disk
skips every finished stage.

    from bliss_ray.pipeline import Run, stages_of
    run = Run(load_experiment("experiments/demo.yaml"), "runs")   # the layout; nothing runs
    [st.key for st in stages_of(run.exp)], run.uri("r1.bilevel")

This module only describes: what runs and where its files go. ``bliss_ray.stages.executor`` runs the stages.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

from bliss_ray import storage
from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.config import Experiment, identity
from bliss_ray.data.corpus import resolve_files


@dataclass(frozen=True)
class Stage:
    key: str  # unique, e.g. "r1.bilevel"
    kind: str  # what it does, e.g. "bilevel"
    round: int | None
    deps: tuple[str, ...]
    settings: tuple[str, ...]  # dotted config sections that change this stage's result


SHARDING = ("schedule.rounds", "schedule.pool_sharding")  # what decides a round's shard of the pool


def _bilevel_settings(r: int) -> tuple[str, ...]:
    """What changes round r's bilevel stage: the whole section, except ``score_carry`` in round 1, which has no
    previous score model to inherit; so arms that differ only in it share their first round."""
    if r > 1:
        return ("bilevel",)
    return tuple(f"bilevel.{f.name}" for f in fields(BilevelSettings) if f.name != "score_carry")


def stages_of(exp: Experiment) -> list[Stage]:
    """The whole data flow of one experiment, in execution order."""
    method, rounds = exp.selection.method, exp.schedule.rounds
    st = [
        Stage("tokenizer", "tokenizer", None, (), ("tokenizer", "data.pool", "data.pool_format", "data.text_column")),
        Stage("tokenize", "tokenize", None, ("tokenizer",), ("data",)),
        Stage("r0.select", "select", 0, ("tokenize",), ("selection.keep_frac", "selection.seed", *SHARDING, "seed")),
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
            own = (*_bilevel_settings(r), "models.proxy", "schedule", "seed")
            st += [
                Stage(f"r{r}.bilevel", "bilevel", r, deps, own),
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
        # the last round's extra steps (a FLOPs-matched baseline) change only that round's pretraining: its
        # selections and earlier rounds stay shared with the unmatched baseline
        extra = ("schedule.final_extra_steps",) if r == rounds else ()
        st += [
            Stage(f"r{r}.select", "select", r, select_deps, ("selection", "mates.temperature", *SHARDING, "seed")),
            Stage(
                f"r{r}.pretrain",
                "pretrain",
                r,
                ("tokenizer", f"r{r}.select", prev),
                ("models.target", "pretrain", "seed", *extra),
            ),
        ]
    pretrains = tuple(s.key for s in st if s.kind == "pretrain")
    st += [
        Stage("evaluate", "evaluate", None, pretrains, ("eval",)),
        Stage("report", "report", None, (*(s.key for s in st), "evaluate"), ()),
    ]
    return st


def setting(exp: Experiment, dotted: str):
    """The experiment's value at a dotted key, as JSON holds it: a section as a dict, a leaf as itself."""
    node = exp.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """A settings tree (an experiment as JSON) as dotted key → leaf (a list is a leaf): the inverse of ``setting``."""
    out = {}
    for k, v in tree.items():
        out |= flat_settings(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def pool_fingerprint(exp: Experiment) -> str:
    """Identity of the pool's bytes, folded into the tokenizer's identity and so into every stage's: each local
    file's content hash (a fresh clone, a copy or a touched file recomputes nothing), each remote file's name and
    size (hashing it would mean downloading the whole pool on the driver)."""
    parts = []
    for f in resolve_files(exp.data.pool):
        fs, p = storage.resolve(f)
        info = fs.get_file_info(p)
        parts.append([storage.name(f), info.size, None if storage.is_remote(f) else _content_hash(p, info.mtime_ns)])
    return identity(parts)


@functools.lru_cache(maxsize=4096)
def _content_hash(path: str, mtime_ns: int) -> str:  # keyed by mtime too: a file edited in place is hashed again
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Run:
    """One experiment's run directory and the execution of its stages.

    ``store``: where the run lives (a local path or a URI). ``root``: this driver's local directory for it; the
    same directory as ``store`` for a local run, a node-local working copy for a remote one (console log,
    TensorBoard files and stage work in progress, uploaded as they finish). ``shared``: another run's store (a
    local path or a URI) whose finished stages this run uses in place of its own when their identities match: a
    sweep's trials share the setup stages computed once before Tune starts, on any filesystem."""

    def __init__(self, exp: Experiment, out_root: str | Path, shared: str | Path | None = None):
        self.exp = exp
        self.shared = (
            None if shared is None else str(shared) if storage.is_remote(shared) else str(Path(shared).resolve())
        )
        self._home: dict[str, str] = {}  # stage key → the store its directory is in
        out = str(out_root) if storage.is_remote(out_root) else str(Path(out_root).resolve())  # absolute for workers
        self.store = storage.join(out, exp.name)
        self.remote = storage.is_remote(out)
        if self.remote:
            self.root = storage.cache_root() / "runs" / hashlib.sha256(self.store.encode()).hexdigest()[:12]
        else:
            self.root = Path(self.store)
        self.stages = stages_of(exp)
        self.by_key = {s.key: s for s in self.stages}
        self.ids: dict[str, str] = {}
        extra = {"tokenizer": pool_fingerprint(exp)}
        for s in self.stages:
            own = {d: setting(exp, d) for d in s.settings}
            self.ids[s.key] = identity(s.key, own, extra.get(s.key), [self.ids[d] for d in s.deps])

    @property
    def variant(self) -> str:
        """A name for this experiment among those sharing its run root: its label (or method) and the identity of
        its evaluation, which depends on every setting that changes a result."""
        return f"{self.exp.label or self.exp.selection.method}-{self.ids['evaluate'][:8]}"

    def dir(self, key: str) -> Path:
        """The stage's local working directory (for a local run: its directory in the store)."""
        return self.root / f"{key}-{self.ids[key]}"

    def uri(self, key: str, *sub: str) -> str:
        """The location of the stage's directory (or of ``sub`` in it) in the store: what workers are given. A stage
        finished in ``shared`` (and not here) is read from there."""
        name = f"{key}-{self.ids[key]}"
        if key not in self._home:  # decided once: the shared store is complete before this run starts
            shared = self.shared is not None and storage.exists(storage.join(self.shared, name, "_SUCCESS"))
            own = shared and storage.exists(storage.join(self.store, name, "_SUCCESS"))
            self._home[key] = self.shared if shared and not own else self.store
        return storage.join(self._home[key], name, *sub)

    def input(self, key: str, *sub: str) -> Path:
        """A local directory with a finished stage's ``sub`` directory: in place for a local run, else a node-local
        copy from the store (made once per node)."""
        return storage.local_copy(self.uri(key, *sub))

    def done(self, key: str) -> bool:
        return storage.exists(self.uri(key, "_SUCCESS"))

    def outputs(self, key: str) -> dict:
        return storage.read_json(self.uri(key, "outputs.json"))

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
