"""Communication-aware planning (``bliss_ray.costs.comms``, ``costs.layouts``, ``bliss-ray plan``): the bytes a
step of the paper's 1B preset sends under DDP, FSDP and HSDP, worked out by hand; the layout the plan recommends on
two 8-GPU nodes; the memory that reducing gradients once per step costs; the HSDP settings' validation.

    .venv/bin/python -m pytest tests/test_comms.py -q
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bliss_ray import cli
from bliss_ray.config import GPU_TYPES, ConfigError, load_experiment
from bliss_ray.costs import comms, memory
from bliss_ray.costs.planner import plan_experiment
from bliss_ray.models.arch import arch_from_preset

REPO = Path(__file__).resolve().parents[1]
P1B = REPO / "experiments" / "paper" / "pythia1b.yaml"

# Pythia-1B (16 blocks, d 2048, d_ff 8192, vocabulary 50304, untied embeddings):
# a block: qkv 3d² + 3d, dense d² + d, MLP 2·d·d_ff + d_ff + d, 2 LayerNorms 4d = 50,358,272
BLOCK = 3 * 2048**2 + 3 * 2048 + 2048**2 + 2048 + 2 * 2048 * 8192 + 8192 + 2048 + 4 * 2048
ROOT = 2 * 50304 * 2048 + 2 * 2048  # embedding + LM head + final LayerNorm = 206,049,280 (FSDP's root unit)
P = 16 * BLOCK + ROOT  # 1,011,781,632
BLOCKS = P - ROOT
# 16 A100s on 2 p4d nodes of 8; 512 sequences a step at micro-batch 8: 512 / (8 · 16) = 4 micro-batches per worker;
# bf16 all-gathers (2 B a parameter), fp32 gradient reductions (4 B); ring collectives over n: (n − 1)/n of the
# tensor per rank for all-gather and reduce-scatter, twice that for all-reduce
N, S, A = 16, 8, 4
GATHERS = lambda n: A * (n - 1) / n * 2 * (P + BLOCKS)  # noqa: E731  (forward: all units; backward: the blocks)
EXPECTED_BYTES = {
    ("ddp", "last_micro_batch"): 2 * 15 / 16 * 4 * P,  # 7.59 GB: one all-reduce a step
    ("fsdp", "every_micro_batch"): GATHERS(16) + A * 15 / 16 * 4 * P,  # 28.81 GB
    ("fsdp", "last_micro_batch"): GATHERS(16) + 15 / 16 * 4 * P,  # 17.43 GB
    # HSDP: gathers and reduce-scatters among a node's 8, all-reduce of each rank's 1/8 across the 2 nodes
    ("hsdp", "every_micro_batch"): GATHERS(8) + A * (7 / 8 * 4 * P + 2 * 1 / 2 * 4 * P / 8),  # 28.91 GB
    ("hsdp", "last_micro_batch"): GATHERS(8) + 7 / 8 * 4 * P + 2 * 1 / 2 * 4 * P / 8,  # 16.77 GB
}


def _pretrain(plan):
    return next(s for s in plan.stages if s.kind == "pretrain")


def test_pythia1b_counts_as_worked_out():
    arch = arch_from_preset("pythia-1b", 50304)
    assert (arch.block_params(), arch.root_params(), memory.n_params(arch)) == (BLOCK, ROOT, P)
    assert P == 1_011_781_632


def test_bytes_per_step_of_the_1b_preset_under_ddp_fsdp_hsdp_match_hand_arithmetic():
    stage = _pretrain(plan_experiment(load_experiment(P1B), "A100-40GB", N))
    got = {c.key: c.comm.bytes for c in stage.layouts if c.shape.micro_batch_seqs == 8}
    assert got.keys() == EXPECTED_BYTES.keys()
    for key, expected in EXPECTED_BYTES.items():
        assert got[key] == pytest.approx(expected, rel=1e-12), key
    # time of HSDP's step: its node-local bytes over NVLink (300 GB/s each way), the all-reduce of 8 shards at
    # once over the node's 400 Gb/s: 50 GB/s ÷ 8 per rank
    hsdp = next(c for c in stage.layouts if c.key == ("hsdp", "last_micro_batch"))
    across = 2 * 1 / 2 * 4 * P / 8
    assert hsdp.comm.seconds == pytest.approx((EXPECTED_BYTES[hsdp.key] - across) / 300e9 + across / (50e9 / 8))
    ddp = next(c for c in stage.layouts if c.key == ("ddp", "last_micro_batch"))  # a ring over both nodes
    assert ddp.comm.seconds == pytest.approx(EXPECTED_BYTES[ddp.key] / 50e9)


def test_plan_on_two_a100_nodes_prints_comm_over_compute_per_layout_and_picks_hsdp():
    proc = subprocess.run(
        [sys.executable, "-m", "bliss_ray.cli", "plan", str(P1B), "--gpu", "A100-40GB", "--gpus", "16"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "8 per node (p4d.24xlarge): NVLink 3 300 GB/s per worker, 50 GB/s per node between nodes" in out
    row = r"^\| pretrain \| (ddp|fsdp|hsdp 2 × 8)(?: \(configured\))? \| (\S+) micro-batch \|.*\| ([0-9.]+) \|$"
    ratios = {(layout, sync): float(r) for layout, sync, r in re.findall(row, out, re.M)}
    layouts = [("ddp", "last"), ("fsdp", "every"), ("fsdp", "last"), ("hsdp 2 × 8", "every"), ("hsdp 2 × 8", "last")]
    assert sorted(ratios) == layouts
    assert min(ratios, key=ratios.get) == ("hsdp 2 × 8", "last")  # its all-gathers stay on NVLink
    assert ratios[("fsdp", "every")] > 3 * ratios[("hsdp 2 × 8", "last")]
    rec = re.search(r"^recommended layout: (.*)$", out, re.M).group(1)
    assert rec.startswith("hsdp 2 × 8, gradients reduced on the last micro-batch")
    assert rec.endswith("--set resources.parallelism=hsdp --set resources.grad_sync=last_micro_batch")


def test_gpus_per_node_sets_the_hsdp_groups(capsys):
    assert cli.main(["plan", str(P1B), "--gpu", "A100-40GB", "--gpus", "16", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "| pretrain | hsdp 4 × 4 |" in out and "16 × A100-40GB, 4 per node" in out
    assert cli.main(["plan", str(P1B), "--gpu", "A100-40GB", "--gpus", "8"]) == 0  # one node: nothing to replicate
    assert "hsdp" not in capsys.readouterr().out


def test_reducing_once_per_step_charges_the_unsharded_gradients():
    arch = arch_from_preset("pythia-1b", 50304)
    every = memory.Shape(1024, 8, 16, "hsdp", "none", 2, "bf16-mixed", 8, "every_micro_batch", 512)
    last = memory.Shape(1024, 8, 16, "hsdp", "none", 2, "bf16-mixed", 8, "last_micro_batch", 512)
    a, b = memory.train_step(arch, every), memory.train_step(arch, last)
    assert b.peak - a.peak == pytest.approx(4 * P)  # fp32, every parameter, kept across micro-batches
    assert a.kept["AdamW"] == pytest.approx(8 * P / 8)  # HSDP shards over the node's 8, not all 16
    one_micro = memory.Shape(1024, 8, 16, "hsdp", "none", 2, "bf16-mixed", 8, "last_micro_batch", 128)
    assert memory.train_step(arch, one_micro).peak == pytest.approx(a.peak)  # nothing to accumulate


def test_every_gpu_type_has_an_interconnect():
    assert tuple(comms.INTERCONNECTS) == GPU_TYPES


def test_comms_math_imports_without_torch_pydantic_or_ray():
    code = "import sys\nfor m in ('torch', 'ray', 'pydantic'): sys.modules[m] = None\nimport bliss_ray.costs.comms"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (
            ["resources.parallelism=hsdp", "resources.train_workers=8", "resources.hsdp_shard_size=3"],
            "resources.hsdp_shard_size: 3 does not divide resources.train_workers=8",
        ),
        (["resources.hsdp_shard_size=0"], "resources.hsdp_shard_size"),
        (["resources.grad_sync=never"], "resources.grad_sync"),
        (["resources.parallelism=hsdp", "resources.precision=fp16-mixed"], "resources.precision"),
    ],
)
def test_hsdp_settings_are_validated_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        load_experiment(REPO / "experiments" / "demo.yaml", overrides)
    assert re.search(r"^  resources(\.\w+)?: ", str(e.value), re.M), str(e.value)


def test_plan_refuses_hsdp_groups_that_do_not_divide_the_workers():
    exp = load_experiment(P1B, ["resources.parallelism=hsdp", "resources.hsdp_shard_size=8"])
    with pytest.raises(ConfigError, match=r"resources\.hsdp_shard_size: 8 does not divide the 12 workers"):
        plan_experiment(exp, "A100-40GB", 12)
