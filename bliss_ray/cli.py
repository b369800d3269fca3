"""The ``bliss-ray`` command.

bliss-ray run CONFIG [--set dotted.key=value ...] [--stage NAME] [--out DIR]   # the pipeline (local Ray)
bliss-ray status RUN_DIR [--watch]                                             # where a run stands
bliss-ray validate CONFIG [--set ...]                                          # check a config, no compute
bliss-ray flops CONFIG [--convention paper|6nd|rebuttal] [--set ...]           # the FLOPs ledger (Table 1)
bliss-ray plan CONFIG [--gpu TYPE] [--gpus N] [--gpus-per-node N] [--set ...]  # memory, GPU-hours, layouts
bliss-ray report RUN_DIR [RUN_DIR ...] --out DIR                               # tables and figures
bliss-ray sweep SWEEP.yaml [--out DIR|URI] [--storage URI] [--results-so-far]   # a Ray Tune sweep
bliss-ray compare COMPARE.yaml [--out DIR] [--seeds 0,1] [--report FILE.md]     # methods × seeds, Table 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bliss_ray import storage
from bliss_ray.config import GPU_TYPES, ConfigError, load_experiment, parse_overrides
from bliss_ray.costs.ledger import format_ledger, ledger
from bliss_ray.costs.memory import device_of
from bliss_ray.costs.plan_format import format_arms, format_plan
from bliss_ray.costs.planner import check_fits, plan_arms, plan_experiment
from bliss_ray.costs.rebuttal import format_rebuttal
from bliss_ray.pipeline import stages_of
from bliss_ray.watch.status import show


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _offline_unless_hub_needed(exp) -> None:
    """No hub traffic by accident: offline unless the experiment names a hub tokenizer (clusters)."""
    name = exp.tokenizer.name_or_path
    wants_hub = exp.tokenizer.kind == "pretrained" and name and not Path(name).exists()
    if not wants_hub and os.environ.get("BLISS_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _check_plan(exp, arm: str = "") -> None:
    """Refuse, before any compute, a config whose memory plan does not fit its accelerators: the ones
    ``resources.gpu_type`` and ``gpu_types`` name, else the local GPU of an embedded Ray; unknown (a cluster without
    a named type) is not checked. ``arm``: the sweep point or comparison variant, named in the refusal."""
    res, device = exp.resources, None
    if res.gpu_type is None and not res.gpu_types:
        local = res.ray_address in (None, "local") and not os.environ.get("RAY_ADDRESS")
        if not local or res.use_gpu is False:
            return
        import torch

        if not torch.cuda.is_available():
            return
        device = device_of(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory)
        if device is None:
            return
    check_fits(exp, device, arm)


def _check_arms(arms: dict, args) -> int | None:
    """``--plan``: print every arm's fit and return the exit code (0: all fit); else refuse what cannot fit (unless
    ``--no-plan-check``) and return None to go on. An arm that names no accelerator is planned on CPU."""
    if args.plan:
        plans = plan_arms(arms)
        print(format_arms(plans))
        return 0 if all(p.fits for p in plans.values()) else 1
    if not args.no_plan_check:
        for name, exp in arms.items():
            _check_plan(exp, arm=name)
    return None


def cmd_plan(args) -> int:
    exp = load_experiment(args.config, args.set)
    print(format_plan(plan_experiment(exp, args.gpu, args.gpus, gpus_per_node=args.gpus_per_node)))
    return 0


def cmd_run(args) -> int:
    exp = load_experiment(args.config, args.set)
    _offline_unless_hub_needed(exp)
    if not args.no_plan_check:
        _check_plan(exp)
    storage.check_writable(args.out)  # an unreachable or read-only store fails here, before any compute
    from bliss_ray.stages.executor import run_experiment  # lazy: Ray, torch

    return run_experiment(exp, args.out, until=args.stage, verbose=args.verbose)[0]


def cmd_status(args) -> int:
    try:
        exp = load_experiment(args.config, args.set) if args.config else None
        return show(args.run_dir, watch=args.watch, every_s=args.every, exp=exp)  # a path or a store URI
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_validate(args) -> int:
    exp = load_experiment(args.config, args.set)
    print(f"{args.config}: valid; stages: {', '.join(s.key for s in stages_of(exp))}")
    return 0


def cmd_flops(args) -> int:
    exp = load_experiment(args.config, args.set)
    if args.convention == "rebuttal":  # the rebuttal's own rows and assumptions, not what the pipeline computes
        print(format_rebuttal(exp))
        return 0
    print(format_ledger(ledger(exp, convention=args.convention), convention=args.convention))
    return 0


def cmd_report(args) -> int:
    from bliss_ray.report.build import build_report  # lazy: torch, matplotlib
    from bliss_ray.report.collect import local_view  # lazy: torch
    from bliss_ray.studies.sweep_report import build_sweep_report, is_sweep_dir  # lazy: matplotlib

    roots = [local_view(r) for r in args.run_dirs]  # local paths or store URIs
    sweeps = [r for r in roots if is_sweep_dir(r)]  # `bliss-ray sweep` outputs: ablation tables, not pipeline runs
    path = build_sweep_report(sweeps, Path(args.out)) if sweeps else build_report(roots, Path(args.out))
    print(f"report: {path}")
    return 0


def cmd_sweep(args) -> int:
    from bliss_ray.studies.sweep import SweepFailed, load_sweep, run_sweep  # lazy: Ray Tune, torch

    sweep = load_sweep(args.sweep, parse_overrides(args.set))  # every point validated before Ray starts
    if (code := _check_arms(sweep.arms(), args)) is not None:
        return code
    for loc in (args.out, args.storage):  # an unreachable or read-only store fails here, naming the URI
        if loc:
            storage.check_writable(loc)
    _offline_unless_hub_needed(sweep.base)
    try:
        result = run_sweep(sweep, args.storage, args.out, so_far=args.results_so_far, verbose=args.verbose)
    except SweepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep results: {result}\nreport: bliss-ray report {storage.join(args.out, sweep.spec.name)} --out DIR")
    return 0


def cmd_compare(args) -> int:
    from bliss_ray.studies.compare import publish_report, run_compare  # lazy: Ray, torch
    from bliss_ray.studies.compare_spec import load_compare  # lazy: with the line above

    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    spec = load_compare(args.compare, seeds, parse_overrides(args.set))  # every variant × seed validated
    if (code := _check_arms(spec.arms(), args)) is not None:
        return code
    storage.check_writable(args.out)
    _offline_unless_hub_needed(spec.experiment(spec.baseline, spec.seeds[0]))
    try:
        members = run_compare(spec, args.out, verbose=args.verbose)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    command = " ".join(["bliss-ray compare", args.compare] + (["--seeds", args.seeds] if args.seeds else []))
    command += "".join(f" --set {item}" for item in args.set)
    report = args.report or storage.join(args.out, spec.name, "compare", "report.md")
    print(f"report: {publish_report(spec, members, report, command, args.out)}")
    return 0


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a subcommand the experiment YAML argument and its repeatable ``--set`` overrides."""
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    return p


