"""Run every CPU benchmark (``make bench``) and rewrite bench/RESULTS.md with the numbers of THIS run.

Runs, each in its own process (its own Ray instance, thread pools and peak RSS), in this order:
train_overhead.py, hypergrad.py, score_throughput.py, mfu.py, scaling.py — each prints one line per ratio and
writes ``bench/out/<name>.json``. RESULTS.md then gets a summary table (ratio, goal, verdict), the machine
(cores, CPU model, GPU or none, load average), the date, and per benchmark the exact command and its printed
lines. The GPU section (filled by ``bench/gpu.sh`` on a GPU machine), the soak section (``bench/soak.py
--results-md bench/RESULTS.md``), the object-store and console sections (``bench/object_store.py``,
``bench/console_latency.py``, each ``--results-md …``) are kept
as they are, or say that they were not run.

Budget: < 15 min on 2 quiet cores. On a machine shared with other users, wall times stretch; the ratios are
still measured against same-run, interleaved baselines.

    .venv/bin/python bench/run_all.py            # what `make bench` runs
    .venv/bin/python bench/run_all.py --quick    # every benchmark's --quick smoke run (RESULTS.md untouched)
    .venv/bin/python bench/run_all.py --only hypergrad mfu   # rewrites those two; RESULTS.md keeps the others
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import _common
from _common import OUT, REPO, get_section

RESULTS = REPO / "bench" / "RESULTS.md"
BENCHES = {  # name → (title, extra arguments of the full run)
    "train_overhead": ("Ray Train stage vs bare PyTorch loop", []),
    "hypergrad": ("Batched vs per-sample c_i; outer step vs plain step", []),
    "score_throughput": ("Ray Data scoring vs bare PyTorch loop", []),
    "mfu": ("Model FLOPs utilisation", []),
    "scaling": ("Data-path scaling and driver memory", []),
}


def headlines(name: str, r: dict) -> list[tuple[str, float, str, bool | None]]:
    """(measurement, value, goal, met?) rows of the summary table; None = no pass/fail goal."""
    if name == "train_overhead":
        fixed = r["fixed_overhead_s"]
        return [
            ("tokens/s ratio Ray Train ÷ bare (steady state)", r["ratio"], "≥ 0.95", r["ratio"] >= 0.95),
            ("Ray Train fixed start/stop overhead per stage [s]", fixed, "≤ 10", fixed <= 10),
            ("CPU-seconds per stage run, Ray Train ÷ bare (fixed costs included)", r["cpu_ratio"], "report", None),
        ]
    if name == "hypergrad":
        rows = [(f"c_i speedup ({k})", v["speedup"], "≥ 1.0 (CPU)", v["speedup"] >= 1.0) for k, v in r["ci"].items()]
        rows += [
            (f"outer step / plain step ({k})", v["ratio"], "≤ 10", v["ratio"] <= 10) for k, v in r["outer"].items()
        ]
        rows += [
            (f"outer step with KL target / plain ({k})", v["ratio"], "report", None)
            for k, v in r["outer_with_target"].items()
        ]
        return rows
    if name == "score_throughput":
        return [
            (
                f"rows/s ratio Ray Data ÷ bare, both on {len(r['cores'])} core(s) (ray.init excluded)",
                r["ratio"],
                "≥ 0.90",
                r["ratio"] >= 0.90,
            ),
            ("rows/s ratio, steady state (fixed costs removed)", r["ratio_steady_state"], "report", None),
            ("rows per CPU-second, bare loop", r["rows_per_cpu_s"]["bare"], "report", None),
            ("rows per CPU-second, Ray Data stage", r["rows_per_cpu_s"]["ray"], "report", None),
            ("rows per CPU-second ratio Ray Data ÷ bare", r["ratio_cpu"], "report", None),
            ("Ray Data scoring fixed overhead [s]", r["fixed_overhead_s"], "report", None),
        ]
    if name == "mfu":
        rows = []
        of = "of the dense bf16 peak" if "gpu" in r else "of the measured fp32 GEMM peak"
        for c in r["cases"]:
            goal = c.get("goal")
            label = (
                f"MFU {c['kind']} {c['preset']} L={c['seq_len']} B={c['batch']}, {of} "
                f"(attn={c['attn_implementation']}, causal-kernel count; full-L² count {c['mfu_full_attention']:.3f})"
            )
            rows.append((label, c["mfu"], f"≥ {goal:.2f}" if goal else "report", c["mfu"] >= goal if goal else None))
        return rows
    if name == "scaling":
        m = list(r["marginal_ms_per_row"].values())
        sizes = sorted(r["per_size"], key=int)
        rss = r["per_size"][sizes[-1]]["rss_mb_peak"] / r["per_size"][sizes[0]]["rss_mb_peak"]
        rows = [(f"marginal ms/row {k}", v, "flat", None) for k, v in r["marginal_ms_per_row"].items()]
        rows.append(("least-squares ms/row (fixed cost removed)", r["lstsq_ms_per_row"], "report", None))
        if len(m) >= 2:
            rows.append(
                ("marginal time/row, last ÷ first interval", m[-1] / m[0], "≈ 1 (0.5–2)", 0.5 <= m[-1] / m[0] <= 2)
            )
        rows.append((f"driver peak RSS {sizes[-1]}× ÷ {sizes[0]}×", rss, "≈ 1 (≤ 1.2)", rss <= 1.2))
        v = r["select_pure"]["rss_mb_peak"]
        rows.append(
            (f"selection.select + manifest of {r['select_rows']:,} scores, peak RSS [MB]", v, "< 1024", v < 1024)
        )
        for order, stage in (r.get("select_stage") or {}).items():
            v = stage["rss_mb_peak"]
            label = f"pipeline select_stage over {r['select_rows']:,} {order} rows, driver peak RSS [MB]"
            rows.append((label, v, "< 1024", v < 1024))
        return rows
    return []


def run_one(name: str, extra: list[str]) -> dict:
    """Run one benchmark script, streaming its output; returns its JSON (+ wall time and return code)."""
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *extra]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for text in proc.stdout:  # Ray's and the benchmark's lines, live
        sys.stdout.write(text)
    rc = proc.wait()
    path = OUT / f"{name}.json"
    fresh = path.exists() and path.stat().st_mtime >= t0
    res = json.loads(path.read_text()) if fresh and rc == 0 else {"error": f"exit code {rc}"}
    return res | {"wall_s": time.time() - t0, "rc": rc}


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def kept_parts(old: str, names: list[str]) -> dict[str, dict]:
    """From an earlier RESULTS.md, each benchmark in ``names``: its summary rows, its section, and the date it was
    measured (its section's Command line, else the file's ``- Date:``). Missing benchmarks are left out."""
    lines = old.splitlines()
    file_date = next((ln[len("- Date: ") :].split(";")[0] for ln in lines if ln.startswith("- Date: ")), "unknown")
    out = {}
    for name in names:
        head = next((i for i, ln in enumerate(lines) if ln.startswith(f"## {name}: ")), None)
        if head is None:
            continue
        end = next((i for i in range(head + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[head:end]
        while section and not section[-1].strip():
            section.pop()
        dated = re.search(r"^Command: .*, (\d{4}-\d\d-\d\dT[\d:+-]+)\)$", "\n".join(section), re.M)
        rows = [ln for ln in lines if ln.startswith(f"| {name} |")]
        out[name] = {"rows": rows, "section": section, "date": dated.group(1) if dated else file_date}
    return out


def render(results: dict, started: dict, total_s: float, old: str, kept: dict[str, dict] | None = None) -> str:
    """RESULTS.md from this run's ``results``; with ``kept`` (``--only``), other benchmarks' rows and sections
    from the earlier file, in the usual order, and a header that says which numbers come from which run."""
    m, kept = started, kept or {}
    verdict = {True: "met", False: "**not met**", None: ""}
    if kept:
        ran = ", ".join(results)
        earlier = "; ".join(f"{n} ({k['date']})" for n, k in kept.items())
        intro = [
            f"Written by `.venv/bin/python bench/run_all.py --only {' '.join(results)}`: the rows and sections of "
            f"{ran} were measured in ONE run on the machine described here; the others are kept from earlier runs: "
            f"{earlier}. Each number is a ratio against a baseline measured in the same run as it, with baseline "
            "and candidate repetitions alternated, because the machine is shared and absolute timings are noisy; "
            "numbers of different runs were measured under different loads.",
        ]
    else:
        intro = [
            "Written by `make bench` (`.venv/bin/python bench/run_all.py`): every number below was measured in ONE "
            "run on the machine described here. Each is a ratio against a baseline measured in the same run, with "
            "baseline and candidate repetitions alternated, because the machine is shared and absolute timings are "
            "noisy.",
        ]
    out = [
        "# Benchmark results",
        "",
        *intro,
        "",
        f"- Machine: {m['cores']} cores, {m['cpu']}, GPU: {m['gpu']}; torch {m['torch']}, Python {m['python']}",
        f"- Date: {m['date']}; 1-min load average at start: {m['loadavg_1m']} (other users' jobs)",
        f"- Total wall time: {total_s / 60:.1f} min" + (f" ({', '.join(results)} only)" if kept else ""),
        "",
        "| benchmark | measurement | value | goal | verdict |",
        "|---|---|---|---|---|",
    ]
    order = [n for n in BENCHES if n in results or n in kept]
    for name in order:
        if name in kept:
            out += kept[name]["rows"]
            continue
        r = results[name]
        if "error" in r:
            out.append(f"| {name} | failed: {r['error']} | | | **failed** |")
            continue
        for label, value, goal, ok in headlines(name, r):
            out.append(f"| {name} | {label} | {fmt(value)} | {goal} | {verdict[ok]} |")
    for name in order:
        if name in kept:
            out += ["", *kept[name]["section"]]
            continue
        r = results[name]
        out += ["", f"## {name}: {BENCHES[name][0]}", ""]
        if "error" in r:
            out.append(f"Failed ({r['error']}); see the console output of `bench/{name}.py`.")
            continue
        when = f"load average {r['machine']['loadavg_1m']}, {r['machine']['date']}"
        out += [f"Command: `{r['command']}` ({r['wall_s'] / 60:.1f} min, {when})", ""]
        out += ["```", *r.get("lines", []), "```"]
    gpu = get_section(old, "gpu") or "No GPU machine was available in this session. Run `bash bench/gpu.sh` on one."
    soak = (
        get_section(old, "soak")
        or "Not run in this session (`.venv/bin/python bench/soak.py --results-md bench/RESULTS.md`)."
    )
    out += ["", "## GPU", "", *_common.section_markers("gpu")[:1], gpu, _common.section_markers("gpu")[1]]
    out += ["", "## Soak (bench/soak.py, not in make bench)", "", _common.section_markers("soak")[0], soak]
    out += [_common.section_markers("soak")[1], ""]
    for name, (_, script) in _common.SCRIPT_SECTIONS.items():
        rerun = f"`.venv/bin/python {script} --results-md bench/RESULTS.md`"
        body = get_section(old, name) or f"Not run in this session ({rerun})."
        begin, end = _common.section_markers(name)
        out += [f"## {_common.section_title(name)}", "", begin, body, end, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's --quick; leaves RESULTS.md alone")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHES),
        help="a subset: rewrites their rows and sections of RESULTS.md, keeps the others' (the header says which "
        "run measured what)",
    )
    args = p.parse_args(argv)
    started = _common.machine()
    t0 = time.time()
    names = args.only or list(BENCHES)
    results = {n: run_one(n, ["--quick"] if args.quick else BENCHES[n][1]) for n in names}
    total = time.time() - t0
    print("\n=== summary")
    for name, r in results.items():
        for label, value, goal, ok in [] if "error" in r else headlines(name, r):
            met = "" if ok is None else ", met" if ok else ", NOT met"
            print(f"{name:>16}: {label}: {fmt(value)}  (goal {goal}{met})")
        if "error" in r:
            print(f"{name:>16}: FAILED ({r['error']})")
    if args.quick:
        print("(RESULTS.md not rewritten: --quick numbers are smoke runs)")
    else:
        old = RESULTS.read_text() if RESULTS.exists() else ""
        kept = kept_parts(old, [n for n in BENCHES if n not in results]) if args.only else None
        RESULTS.write_text(render(results, started, total, old, kept))
        shown = RESULTS.relative_to(REPO) if RESULTS.is_relative_to(REPO) else RESULTS
        print(f"wrote {shown} ({total / 60:.1f} min)" + (f"; kept {', '.join(kept)}" if kept else ""))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
