"""``bliss-ray plan``: before launch, per stage of the pipeline, the memory one worker needs, whether it fits the
cluster's accelerator, the cheapest change that makes it fit, and what the run costs in GPU-hours.

Memory comes from ``bliss_ray.costs.memory`` (formulas there), stages from ``pipeline.plan``, FLOPs from the ledger
(``bliss_ray.costs.flops``, paper convention). Time = FLOPs × recompute factor ÷ (MFU × peak) per worker, with the MFU
measured on that device type when ``bench/RESULTS.md`` holds a GPU run of it (``bench/gpu.sh``; its training
rows by model, its bilevel and scoring rows), otherwise an assumption printed with the plan.

The cheapest fix of a training stage searches FSDP, activation checkpointing (every 4th, every 2nd, every block)
and smaller micro-batches with more accumulation, for the least estimated step time: recompute costs what the
ledger says, FSDP an assumed 3 % of un-overlapped communication, and a halving of the micro-batch under 8192
tokens an assumed 5 % of MFU. Inference stages halve their batch; the bilevel stage and MATES probes have no
result-neutral knob, so the plan names the smallest device that fits them.

    bliss-ray plan experiments/paper/pythia1b.yaml --gpu A10G-24GB --gpus 8
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from bliss_ray.config import GPU_KINDS, ConfigError, Experiment
from bliss_ray.costs import memory
from bliss_ray.costs.ledger import ledger, model_archs
from bliss_ray.costs.memory import DEVICES, GIB, Estimate, Shape
from bliss_ray.costs.throughput import RESULTS_MD, measured_mfu, rate_of
from bliss_ray.models.arch import LMArch, influence_arch
from bliss_ray.pipeline import stages_of
from bliss_ray.train.precision import resolve_precision

FSDP_COST, MICRO_HALVING_COST, FULL_MICRO_TOKENS = 1.03, 1.05, 8192
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
    time_factor: float = 1.0  # step time with the fix ÷ as configured (recompute, FSDP, micro-batch)
    device: str = ""  # the stage kind's accelerator (resources.gpu_type_for, or the one planned for)

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


def _arch_name(exp: Experiment, which: str) -> str:
    return getattr(exp.models, which).arch


def _train_shape(exp: Experiment, section: str, workers: int, precision: str, **change) -> Shape:
    r, t = exp.resources, getattr(exp, section)
    shape = Shape(
        exp.data.seq_len,
        t.micro_batch_seqs,
        workers,
        r.parallelism if workers > 1 else "ddp",
        r.activation_checkpointing,
        r.activation_checkpointing_k,
        precision,
    )
    return dataclasses.replace(shape, **change)


def _describe(shape: Shape, global_batch: int) -> str:
    ac = {"none": "no AC", "full": "AC full"}.get(shape.checkpointing, f"AC every {shape.checkpointing_k}")
    accumulation = global_batch // (shape.micro_batch_seqs * shape.workers)
    return f"{shape.parallelism}, {ac}, {shape.precision}, micro {shape.micro_batch_seqs} × {accumulation} acc"


def _cost(arch: LMArch, shape: Shape, configured_micro: int) -> float:
    halvings = lambda m: max(0.0, math.log2(FULL_MICRO_TOKENS / (m * shape.seq_len)))  # noqa: E731
    micro = MICRO_HALVING_COST ** (halvings(shape.micro_batch_seqs) - halvings(configured_micro))
    return memory.recompute_factor(arch, shape) * (FSDP_COST if shape.parallelism == "fsdp" else 1.0) * micro


def _train_fix(arch: LMArch, shape: Shape, section: str, capacity: float) -> tuple[dict, Estimate | None, Shape]:
    """The cheapest (parallelism, checkpointing, micro-batch) that fits, as dotted overrides."""
    plans = [shape.parallelism] + (["fsdp"] if shape.parallelism == "ddp" and shape.workers > 1 else [])
    now = memory.checkpointed_layers(arch.n_layer, shape.checkpointing, shape.checkpointing_k)
    ladder = [(shape.checkpointing, shape.checkpointing_k), ("every_k", 4), ("every_k", 2), ("full", 2)]
    acs = [(m, k) for m, k in ladder if memory.checkpointed_layers(arch.n_layer, m, k) >= now]
    micros = [m for m in range(shape.micro_batch_seqs, 0, -1) if shape.micro_batch_seqs % m == 0]
    best = None
    for par, (mode, k), m in itertools.product(plans, acs, micros):
        cand = dataclasses.replace(shape, parallelism=par, checkpointing=mode, checkpointing_k=k, micro_batch_seqs=m)
        est = memory.train_step(arch, cand)
        if est.peak > capacity:
            continue
        fix = {"resources.parallelism": par} if par != shape.parallelism else {}
        if (mode, k) != (shape.checkpointing, shape.checkpointing_k):
            fix["resources.activation_checkpointing"] = mode
            if mode == "every_k":
                fix["resources.activation_checkpointing_k"] = k
        if m != shape.micro_batch_seqs:
            fix[f"{section}.micro_batch_seqs"] = m
        key = (_cost(arch, cand, shape.micro_batch_seqs), len(fix))
        if best is None or key < best[0]:
            best = (key, fix, est, cand)
    return (best[1], best[2], best[3]) if best else ({}, None, shape)


def _merge(fixes: list[dict]) -> dict:
    """One set of overrides from every stage's fix: ``resources`` are shared by the training stages, so the
    strongest setting wins (FSDP over DDP, more checkpointed layers, the smaller k)."""
    rank = {"ddp": 0, "fsdp": 1, "none": 0, "every_k": 1, "full": 2}
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


def _stage(exp: Experiment, kind: str, count: int, device: str, workers: int, precision: str) -> StagePlan | None:
    r = exp.resources
    target, proxy = model_archs(exp)
    per_host = workers if device == "CPU" else 1
    capacity = memory.usable_bytes(device, per_host)
    if kind in TRAIN_KINDS:
        section = TRAIN_KINDS[kind]
        arch, name = (proxy, _arch_name(exp, "proxy")) if kind == "warmup" else (target, _arch_name(exp, "target"))
        shape = _train_shape(exp, section, workers, precision)
        gb = getattr(exp, section).global_batch_seqs
        sp = StagePlan(kind, count, workers, name, _describe(shape, gb), memory.train_step(arch, shape), capacity)
        if not sp.fits:
            sp.fix, sp.fixed, fixed_shape = _train_fix(arch, shape, section, capacity)
            if sp.fixed is not None:
                sp.settings += f" → {_describe(fixed_shape, gb)}"
            shape = fixed_shape
        sp.note = f"recompute ×{memory.recompute_factor(arch, shape):.2f}" if shape.checkpointing != "none" else ""
        sp.time_factor = _cost(arch, shape, getattr(exp, section).micro_batch_seqs)
        return sp
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
    exp: Experiment, device: str | None = None, workers: int | None = None, results_md: Path = RESULTS_MD
) -> Plan:
    """The plan of every stage kind of ``exp`` on ``workers`` (default ``resources.train_workers``), each kind on
    its accelerator (``stage_devices``: ``device`` for all when given)."""
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


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.2g}"


def _label(s: StagePlan, p: Plan) -> str:
    return s.kind if s.device == p.device else f"{s.kind} on {s.device}"


def _bigger_flag(s: StagePlan) -> str:
    """The cheapest fix of a stage no setting fits: that stage kind alone on the smallest device that holds it."""
    return f"--set resources.gpu_types.{s.kind}={s.bigger_device}"


def _misfit_lines(p: Plan) -> list[str]:
    """What does not fit, each stage's need, and the merged fix."""
    if p.fits:
        return []
    lines = ["", f"does not fit on {p.device}:"]
    for s in p.stages:
        if not s.fits:
            need, usable = s.estimate.peak / GIB, s.capacity / GIB
            lines.append(f"  {_label(s, p)}: needs {need:.1f} GiB per worker, {usable:.1f} usable")
            if s.bigger_device and not s.fix:
                lines.append(f"    no setting makes it fit; the smallest device that does: {_bigger_flag(s)}")
    if p.fix:
        lines.append(f"fix: {fix_flags(p.fix)}")
    return lines