def _add_run_commands(sub) -> None:
    """The subcommands about one experiment config or run: run, status, validate, flops, plan."""
    p = _with_config(sub.add_parser("run", help="run the pipeline"))
    p.add_argument("--stage", help="stop after this stage (a key like r1.bilevel, or a kind like tokenize)")
    p.add_argument("--out", default="runs", help="root of run directories (default: runs/)")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's own output on screen too, not only in the log")
    p.add_argument("--no-plan-check", action="store_true", help="run even if the memory plan says it cannot fit")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("status", help="every stage of a run: done / running / interrupted / failed / pending")
    p.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--every", type=float, default=5.0, help="seconds between refreshes with --watch")
    p.add_argument("--config", help="the plan of this config, not of the experiment launched last in RUN_DIR")
    p.add_argument("--set", action="append", default=[], help="override with --config: key=value (repeatable)")
    p.set_defaults(fn=cmd_status)
    _with_config(sub.add_parser("validate", help="validate a config")).set_defaults(fn=cmd_validate)
    p = _with_config(sub.add_parser("flops", help="print the FLOPs ledger of a config"))
    p.add_argument("--convention", choices=["paper", "6nd", "rebuttal"], default="paper")
    p.set_defaults(fn=cmd_flops)
    p = _with_config(sub.add_parser("plan", help="per-stage memory, fit and GPU-hours on a device type"))
    p.add_argument("--gpu", choices=GPU_TYPES, help="device type (default: resources.gpu_type)")
    p.add_argument("--gpus", type=int, help="training workers (default: resources.train_workers)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs on one node (default: the GPU type's node, costs/comms.py)")
    p.set_defaults(fn=cmd_plan)


def _with_arm_checks(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--set`` for every arm, and the memory plan of every arm before anything starts."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base experiment")
    p.add_argument("--plan", action="store_true", help="run nothing: print every arm's memory fit on its GPU type")
    p.add_argument("--no-plan-check", action="store_true", help="start even if an arm's memory plan does not fit")
    return p


def _add_study_commands(sub) -> None:
    """The subcommands over several runs: report, sweep, compare."""
    p = sub.add_parser("report", help="tables and figures from run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("sweep", help="run (or resume) a Ray Tune sweep")
    p.add_argument("sweep")
    p.add_argument("--storage", help="Tune storage path (local dir or s3://, gs://); default runs/sweeps")
    p.add_argument(
        "--out",
        default="runs",
        help="root for the trials' run directories: a local path or s3://, gs:// (default: runs/)",
    )
    p.add_argument(
        "--results-so-far",
        action="store_true",
        help="run nothing: write the results of the trials the sweep has now (it may be running or stopped)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Tune's and Ray's own output on screen too")
    _with_arm_checks(p).set_defaults(fn=cmd_sweep)
    p = sub.add_parser("compare", help="variants × seeds of a method comparison, then Table 4 and Figure 3")
    p.add_argument("compare", help="comparison YAML (see experiments/compare/)")
    p.add_argument("--out", default="runs", help="root of run directories (default: runs/)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the file's")
    p.add_argument("--report", help="where the report goes (default: <out>/<name>/compare/report.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's own output on screen too")
    _with_arm_checks(p).set_defaults(fn=cmd_compare)


def _parser() -> argparse.ArgumentParser:
    """The ``bliss-ray`` argument parser: one subcommand per ``cmd_*`` function, in the order ``--help`` lists."""
    parser = argparse.ArgumentParser(prog="bliss-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except (ConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
