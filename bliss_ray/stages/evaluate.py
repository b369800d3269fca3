"""Stage evaluate: zero-shot lm-eval of every round's decay-branch checkpoint, as parallel Ray tasks.

Inputs: each ``r*.pretrain`` stage's ``decay/`` model (``state/model`` when there is no decay branch) and its
mid-round branch models ``branches/<step>/`` (``pretrain.eval_branches`` per round, listed in the stage's
``branch_steps``), and the reference set's held-out evaluation part (``reference/eval_array``, which selection
never sees). Outputs: ``results/<stage>.json`` and ``results/<stage>.branch<step>.json`` (lm-eval's compact
results: per task value, stderr, n, task version, data source; lm-eval version; the paper average) plus the
target's loss on that part, and ``outputs.json`` with one summary row per checkpoint (stage, round, steps,
tokens, ``branch``: a mid-round branch or the round's final checkpoint, average, reference loss) and
``reference_split`` (``eval``, or ``all`` when ``data.reference_eval_frac`` is 0).

Checkpoints are evaluated data-parallel (one task each), never model-parallel: a 410M/1B model fits one device.
A checkpoint already evaluated with the same settings in the same run root (the round 0 that every method of a
``bliss-ray compare`` seed shares, or the rounds a FLOPs-matched baseline shares with its baseline) is not
evaluated again: results are kept in ``<run>/_eval_cache/``, keyed by the checkpoint's and the reference's
locations, which are identity-addressed, and every setting that changes a result.
The same directories evaluate with the stock CLI: ``lm_eval --model hf --model_args pretrained=DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ray
import torch

from bliss_ray import node_cache, storage
from bliss_ray.evaluation.harness import evaluate_checkpoint, evaluates_offline
from bliss_ray.evaluation.reference import reference_loss
from bliss_ray.evaluation.tasks.ref_cloze import SKIP_IDS_ENV as REF_CLOZE_SKIP_ENV
from bliss_ray.stages import _faults
from bliss_ray.stages._ray import QUIET_ENV, task_options, use_gpu
from bliss_ray.storage import local_copy
from bliss_ray.train.precision import inference_dtype, resolve_precision


def _evaluate(
    model_dir: str,
    reference_dir: str,
    tasks: list[str],
    limit,
    batch_size: int,
    bootstrap: int,
    threads: int,
    device: str,
    dtype: str = "float32",
    offline: bool = True,
) -> dict:
    # lm-eval's bootstrap forks a multiprocessing pool: in a threaded Ray worker that can deadlock (observed); one
    # process is enough for our resamples
    os.environ.update(QUIET_ENV | {"DISABLE_MULTIPROC": "1"})
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # eval.offline decides, not the worker's inherited env
        if offline:
            os.environ[key] = "1"
        else:
            os.environ.pop(key, None)
    torch.set_num_threads(threads)
    _faults.hold("evaluate")
    with node_cache.holding():  # Ray reuses this worker process: the copies are released when the task ends
        model_dir, reference_dir = str(local_copy(model_dir)), str(local_copy(reference_dir))  # this node's copies
        # bliss_ref_cloze (lm-eval imports ref_cloze.py in this process) skips the passages selection may see; a
        # reused worker may still hold an earlier task's setting, so an absent list clears it
        seen = Path(reference_dir) / "selection_doc_ids.npy"
        if seen.exists():
            os.environ[REF_CLOZE_SKIP_ENV] = str(seen)
        else:
            os.environ.pop(REF_CLOZE_SKIP_ENV, None)

        out = evaluate_checkpoint(
            model_dir, tasks, limit=limit, batch_size=batch_size, device=device, dtype=dtype, bootstrap_iters=bootstrap
        )
        out["reference_loss"] = reference_loss(model_dir, reference_dir, dtype=dtype)
    return out


def _cache_uri(run, args: tuple) -> str:
    """Where the result of ``_evaluate(*args)`` is kept: the arguments that change it, hashed (threads do not)."""
    model_dir, reference_dir, tasks, limit, batch_size, bootstrap, _threads, device, dtype, offline = args
    key = [model_dir, reference_dir, tasks, limit, batch_size, bootstrap, device, dtype, offline]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return storage.join(run.store, "_eval_cache", f"{digest}.json")


def _checkpoint_rows(run, keys: list[str]) -> list[dict]:
    """One row per checkpoint to evaluate: each round's mid-round decay branches, then its final checkpoint."""
    rows = []
    for key in keys:
        final = run.uri(key, "decay") if storage.exists(run.uri(key, "decay")) else run.uri(key, "state", "model")
        out = run.outputs(key)
        # the round's mid-round decay branches (pretrain.eval_branches), then its final checkpoint: step order
        mid = [(s, run.uri(key, "branches", str(s)), True) for s in out["branch_steps"]]
        for steps, model_dir, branch in [*mid, (out["end_step"], final, False)]:
            rows.append(
                {
                    "stage": key,
                    "round": out["round"],
                    "model_dir": model_dir,
                    "steps": steps,
                    "tokens": steps * out["tokens_per_step"],
                    "branch": branch,
                }
            )
    return rows


