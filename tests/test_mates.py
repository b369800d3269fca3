"""The MATES baseline (bliss_ray.mates, bliss_ray.stages.mates).

Pure tests (no Ray; a 3-step pythia-micro checkpoint trained in-process):
* probing is exact: a probe's loss equals a from-scratch single-process computation of the same AdamW step;
* probing restores the full state between probes: x-then-y equals y alone, and the same check FAILS when the
  optimizer restore (or the parameter restore) is switched off, so a leak cannot go unnoticed;
* the influence model: 512-token chunking + mean pooling, save/load + ``Scorer(kind="mates")``, pretrained-trunk
  loading, and learning a learnable synthetic target to held-out Spearman > 0.5;
* the FLOPs ledger has MATES's rows (and ``bliss-ray flops`` prints them for the paper recipe), and a report
  charges probing with the reference batches the probe stage measured (``Prober.reference_batches``).
Gumbel selection with τ → 0 = deterministic bottom-k is tests/test_selection.py's
``test_gumbel_tau_to_zero_is_topk_and_mates_is_bottom_k``.

Ray test (marked ``ray``): a tiny MATES pipeline into the session's ``tiny_run`` directory reuses tokenize,
warm-up and round 0, runs probe → influence (Ray Train) → score → select → pretrain, its actor-pool probes equal
in-process probes of the same rows, and the report shows the MATES variant next to BLISS with FLOPs.

    .venv/bin/python -m pytest tests/test_mates.py -q
    .venv/bin/python -m pytest tests/test_mates.py -q -m "not ray"     # the pure part, seconds
"""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from bliss_ray import storage
from bliss_ray.mates.influence import InfluenceModel, train_influence_model
from bliss_ray.mates.probe import Prober
from bliss_ray.models.arch import arch_from_preset, influence_arch
from bliss_ray.models.lm import build_lm
from bliss_ray.train.checkpoint import load_train_state, save_train_state
from bliss_ray.train.loop import make_optimizer
from tests.conftest import REPO, load_tiny

