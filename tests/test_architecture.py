"""Architecture rules, read from the code: the package's floors (no import circle, no import that points up a
floor, no function-local import of its own modules without a stated reason), Ray only where it is allowed, the
GPU runbook's layer without pydantic; every shipped experiment YAML loads, invalid configs fail naming the
field, no credentials in the tree.

    .venv/bin/python -m pytest tests/test_architecture.py -q
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bliss_ray.config import ConfigError, load_experiment, parse_experiment

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "bliss_ray"
# The floors of the house, bottom first (docs/design.md draws them): a module imports only its own floor and those
# below. Within a floor, modules may import each other as long as no circle forms.
FLOORS = [
    {"storage", "node_cache", "testing"},
    {"models", "data", "train", "bilevel", "selection", "mates", "evaluation"},  # the math: pure PyTorch / NumPy
    {"config"},
    {"pipeline"},
    {"costs"},
    {"report"},
    {"watch"},
    {"stages"},
    {"studies"},
    {"cli"},
]
# The only modules that may import Ray (the math and everything it stands on never do).
RAY_MODULES = {"stages", "studies.sweep", "studies.sweep_console", "studies.compare", "studies.tune_callback"}
RAY_MODULES |= {"watch.progress", "watch.mlflow_tracker", "watch.wandb_tracker"}
# What bench/gpu.sh runs on GPU machines that have torch + transformers but no ray, pydantic or lm-eval.
PURE_TORCH = [
    "bliss_ray.models.arch",
    "bliss_ray.models.lm",
    "bliss_ray.models.score",
    "bliss_ray.bilevel.loop",
    "bliss_ray.train.loop",
    "bliss_ray.train.lm_run",
    "bliss_ray.selection.scoring",
    "bliss_ray.data.tokens",
    "bliss_ray.costs.flops",
    "bliss_ray.costs.memory",
    "bliss_ray.selection.rules",
]


def modules(pkg: Path) -> dict[str, Path]:
    """Dotted name (without the package's own name) → file, for every module of a package directory."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def internal_imports(pkg: Path) -> list[tuple[str, str, int, bool, str]]:
    """(importer, imported module, line, inside a function, the line's text) for every import of the package's own
    modules (``from pkg.a import b`` counts as importing ``a.b`` when that is a module)."""
    mods, top, found = modules(pkg), pkg.name, []
    for name, path in mods.items():
        source = path.read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        local = {
            id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith(f"{top}."):
                    continue
                dotted = target[len(top) + 1 :]
                while dotted and dotted not in mods:
                    dotted = dotted.rpartition(".")[0]
                if dotted and dotted != name:
                    found.append((name, dotted, node.lineno, id(node) in local, lines[node.lineno - 1]))
    return found


def floor_of(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, floor in enumerate(FLOORS) if head in floor)


def circles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), by Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def violations(pkg: Path) -> dict[str, list]:
    """Every breach of the floors in a package: circles, upward imports, unexplained function-local imports."""
    found = internal_imports(pkg)
    return {
        "circles": circles([(a, b) for a, b, *_ in found]),
        "upward": [f"{a} -> {b}" for a, b, *_ in found if floor_of(b) > floor_of(a)],
        "local": sorted({f"{a}:{line}" for a, b, line, local, text in found if local and "# lazy:" not in text}),
    }


def test_the_package_has_no_circle_no_upward_import_and_no_unexplained_local_import():
    assert violations(PKG) == {"circles": [], "upward": [], "local": []}


def test_the_floor_checks_find_a_planted_circle_upward_import_and_local_import(tmp_path):
    """Negative control: the same checks on a small package with one of each breach find all three."""
    pkg = tmp_path / "bliss_ray"
    files = {
        "config.py": "from bliss_ray.pipeline import Run\n",  # upward (config is below pipeline) and a circle
        "pipeline.py": "from bliss_ray.config import Experiment\n",
        "storage.py": "def f():\n    from bliss_ray.models import arch\n",  # upward, local, no reason
        "models/__init__.py": "",
        "models/arch.py": "def g():\n    from bliss_ray.models import lm  # lazy: a stated reason\n",
        "models/lm.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    found = violations(pkg)
    assert found["circles"] == [["config", "pipeline"]]
    assert sorted(found["upward"]) == ["config -> pipeline", "storage -> models.arch"]
    assert found["local"] == ["storage:2"]


def test_every_module_has_a_floor():
    assert [m for m in modules(PKG) if m and m.split(".")[0] not in set().union(*FLOORS)] == []


def _ray_allowed(module: str) -> bool:
    return any(module == m or module.startswith(f"{m}.") for m in RAY_MODULES)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_ray_is_imported_only_where_allowed():
    offenders = [
        f"{name}: {m}"
        for name, path in modules(PKG).items()
        if not _ray_allowed(name)
        for m in _imports(path)
        if m == "ray" or m.startswith("ray.")
    ]
    assert not offenders, offenders


def test_everything_else_imports_without_ray_installed():
    """Transitively too: import every module outside ``RAY_MODULES`` with ``ray`` made unimportable."""
    mods = [f"bliss_ray.{m}" if m else "bliss_ray" for m in modules(PKG) if not _ray_allowed(m)]
    mods = [m for m in mods if not m.startswith("bliss_ray.evaluation.tasks")]  # lm-eval task plugins
    code = "import sys; sys.modules['ray'] = None\n" + "\n".join(f"import {m}" for m in mods)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_runbook_layer_needs_neither_ray_nor_pydantic():
    code = "import sys\nfor m in ('ray', 'pydantic', 'lm_eval', 'optuna'): sys.modules[m] = None\n"
    code += "\n".join(f"import {m}" for m in PURE_TORCH)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_orchestration_is_where_ray_lives():
    """The rule above is not vacuous: the stages do import Ray."""
    assert any(m.startswith("ray") for m in _imports(PKG / "stages" / "train_lm.py"))


def test_every_trainer_is_built_by_torch_trainer():
    """``stages._ray.torch_trainer`` keeps bliss_ray's objects away from Train's controller (test_train_stage.py);
    a stage that called ``TorchTrainer(...)`` itself would bypass it."""
    calls = [
        f"{p.relative_to(REPO)}:{node.lineno}"
        for p in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TorchTrainer"
    ]
    assert calls == ["bliss_ray/stages/_ray.py:" + str(_line_of(PKG / "stages" / "_ray.py", "return TorchTrainer("))]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    import yaml

    tree = yaml.safe_load(path.read_text())
    if "base" in tree and "space" in tree:  # a sweep file: its base experiment and overrides must validate
        from bliss_ray.studies.sweep import load_sweep

        load_sweep(path)
    elif "variants" in tree:  # a comparison file: every variant of its base must validate
        from bliss_ray.studies.compare_spec import load_compare

        load_compare(path)
    else:
        load_experiment(path)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["bilevel.gama=0.1"], "bilevel.gama"),  # unknown key
        (["bilevel.outer_steps=many"], "bilevel.outer_steps"),  # wrong type
        (["selection.keep_frac=0"], "selection.keep_frac"),  # outside (0, 1]
        (["selection.keep_frac=1.5"], "selection.keep_frac"),
        (["models.target.vocab_size=50304", "models.proxy.vocab_size=8192", "bilevel.gamma=0.1"], "vocab"),
        (["pretrain.global_batch_seqs=10", "pretrain.micro_batch_seqs=4"], "pretrain.global_batch_seqs"),
        (["tokenizer.kind=pretrained"], "tokenizer.name_or_path"),
    ],
)
def test_invalid_config_fails_before_compute_naming_the_field(overrides, field):
    """Reliability scenario 6: unknown keys, wrong types and impossible combinations fail at load, naming the field."""
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_experiment(REPO / "experiments" / "demo.yaml", overrides)


