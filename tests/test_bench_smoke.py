"""The benchmarks' own logic: the GPU runbook works where the GPU machines live (``bench/gpu.sh --cpu`` runs with
ray, pydantic, optuna and lm-eval made unimportable, as on those machines, which have only torch, transformers,
pyarrow, pandas and numpy, and writes its JSON); MFU counts attention as the causal kernels compute it; and
``run_all.py --only`` rewrites its benchmarks' results and keeps the others'. The heavy benchmarks are never run here.

    .venv/bin/python -m pytest tests/test_bench_smoke.py -q
"""

import importlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "pydantic", "optuna", "lm_eval")

pytestmark = pytest.mark.timeout(180)


def test_gpu_runbook_cpu_smoke_without_ray_or_pydantic(tmp_path):
    # sitecustomize runs at interpreter start-up, before the script: a None entry in sys.modules makes
    # `import ray` (directly or deep inside a transitive import) raise ImportError, as on the GPU machines.
    blocker, ran = tmp_path / "blocker", tmp_path / "blocker_ran"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in FORBIDDEN)
        + f"open({str(ran)!r}, 'w').close()\n"  # proves the interpreter gpu.sh started loaded the blocker
    )
    out = tmp_path / "gpu_bench.json"
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": str(blocker)}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ran.exists()
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["forbidden_modules_loaded"] == []
    # an MFU is a fraction of a peak: above 1 the FLOPs are over-counted or the peak under-measured
    assert res["train"] and all(0 < t["mfu"] <= 1 and t["attn_implementation"] == "sdpa" for t in res["train"])
    # at L = 64 ATen's CPU flash kernel computes the whole (masked) score matrix: the ledger's count is the kernel's
    assert all(t["flops_per_call"] == t["flops_per_call_full_attention"] for t in res["train"])
    assert res["outer"]["seconds"] and res["outer"]["flops_per_step"] > 0
    assert all(res["score"][dt]["rows_per_s"] > 0 for dt in ("bfloat16", "float32"))
    assert "bilevel outer step" in proc.stdout  # one result line per measurement


def test_blocker_really_blocks(tmp_path):
    """The test above is not vacuous: with the blocker on the path, importing Ray fails."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import ray"],
        env=os.environ | {"PYTHONPATH": str(blocker)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


def _bench_module(name: str):
    """A bench/ helper module, imported the way the benchmark scripts see it (bench/ on the path: they import
    each other by bare name)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.append(str(REPO / "bench"))
    return importlib.import_module(name)


def test_attention_is_counted_as_the_causal_kernels_compute_it():
    """MFU's attention count (bench/_attention.py), worked by hand from ATen's CPU flash tiling: query blocks of
    256 rows (L ≥ 768), 64 (L ≥ 192) or 32, key blocks of 512 (at most L), every key block that starts below a
    query block's end computed whole."""
    from bliss_ray.models.arch import arch_from_preset

    att = _bench_module("_attention")
    # L = 1024: query blocks at 0, 256, 512, 768 end at 256 … 1024 → 512, 512, 1024, 1024 keys computed
    assert att.computed_key_fraction(1024, "cpu") == 256 * (512 + 512 + 1024 + 1024) / 1024**2 == 0.75
    # L = 2048: pairs of query blocks end in the 1st … 4th key block
    assert att.computed_key_fraction(2048, "cpu") == 2 * 256 * (512 + 1024 + 1536 + 2048) / 2048**2 == 0.625
    assert att.computed_key_fraction(512, "cpu") == att.computed_key_fraction(256, "cpu") == 1.0  # one key block
    assert att.computed_key_fraction(1024, "cuda") == 1025 / 2048  # exact causal: (L + 1)/2 keys per query
    a160 = arch_from_preset("pythia-160m", 50304)
    assert att.attention_flops_per_token(a160, 1024) == 4 * 1024 * 768 * 12  # the ledger's 4·L·d·n_layer
    # a 160M training step at L = 1024 on CPU: a quarter of its 3 attention passes never runs
    assert att.uncomputed_flops(a160, 1024, "cpu", passes=3, tokens=1024) == 0.25 * 3 * 4 * 1024 * 768 * 12 * 1024


