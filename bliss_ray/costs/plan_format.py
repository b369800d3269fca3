"""What ``bliss-ray plan`` prints (``costs.planner`` computes it): per stage its memory, fit and GPU-hours; for the
training stages every data-parallel layout's memory, communication per step and communication ÷ compute, and the
recommended layout; what does not fit, with the fix. ``format_arms``: the fit of every arm of a sweep or
comparison.

    print(format_plan(plan_experiment(exp, "A100-40GB", 16)))
"""

from __future__ import annotations

from bliss_ray.costs import memory
from bliss_ray.costs.comms import INTERCONNECTS
from bliss_ray.costs.layouts import LayoutCost, label, steps_of
from bliss_ray.costs.memory import DEVICES, GIB
from bliss_ray.costs.planner import Plan, StagePlan, bigger_flag, fix_flags, stage_label

SYNC = {"every_micro_batch": "every micro-batch", "last_micro_batch": "last micro-batch"}


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.2g}"


def _misfit_lines(p: Plan) -> list[str]:
    """What does not fit, each stage's need, and the merged fix."""
    if p.fits:
        return []
    lines = ["", f"does not fit on {p.device}:"]
    for s in p.stages:
        if not s.fits:
            need, usable = s.estimate.peak / GIB, s.capacity / GIB
            lines.append(f"  {stage_label(s, p)}: needs {need:.1f} GiB per worker, {usable:.1f} usable")
            if s.bigger_device and not s.fix:
                lines.append(f"    no setting makes it fit; the smallest device that does: {bigger_flag(s)}")
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
            f"| {stage_label(s, p)} | {s.count} | {s.workers} | {s.model} | {s.settings} | {gib} | {fits} | {hours} | "
            f"{s.mfu_note or '—'} |"
        )
    total = sum(s.gpu_hours or 0.0 for s in p.stages)
    lines += ["", f"total: {_hours(total)} {unit} (evaluation not counted: lm-eval's FLOPs are not in the ledger)"]
    for s in p.stages:
        detail = s.estimate.describe() + (f" — {s.note}" if s.note else "")
        lines.append(f"- {s.kind}: {detail}")
    lines += _layout_lines(p) + _misfit_lines(p)
    return "\n".join(lines)


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
        cheapest = fix_flags(p.fix) or "; ".join(bigger_flag(s) for s in p.stages if not s.fits and s.bigger_device)
        lines.append(f"- {name} does not fit; cheapest fix: {cheapest or 'none found'}")
    return "\n".join(lines)


def _link_note(s: StagePlan) -> str:
    """The node a training stage's communication is priced on."""
    link = INTERCONNECTS[s.device]
    where = "one host" if link.gpus_per_node is None else link.node
    intra, network = link.intra_bytes_per_s / 1e9, link.network_bytes_per_s / 1e9
    return (
        f"{s.workers} × {s.device}, {s.per_node} per node ({where}): {link.link} {intra:g} GB/s per worker, "
        f"{network:g} GB/s per node between nodes, each way"
    )


def _layout_row(s: StagePlan, c: LayoutCost) -> str:
    configured = not ({"resources.parallelism", "resources.grad_sync"} & c.fix.keys())
    name = label(c.shape) + (" (configured)" if configured else "")
    fits = "yes" if c.fits else "**no**"
    return (
        f"| {s.kind} | {name} | {SYNC[c.key[1]]} | {steps_of(c.shape)} | {c.estimate.peak / GIB:.1f} | {fits} | "
        f"{c.comm.bytes / 1e9:.2f} | {c.comm.seconds:.3g} | {c.compute_s:.3g} | {c.comm.seconds / c.compute_s:.2f} |"
    )


def _layout_lines(p: Plan) -> list[str]:
    """Every layout of the training stages on 2+ workers, and the recommended one."""
    trains = [s for s in p.stages if s.layouts]
    if not trains:
        return []
    links = "; ".join(dict.fromkeys(_link_note(s) for s in trains))
    lines = [
        "",
        f"Layouts of the training stages, per optimizer step and worker; communication priced on {links} "
        "(assumed; nothing overlapped: an upper bound):",
        "",
        "| stage | layout | grad sync | settings | GiB/worker | fits | GB sent | comm s | compute s "
        "| comm ÷ compute |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_layout_row(s, c) for s in trains for c in s.layouts]
    rec = p.recommended
    if rec is None:
        return [*lines, "", "recommended layout: none fits every training stage"]
    c, unit = rec.layout, "CPU-hours" if p.device == "CPU" else "GPU-hours"
    what = f"{label(c.shape)}, gradients reduced on the {SYNC[c.key[1]]}"
    if not rec.fix:
        return [*lines, "", f"recommended layout: as configured ({what}), {_hours(rec.gpu_hours)} training {unit}"]
    hours = f"{_hours(rec.gpu_hours)} training {unit} (as planned: {_hours(rec.planned_hours)})"
    return [*lines, "", f"recommended layout: {what}, {hours}: {fix_flags(rec.fix)}"]
