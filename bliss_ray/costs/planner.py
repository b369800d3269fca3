"""``bliss-ray plan``: before launch, per stage of the pipeline, the memory one worker needs, whether it fits the
cluster's accelerator, the cheapest change that makes it fit, what the run costs in GPU-hours, and for the training
stages the data-parallel layout that trains fastest.

Memory comes from ``bliss_ray.costs.memory`` (formulas there), stages from ``pipeline.plan``, FLOPs from the ledger
(``bliss_ray.costs.flops``, paper convention). Time = FLOPs × recompute factor ÷ (MFU × peak) per worker, with the MFU
measured on that device type when ``bench/RESULTS.md`` holds a GPU run of it (``bench/gpu.sh``; its training
rows by model, its bilevel and scoring rows), otherwise an assumption printed with the plan; training stages add
their communication (``costs.comms`` on the GPU type's node: bandwidths and GPUs per node in its table, or
``--gpus-per-node``).

A training stage is priced in every layout (``costs.layouts``: DDP, FSDP, HSDP × gradient sync every micro-batch
or the last), each as configured or with its fastest fit (more activation checkpointing, smaller micro-batches);
the plan prints each one's communication ÷ compute and recommends the layout of least training GPU-hours that
fits. A stage that does not fit as configured takes the fastest layout that does as its fix. Inference stages
halve their batch; the bilevel stage and MATES probes have no result-neutral knob, so the plan names the smallest
device that fits them.

    bliss-ray plan experiments/paper/pythia1b.yaml --gpu A100-40GB --gpus 16
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bliss_ray.config import GPU_KINDS, ConfigError, Experiment
from bliss_ray.costs import layouts, memory
from bliss_ray.costs.comms import INTERCONNECTS
from bliss_ray.costs.layouts import LayoutCost
from bliss_ray.costs.ledger import ledger, model_archs
from bliss_ray.costs.memory import DEVICES, GIB, Estimate, Shape
from bliss_ray.costs.throughput import RESULTS_MD, measured_mfu, rate_of
from bliss_ray.models.arch import influence_arch
from bliss_ray.pipeline import stages_of
from bliss_ray.train.precision import resolve_precision

TRAIN_KINDS = {"warmup": "warmup", "pretrain": "pretrain"}  # stage kind → its TrainConfig section
LEDGER_KIND = {
    "target pretraining": "pretrain",
    "decay branches": "pretrain",
    "proxy warm-up": "warmup",
    "bilevel optimisation": "bilevel",
    "score-model inference": "score",
    "influence-model inference": "score",
    "oracle probing": "probe",
    "influence-model training": "influence",
}


class PlanError(ConfigError):
    """The plan says the config cannot fit the cluster's accelerator; the message holds the fix."""


@dataclass
class StagePlan:
    kind: str
    count: int  # stages of this kind in the pipeline
    workers: int
    model: str
    settings: str
    estimate: Estimate
    capacity: float
    fix: dict[str, object] = field(default_factory=dict)  # dotted overrides; empty if it fits as configured
    fixed: Estimate | None = None  # the estimate with the fix
    bigger_device: str | None = None  # when no setting helps
    flops: float = 0.0
    gpu_hours: float | None = None
    mfu_note: str = ""
    note: str = ""
    time_factor: float = 1.0  # step time (with the fix) ÷ its bare compute: recompute, micro-batch, communication
    device: str = ""  # the stage kind's accelerator (resources.gpu_type_for, or the one planned for)
    layouts: list[LayoutCost] = field(default_factory=list)  # a training stage on 2+ workers: every layout's cost
    per_node: int = 1  # workers on one node (training stages)

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.capacity


@dataclass
class Plan:
    exp: Experiment
    device: str
    workers: int
    stages: list[StagePlan]
    fix: dict[str, object]  # the merged fix of every stage that does not fit

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def recommended(self) -> Recommendation | None:
        return recommend(self.stages)


@dataclass(frozen=True)
class Recommendation:
    """The layout of least training GPU-hours among those that fit every training stage."""

    layout: LayoutCost  # in the last training stage (target pretraining)
    fix: dict[str, object]  # its overrides, merged over the training stages
    gpu_hours: float  # of the training stages in it
    planned_hours: float  # of the training stages as planned (configured, or their fix)