def test_vocab_mismatch_is_fine_without_kl():
    exp = load_experiment(
        REPO / "experiments" / "demo.yaml",
        ["models.target.vocab_size=50304", "models.proxy.vocab_size=8192", "bilevel.gamma=0"],
    )
    assert exp.bilevel.gamma == 0


def test_settings_are_defined_once_and_frozen():
    """The sections the workers receive are the math layer's own frozen classes, not a mirror of them."""
    import dataclasses

    from pydantic import ValidationError

    from bliss_ray.bilevel.settings import BilevelSettings
    from bliss_ray.train.settings import TrainSettings

    exp = parse_experiment({"name": "x"})
    assert type(exp.bilevel) is BilevelSettings and type(exp.pretrain) is type(exp.warmup) is TrainSettings
    for section, field in ((exp.bilevel, "gamma"), (exp.pretrain, "steps"), (exp.resources, "train_workers")):
        with pytest.raises((dataclasses.FrozenInstanceError, ValidationError)):
            setattr(section, field, 2)


TOKEN_PATTERNS = [
    r"hf_[A-Za-z0-9]{30,}",
    r"AKIA[0-9A-Z]{16}",
    r"ghp_[A-Za-z0-9]{36}",
    r"sk-[A-Za-z0-9]{32,}",
    r"xox[baprs]-[A-Za-z0-9-]{10,}",
    r"-----BEGIN (RSA |EC )?PRIVATE KEY-----",
]


def test_no_credentials_in_the_tree():
    """Scenario 9 (security): no tokens or keys in tracked files (the released BLISS code had an HF token)."""
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO).stdout.split()
    hits = []
    for f in files:
        p = REPO / f
        if p.suffix in {".parquet", ".png", ".arrow", ".safetensors"} or not p.is_file():
            continue
        text = p.read_text(errors="ignore")
        hits += [f"{f}: {pat}" for pat in TOKEN_PATTERNS if re.search(pat, text)]
    assert not hits, hits


def test_checkpoint_loading_never_unpickles():
    """Scenario 9: every torch.load in the package passes weights_only=True."""
    bad = []
    for p in PKG.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                bad.append(f"{p.relative_to(REPO)}:{i}")
    assert not bad, bad
