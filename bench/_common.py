"""Shared helpers of the benchmarks: environment, machine description, interleaved timing, peaks, JSON output.

Import this module FIRST in every benchmark: it sets the offline / quiet environment before ``transformers`` or
Ray are imported. It never imports Ray, pydantic or the orchestration layer itself, so ``gpu_bench.py`` can use
it on GPU machines that have only torch, transformers, pyarrow, pandas and numpy.

Every benchmark reports RATIOS against a baseline measured in the same run, with repetitions of baseline and
candidate alternated (A B B A ...) so that the load of other users of a shared machine hits both alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repo root
    sys.path.insert(0, str(REPO))

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # a private, single-process benchmark cluster
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # Ray starts its workers with niceness 15 by default. On a machine shared with other users that starves
    # the Ray side of every comparison against a bare loop in this (niceness 0) process and measures the
    # neighbours, not Ray. Benchmarks compare orchestration cost, so workers get the driver's priority.
    "RAY_worker_niceness": "0",
}.items():
    os.environ.setdefault(_k, _v)


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak of a GPU by name: the project's one table, ``bliss_ray.costs.memory.GPU_BF16_PEAK``."""
    from bliss_ray.costs.memory import gpu_bf16_peak  # here, not at the top: the environment above is set first

    return gpu_bf16_peak(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on (cores, CPU, GPU or none, versions, load)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other users of the machine: read ratios, not seconds
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def command() -> str:
    """The exact command line that produced a result (for RESULTS.md), paths relative to the repository."""
    args = [os.path.relpath(a, REPO) if os.path.isabs(a) and Path(a).is_relative_to(REPO) else a for a in sys.argv]
    return " ".join([".venv/bin/python" if "venv" in sys.executable else "python", *args])


def write_json(name: str, payload: dict, out: Path | None = None) -> Path:
    path = Path(out) if out else OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "command": command(), "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2, default=float))
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def median(xs) -> float:
    return float(statistics.median(xs))


def alternate(cases: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each case ``reps`` times, order reversed every round (A B, B A, ...): a slow drift of the machine's
    load then biases no case. A case returns its own measurement (seconds, tokens/s, ...)."""
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(float(cases[n]()))
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios: each pair was measured back to back, so it shares the machine's load."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def cpu_matmul_peak(sizes=(2048, 4096), reps: int = 4) -> float:
    """Best fp32 square-matmul rate (FLOP/s) over ``sizes`` × ``reps``: the CPU peak MFU is measured against,
    with the current torch thread count, measured now (so it sees the same machine load as the workload)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm the allocator and the BLAS thread pool
        for _ in range(reps):
            best = max(best, 2 * n**3 / timed(lambda a=a, b=b: a @ b))
    return best


def gpu_matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """Achieved dense bf16 matmul rate on the current GPU (a sanity check of the table's peak)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return max(2 * n**3 / timed(lambda: a @ b, torch.cuda.synchronize) for _ in range(reps))


class TreeCpu:
    """CPU seconds (user + system) used by this process and all its descendants — with a local Ray, that is the
    GCS, raylet and every worker — while the context is active. On a machine shared with other users, wall time
    measures the neighbours as much as us; CPU time measures the work we did. Sampled at 5 Hz from a thread,
    so a process that exits mid-measurement (a Ray Data actor at the end of a dataset) keeps its last reading.

    ``by_role`` splits the seconds by what each process was: ``driver`` (this process), Ray's daemons by name
    (``raylet``, ``gcs_server``, ...), and a Ray worker by the last task or actor its process title named
    (``ray::MapWorker(MapBatches(_RayScorer))``, ``ray::ReadParquet->SplitBlocks(4)``, ...; ``ray::IDLE`` if it
    never ran one): where an orchestration's extra CPU goes.

        with TreeCpu() as cpu: work()
        cpu.seconds, cpu.by_role
    """

    def __init__(self, period_s: float = 0.2):
        import psutil

        self._me, self._period, self.seconds = psutil.Process(), period_s, 0.0
        self._roles: dict[int, str] = {}
        self.by_role: dict[str, float] = {}
        self.started = 0  # processes started during the measurement (Ray workers and actors)

    def _role(self, p) -> str:
        if p.pid == self._me.pid:
            return "driver"
        title = " ".join(p.cmdline())
        if title.startswith("ray::") and not title.startswith("ray::IDLE"):  # setproctitle: its task or actor
            return title.split()[0]
        if title.startswith("ray::") or "default_worker.py" in title:
            return self._roles.get(p.pid, "ray::IDLE")  # idle now: keep what it last ran
        return p.name()

    def _sample(self, charge: bool = True) -> None:
        """Read every process's CPU time; charge what it used since the last sample to its current role (a process
        born during the measurement counts from 0)."""
        import psutil

        now = {}
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                role = self._roles[p.pid] = self._role(p)
            except psutil.Error:  # exited between listing and reading
                continue
            now[p.pid] = t.user + t.system
            if charge:
                self.by_role[role] = self.by_role.get(role, 0.0) + now[p.pid] - self._last.get(p.pid, 0.0)
        self._last |= now

    def _poll(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def __enter__(self) -> TreeCpu:
        import threading

        self._last: dict[int, float] = {}
        self.by_role = {}
        self._sample(charge=False)  # the baseline
        self._before = set(self._last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(self.by_role.values())
        self.started = len(set(self._last) - self._before)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process image. Not ``ru_maxrss``: Linux
    carries that across ``execve``, so a child spawned by a big parent (subprocess uses vfork) starts out
    "peaking" at the parent's size."""
    try:
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_ray(num_cpus: int = 4):
    """A private local Ray instance (4 logical CPUs on any machine, as the test suite: budgets stay explicit)."""
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="brb_", dir="/tmp"))  # short: socket paths
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def get_section(text: str, name: str) -> str | None:
    """The body between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in RESULTS.md, if present."""
    begin, end = section_markers(name)
    if begin in text and end in text:
        return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    return None


def set_section(path: Path, name: str, body: str, title: str) -> None:
    """Replace (or append, under ``## title``) one marked section of a RESULTS.md. Scripts that run outside
    ``make bench`` (gpu.sh, soak.py) record their results this way; run_all.py keeps those sections."""
    begin, end = section_markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if get_section(text, name) is None:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated the '{name}' section of {path}")


# RESULTS.md sections written by scripts outside make bench (too long, or a different shape), which run_all keeps:
# name → (title, script)
SCRIPT_SECTIONS = {
    "object_store": ("Object-store run root vs local disk", "bench/object_store.py"),
    "console": ("Console budgets", "bench/console_latency.py"),
    "driver_scale": ("A remote run's driver as the pool grows", "bench/driver_scale.py"),
}


def section_title(name: str) -> str:
    title, script = SCRIPT_SECTIONS[name]
    return f"{title} ({script}, not in make bench)"


def record_lines(path: Path, name: str, lines: list[str], figure: str | None = None) -> None:
    """Record a script's printed result lines, under the command that made them, as its RESULTS.md section (with
    a figure, a path relative to ``path``, below them)."""
    body = [f"Command: `{command()}`", "", "```", *lines, "```"] + (["", f"![{name}]({figure})"] if figure else [])
    set_section(path, name, "\n".join(body), section_title(name))


def line(label: str, value: float, detail: str = "", fmt: str = "{:.3f}") -> str:
    """One result line, ``label: value  (detail)``, printed and returned."""
    text = f"{label}: {fmt.format(value)}" + (f"  ({detail})" if detail else "")
    print(text, flush=True)
    return text
