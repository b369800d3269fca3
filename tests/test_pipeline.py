"""The whole pipeline on a local Ray (experiments/tiny.yaml): every stage, idempotent reruns, exact
invalidation, the random baseline sharing round 0, the report, and the stock lm-eval CLI on a checkpoint.

    .venv/bin/python -m pytest tests/test_pipeline.py -q
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bliss_ray.data.corpus import resolve_files
from bliss_ray.data.packing import shard_of
from bliss_ray.pipeline import Run
from bliss_ray.stages.executor import execute
from tests.conftest import RAY_INTERNALS, REPO, load_tiny

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def test_every_stage_finishes_with_its_outputs(tiny_run):
    run, results = tiny_run
    assert all(run.done(s.key) for s in run.stages)
    # row counts against the files themselves, not against each other (the stages check those sums already)
    tok = results["tokenize"]
    assert tok["rows_in"] == sum(pq.ParquetFile(f).metadata.num_rows for f in resolve_files(run.exp.data.pool))
    assert tok["docs_packed"] + tok["rows_quarantined"] == tok["rows_in"]
    packed = sorted((run.dir("tokenize") / "pool" / "packed").glob("*.parquet"))
    assert tok["seqs"] == sum(pq.ParquetFile(f).metadata.num_rows for f in packed) > 1000
    sc = results["r1.score"]
    shard = (1, run.exp.schedule.rounds + 1) if run.exp.schedule.pool_sharding == "disjoint" else None
    pool_ids = np.concatenate([pq.read_table(f, columns=["row_id"]).column("row_id").to_numpy() for f in packed])
    in_shard = pool_ids if shard is None else pool_ids[shard_of(pool_ids, shard[1]) == shard[0]]
    scored = pads.dataset(run.dir("r1.score") / "scores", format="parquet", partitioning="hive").to_table()
    assert sc["rows_in"] == len(in_shard) == scored.num_rows > 0
    assert np.array_equal(np.sort(scored.column("row_id").to_numpy()), np.sort(in_shard))  # each row once
    ok = scored.column("ok").to_numpy()
    assert (sc["rows_scored"], sc["rows_quarantined"]) == (int(ok.sum()), int((~ok).sum()))
    sel = json.loads((run.dir("r1.select") / "manifest.json").read_text())
    assert sel["method"] == "topk" and sel["selected"] == int(sel["pool_size"] * 0.2)
    metrics = [json.loads(x) for x in (run.dir("r1.bilevel") / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"lower_loss", "kl", "upper_loss", "hypergrad_norm", "weight_entropy"} <= set(metrics[0])
    ev = results["evaluate"]["checkpoints"]
    # tiny: 6 steps per round, one mid-round branch (pretrain.eval_branches) at the round's step 3
    assert [(c["steps"], c["branch"]) for c in ev] == [(3, True), (6, False), (9, True), (12, False)]
    assert all(c["tokens"] == c["steps"] * 8 * 64 for c in ev) and ev[-1]["lm_eval_version"].startswith("0.4")
    assert set(ev[-1]["tasks"]) == {"bliss_ref_cloze", "sciq_local"}


def test_checkpoints_load_with_stock_transformers(tiny_run):
    run, _ = tiny_run
    for sub in ("decay", "state/model"):
        d = run.dir("r1.pretrain") / sub
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok("It was a truth universally acknowledged", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
    state = torch.load(run.dir("r1.pretrain") / "state" / "train_state.pt", weights_only=True)
    assert state["step"] == 12  # round 1 ends at 2 × 6 steps; the next round continues from here


def test_rerun_is_a_noop(tiny_run):
    """Reliability scenario 2 (driver killed between stages): rerunning a finished run runs no stage at all."""
    run, _ = tiny_run

    def must_not_run(*args):
        raise AssertionError(f"stage {args[1].key} ran again")

    t0 = time.perf_counter()
    execute(Run(load_tiny(), run.root.parent), runner=must_not_run)
    assert time.perf_counter() - t0 < 10


def test_changing_one_setting_reruns_only_what_depends_on_it(tiny_run):
    run, _ = tiny_run

    def pending(**overrides):
        r = Run(load_tiny(**overrides), run.root.parent)
        return [s.key for s in r.stages if not r.done(s.key)]

    assert pending(**{"eval.limit": 10}) == ["evaluate", "report"]
    assert pending(**{"bilevel.score_lr": 3e-3}) == [
        "r1.bilevel",
        "r1.score",
        "r1.select",
        "r1.pretrain",
        "evaluate",
        "report",
    ]
    assert pending(**{"resources.train_workers": 2}) == []  # resources never change results
    assert pending(**{"pretrain.lr": 1e-3})[0] == "r0.pretrain"


def test_random_baseline_shares_round_zero_and_the_report_compares(tiny_run, tmp_path):
    run, _ = tiny_run
    ran = []

    def counting(r, st, d):
        from bliss_ray.stages.steps import run_stage

        ran.append(st.key)
        return run_stage(r, st, d)

    execute(Run(load_tiny(**{"selection.method": "random"}), run.root.parent), runner=counting)
    assert ran == ["r1.select", "r1.pretrain", "evaluate", "report"]  # tokenize, warm-up and round 0 reused

    from bliss_ray.report.build import build_report

    report = build_report([run.root], tmp_path / "report").read_text()
    for section in (
        "## FLOPs",
        "## Downstream results",
        "## Bilevel training",
        "## Downstream vs target steps",
        "## Selection diagnostics",
        "Jaccard",
        "Speed-ups",
    ):
        assert section in report, section
    assert "| bliss (" in report and "| random (" in report
    for png in ("bilevel_curves.png", "downstream_vs_steps.png", "score_histograms.png", "domain_shares.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000


def test_stock_lm_eval_cli_on_a_pipeline_checkpoint(tiny_run, tmp_path):
    """The stock CLI loads the final decay checkpoint and reproduces what the evaluate stage recorded for it."""
    run, _ = tiny_run
    model_dir = run.dir("r1.pretrain") / "decay"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir}",
        "--tasks",
        "sciq_local",
        "--include_path",
        str(REPO / "bliss_ray/evaluation/tasks"),
        "--device",
        "cpu",
        "--batch_size",
        str(run.exp.eval.batch_size),  # the evaluate stage's: the same paddings, the same fp32 sums
        "--limit",
        str(run.exp.eval.limit),
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(Path(tmp_path / "out").rglob("results_*.json")).read_text())
    cli = results["results"]["sciq_local"]
    stage = json.loads((run.dir("evaluate") / "results" / "r1.pretrain.json").read_text())["tasks"]["sciq_local"]
    assert stage["n"] == results["n-samples"]["sciq_local"]["effective"] == run.exp.eval.limit
    for metric in ("acc", "acc_norm"):
        assert cli[f"{metric},none"] == pytest.approx(stage["metrics"][metric]["value"], abs=1e-12), metric


def test_compare_runs_four_methods_and_reports_table4(tiny_run, tmp_path):
    """``bliss-ray compare`` on the tiny comparison, one seed, into the session's run root: BLISS, MATES and random
    reuse what the other tests ran; the FLOPs-matched random adds only its longer last round; one report."""
    from bliss_ray.costs.ledger import ledger, totals
    from bliss_ray.studies.compare_spec import load_compare, target_step_flops
    from tests.conftest import private_ray_env

    run, _ = tiny_run
    spec_file = REPO / "experiments" / "compare" / "tiny.yaml"
    report = tmp_path / "compare" / "report.md"
    cmd = ["compare", str(spec_file), "--seeds", "0", "--out", str(run.root.parent), "--report", str(report)]
    bliss_ray = Path(sys.executable).with_name("bliss-ray")
    proc = subprocess.run([bliss_ray, *cmd], capture_output=True, text=True, env=private_ray_env(), timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # the console: run's lines for every variant between a start and an end line of its own, nothing of Ray's
    screen = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in screen if re.search(RAY_INTERNALS, line)], screen
    for name in ("bliss", "mates", "random", "random_flops"):
        ends = (rf"\S+ variant {name}, seed 0 \(\d of 4\): start$", rf"\S+ variant {name}, seed 0: done in .* loss \d")
        assert all(any(re.match(end, line) for line in screen) for end in ends), (name, screen)

    spec = load_compare(spec_file, [0])
    runs = {name: Run(spec.experiment(name, 0), run.root.parent) for name in spec.variants}
    bliss_total = totals(ledger(runs["bliss"].exp, pool_rows_per_round=runs["bliss"].outputs("r1.score")["rows_in"]))
    extra = [  # the extra steps compare chose, from the experiment its new evaluate stage recorded
        exp["schedule"]["final_extra_steps"]
        for d in run.root.glob("evaluate-*")
        if (exp := json.loads((d / "experiment.json").read_text())).get("label") == "random_flops"
    ]
    assert len(extra) == 1 and extra[0] > 0, extra
    matched = Run(spec.experiment("random_flops", 0, extra_steps=extra[0]), run.root.parent)
    assert all(matched.done(s.key) for s in matched.stages)
    assert abs(totals(ledger(matched.exp))["total"] - bliss_total["total"]) <= target_step_flops(matched.exp)
    # only the last round's pretraining (and what reads it) differs from the random baseline's stages
    own = [s.key for s in matched.stages if matched.ids[s.key] != runs["random"].ids.get(s.key)]
    assert own == ["r1.pretrain", "evaluate", "report"]
    steps = [c["steps"] for c in matched.outputs("evaluate")["checkpoints"]]
    per_round = 1 + run.exp.pretrain.eval_branches
    assert len(steps) == (run.exp.schedule.rounds + 1) * per_round
    assert max(steps) == (run.exp.schedule.rounds + 1) * run.exp.pretrain.steps + extra[0]
    # round 0 is every method's: its checkpoints were evaluated once, by the first variant; the results are the same
    random_rows = {(c["stage"], c["steps"]): c for c in runs["random"].outputs("evaluate")["checkpoints"]}
    for c in matched.outputs("evaluate")["checkpoints"]:
        assert c["evaluated_earlier"] == (c["round"] == 0), c
        if c["round"] == 0:
            assert c["reference_loss"] == random_rows[(c["stage"], c["steps"])]["reference_loss"]

    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "FLOPs" not in line.split("|")[2]]
    assert {line.split("|")[1].strip() for line in rows} >= set(spec.variants)
    for png in ("report_fig3_steps.png", "report_fig3_flops.png"):
        assert (report.parent / png).stat().st_size > 10_000
    # tiny.yaml measures every method against mates too: the table, and bliss head to head with mates
    assert "| vs mates: steps | vs mates: FLOPs |" in text and "Against `mates`:" in text
    for png in ("report_fig3_bliss_vs_mates_steps.png", "report_fig3_bliss_vs_mates_flops.png"):
        assert f"]({png})" in text and (report.parent / png).stat().st_size > 10_000
