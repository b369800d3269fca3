"""Architecture rules: the math never imports Ray (or the pydantic config layer, for the GPU runbook), every
shipped experiment YAML loads, invalid configs fail naming the field, no credentials in the tree.

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
ORCHESTRATION = {"stages", "pipeline.py", "sweep.py", "compare.py", "cli.py"}  # the only places allowed to import Ray
# What bench/gpu.sh runs on GPU machines that have torch + transformers but no ray, pydantic or lm-eval.
PURE_TORCH = [
    "bliss_ray.models.arch",
    "bliss_ray.models.lm",
    "bliss_ray.models.score",
    "bliss_ray.bilevel.loop",
    "bliss_ray.train.loop",
    "bliss_ray.selection.scoring",
    "bliss_ray.data.tokens",
    "bliss_ray.costs.flops",
    "bliss_ray.selection.rules",
]


def _math_modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] not in ORCHESTRATION:
            yield path


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_math_modules_do_not_import_ray_directly():
    offenders = [
        f"{p.relative_to(REPO)}: {m}"
        for p in _math_modules()
        for m in _imports(p)
        if m == "ray" or m.startswith("ray.")
    ]
    assert not offenders, offenders


def test_math_modules_import_without_ray_installed():
    """Transitively too: import every math module with `ray` made unimportable."""
    mods = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in _math_modules()]
    mods = [m[: -len(".__init__")] if m.endswith(".__init__") else m for m in mods]
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


def test_bilevel_settings_mirror_the_config_schema():
    """The Ray-free loop settings and the validated schema share names and defaults where they overlap."""
    from bliss_ray.bilevel.loop import BilevelSettings
    from bliss_ray.config import BilevelConfig

    schema = BilevelConfig.model_fields
    for name in BilevelSettings.__dataclass_fields__:
        assert name in schema, name
    assert parse_experiment({"name": "x"}).bilevel.z_steps == BilevelSettings().z_steps


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