def recommend(stages: list[StagePlan]) -> Recommendation | None:
    """``Plan.recommended``: None without a training stage on 2+ workers or a layout that fits all of them."""
    trains = [s for s in stages if s.layouts and s.gpu_hours is not None]
    best = None
    for key in dict.fromkeys(c.key for c in trains[0].layouts) if trains else ():
        picks = [next((c for c in s.layouts if c.key == key), None) for s in trains]
        if not all(c is not None and c.fits for c in picks):
            continue
        hours = sum(s.gpu_hours * c.time_factor / s.time_factor for s, c in zip(trains, picks, strict=True))
        fix = _merge([c.fix for c in picks])
        if best is None or (hours, len(fix)) < (best.gpu_hours, len(best.fix)):
            best = Recommendation(picks[-1], fix, hours, sum(s.gpu_hours for s in trains))
    return best


def _arch_name(exp: Experiment, which: str) -> str:
    return getattr(exp.models, which).arch


def _merge(fixes: list[dict]) -> dict:
    """One set of overrides from every stage's fix: ``resources`` are shared by the training stages, so the
    strongest setting wins (FSDP over HSDP over DDP, gradients reduced every micro-batch, more checkpointed layers,
    the smaller k)."""
    rank = {"ddp": 0, "hsdp": 1, "fsdp": 2, "last_micro_batch": 0, "every_micro_batch": 1}
    rank |= {"none": 0, "every_k": 1, "full": 2}
    out: dict = {}
    for fix in fixes:
        for k, v in fix.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, str):
                out[k] = v if rank.get(v, 0) > rank.get(out[k], 0) else out[k]
            else:
                out[k] = min(out[k], v)
    if out.get("resources.activation_checkpointing") == "full":
        out.pop("resources.activation_checkpointing_k", None)
    return out


def _bigger(peak: float) -> str | None:
    """The device with the least memory on which ``peak`` bytes fit, if any."""
    return next((d for d in DEVICES if d != "CPU" and peak <= memory.usable_bytes(d)), None)


def _train_stage(
    exp: Experiment, kind: str, count: int, device: str, workers: int, precision: str, per_node: int, measured: dict
) -> StagePlan:
    """A training stage: its configured shape, every layout's cost (``costs.layouts``) and, when it does not fit,
    the fastest layout that does as its fix. ``measured``: ``measured_mfu`` of the device."""
    r, section = exp.resources, TRAIN_KINDS[kind]
    target, proxy = model_archs(exp)
    arch, name = (proxy, _arch_name(exp, "proxy")) if kind == "warmup" else (target, _arch_name(exp, "target"))
    t = getattr(exp, section)
    shard = layouts.shard_size(r.parallelism, r.hsdp_shard_size, workers, per_node)
    par = r.parallelism if workers > 1 else "ddp"
    ac = (r.activation_checkpointing, r.activation_checkpointing_k)
    shape = Shape(exp.data.seq_len, t.micro_batch_seqs, workers, par, *ac, precision, shard, r.grad_sync)
    shape = dataclasses.replace(shape, global_batch_seqs=t.global_batch_seqs)
    rate, note = rate_of(kind, name, precision, device, measured)
    capacity = memory.usable_bytes(device, workers if device == "CPU" else 1)
    load = layouts.StageLoad(arch, shape, section, capacity, rate, INTERCONNECTS[device], per_node)
    chosen = layouts.cost(load, shape)
    sp = StagePlan(kind, count, workers, name, layouts.describe(shape), chosen.estimate, capacity, mfu_note=note)
    sp.per_node, costs = per_node, layouts.layout_costs(load)
    sp.layouts = costs if workers > 1 else []
    if not sp.fits and (best := layouts.fastest(costs)) is not None:
        sp.fix, sp.fixed, chosen = best.fix, best.estimate, best
        sp.settings += f" → {layouts.describe(best.shape)}"
    if chosen.shape.checkpointing != "none":
        sp.note = f"recompute ×{memory.recompute_factor(arch, chosen.shape):.2f}"
    sp.time_factor = chosen.time_factor
    return sp