def test_outer_step_attention_split_matches_the_ledger(monkeypatch):
    """The outer step's kernel count: 13 fast-kernel passes of the proxy trunk at K = 1, Q = 3 (inner step 3,
    its score forward 1, ∇f 3, outer score forward 1 + backward 2, ghost c_i 3) lose the skipped tiles; ∇g and
    the HVPs (math backend) do not. A ledger whose attention passes differ from that split is refused."""
    from bliss_ray.models.arch import arch_from_preset

    w = _bench_module("_workloads")
    s = w.bilevel_settings(None, 4, 4)
    ledger = w.outer_step_flops("pythia-micro", None, 512, 1024, s)
    kernel = w.outer_step_kernel_flops("pythia-micro", None, 512, 1024, s, "cuda")
    a = arch_from_preset("pythia-micro", 512)
    per_pass = 4 * 1024 * a.d_model * a.n_layer * 4 * 1024  # 4·L·d·n per token × 4 × 1024 tokens
    assert ledger - kernel == pytest.approx(13 * per_pass * (1 - 1025 / 2048), rel=1e-12)
    assert w.outer_step_kernel_flops("pythia-micro", None, 512, 256, s, "cpu") == w.outer_step_flops(
        "pythia-micro", None, 512, 256, s
    )  # L ≤ 512 on CPU: nothing skipped

    real = w.outer_step_flops
    extra_pass = lambda p, t, v, L, st: real(p, t, v, L, st) + 4 * L * a.d_model * a.n_layer * 4 * L  # noqa: E731
    monkeypatch.setattr(w, "outer_step_flops", extra_pass)
    with pytest.raises(AssertionError, match="we split"):
        w.outer_step_kernel_flops("pythia-micro", None, 512, 1024, s, "cuda")


def test_run_all_only_rewrites_its_benchmarks_and_keeps_the_others(tmp_path, monkeypatch):
    """``run_all.py --only hypergrad`` does what its help says: hypergrad's rows and section are this run's, every
    other benchmark's rows and section are the earlier file's, byte for byte, and the header names both runs."""
    run_all = _bench_module("run_all")
    old = (REPO / "bench" / "RESULTS.md").read_text()
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(old)
    fake = {
        "ci": {"tiny": {"speedup": 1.25}},
        "outer": {"tiny": {"ratio": 7.5}},
        "outer_with_target": {},
        "command": "python bench/hypergrad.py",
        "machine": {"loadavg_1m": 0.5, "date": "2031-01-02T03:04:05+00:00"},
        "lines": ["c_i speedup: 1.250  (fake)"],
        "wall_s": 60.0,
        "rc": 0,
    }
    monkeypatch.setattr(run_all, "RESULTS", results_md)
    monkeypatch.setattr(run_all, "run_one", lambda name, extra: dict(fake))
    assert run_all.main(["--only", "hypergrad"]) == 0
    new = results_md.read_text()

    old_rows = [ln for ln in old.splitlines() if ln.startswith("| ") and not ln.startswith("| hypergrad |")]
    new_rows = [ln for ln in new.splitlines() if ln.startswith("| ") and not ln.startswith("| hypergrad |")]
    assert old_rows and new_rows == old_rows  # the header row, its rule and every other benchmark's rows
    assert [ln for ln in new.splitlines() if ln.startswith("| hypergrad |")] == [
        "| hypergrad | c_i speedup (tiny) | 1.250 | ≥ 1.0 (CPU) | met |",
        "| hypergrad | outer step / plain step (tiny) | 7.500 | ≤ 10 | met |",
    ]
    kept = run_all.kept_parts(old, ["train_overhead", "scaling"])
    for name in ("train_overhead", "scaling"):
        assert "\n".join(kept[name]["section"]) in new
    assert "c_i speedup: 1.250  (fake)" in new and "2031-01-02T03:04:05+00:00" in new
    assert "--only hypergrad" in new and "kept from earlier runs" in new
    assert "every number below was measured in ONE run" not in new  # it no longer is
    for marker in ("<!-- gpu:begin -->", "<!-- soak:begin -->"):
        assert new.split(marker)[1] == old.split(marker)[1]