def format_plan(p: Plan) -> str:
    d = DEVICES[p.device]
    unit = "CPU-hours" if p.device == "CPU" else "GPU-hours"
    cap = p.stages[0].capacity / GIB if p.stages else 0.0
    head = f"Plan for {p.exp.name} on {p.workers} × {p.device}: {cap:.1f} GiB usable per worker" + (
        f" ({d.memory_gib} GiB less {memory.RESERVED_GIB} GiB reserved and {memory.ALLOCATOR_HEADROOM:.0%} "
        "allocator headroom)"
        if d.memory_gib
        else " (host RAM ÷ workers, less headroom)"
    )
    lines = [
        head,
        "",
        f"| stage | × | workers | model | settings | GiB/worker | fits | {unit} | throughput |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in p.stages:
        gib = f"{s.estimate.peak / GIB:.1f}" + (f" → {s.fixed.peak / GIB:.1f}" if s.fixed else "")
        fits = "yes" if s.fits else ("no → fix" if s.fixed else "**no**")
        hours = "—" if s.gpu_hours is None else _hours(s.gpu_hours)
        lines.append(
            f"| {_label(s, p)} | {s.count} | {s.workers} | {s.model} | {s.settings} | {gib} | {fits} | {hours} | "
            f"{s.mfu_note or '—'} |"
        )
    total = sum(s.gpu_hours or 0.0 for s in p.stages)
    lines += ["", f"total: {_hours(total)} {unit} (evaluation not counted: lm-eval's FLOPs are not in the ledger)"]
    for s in p.stages:
        detail = s.estimate.describe() + (f" — {s.note}" if s.note else "")
        lines.append(f"- {s.kind}: {detail}")
    lines += _misfit_lines(p)
    return "\n".join(lines)


def check_fits(exp: Experiment, device: str | None = None, arm: str = "") -> None:
    """Raise ``PlanError`` with the cheapest fix when the plan says ``exp`` cannot fit its accelerators (``device``
    for every stage when given); ``arm`` names the sweep point or comparison variant in the message."""
    p = plan_experiment(exp, device)
    if p.fits:
        return
    bad = [s for s in p.stages if not s.fits]
    parts = [f"{_label(s, p)} needs {s.estimate.peak / GIB:.1f} GiB per worker" for s in bad]
    where = f"{arm}: " if arm else ""
    msg = f"{where}the memory plan does not fit {p.device} ({bad[0].capacity / GIB:.1f} GiB usable): " + "; ".join(
        parts
    )
    if p.fix:
        msg += f"\n  fix: {fix_flags(p.fix)}"
    for s in bad:
        if s.bigger_device and not s.fix:
            msg += f"\n  no setting fits {s.kind}; it needs at least {s.bigger_device}: {_bigger_flag(s)}"
    raise PlanError(msg + "\n  (`bliss-ray plan` shows the whole plan; `--no-plan-check` runs anyway)")


def plan_arms(arms: dict[str, Experiment], device: str | None = None) -> dict[str, Plan]:
    """The plan of every arm of a sweep or comparison (name → experiment), each stage on its accelerator (an arm
    that names none: on CPU, as the embedded Ray runs it)."""
    named = lambda e: e.resources.gpu_type or e.resources.gpu_types  # noqa: E731
    return {name: plan_experiment(exp, device or (None if named(exp) else "CPU")) for name, exp in arms.items()}


def format_arms(plans: dict[str, Plan]) -> str:
    """One line per arm × GPU stage: its accelerator, the memory it needs, whether it fits; then the fixes."""
    lines = ["| arm | stage | device | GiB/worker | usable | fits |", "|---|---|---|---|---|---|"]
    for name, p in plans.items():
        for s in p.stages:
            fits = "yes" if s.fits else "**no**"
            lines.append(
                f"| {name} | {s.kind} | {s.device} | {s.estimate.peak / GIB:.1f} | {s.capacity / GIB:.1f} | {fits} |"
            )
    bad = {name: p for name, p in plans.items() if not p.fits}
    lines += ["", f"{len(plans) - len(bad)} of {len(plans)} arms fit."]
    for name, p in bad.items():
        cheapest = fix_flags(p.fix) or "; ".join(_bigger_flag(s) for s in p.stages if not s.fits and s.bigger_device)
        lines.append(f"- {name} does not fit; cheapest fix: {cheapest or 'none found'}")
    return "\n".join(lines)


def check_arms(arms: dict[str, Experiment], device: str | None = None) -> None:
    """Raise ``PlanError`` naming the first arm, stage and cheapest fix that do not fit, before anything starts."""
    for name, exp in arms.items():
        check_fits(exp, device, arm=name)
