"""Collect what a report needs from run directories (no Ray, no recomputation; works on copied-back runs).

A *variant* is one finished ``evaluate`` stage of an experiment root: its experiment config, its checkpoints'
evaluation rows, and (through the stage map the evaluate stage records) its bilevel metrics, selection
manifests and selected row ids. Several variants may share one root (e.g. ``--set selection.method=random``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bliss_ray import storage
from bliss_ray.pipeline import flat_settings
from bliss_ray.train.checkpoint import read_metrics

_IDENTITY_FREE = {"name", "label", "resources", "flops", "eval", "tracking", "mlflow_uri"}


@dataclass
class Variant:
    root: Path
    exp: dict
    evaluate: dict  # the evaluate stage's outputs.json
    label: str = ""
    stage_outputs: dict[str, dict] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.exp["selection"]["method"]

    def stage_dir(self, key: str) -> Path | None:
        name = self.evaluate.get("stage_dirs", {}).get(key)
        return self.root / name if name and (self.root / name / "_SUCCESS").exists() else None

    def checkpoints(self) -> list[dict]:
        return sorted(self.evaluate["checkpoints"], key=lambda c: c["steps"])

    def bilevel_metrics(self) -> dict[int, list[dict]]:
        out = {}
        for r in range(1, self.exp["schedule"]["rounds"] + 1):
            d = self.stage_dir(f"r{r}.bilevel")
            if d is not None:
                out[r] = read_metrics(d / "metrics.jsonl")
        return out

    def selections(self) -> dict[int, dict]:
        """round → {manifest, ids} of every selection stage."""
        out = {}
        for r in range(self.exp["schedule"]["rounds"] + 1):
            d = self.stage_dir(f"r{r}.select")
            if d is not None:
                ids = pq.read_table(d / "selected.parquet").column("row_id").to_numpy()
                out[r] = {"manifest": json.loads((d / "manifest.json").read_text()), "ids": np.sort(ids)}
        return out

    def pool_rows_per_round(self) -> int | None:
        return pool_rows_per_round(
            [
                json.loads((d / "outputs.json").read_text())
                for r in range(1, 99)
                if (d := self.stage_dir(f"r{r}.score")) is not None
            ]
        )

    def probe_reference_batches(self) -> list[tuple[int, int]] | None:
        """(rows, tokens) of one reference evaluation as a MATES probe stage computed it (the same every round)."""
        for r in range(1, self.exp["schedule"]["rounds"] + 1):
            d = self.stage_dir(f"r{r}.probe")
            batches = json.loads((d / "outputs.json").read_text()).get("reference_batches") if d else None
            if batches:
                return [(int(rows), int(tokens)) for rows, tokens in batches]
        return None


def pool_rows_per_round(score_outputs: list[dict]) -> int | None:
    """Rows the scoring stages read per round (the FLOPs ledger's inference row), from their ``outputs.json``."""
    rows = [x for out in score_outputs if (x := out.get("rows_in"))]
    return int(np.mean(rows)) if rows else None


def _comparable(variants: list[Variant]) -> list[dict]:
    """Each variant's result-affecting settings, flattened; only keys every variant has, so that runs made before
    a config field was added still compare with newer ones."""
    flat = [
        {k: json.dumps(x) for k, x in flat_settings(v.exp).items() if k.split(".")[0] not in _IDENTITY_FREE}
        for v in variants
    ]
    common = set.intersection(*(set(f) for f in flat)) if flat else set()
    return [{k: v for k, v in f.items() if k in common} for f in flat]


# what a report reads from a run; models, token arrays, pools and checkpoints stay in the store
_REPORT_FILES = {"experiment.json", "outputs.json", "_SUCCESS", "metrics.jsonl", "manifest.json", "selected.parquet"}
_REPORT_FILES |= {"sweep.json", "sweep_results.parquet", "sweep_curves.parquet"}  # a sweep's OUT/<sweep>/


def local_view(root: str | Path) -> Path:
    """A run root as a local directory: itself when local; for a store URI, a temporary copy of only the files
    a report reads (``bliss-ray report s3://bucket/runs/demo``)."""
    if not storage.is_remote(root):
        return Path(root)
    dest = Path(tempfile.mkdtemp(prefix="bliss_report_")) / storage.name(root)
    n = storage.download_files(root, dest, lambda rel: rel.rsplit("/", 1)[-1] in _REPORT_FILES)
    if n == 0:
        raise FileNotFoundError(f"no run files under {root}")
    return dest


def find_variants(roots: list[Path]) -> list[Variant]:
    variants = []
    for root in roots:
        root = Path(root)
        candidates = [root] if (root / "experiment.json").exists() else [p for p in root.iterdir() if p.is_dir()]
        for exp_root in candidates:
            for ev in sorted(exp_root.glob("evaluate-*/_SUCCESS")):
                d = ev.parent
                exp = json.loads((d / "experiment.json").read_text())
                variants.append(Variant(exp_root, exp, json.loads((d / "outputs.json").read_text())))
    _label(variants)
    return variants


def _describe(method: str, flat: dict, peers: list[dict]) -> str:
    """The method plus (up to 3 of) the settings in which ``flat`` differs from its peers' flattened settings."""
    differing = sorted({k for peer in peers for k in flat if peer.get(k) != flat[k]})
    shown = [k for k in differing if not k.startswith("selection.method")][:3]
    extra = ", ".join(dict.fromkeys(f"{k.split('.')[-1]}={json.loads(flat[k])}" for k in shown))
    return method + (f" ({extra})" if extra else "")


def _label(variants: list[Variant]) -> None:
    """Name each variant: its ``label``, else the method plus the settings that tell it apart from its peers."""
    flat = _comparable(variants)
    for i, v in enumerate(variants):
        if v.exp.get("label"):
            v.label = v.exp["label"]
            continue
        v.label = _describe(
            v.method, flat[i], [flat[j] for j, w in enumerate(variants) if w.method == v.method and j != i]
        )
        if len({w.root for w in variants}) > 1 and v.label == v.method:
            v.label += f" [{v.root.name}]"


SEED_KEYS = ("seed", "selection.seed")


def seed_groups(variants: list[Variant]) -> list[tuple[str, list[Variant]]]:
    """Variants whose experiments differ only in their seeds, grouped (in first-seen order) and named by the
    method plus the settings that tell the groups of one method apart."""
    flat = [{k: v for k, v in f.items() if k not in SEED_KEYS} for f in _comparable(variants)]
    groups: dict[str, list[int]] = {}  # insertion-ordered: first-seen order
    for i, f in enumerate(flat):
        groups.setdefault(json.dumps(f, sort_keys=True), []).append(i)
    firsts = [members[0] for members in groups.values()]
    named = []
    for i, members in zip(firsts, groups.values(), strict=True):
        peers = [flat[j] for j in firsts if j != i and variants[j].method == variants[i].method]
        named.append((_describe(variants[i].method, flat[i], peers), [variants[m] for m in members]))
    return named


def reach_step(steps: list[float], values: list[float], target: float, higher_is_better: bool) -> float | None:
    """First (linearly interpolated) step at which a curve reaches ``target``; None if it never does."""
    sign = 1 if higher_is_better else -1
    prev = None
    for s, v in zip(steps, values, strict=True):
        if v is None or not np.isfinite(v):
            continue
        if sign * (v - target) >= 0:
            if prev is None:
                return s
            (s0, v0) = prev
            return s0 + (s - s0) * (target - v0) / (v - v0) if v != v0 else s
        prev = (s, v)
    return None