def _stage(exp: Experiment, kind: str, count: int, device: str, workers: int, precision: str) -> StagePlan | None:
    r = exp.resources
    target, proxy = model_archs(exp)
    per_host = workers if device == "CPU" else 1
    capacity = memory.usable_bytes(device, per_host)
    if kind == "bilevel":
        tgt = target if exp.bilevel.gamma > 0 else None
        est = memory.bilevel_step(proxy, tgt, exp.data.seq_len, exp.bilevel.micro_batch_seqs)
        sp = StagePlan(kind, count, r.bilevel_workers, _arch_name(exp, "proxy"), "replicated, fp32", est, capacity)
        sp.note = "rough; replicated: double backward through FSDP2-sharded parameters is unverified"
        if not sp.fits:
            sp.bigger_device = _bigger(sp.estimate.peak)
        return sp
    if kind == "probe":
        shape = Shape(exp.data.seq_len, 1, 1, "replicated", "none", 2, precision)
        est = memory.train_step(target, shape)
        est.kept["checkpoint snapshot"] = 12 * memory.n_params(target)  # params + AdamW moments, restored per probe
        ref_tokens = exp.flops.reference_tokens_per_seq or exp.data.seq_len
        ref_logits = 10 * 32 * ref_tokens * target.vocab_size  # batches of 32 (stages.mates.REF_BATCH): 2 + 4 + 4 B
        est.transient = ("reference loss", max(est.transient[1], ref_logits))
        sp = StagePlan(kind, count, 1, _arch_name(exp, "target"), f"1 probe per GPU, {precision}", est, capacity)
        if not sp.fits:
            sp.bigger_device = _bigger(est.peak)
        return sp
    if kind == "influence":
        bert = influence_arch(exp.mates.influence_arch, target.vocab_size)
        shape = Shape(exp.data.seq_len, exp.mates.influence_batch_seqs, 1, "replicated", "none", 2, precision)
        est = memory.train_step(bert, shape, lm_head=False)
        return StagePlan(kind, count, 1, exp.mates.influence_arch, f"1 GPU, {precision}", est, capacity)
    if kind in ("score", "evaluate"):
        return _inference_stage(exp, kind, count, device, precision, capacity)
    return None


def _inference_stage(exp, kind, count, device, precision, capacity) -> StagePlan:
    target, proxy = model_archs(exp)
    if kind == "score":
        mates = exp.selection.method == "mates"
        arch = influence_arch(exp.mates.influence_arch, target.vocab_size) if mates else proxy
        name = exp.mates.influence_arch if mates else _arch_name(exp, "proxy") + " trunk"
        prec = "bf16-mixed" if exp.score.dtype == "bfloat16" else precision
        key, batch, head = "score.batch_seqs", exp.score.batch_seqs, False
    else:
        arch, name, head = target, _arch_name(exp, "target"), True
        prec = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(precision, "fp32")
        key, batch = "eval.batch_size", exp.eval.batch_size
    est_at = lambda b: memory.inference_step(arch, exp.data.seq_len, b, prec, head)  # noqa: E731
    sp = StagePlan(kind, count, 1, name, f"batch {batch}, {prec}", est_at(batch), capacity)
    if not sp.fits:
        b = batch
        while b > 1 and est_at(b).peak > capacity:
            b //= 2
        if est_at(b).peak <= capacity:
            sp.fix, sp.fixed = {key: b}, est_at(b)
            sp.settings += f" → batch {b}"
        else:
            sp.bigger_device = _bigger(est_at(1).peak)
    return sp


def stage_devices(exp: Experiment, device: str | None = None) -> dict[str, str]:
    """Each GPU stage kind of ``exp``'s plan → the accelerator it runs on: ``device`` for all when given, else
    ``resources.gpu_type_for(kind)``. Raises ``ConfigError`` when a stage has none, or an unknown one."""
    kinds = dict.fromkeys(st.kind for st in stages_of(exp) if st.kind in GPU_KINDS)
    devices = {kind: device or exp.resources.gpu_type_for(kind) for kind in kinds}
    if missing := [k for k, d in devices.items() if d is None]:
        raise ConfigError(f"no device to plan {', '.join(missing)} for: pass --gpu TYPE or set resources.gpu_type")
    if unknown := sorted({d for d in devices.values() if d not in DEVICES}):
        raise ConfigError(f"unknown device {unknown}; choose from {', '.join(DEVICES)}")
    return devices


