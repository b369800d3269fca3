"""A method comparison (the rebuttal's Table 4 and Figure 3): variants × seeds of one base experiment. No Ray here;
``bliss_ray.studies.compare`` runs it.

A comparison file names a base experiment, the seeds, and the variants as dotted overrides of the base::

    name: compare_demo
    base: experiments/demo.yaml
    seeds: [0, 1, 2]
    baseline: random                 # speed-ups are measured against this variant (Table 4)
    also_against: [mates]            # ... and against these too (the table against every baseline)
    variants:
      bliss: {}
      mates: {selection.method: mates, mates.probes: 128}
      random: {selection.method: random}
      random_flops: {selection.method: random, match_flops: bliss}
    tuning: {sweep: experiments/sweeps/demo_tune.yaml, variant: bliss}   # optional: where bliss's settings came from

Every variant × seed is an ``Experiment`` named ``name`` (one run root): stages with the same settings and inputs
(tokenizer, tokenize, a seed's round 0) have the same identity and are computed once. ``match_flops: V`` gives the
variant extra target steps in its last round (``schedule.final_extra_steps``) until its total FLOPs — the ledger's
total, selection included, evaluation excluded — equal variant V's of the same seed, to within half a target step.
Every variant is measured against ``baseline`` and each of ``also_against``; the first variant is the method the
comparison is about, which the report draws head to head against each of ``also_against`` (the rebuttal's Figure 3,
BLISS against MATES). ``tuning`` names the sweep that tuned a variant: its seeds must be disjoint from the
comparison's, so the comparison is the held-out check of the tuned settings, and the report shows the search beside
it.

    from bliss_ray.studies.compare_spec import load_compare
    spec = load_compare("experiments/compare/demo.yaml")   # raises ConfigError naming the field
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bliss_ray.config import ConfigError, Experiment, load_experiment
from bliss_ray.costs.flops import forward_flops_per_token
from bliss_ray.costs.ledger import Row, ledger, model_archs, totals
from bliss_ray.studies.sweep_spec import load_sweep, resolve_base


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overrides: dict[str, Any] = {}
    match_flops: str | None = None
    """Another variant whose total FLOPs this one matches with extra target steps in its last round."""


class Tuning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sweep: str
    """The sweep file (``bliss-ray sweep``) that searched this variant's settings."""
    variant: str
    """The variant whose settings the sweep tuned: the base experiment's, the defaults the demo ships."""
    candidate: str | None = None
    """A variant that runs the search's best point; the report says whether it beats ``variant`` on every one of
    this comparison's (held-out) seeds, the condition for its settings to become the defaults."""
    before: str | None = None
    """Once the best point has become the defaults (``variant`` runs it): a variant that runs the settings the
    search started from, so that the report keeps the held-out check that let the best point replace them."""
    check: str | None = None
    """A held-out check made by an earlier comparison that ran the ``candidate`` on these seeds: the
    ``<report>.heldout_check.json`` that ``bliss-ray compare`` writes beside its report, e.g. a copy kept with the
    docs (path resolved like ``results``). The report shows it instead of running the candidate again."""
    results: str | None = None
    """The sweep's output directory (``sweep.json``, ``sweep_results.parquet``): by default ``<out>/<sweep name>/``,
    where ``bliss-ray sweep --out`` put it; else a path relative to the repository, the working directory or this
    file, e.g. a copy of an earlier search kept with the docs."""


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: str
    """The experiment every variant starts from (path relative to the repository, the working directory or this
    file; ``load_compare`` resolves it)."""
    overrides: dict[str, Any] = {}
    """Applied to the base before each variant's own overrides."""
    seeds: list[int] = Field(min_length=1)
    """Each seed sets ``seed`` and ``selection.seed`` of every variant."""
    baseline: str
    """The variant whose final held-out reference loss the others race to (Table 4's speed-up)."""
    also_against: list[str] = []
    """Further variants every method is measured against the same way (the report's table against every baseline),
    each also drawn head to head with the first variant, the method the comparison is about."""
    variants: dict[str, VariantSpec] = Field(min_length=2)
    tuning: Tuning | None = None

    @model_validator(mode="after")
    def _refs(self) -> CompareSpec:
        if self.baseline not in self.variants:
            raise ValueError(f"baseline: '{self.baseline}' is not one of the variants {sorted(self.variants)}")
        self._check_also_against()
        for name, v in self.variants.items():
            if v.match_flops is not None and v.match_flops not in self.variants:
                raise ValueError(f"variants.{name}.match_flops: no variant '{v.match_flops}'")
            if v.match_flops is not None and self.variants[v.match_flops].match_flops is not None:
                raise ValueError(f"variants.{name}.match_flops: '{v.match_flops}' matches another variant itself")
        if self.tuning and self.tuning.variant not in self.variants:
            raise ValueError(f"tuning.variant: '{self.tuning.variant}' is not one of the variants")
        if self.tuning and self.tuning.candidate not in (None, *self.variants):
            raise ValueError(f"tuning.candidate: '{self.tuning.candidate}' is not one of the variants")
        if self.tuning and self.tuning.candidate == self.tuning.variant:
            raise ValueError("tuning.candidate: the tuned variant itself; name the variant that runs the best point")
        if self.tuning and self.tuning.before not in (None, *self.variants):
            raise ValueError(f"tuning.before: '{self.tuning.before}' is not one of the variants")
        if self.tuning and self.tuning.before is not None and self.tuning.candidate is not None:
            raise ValueError("tuning.before: a candidate is still on trial; name one of the two")
        if self.tuning and self.tuning.check is not None and (self.tuning.candidate or self.tuning.before):
            raise ValueError("tuning.check: a check made earlier; this comparison runs its own (candidate/before)")
        if self.tuning and self.tuning.before == self.tuning.variant:
            raise ValueError("tuning.before: the tuned variant itself; name the variant with the earlier settings")
        return self

    def _check_also_against(self) -> None:
        for name in self.also_against:
            if name not in self.variants:
                raise ValueError(f"also_against: '{name}' is not one of the variants {sorted(self.variants)}")
            if name == self.baseline:
                raise ValueError(f"also_against: '{name}' is the baseline already")
            if name == self.lead:  # its head-to-head figure would draw the method against itself
                raise ValueError(f"also_against: '{name}' is the first variant, the method measured against them")
        if len(set(self.also_against)) < len(self.also_against):
            raise ValueError(f"also_against: a variant named twice in {self.also_against}")

    @property
    def lead(self) -> str:
        """The method the comparison is about: its first variant."""
        return next(iter(self.variants))

    @property
    def baselines(self) -> list[str]:
        """Every variant the others are measured against, the main baseline first."""
        return [self.baseline, *self.also_against]

    @property
    def size(self) -> int:
        """Variant × seed runs."""
        return len(self.variants) * len(self.seeds)

    def arms(self) -> dict[str, Experiment]:
        """Every variant at the first seed, for checks before launch (seeds do not change what a variant needs)."""
        return {name: self.experiment(name, self.seeds[0]) for name in self.variants}

    def order(self) -> list[str]:
        """Variants in run order: those another variant matches come first."""
        first = [n for n, v in self.variants.items() if v.match_flops is None]
        return first + [n for n in self.variants if n not in first]

    def experiment(self, variant: str, seed: int, extra_steps: int = 0) -> Experiment:
        """One variant × seed: the base experiment file with the comparison's and the variant's overrides."""
        return load_experiment(
            self.base,
            {
                **self.overrides,
                **self.variants[variant].overrides,
                "name": self.name,
                "label": variant,
                "seed": seed,
                "selection.seed": seed,
                "schedule.final_extra_steps": extra_steps,
            },
        )