V, L = 256, 32  # vocabulary and row length of the pure tests
LR = 3e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A target state after 3 AdamW steps (non-trivial moments and step counts), a reference set whose items
    are right-padded with a continuation mask (exercises the prober's padding trim), and candidates."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_lm(arch_from_preset("pythia-micro", V), L, seed=0)
    opt = make_optimizer(model, LR, (0.9, 0.95), 0.1)
    for _ in range(3):
        x = torch.from_numpy(rng.integers(0, V, (4, L)))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    d = tmp_path_factory.mktemp("ckpt")
    save_train_state(d, model, opt, step=3)
    ref = rng.integers(0, V, (6, L))
    mask = np.zeros((6, L), np.int8)
    for i, end in enumerate([10, 32, 20, 15, 27, 8]):  # items of different lengths, target = last 3 tokens
        mask[i, end - 3 : end] = 1
        ref[i, end:] = 0  # padding after the item
    return d, ref, mask, rng.integers(0, V, (3, L))


def _direct_probe(state_dir, x, ref, mask, lr) -> float:
    """The same probe written from scratch: fresh model and optimizer from disk, one AdamW step on {x}, and the
    reference loss over full (untrimmed) rows as total masked NLL / masked tokens."""
    model, state = load_train_state(state_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt.load_state_dict(state["optimizer"])
    for g in opt.param_groups:
        g["lr"] = lr
    xb = torch.as_tensor(x[None], dtype=torch.long)  # (1, L)
    model(input_ids=xb, labels=xb).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.eval()
    with torch.no_grad():
        ids = torch.as_tensor(ref, dtype=torch.long)
        logits = model(input_ids=ids).logits  # (R, L, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1)
        m = torch.as_tensor(mask[:, 1:], dtype=nll.dtype)
        return ((nll * m).sum() / m.sum()).item()


def test_probe_equals_a_direct_one_step_update(checkpoint):
    state_dir, ref, mask, cand = checkpoint
    prober = Prober(state_dir, ref, mask, LR, reference_batch_seqs=4)
    losses = prober.probe(cand)  # the third probe runs after two others: restore is part of what is checked
    for i in range(len(cand)):
        assert losses[i] == pytest.approx(_direct_probe(state_dir, cand[i], ref, mask, LR), rel=1e-6, abs=1e-7)
    assert prober.baseline_loss == pytest.approx(_direct_probe(state_dir, cand[0], ref, mask, 0.0), rel=1e-6)
    assert np.all(np.abs(losses - prober.baseline_loss) > 1e-5)  # the step really changes the reference loss
    # items sorted by length (8, 10, 15, 20 | 27, 32) in batches of 4, each cut after its longest item: what one
    # reference evaluation computes, and what the FLOPs ledger charges per probe
    assert prober.reference_batches == [(4, 20), (2, 32)]
    assert prober.reference_tokens == 4 * 20 + 2 * 32 < 6 * L


def test_probing_restores_the_full_state_between_probes(checkpoint):
    """x then y must give y's loss exactly as y alone; without the optimizer restore (moments + step counts
    leak) or without the parameter restore it does not, so this test fails whenever state leaks."""
    state_dir, ref, mask, cand = checkpoint
    x, y = cand[0], cand[1]
    prober = Prober(state_dir, ref, mask, LR)
    alone = prober.probe(y[None])[0]
    assert prober.probe(np.stack([x, y]))[1] == alone  # bit-identical
    step0 = [s["step"].item() for s in prober.optimizer.state.values()]

    prober.restore_optimizer = lambda: None  # a leaky prober: parameters restored, AdamW state not
    leaked = prober.probe(np.stack([x, y]))[1]
    assert abs(leaked - alone) > 1e-7 * abs(alone)
    assert [s["step"].item() for s in prober.optimizer.state.values()] != step0  # the step counts leaked too

    fresh = Prober(state_dir, ref, mask, LR)
    fresh.restore_params = lambda: None  # the other half of the state
    assert abs(fresh.probe(np.stack([x, y]))[1] - alone) > 1e-7 * abs(alone)


def test_influence_model_chunks_long_rows_at_512_and_mean_pools(tmp_path):
    model = InfluenceModel(influence_arch("bert-tiny", V), seed=0).eval()
    ids = torch.randint(0, V, (2, 1024))
    with torch.no_grad():
        pred = model(ids)[0]  # (2,)
        halves = [model.bert(input_ids=ids[:, s : s + 512]).last_hidden_state for s in (0, 512)]  # 2 × (2, 512, d)
        manual = model.head(torch.cat(halves, 1).mean(1)).squeeze(-1)  # mean over all 1024 tokens
        torch.testing.assert_close(pred, manual, rtol=1e-5, atol=1e-6)
        odd = torch.randint(0, V, (2, 600))  # the short last chunk (88 tokens) is padded and masked out
        parts = [
            model.bert(input_ids=odd[:, :512]).last_hidden_state,
            model.bert(input_ids=odd[:, 512:]).last_hidden_state,
        ]
        manual = model.head(torch.cat(parts, 1).mean(1)).squeeze(-1)  # (2,): mean over the 600 real tokens
        torch.testing.assert_close(model(odd)[0], manual, rtol=1e-5, atol=1e-6)
    assert pred.dtype == torch.float32

    from bliss_ray.selection.scoring import Scorer

    model.save(tmp_path / "im")
    assert not list(tmp_path.glob("im/*.pt")) and not list(tmp_path.glob("im/*.bin"))  # safetensors + json only
    rows = np.random.default_rng(0).integers(0, V, (5, 64))
    out = Scorer(str(tmp_path / "im"), batch_seqs=2, kind="mates")({"row_id": np.arange(5), "input_ids": rows})
    with torch.no_grad():
        direct = model(torch.as_tensor(rows))[0].numpy()
    np.testing.assert_allclose(out["logit"], direct, rtol=1e-5, atol=1e-6)
    assert out["ok"].all() and np.array_equal(out["score"], out["logit"])  # MATES ranks the raw prediction


def test_pretrained_trunk_loads_where_shapes_match_but_never_word_embeddings(tmp_path):
    from safetensors.torch import save_file

    donor = InfluenceModel(influence_arch("bert-tiny", 999), seed=1)
    weights = {f"bert.{k}": v.contiguous() for k, v in donor.bert.state_dict().items()}
    weights["cls.predictions.bias"] = torch.zeros(999)  # an MLM head, as in bert-base-uncased's checkpoint
    (tmp_path / "bert").mkdir()
    save_file(weights, tmp_path / "bert" / "model.safetensors")
    model = InfluenceModel(influence_arch("bert-tiny", V), seed=0)
    before = model.bert.embeddings.word_embeddings.weight.clone()
    info = model.load_pretrained_trunk(tmp_path / "bert")
    assert "embeddings.position_embeddings.weight" in info["loaded"] and len(info["loaded"]) > 20
    assert "bert.embeddings.word_embeddings.weight" in info["skipped"]
    torch.testing.assert_close(
        model.bert.encoder.layer[0].output.dense.weight, donor.bert.encoder.layer[0].output.dense.weight
    )
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before)


@pytest.fixture
def one_thread():
    """bert-tiny's matrices are too small for intra-op threads: 1 thread is ~30× faster on a loaded 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_influence_model_learns_a_learnable_target_and_reports_heldout_spearman(one_thread):
    """Target = 7 + 3 · (fraction of tokens from the lower half of the vocabulary): mean pooling + a linear head
    can represent it, so held-out Spearman must be high; it is reported per epoch and the best epoch is kept."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.1, 0.9, 200)[:, None]  # (N, 1) per-row share of "low" tokens
    ids = np.where(
        rng.uniform(size=(200, L)) < p, rng.integers(0, V // 2, (200, L)), rng.integers(V // 2, V, (200, L))
    )
    losses = 7.0 + 3.0 * (ids < V // 2).mean(1)
    fit = train_influence_model(ids, losses, arch=influence_arch("bert-tiny", V), lr=1e-3, epochs=3, batch_seqs=16)
    assert (fit.train_rows, fit.heldout_rows) == (180, 20)  # the 90/10 split
    assert len(fit.history) == 3 and all("spearman" in h and "heldout_mse" in h for h in fit.history)
    assert fit.spearman_heldout == max(h["spearman"] for h in fit.history) > 0.5
    assert fit.target_mean == pytest.approx(losses.mean())


def test_ledger_has_the_mates_rows():
    from bliss_ray.config import load_experiment
    from bliss_ray.costs.ledger import format_ledger, ledger, totals

    exp = load_experiment(REPO / "experiments" / "paper" / "pythia410m_mates.yaml")
    rows = {r.stage: r.flops for r in ledger(exp)}
    assert rows["target pretraining"] == pytest.approx(6.35e19, rel=1e-3)  # same target recipe as BLISS's Table 1
    for stage in ("oracle probing", "influence-model training", "influence-model inference"):
        assert rows[stage] > 0, stage
    assert "proxy warm-up" not in rows and "bilevel optimisation" not in rows
    assert totals(ledger(exp))["total"] == pytest.approx(sum(v for k, v in rows.items() if k != "decay branches"))
    assert "oracle probing" in format_ledger(ledger(exp))
    bert = dataclasses.replace(influence_arch("bert-base"), vocab_size=50304)
    assert bert.family == "bert" and (bert.n_layer, bert.d_model) == (12, 768)


def test_report_ledger_counts_the_reference_batches_the_probe_stage_measured(tmp_path):
    """``bliss-ray report`` charges probing with what a finished probe stage computed (its outputs'
    ``reference_batches``), not the config's estimate: the plumbing from run directory to ledger."""
    from bliss_ray.config import load_experiment
    from bliss_ray.costs.ledger import ledger
    from bliss_ray.report.build import _variant_flops
    from bliss_ray.report.collect import Variant

    exp = load_experiment(REPO / "experiments" / "paper" / "pythia410m_mates.yaml")
    probe_dir = tmp_path / "r1.probe-0123"
    probe_dir.mkdir()
    (probe_dir / "outputs.json").write_text(json.dumps({"reference_batches": [[32, 61], [32, 97]]}))
    (probe_dir / "_SUCCESS").write_text("")
    variant = Variant(tmp_path, exp.model_dump(mode="json"), {"stage_dirs": {"r1.probe": probe_dir.name}})
    assert variant.probe_reference_batches() == [(32, 61), (32, 97)]
    probing = {r.stage: r.flops for r in _variant_flops(variant)[0]}["oracle probing"]
    assert probing == pytest.approx(
        {r.stage: r.flops for r in ledger(exp, reference_batches=[(32, 61), (32, 97)])}["oracle probing"]
    )
    assert probing != pytest.approx({r.stage: r.flops for r in ledger(exp)}["oracle probing"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tiny_mates_pipeline_reuses_round_zero_and_reports_with_flops(tiny_run, tmp_path):
    from bliss_ray.costs.ledger import ledger, totals
    from bliss_ray.data.tokens import TokenArray
    from bliss_ray.pipeline import Run
    from bliss_ray.report.build import build_report
    from bliss_ray.report.collect import find_variants
    from bliss_ray.stages.executor import execute
    from bliss_ray.stages.inputs import pool_files, shard_sample
    from bliss_ray.stages.mates import probe_lr
    from bliss_ray.stages.steps import run_stage

    bliss_run, _ = tiny_run
    overrides = {
        "selection.method": "mates",
        "mates.probes": 32,
        "mates.reference_seqs": 8,
        "mates.influence_epochs": 2,
    }
    ran = []

    def counting(r, st, d):
        ran.append(st.key)
        return run_stage(r, st, d)

    run = Run(load_tiny(**overrides), bliss_run.root.parent)
    # a chunk an earlier attempt finished, in the stage's location in the store: probing resumes without it
    keep = shard_sample(run, 1, 32, run.exp.seed, 1, 2).resolve(pool_files(run))
    chunk_ids = TokenArray.build(pool_files(run), tmp_path / "cand", keep_ids=keep).row_ids[16:32]
    planted = pa.table({"row_id": pa.array(chunk_ids, pa.int64()), "loss": pa.array(np.full(16, 1e6))})
    pq.write_table(planted, tmp_path / "chunk.parquet")
    storage.write_bytes(run.uri("r1.probe", "_chunks", "000001.parquet"), (tmp_path / "chunk.parquet").read_bytes())
    results = execute(run, runner=counting)
    assert ran == ["r1.probe", "r1.influence", "r1.score", "r1.select", "r1.pretrain", "evaluate", "report"]

    probe = results["r1.probe"]
    probes = pq.read_table(run.dir("r1.probe") / "probes.parquet")
    assert probe["probes"] == len(probes) == 32 and probe["probes_finite"] == 32
    assert probe["probes_per_s"] > 0 and probe["target_step"] == 6
    probed = dict(zip(probes.column("row_id").to_numpy(), probes.column("loss").to_numpy(), strict=True))
    assert [probed[i] for i in chunk_ids] == [1e6] * 16 and not storage.exists(run.uri("r1.probe", "_chunks"))
    # the actor pool's (row id, loss) pairs equal in-process probes of the same rows: no chunk/row mix-up
    ids = np.array([i for i in probes.column("row_id").to_numpy() if i not in set(chunk_ids)])[[0, 7, 15]]
    rows = TokenArray.build(pool_files(run), tmp_path / "rows", keep_ids=ids)
    ref = TokenArray.open(run.dir("tokenize") / "reference" / "array")
    prober = Prober(run.dir("r0.pretrain") / "state", ref.tokens[:8], None, probe_lr(run, 1, 6))
    assert prober.baseline_loss == pytest.approx(probe["baseline_loss"], rel=1e-6)
    expected = dict(zip(probes.column("row_id").to_numpy(), probes.column("loss").to_numpy(), strict=True))
    np.testing.assert_allclose(prober.probe(rows.tokens), [expected[i] for i in rows.row_ids], rtol=1e-6)

    inf = results["r1.influence"]
    assert "spearman_heldout" in inf and inf["train_rows"] + inf["heldout_rows"] == 32
    metrics = [json.loads(x) for x in (run.dir("r1.influence") / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all("spearman" in m for m in metrics)
    assert (run.dir("r1.influence") / "influence_model" / "model.safetensors").exists()
    sel = json.loads((run.dir("r1.select") / "manifest.json").read_text())
    assert sel["method"] == "mates" and sel["temperature"] == 1.0

    assert probe["reference_batches"] == [[8, run.exp.data.seq_len]]  # a passage reference: 8 whole rows
    rows = ledger(
        run.exp, pool_rows_per_round=results["r1.score"]["rows_in"], reference_batches=probe["reference_batches"]
    )
    stages = {r.stage: r.flops for r in rows}
    for stage in ("oracle probing", "influence-model training", "influence-model inference"):
        assert stages[stage] > 0, stage
    report = build_report([run.root], tmp_path / "report").read_text()
    assert f"| mates ({totals(rows)['total']:.3g}) |" in report  # Table 4: the MATES row with its total FLOPs
    assert "| bliss (" in report
    if any(v.method == "random" for v in find_variants([run.root])):  # when test_pipeline's random run exists
        assert "| random (" in report