def test_ray_timeline_reads_processes_and_train_phases_off_session_logs(tmp_path):
    """``bench/_ray_timeline.py``: the processes a stage started and Train's start-up phases, read from log lines in
    the formats Ray 2.60 writes (raylet, core worker, worker stdout, Train's JSON controller log); lines outside the
    window are ignored."""
    timeline = _bench_module("_ray_timeline")
    logs = tmp_path / "logs"
    (logs / "train").mkdir(parents=True)
    wid, pid = "ab12", 77
    (logs / "raylet.out").write_text(
        "[2026-12-06 10:00:00,000 I 1 1] (raylet) worker_pool.cc:1: Started worker process with pid 5 worker_id=ff\n"
        f"[2026-12-06 10:00:10,500 I 1 1] (raylet) worker_pool.cc:1: Started worker process with pid {pid} "
        f"worker_id={wid}\n"
    )
    (logs / f"python-core-worker-{wid}_{pid}.log").write_text(
        "[2026-12-06 10:00:11,250 I 77 77] core_worker.cc:1: Constructing CoreWorker\n"
        "[2026-12-06 10:00:13,000 I 77 77] task_receiver.cc:1: Actor creation task finished, task_id: 00\n"
    )
    (logs / f"worker-{wid}-01000000-{pid}.out").write_text(":actor_name:RayTrainWorker\n")

    def record(stamp, message):
        return json.dumps({"asctime": f"2026-12-06 10:00:{stamp}", "levelname": "INFO", "message": message})

    (logs / "train" / "ray-train-sys-controller-cd.log").write_text(
        "\n".join(
            [
                record("09,000", "Requesting resources: {'CPU': 1.0} * 1"),  # before the window
                record("10,750", "Requesting resources: {'CPU': 1.0} * 1"),
                record("13,000", "[Worker Group Initialization] 1 worker actors created in 2.25s."),
                record(
                    "13,010", "[Worker Group Initialization] before_init_train_context callbacks completed in 0.01s."
                ),
                record("15,500", "[Worker Group Initialization] Train context initialized on workers in 2.50s."),
                record("19,000", "[Worker Group Initialization] Train function launched on workers in 3.50s."),
                record("30,000", "Shutting down 1 workers."),
            ]
        )
        + "\nnot json\n"
    )
    t0 = datetime(2026, 12, 6, 10, 0, 10).timestamp()
    t1 = datetime(2026, 12, 6, 10, 0, 31).timestamp()
    rows = timeline.processes(logs, t0, t1)
    assert [r["name"] for r in rows] == ["RayTrainWorker"]
    assert rows[0]["spawned_s"] == pytest.approx(0.5) and rows[0]["up_s"] == pytest.approx(1.25)
    assert rows[0]["created_s"] == pytest.approx(3.0)
    assert timeline.render(rows) == "RayTrainWorker +0.5→+1.2→+3.0"
    phases = timeline.train_phases(logs, t0, t1)
    assert phases["first_s"] == pytest.approx(0.75) and phases["shutdown_s"] == pytest.approx(20.0)
    assert list(phases["phases"].values()) == [2.25, 0.01, 2.5, 3.5]
    assert timeline.render_phases(phases) == (
        "controller's first log line +0.8; 1 worker actors created 2.2 s, Train context initialized 2.5 s, "
        "Train function launched 3.5 s; shutdown +20.0"
    )
