"""The sweep file and its on-disk layout: parse and validate a sweep YAML before any compute, name each trial's run
directory and files. No Ray here; ``bliss_ray.studies.sweep`` runs sweeps, ``bliss_ray.studies.sweep_objective``
scores trials.

    from bliss_ray.studies.sweep_spec import load_sweep
    sweep = load_sweep("experiments/sweeps/table2_proxy_sigmoid_tiny.yaml")   # raises ConfigError naming the field
    sweep.experiment({"bilevel.use_sigmoid": False})                             # one point's full Experiment

Fields (see experiments/sweeps/README.md): ``name``, ``description``, ``base``, ``overrides``, ``stage``
(bilevel | full), ``round``, ``space`` (dotted key → {grid | choice | loguniform | uniform}), ``labels``, ``metric``,
``mode``, ``last_steps``, ``search`` (grid | {type: optuna, seed, num_samples, startup_trials, start_from_base}),
``seeds``,
``max_concurrent_trials``, ``max_failures``, ``trial_resources``, ``asha``.

Two rules keep a sweep's ranking about data selection: a proxy-level metric (``upper_loss``, ``lower_loss``) is
refused when the space changes the proxy itself (a bigger proxy wins its own loss by construction), and a
``full`` sweep's points must train the target on the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bliss_ray.config import ConfigError, Experiment, load_experiment
from bliss_ray.models.arch import PRESETS
from bliss_ray.pipeline import Run, setting, stages_of
from bliss_ray.storage import join as storage_join
from bliss_ray.studies.sweep_metrics import FINAL_METRICS, PROXY_METRICS, paper_tasks, proxy_keys, target_tokens

REPO = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Strict):
    """Exactly one of: ``grid`` (every value, grid search), ``choice`` (categorical, Optuna), or a range."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform, uniform (got {given or 'none'})")
        if given[0] in ("loguniform", "uniform"):
            lo, hi = getattr(self, given[0])
            if not lo < hi or (given[0] == "loguniform" and lo <= 0):
                raise ValueError(f"{given[0]} needs 0 < lo < hi (log) or lo < hi, got [{lo}, {hi}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None)

    def candidates(self, ranges: bool) -> list:
        """Values to validate/pre-compute with: every listed value, and the bounds of ranges when ``ranges``."""
        return list(getattr(self, self.kind)) if self.kind in ("grid", "choice") or ranges else []

    def contains(self, value) -> bool:
        if self.kind in ("grid", "choice"):
            return value in getattr(self, self.kind)
        lo, hi = getattr(self, self.kind)
        return isinstance(value, int | float) and lo <= value <= hi


class Search(_Strict):
    type: Literal["grid", "optuna"] = "grid"
    seed: int = 0
    """Optuna sampler seed: the same seed and space give the same trials."""
    num_samples: int = Field(1, ge=1)
    """Optuna trials (ignored by grid: one trial per grid point and seed)."""
    startup_trials: int = Field(10, ge=1)
    """Trials Optuna's TPE sampler draws at random before it models the results (Optuna's default is 10: a search
    of 10 trials or fewer is then a seeded random search)."""
    start_from_base: bool = False
    """Optuna: the first trial runs the base experiment's own settings, so the ranking shows whether the search beat
    them on the tuning seeds (it counts as one of ``num_samples``)."""


class Asha(_Strict):
    max_t: int = Field(100, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class PaperRows(_Strict):
    """What the paper reports for some variants, shown beside ours: ``rows`` maps a variant's label (as the report
    names it, from ``labels``) to the paper's number for it; ``source`` says which table, setting and metric."""

    source: str
    rows: dict[str, str] = Field(min_length=1)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: str
    stage: Literal["bilevel", "full"] = "bilevel"
    round: int = Field(1, ge=1)
    overrides: dict[str, Any] = {}
    space: dict[str, Domain] = Field(min_length=1)
    labels: dict[str, dict[Any, str]] = {}
    """How reports name values, e.g. {models.proxy.arch: {pythia-micro: "31M stand-in"}}."""
    metric: str = "upper_loss"
    mode: Literal["min", "max"] = "min"
    last_steps: int = Field(5, ge=1)
    search: Search = Search()
    seeds: list[int] = []
    max_concurrent_trials: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=-1)
    """Tune-level retries of a trial whose driver died (Train-level retries: ``resources.max_failures``)."""
    trial_resources: dict[str, float] = {"CPU": 0.01}
    """Resources of a trial driver (it only orchestrates). The shipped clusters use ``{CPU: 1, TRAIN_DRIVER: 1}``:
    ``TRAIN_DRIVER`` exists only on their on-demand ``cpu_drivers`` nodes, so spot reclaims never kill a driver."""
    asha: Asha | None = None
    paper: PaperRows | None = None
    baseline: dict[str, Any] | None = None
    """Overrides that turn the base into the baseline (e.g. ``{selection.method: random}``), run once per seed
    before Tune starts; metric ``steps_to_baseline`` is the target steps a trial needs to reach its final
    held-out reference loss."""

    @field_validator("search", mode="before")
    @classmethod
    def _search_shorthand(cls, v):
        return {"type": v} if isinstance(v, str) else v


@dataclasses.dataclass
class Sweep:
    spec: SweepSpec
    path: Path
    base_path: Path
    base: Experiment  # the base experiment with the sweep's overrides

    def experiment(self, point: dict, extra: dict | None = None) -> Experiment:
        return load_experiment(self.base_path, {**self.spec.overrides, **point, **(extra or {})})

    def baseline_experiment(self, seed: int) -> Experiment:
        """The baseline run of one seed: the base, the sweep's overrides and ``baseline``; no point of the space."""
        return self.experiment(self.spec.baseline or {}, {"seed": seed})

    def seeds(self) -> list[int]:
        return self.spec.seeds or [self.base.seed]

    def base_point(self) -> dict:
        """The base experiment's own value of each key of the space."""
        return {key: setting(self.base, key) for key in self.spec.space}

    def arms(self) -> dict[str, Experiment]:
        """Every configuration the sweep can run, by its label (a grid point, or an Optuna range's bounds), for
        checks before launch; seeds do not change what a configuration needs."""
        return {variant_label(self.spec, pt) or "base": self.experiment(pt) for pt in points(self.spec, True)}

    def fingerprint(self) -> str:
        """What a resumed sweep must share with the original: the base with its overrides (except ``resources``)
        and the search; how to run (resources, concurrency, retries) may change."""
        keep = ("base", "stage", "round", "space", "metric", "mode", "last_steps", "search", "seeds", "baseline")
        base = self.base.model_dump(mode="json", exclude={"resources", "label"})
        blob = json.dumps([self.spec.model_dump(mode="json", include=set(keep)), base], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _loc(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, str) and "." in p else str(p) for p in loc).replace(".[", "[")


def _fields(section: type) -> dict[str, type]:
    """Field name → type of a config section: a pydantic model, or a settings dataclass of the math layer."""
    if dataclasses.is_dataclass(section):
        hints = typing.get_type_hints(section)
        return {f.name: hints[f.name] for f in dataclasses.fields(section)}
    return {name: f.annotation for name, f in section.model_fields.items()}


def _check_key(key: str, where: str) -> None:
    """A dotted key must name a value (not a section) of the Experiment schema."""
    model: type = Experiment
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(model)
        if part not in fields:
            parent = ".".join(parts[:i]) or "the experiment"
            raise ConfigError(f"{where}: '{key}' is not a config key ({parent} has no field '{part}')")
        ann = fields[part]
        is_section = isinstance(ann, type) and (issubclass(ann, BaseModel) or dataclasses.is_dataclass(ann))
        if i < len(parts) - 1 and not is_section:
            raise ConfigError(f"{where}: '{key}' is not a config key ('{'.'.join(parts[: i + 1])}' is a value)")
        if i == len(parts) - 1 and is_section:
            raise ConfigError(f"{where}: '{key}' is a section; name one of its fields")
        model = ann if is_section else model


def resolve_base(base: str, sweep_path: Path) -> Path:
    """The base experiment file a sweep or comparison file names: relative to the working directory, to that
    file, or to the repository."""
    for p in (Path(base), sweep_path.parent / base, REPO / base):
        if p.is_file():
            return p.resolve()
    raise ConfigError(f"{sweep_path}: base: experiment file '{base}' not found (relative to the repo or to the file)")


def points(spec: SweepSpec, ranges: bool = False) -> list[dict]:
    """Grid: every grid point × seed (what runs). Optuna: one-at-a-time probes of each listed value (and range
    bounds when ``ranges``), the other keys at their first value: what can be validated and shared up front."""
    seeds = [{"seed": s} for s in spec.seeds] or [{}]
    if spec.search.type == "grid":
        keys = list(spec.space)
        combos = itertools.product(*(spec.space[k].grid for k in keys))
        return [dict(zip(keys, c, strict=True)) | s for c in combos for s in seeds]
    first = {k: d.candidates(True)[0] for k, d in spec.space.items() if d.candidates(ranges)}
    probes = [first] + [first | {k: v} for k, d in spec.space.items() for v in d.candidates(ranges)[1:]]
    return [p | seeds[0] for p in probes]


def _parse_spec(path: Path) -> SweepSpec:
    """Read the sweep YAML and validate it against the schema, listing every bad field in one ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    try:
        return SweepSpec.model_validate(tree)
    except ValidationError as e:
        lines = [f"  {_loc(err['loc']) or '<sweep>'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid sweep {path}:\n" + "\n".join(lines)) from None


def _check_keys(spec: SweepSpec, where: str) -> None:
    """The space, overrides and baseline must name config values, and the space's domains must suit the search."""
    for key, dom in spec.space.items():
        _check_key(key, f"{where}: space")
        if key in ("name", "label") or (key == "seed" and spec.seeds):
            raise ConfigError(f"{where}: space: '{key}' is set by the sweep itself (use `seeds:` for repeats)")
        if (dom.kind == "grid") != (spec.search.type == "grid"):
            want = "grid" if spec.search.type == "grid" else "choice, loguniform or uniform"
            raise ConfigError(f"{where}: space[{key}]: search '{spec.search.type}' takes {want} domains")
    for key in spec.overrides:
        _check_key(key, f"{where}: overrides")
    for key in spec.baseline or {}:
        _check_key(key, f"{where}: baseline")


def _check_objective(spec: SweepSpec, where: str) -> None:
    """Labels, metric, mode, seeds and ASHA must agree with each other and with the stage; a proxy-level metric
    must not rank points that change the proxy itself."""
    if (spec.metric == "steps_to_baseline") != (spec.baseline is not None):
        raise ConfigError(f"{where}: baseline: metric steps_to_baseline needs one, and no other metric uses it")
    for key in spec.labels:
        if key not in spec.space:
            raise ConfigError(f"{where}: labels: '{key}' is not a key of space")
    unknown = set(spec.paper.rows) - {variant_label(spec, p) for p in points(spec)} if spec.paper else set()
    if unknown:
        raise ConfigError(f"{where}: paper: rows {sorted(unknown)} name no variant of the grid")
    allowed = FINAL_METRICS[spec.stage]
    if spec.metric not in allowed:
        raise ConfigError(f"{where}: metric: '{spec.metric}' is not reported by stage '{spec.stage}' ({allowed})")
    if spec.mode != allowed[spec.metric]:
        raise ConfigError(f"{where}: mode: {spec.metric} is better when {allowed[spec.metric]}imised")
    if spec.search.type == "optuna" and len(spec.seeds) > 1:
        raise ConfigError(f"{where}: seeds: repeats need search: grid (rerun Optuna's best point with a grid)")
    if spec.asha and spec.stage != "bilevel":
        raise ConfigError(f"{where}: asha: only stage bilevel reports the metric during training")
    if spec.metric in PROXY_METRICS and (varied := proxy_keys(spec.space)):
        raise ConfigError(
            f"{where}: metric: '{spec.metric}' is measured on the proxy itself, and space varies the proxy "
            f"({', '.join(varied)}): a larger or longer-trained proxy wins it by construction, which says nothing "
            "about which proxy selects better data. Use stage: full with metric reference_loss (the target's "
            "reference-set loss after selection) or paper_average"
        )


def _check_start_from_base(sweep: Sweep, where: str) -> None:
    """``start_from_base`` needs Optuna, and the base's own point must lie inside the space."""
    spec = sweep.spec
    if spec.search.start_from_base:
        if spec.search.type != "optuna":
            raise ConfigError(f"{where}: search: start_from_base needs type optuna (a grid runs its own points)")
        for key, value in sweep.base_point().items():
            if not spec.space[key].contains(value):
                raise ConfigError(f"{where}: search: start_from_base: the base's {key} = {value} is outside space")


def _check_point(spec: SweepSpec, exp: Experiment, pt: dict, where: str) -> None:
    """One point's experiment must evaluate what the metric needs, use known model presets and run the stage."""
    if spec.metric == "paper_average" and not paper_tasks(exp.eval.tasks):
        raise ConfigError(f"{where}: metric: point {pt} evaluates no paper task (eval.tasks={exp.eval.tasks})")
    bad = [f"models.{m}.arch={a}" for m in ("target", "proxy") if (a := getattr(exp.models, m).arch) not in PRESETS]
    if bad:
        raise ConfigError(f"{where}: point {pt}: unknown model preset {bad}; choose from {sorted(PRESETS)}")
    key = f"r{spec.round}.bilevel"
    if spec.stage == "bilevel" and key not in {s.key for s in stages_of(exp)}:
        raise ConfigError(
            f"{where}: round: point {pt} has no stage {key} (needs selection.method bliss and "
            f"schedule.rounds >= {spec.round})"
        )


def _check_points(sweep: Sweep, where: str) -> dict[int, dict]:
    """Build and check every point's experiment; return target tokens → the first point training on that many."""
    spec = sweep.spec
    tokens: dict[int, dict] = {}
    for pt in points(spec, ranges=True):
        exp = _validated(sweep.experiment, pt, None, f"{where}: point {pt}")
        tokens.setdefault(target_tokens(exp), pt)
        _check_point(spec, exp, pt, where)
    if spec.stage == "full" and len(tokens) > 1:  # selection is judged by the target at equal training tokens
        shown = "; ".join(f"{n:,} tokens at {pt}" for n, pt in tokens.items())
        raise ConfigError(f"{where}: space: the points train the target on different token counts ({shown})")
    return tokens


def _check_baseline(sweep: Sweep, tokens: dict[int, dict], where: str) -> None:
    """Each seed's baseline must build and train the target on the trials' token count (steps are compared)."""
    for seed in sweep.seeds() if sweep.spec.baseline else []:
        baseline = _validated(lambda s, _: sweep.baseline_experiment(s), seed, None, f"{where}: baseline")
        if target_tokens(baseline) not in tokens:
            raise ConfigError(
                f"{where}: baseline: it trains the target on {target_tokens(baseline):,} tokens, the trials on "
                f"{', '.join(f'{n:,}' for n in tokens)}: steps to reach its final loss would not be like for like"
            )


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Parse and validate a sweep file; raise ``ConfigError`` naming the bad field. No Ray, no compute.
    ``overrides`` (``--set``) apply to the base after the file's own ``overrides``."""
    path = Path(path)
    spec = _parse_spec(path)
    if overrides:
        spec = spec.model_copy(update={"overrides": spec.overrides | overrides})
    where = f"sweep {path}"
    _check_keys(spec, where)
    _check_objective(spec, where)
    base_path = resolve_base(spec.base, path)
    sweep = Sweep(spec, path, base_path, _validated(load_experiment, base_path, spec.overrides, f"{where}: overrides"))
    _check_start_from_base(sweep, where)
    tokens = _check_points(sweep, where)
    _check_baseline(sweep, tokens, where)
    return sweep


def _validated(fn, a, b, where: str) -> Experiment:
    try:
        return fn(a, b)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def variant_label(spec: SweepSpec, point: dict) -> str:
    """How reports name a config point: each key's ``labels`` entry, else ``<last key part>=<value>``."""

    def show(key: str, value) -> str:
        names = spec.labels.get(key, {})
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        return names.get(value, names.get(str(value), f"{key.split('.')[-1]}={shown}"))

    return ", ".join(show(k, point[k]) for k in spec.space if k in point)


# ---- on-disk layout (see bliss_ray.studies.sweep) -------------------------------------------------------------------


def trial_run(sweep: Sweep, config: dict, trial_id: str, out: str | Path, storage: str) -> Run:
    """A trial's pipeline Run: its own directory (OUT/<sweep>/<trial id>, a local path or a URI) and Train storage,
    both deterministic from the trial id; finished stages of OUT/<base name>/ (the setup stages computed before
    Tune starts) are used in place, never recomputed."""
    spec = sweep.spec
    point = {k: config[k] for k in spec.space if k in config}
    seed = config.get("seed", spec.seeds[0] if spec.seeds else None)
    extra = {"label": variant_label(spec, point), "resources.storage_path": storage_join(storage, trial_id)}
    extra |= {"seed": seed} if seed is not None else {}
    exp = sweep.experiment(point, extra)
    return Run(exp, storage_join(str(out), spec.name, trial_id), shared=storage_join(str(out), exp.name))


def sweep_json(sweep: Sweep) -> bytes:
    """``sweep.json``: what a resume checks (the fingerprint) and what the report shows (spec, labels by value)."""
    spec = sweep.spec
    meta = {
        "fingerprint": sweep.fingerprint(),
        "sweep_file": str(sweep.path),
        "base_file": str(sweep.base_path),
        "base_name": sweep.base.name,
        "space_keys": list(spec.space),
        **spec.model_dump(mode="json", exclude={"labels"}),
        "labels": {k: {str(v): text for v, text in names.items()} for k, names in spec.labels.items()},
    }
    return json.dumps(meta, indent=2, default=str).encode()
