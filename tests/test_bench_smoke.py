"""The GPU runbook works where the GPU machines live: ``bench/gpu.sh --cpu`` runs with ray, pydantic, optuna and
lm-eval made unimportable (as on those machines, which have only torch, transformers, pyarrow, pandas and
numpy), and writes its JSON. The heavy benchmarks are never run here.

    .venv/bin/python -m pytest tests/test_bench_smoke.py -q
"""

import json
import os
import subprocess
import sys
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
    assert res["train"] and all(0 < t["mfu"] < 1.5 and t["attn_implementation"] == "sdpa" for t in res["train"])
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
