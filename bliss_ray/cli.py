"""The ``bliss-ray`` command.

bliss-ray run CONFIG [--set dotted.key=value ...] [--stage NAME] [--out DIR]   # the pipeline (local Ray)
bliss-ray validate CONFIG [--set ...]                                          # check a config, no compute
bliss-ray flops CONFIG [--set ...]                                             # the FLOPs ledger (Table 1)
bliss-ray report RUN_DIR [RUN_DIR ...] --out DIR                               # tables and figures
bliss-ray sweep SWEEP.yaml [--storage URI] [--out DIR]                          # a Ray Tune sweep
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bliss_ray.config import ConfigError, load_experiment


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


def cmd_run(args) -> int:
    from bliss_ray.pipeline import Run

    exp = load_experiment(args.config, args.set)
    _offline_unless_hub_needed(exp)
    results = Run(exp, Path(args.out)).execute(until=args.stage)
    report = results.get("report", {}).get("report")
    print(f"\nrun directory: {Path(args.out) / exp.name}" + (f"\nreport: {report}" if report else ""))
    return 0


def cmd_validate(args) -> int:
    from bliss_ray.pipeline import plan

    exp = load_experiment(args.config, args.set)
    print(f"{args.config}: valid; stages: {', '.join(s.key for s in plan(exp))}")
    return 0


def cmd_flops(args) -> int:
    from bliss_ray.flops import format_ledger, ledger

    exp = load_experiment(args.config, args.set)
    print(format_ledger(ledger(exp, convention=args.convention), convention=args.convention))
    return 0


def cmd_report(args) -> int:
    from bliss_ray.report.build import build_report

    path = build_report([Path(p) for p in args.run_dirs], Path(args.out))
    print(f"report: {path}")
    return 0


def cmd_sweep(args) -> int:
    from bliss_ray.sweep import SweepFailed, load_sweep, run_sweep

    sweep = load_sweep(args.sweep)  # the whole sweep is validated before Ray starts
    _offline_unless_hub_needed(sweep.base)
    try:
        result = run_sweep(Path(args.sweep), storage=args.storage, out=Path(args.out))
    except SweepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep results: {result}\nreport: bliss-ray report {Path(args.out) / sweep.spec.name} --out DIR")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bliss-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="experiment YAML (see experiments/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
        return p

    p = with_config(sub.add_parser("run", help="run the pipeline"))
    p.add_argument("--stage", help="stop after this stage (a key like r1.bilevel, or a kind like tokenize)")
    p.add_argument("--out", default="runs", help="root of run directories (default: runs/)")
    p.set_defaults(fn=cmd_run)
    with_config(sub.add_parser("validate", help="validate a config")).set_defaults(fn=cmd_validate)
    p = with_config(sub.add_parser("flops", help="print the FLOPs ledger of a config"))
    p.add_argument("--convention", choices=["paper", "6nd"], default="paper")
    p.set_defaults(fn=cmd_flops)
    p = sub.add_parser("report", help="tables and figures from run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("sweep", help="run (or resume) a Ray Tune sweep")
    p.add_argument("sweep")
    p.add_argument("--storage", help="Tune storage path (local dir or s3://, gs://); default runs/sweeps")
    p.add_argument("--out", default="runs", help="root for the trials' run directories")
    p.set_defaults(fn=cmd_sweep)

    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