def load_compare(
    path: str | Path, seeds: list[int] | None = None, overrides: dict[str, Any] | None = None
) -> CompareSpec:
    """The comparison, its ``base`` resolved to a file; every variant × seed is validated here, before compute.
    ``overrides`` (``--set``) apply to every variant after the file's own ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file not found: {path}")
    try:
        spec = CompareSpec.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        raise ConfigError("\n".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from e
    update = {"base": str(resolve_base(spec.base, path))} | ({"seeds": seeds} if seeds else {})
    spec = spec.model_copy(update=update | ({"overrides": spec.overrides | overrides} if overrides else {}))
    if spec.tuning:
        spec = spec.model_copy(update={"tuning": _checked_tuning(spec, path)})
    for name in spec.variants:
        for seed in spec.seeds:
            try:
                spec.experiment(name, seed)
            except ConfigError as e:
                raise ConfigError(f"variants.{name}: {e}") from e
    return spec


def _checked_tuning(spec: CompareSpec, path: Path) -> Tuning:
    """``tuning`` with its sweep file resolved; the tuned variant must be judged on seeds its sweep never saw, from
    the same base experiment."""
    sweep_path = resolve_base(spec.tuning.sweep, path)
    try:
        sweep = load_sweep(sweep_path)
    except ConfigError as e:
        raise ConfigError(f"tuning.sweep: {e}") from None
    if shared := sorted(set(sweep.seeds()) & set(spec.seeds)):
        raise ConfigError(
            f"tuning.sweep: {sweep_path.name} tunes on seeds {sweep.seeds()}, and this comparison runs seeds "
            f"{spec.seeds}: seeds {shared} would judge the settings on the data that chose them"
        )
    if sweep.base_path != Path(spec.base):
        raise ConfigError(f"tuning.sweep: its base {sweep.base_path} is not the comparison's base {spec.base}")
    resolved = {"sweep": str(sweep_path)}
    if spec.tuning.results is not None:
        try:  # the search order of every file a comparison names
            found = resolve_base(str(Path(spec.tuning.results) / "sweep_results.parquet"), path)
        except ConfigError:
            raise ConfigError(f"tuning.results: no sweep_results.parquet in '{spec.tuning.results}'") from None
        resolved["results"] = str(found.parent)
    if spec.tuning.check is not None:
        try:
            resolved["check"] = str(resolve_base(spec.tuning.check, path))
        except ConfigError:
            raise ConfigError(f"tuning.check: no file '{spec.tuning.check}'") from None
    return spec.tuning.model_copy(update=resolved)


def target_step_flops(exp: Experiment) -> float:
    """FLOPs of one target pretraining step in the ledger's convention."""
    target, _ = model_archs(exp)
    tokens = exp.pretrain.global_batch_seqs * exp.data.seq_len
    return 3 * forward_flops_per_token(target, exp.data.seq_len) * tokens


def matching_extra_steps(exp: Experiment, goal_flops: float, pool_rows_per_round: int | None = None) -> int:
    """Extra last-round target steps that bring ``exp``'s total FLOPs closest to ``goal_flops`` (never negative)."""
    own = totals(ledger(exp, pool_rows_per_round=pool_rows_per_round))["total"]
    return max(0, round((goal_flops - own) / target_step_flops(exp)))


def spent_flops(rows: list[Row], exp: Experiment, steps: float, round_index: int) -> float:
    """FLOPs spent when the target has trained ``steps`` steps in round ``round_index``, in plan order: the proxy
    warm-up (before round 0's pretraining), the selection of rounds 1..r, and the target steps so far."""
    warmup = sum(r.flops for r in rows if r.group == "warm-up")
    selection = sum(r.flops for r in rows if r.group == "selection")
    per_round = selection / exp.schedule.rounds if exp.schedule.rounds else 0.0
    return warmup + round_index * per_round + steps * target_step_flops(exp)