def plan_experiment(
    exp: Experiment,
    device: str | None = None,
    workers: int | None = None,
    results_md: Path = RESULTS_MD,
    gpus_per_node: int | None = None,
) -> Plan:
    """The plan of every stage kind of ``exp`` on ``workers`` (default ``resources.train_workers``), each kind on
    its accelerator (``stage_devices``: ``device`` for all when given), ``gpus_per_node`` of it on a node (default:
    its node type's, ``comms.INTERCONNECTS``; CPU: every worker on one host)."""
    devices = stage_devices(exp, device)
    workers = workers or exp.resources.train_workers
    counts: dict[str, int] = {}
    for st in stages_of(exp):
        counts[st.kind] = counts.get(st.kind, 0) + 1
    flops: dict[str, float] = {}
    for row in ledger(exp):
        flops[LEDGER_KIND[row.stage]] = flops.get(LEDGER_KIND[row.stage], 0.0) + row.flops
    stages = []
    for kind, count in counts.items():
        on = devices.get(kind, next(iter(devices.values()), "CPU"))
        precision = resolve_precision(exp.resources.precision, "cpu" if on == "CPU" else "cuda")
        if kind in TRAIN_KINDS:
            per_node = gpus_per_node or INTERCONNECTS[on].gpus_per_node or workers
            sp = _train_stage(exp, kind, count, on, workers, precision, per_node, measured_mfu(on, results_md))
        else:
            sp = _stage(exp, kind, count, on, workers, precision)
        if sp is None:
            continue
        sp.device = on
        if kind in flops:
            rate, sp.mfu_note = rate_of(kind, sp.model.split()[0], precision, on, measured_mfu(on, results_md))
            sp.flops = flops[kind]
            sp.gpu_hours = flops[kind] * sp.time_factor / rate / 3600
        stages.append(sp)
    main = device or exp.resources.gpu_type or next(iter(devices.values()), "CPU")
    return Plan(exp, main, workers, stages, _merge([s.fix for s in stages if not s.fits]))


def fix_flags(fix: dict) -> str:
    return " ".join(f"--set {k}={v}" for k, v in fix.items())


def stage_label(s: StagePlan, p: Plan) -> str:
    """A stage kind, with its device when that is not the plan's."""
    return s.kind if s.device == p.device else f"{s.kind} on {s.device}"


def bigger_flag(s: StagePlan) -> str:
    """The cheapest fix of a stage no setting fits: that stage kind alone on the smallest device that holds it."""
    return f"--set resources.gpu_types.{s.kind}={s.bigger_device}"


def check_fits(exp: Experiment, device: str | None = None, arm: str = "") -> None:
    """Raise ``PlanError`` with the cheapest fix when the plan says ``exp`` cannot fit its accelerators (``device``
    for every stage when given); ``arm`` names the sweep point or comparison variant in the message."""
    p = plan_experiment(exp, device)
    if p.fits:
        return
    bad = [s for s in p.stages if not s.fits]
    parts = [f"{stage_label(s, p)} needs {s.estimate.peak / GIB:.1f} GiB per worker" for s in bad]
    where = f"{arm}: " if arm else ""
    msg = f"{where}the memory plan does not fit {p.device} ({bad[0].capacity / GIB:.1f} GiB usable): " + "; ".join(
        parts
    )
    if p.fix:
        msg += f"\n  fix: {fix_flags(p.fix)}"
    for s in bad:
        if s.bigger_device and not s.fix:
            msg += f"\n  no setting fits {s.kind}; it needs at least {s.bigger_device}: {bigger_flag(s)}"
    raise PlanError(msg + "\n  (`bliss-ray plan` shows the whole plan; `--no-plan-check` runs anyway)")


def plan_arms(arms: dict[str, Experiment], device: str | None = None) -> dict[str, Plan]:
    """The plan of every arm of a sweep or comparison (name → experiment), each stage on its accelerator (an arm
    that names none: on CPU, as the embedded Ray runs it)."""
    named = lambda e: e.resources.gpu_type or e.resources.gpu_types  # noqa: E731
    return {name: plan_experiment(exp, device or (None if named(exp) else "CPU")) for name, exp in arms.items()}


def check_arms(arms: dict[str, Experiment], device: str | None = None) -> None:
    """Raise ``PlanError`` naming the first arm, stage and cheapest fix that do not fit, before anything starts."""
    for name, exp in arms.items():
        check_fits(exp, device, arm=name)