def _evaluate_args(run, model_dir: str, cpus: float, device: str) -> tuple:
    """The arguments of ``_evaluate`` for one checkpoint (also the cache key, see ``_cache_uri``)."""
    exp, e = run.exp, run.exp.eval
    return (
        model_dir,
        run.uri("tokenize", "reference", "eval_array"),  # held out from selection (data.reference_eval_frac)
        e.tasks,
        e.limit,
        e.batch_size,
        e.bootstrap_iters,
        max(1, int(cpus)),
        device,
        inference_dtype(resolve_precision(exp.resources.precision, device)),
        evaluates_offline(e.tasks, e.offline),
    )


def _evaluate_or_reuse(run, rows: list[dict], task, cpus: float, device: str) -> list[dict]:
    """Each row's result: from the run root's evaluation cache, else from a Ray task launched for it (all tasks
    run in parallel); marks each row ``evaluated_earlier`` and caches the fresh results."""
    cached, results = [], []
    for row in rows:
        args = _evaluate_args(run, row["model_dir"], cpus, device)
        cached.append(_cache_uri(run, args))
        blob = storage.read_bytes(cached[-1])
        results.append(json.loads(blob) if blob else task.remote(*args))
    pending = [i for i, r in enumerate(results) if isinstance(r, ray.ObjectRef)]
    for i, result in zip(pending, ray.get([results[i] for i in pending]), strict=True):
        results[i] = result
        storage.write_json(cached[i], result)  # after the result exists: a killed stage caches nothing half-done
    for i, row in enumerate(rows):
        row["evaluated_earlier"] = i not in pending  # by another variant sharing this checkpoint, or a rerun
    return results


def _summary(result: dict) -> dict:
    """The fields of a checkpoint's lm-eval result that its ``outputs.json`` row keeps."""
    avg = result.get("paper_average") or {}
    return {
        "paper_average": avg.get("value"),
        "paper_average_n_tasks": avg.get("n_tasks"),
        "paper_average_stderr": avg.get("stderr"),
        "reference_loss": result["reference_loss"],
        "lm_eval_version": result.get("lm_eval_version"),
        "tasks": {
            t: {"value": v["value"], "stderr": v["stderr"], "metric": v["metric"], "n": v["n"]}
            for t, v in result["tasks"].items()
        },
    }


def evaluate_checkpoints(run, st, d: Path) -> dict:
    exp, e = run.exp, run.exp.eval
    keys = list(st.deps) if e.every_round else list(st.deps)[-1:]
    gpu = use_gpu(exp.resources)
    cpus = max(1.0, exp.resources.cpus_per_worker)
    task = ray.remote(max_retries=2)(_evaluate).options(**task_options(exp.resources, "evaluate", cpus))
    rows = _checkpoint_rows(run, keys)
    results = _evaluate_or_reuse(run, rows, task, cpus, "cuda" if gpu else "cpu")
    (d / "results").mkdir(exist_ok=True)
    for row, result in zip(rows, results, strict=True):
        name = f"{row['stage']}.branch{row['steps']}" if row["branch"] else row["stage"]
        storage.write_json(d / "results" / f"{name}.json", result)
        row |= _summary(result)
    stage_dirs = {s.key: run.dir(s.key).name for s in run.stages}  # lets reports find this variant's stages
    split = "eval" if exp.data.reference_eval_frac > 0 else "all"  # "all": no split, the selection rows
    return {
        "checkpoints": rows,
        "tasks": e.tasks,
        "limit": e.limit,
        "stage_dirs": stage_dirs,
        "reference_split": split,
    }
