"""The memory planner (``bliss_ray.costs.memory``, ``bliss_ray.costs.planner``, ``bliss-ray plan``): its estimate
against a real step's measured peak, its verdicts on the paper presets, and ``bliss-ray run`` refusing what cannot fit.

    .venv/bin/python -m pytest tests/test_plan.py -q
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bliss_ray import cli
from bliss_ray.config import GPU_TYPES, ConfigError, apply_overrides, load_experiment, parse_experiment
from bliss_ray.costs import memory
from bliss_ray.costs.plan_format import format_plan
from bliss_ray.costs.planner import check_fits, measured_mfu, plan_experiment
from bliss_ray.models.arch import arch_from_preset

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "experiments" / "paper").glob("*.yaml"))
P1B = REPO / "experiments" / "paper" / "pythia1b.yaml"

# Runs in a fresh interpreter: one warm-up step (AdamW state, kernels), then one profiled step. The profiler's
# allocation events carry the CPU allocator's running total of bytes allocated since profiling started (c10's
# ProfiledCPUMemoryReporter): its maximum is the step's peak of live torch allocations above what existed before,
# the CPU counterpart of torch.cuda.max_memory_allocated. Adding the bytes of the tensors alive at the start
# (weights, AdamW moments; grads are None after zero_grad) gives the step's absolute peak. RSS would not do: glibc
# keeps freed pages, and the interpreter, libraries and the profiler itself move it by tens of MB.
MEASURE = """
import json, sys, torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
from bliss_ray.train.loop import lm_loss, make_optimizer
preset, vocab, seq_len, micro, accumulation, ac = json.loads(sys.argv[1])
torch.set_num_threads(1)
model = build_lm(arch_from_preset(preset, vocab), seq_len)
if ac:
    model.activation_checkpointing_enable(every_n_layers=ac)
opt = make_optimizer(model, 1e-3, (0.9, 0.95), 0.1)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, vocab, (micro, seq_len), generator=g) for _ in range(accumulation)]
def step():
    for x in batches:
        (lm_loss(model, x) / accumulation).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
start = sum(p.numel() * p.element_size() for p in model.parameters())
start += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
events, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
while events:
    e = events.pop()
    events.extend(e.children)
    if e.tag == _EventType.Allocation:
        peak = max(peak, e.extra_fields.total_allocated)
print(json.dumps({"peak": start + peak}))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "preset,vocab,seq_len,micro,ac",
    [
        ("pythia-tiny", 8192, 128, 8, 0),  # the demo's target
        ("pythia-31m", 50304, 256, 2, 0),  # the paper's proxy (the loss's B·T·V buffers dominate)
        ("pythia-31m", 50304, 256, 2, 1),  # with every block checkpointed
        ("pythia-31m", 8192, 512, 4, 2),  # every 2nd block: activations dominate
    ],
)
def test_estimate_matches_the_measured_peak_of_a_cpu_step(preset, vocab, seq_len, micro, ac):
    """Two micro-batches per step, as the paper presets accumulate (gradients stay allocated through the second)."""
    args = json.dumps([preset, vocab, seq_len, micro, 2, ac])
    proc = subprocess.run([sys.executable, "-c", MEASURE, args], capture_output=True, text=True, cwd=REPO, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    mode = {0: "none", 1: "full"}.get(ac, "every_k")
    shape = memory.Shape(seq_len, micro, 1, "ddp", mode, max(ac, 2), "fp32")
    estimate = memory.train_step(arch_from_preset(preset, vocab), shape).peak
    assert abs(estimate / measured - 1) < 0.25, (estimate / 2**20, measured / 2**20)


def test_checkpointing_and_sharding_lower_the_estimate_as_their_formulas_say():
    arch = arch_from_preset("pythia-1b", 50304)
    base = memory.Shape(1024, 8, 8, "ddp", "none", 2, "bf16-mixed")
    ddp, fsdp = memory.train_step(arch, base), memory.train_step(arch, memory.Shape(1024, 8, 8, "fsdp"))
    assert fsdp.kept["AdamW"] == pytest.approx(ddp.kept["AdamW"] / 8)
    full = memory.train_step(arch, memory.Shape(1024, 8, 8, "ddp", "full", 2, "bf16-mixed"))
    # a checkpointed layer keeps its fp32 residual input (4·s·b·h) instead of Korthikanti's 34·s·b·h
    assert full.kept["activations"] == pytest.approx(16 * 4 * 1024 * 8 * 2048)
    assert memory.checkpointed_layers(16, "every_k", 3) == 6  # blocks 0, 3, 6, 9, 12, 15


def test_device_table_and_config_agree():
    assert tuple(memory.DEVICES) == GPU_TYPES
    assert memory.device_of("NVIDIA A100-SXM4-80GB", 85_094_301_696) == "A100-80GB"
    assert memory.device_of("NVIDIA A100-SXM4-40GB", 42_505_273_344) == "A100-40GB"
    assert memory.device_of("NVIDIA L40S", 48 * 2**30) is None


def test_memory_math_imports_without_pydantic_or_ray():
    """bench/gpu_bench.py prints the planner's numbers on GPU machines that have neither."""
    code = "import sys\nfor m in ('ray', 'pydantic'): sys.modules[m] = None\nimport bliss_ray.costs.memory"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_flops_and_plan_commands_run_without_torch_or_transformers():
    """The ledger and the planner are arithmetic on ``models.arch``: ``bliss-ray flops`` / ``plan`` answer in about a
    second instead of the ten that importing torch and transformers took on 2 cores."""
    code = (
        "import sys\nfor m in ('torch', 'transformers'): sys.modules[m] = None\nfrom bliss_ray import cli\n"
        f"assert cli.main(['flops', '{P1B}']) == 0\nassert cli.main(['plan', '{P1B}', '--gpu', 'A10G-24GB']) == 0"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "target pretraining" in proc.stdout and "| pretrain |" in proc.stdout


def test_plan_cli_paper_1b_fits_eight_a10g_and_ddp_does_not(capsys):
    assert cli.main(["plan", str(P1B), "--gpu", "A10G-24GB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" not in out and "| pretrain | 5 | 8 | pythia-1b | fsdp" in out
    assert "double backward through FSDP2-sharded parameters is unverified" in out  # bilevel stays replicated
    overrides = ["--set", "resources.parallelism=ddp", "--set", "resources.activation_checkpointing=none"]
    assert cli.main(["plan", str(P1B), "--gpu", "A10G-24GB", "--gpus", "8", *overrides]) == 0
    out = capsys.readouterr().out
    assert "does not fit on A10G-24GB" in out
    fix = re.search(r"^fix: (.*)$", out, re.M).group(1)
    # the fastest layout that fits two g5.12xlarge nodes (4 A10Gs each, 40 Gb/s between them): HSDP, reducing
    # gradients once per step, so only one all-reduce per step crosses the network
    assert "resources.parallelism=hsdp" in fix and "resources.grad_sync=last_micro_batch" in fix
    # the printed fix really fits
    pairs = [f.split("=", 1) for f in fix.replace("--set ", "").split()]
    exp = load_experiment(P1B, ["resources.parallelism=ddp", "resources.activation_checkpointing=none"])
    fixed = parse_experiment(apply_overrides(exp.model_dump(mode="json"), [f"{k}={v}" for k, v in pairs]))
    assert plan_experiment(fixed, "A10G-24GB", 8).fits


# The node type each cluster config provisions, by the planner's device names: what a preset's gpu_type must name.
CLUSTER_DEVICES = {
    "A10G-24GB": ("aws.yaml", "g5."),
    "L4-24GB": ("gcp.yaml", "nvidia-l4"),
    "A100-40GB": ("aws.yaml", "p4d."),
}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_preset_names_a_cluster_node_type_and_fits_it(path):
    exp = load_experiment(path)
    device = exp.resources.gpu_type
    assert device in CLUSTER_DEVICES, f"{path.name}: resources.gpu_type must name a node type of cluster/"
    config, marker = CLUSTER_DEVICES[device]
    node_types = yaml.safe_load((REPO / "cluster" / config).read_text())["available_node_types"]
    assert any(marker in json.dumps(t["node_config"]) for t in node_types.values()), (config, marker)
    plan = plan_experiment(exp, device)
    assert plan.fits, format_plan(plan)


def test_run_refuses_a_config_that_cannot_fit_before_any_compute(tmp_path, monkeypatch, capsys):
    from bliss_ray.stages import executor

    class Started(Exception):
        pass

    def no_run(*a, **k):
        raise Started

    monkeypatch.setattr(executor, "run_experiment", no_run)
    args = ["run", str(P1B), "--set", "resources.parallelism=ddp", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit A10G-24GB" in err and "fix: --set resources.parallelism=hsdp" in err
    with pytest.raises(Started):  # the flag overrides the check: the pipeline is reached
        cli.main([*args, "--no-plan-check"])


def test_check_fits_names_a_bigger_device_when_no_setting_helps():
    exp = load_experiment(REPO / "experiments" / "paper" / "pythia1b_mates.yaml")
    with pytest.raises(ConfigError, match=r"(?s)probe needs .* it needs at least A100-40GB"):
        check_fits(exp, "A10G-24GB")


@pytest.mark.parametrize(
    "override,field",
    [
        ("resources.parallelism=zero3", "resources.parallelism"),
        ("resources.activation_checkpointing=some", "resources.activation_checkpointing"),
        ("resources.activation_checkpointing_k=1", "resources.activation_checkpointing_k"),
        ("resources.precision=bf16", "resources.precision"),
        ("resources.gpu_type=V100", "resources.gpu_type"),
    ],
)
def test_new_resource_settings_are_validated_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_experiment(REPO / "experiments" / "demo.yaml", [override])


def test_measured_mfu_comes_from_the_gpu_section_gpu_bench_writes(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gpu_bench import render_section
    finally:
        sys.path.remove(str(REPO / "bench"))
    train = {"batch": 32, "seq_len": 1024, "micro": 16, "seconds": [1.0], "peak_memory_gb": 20.0, "planned_gib": 19.0}
    run = {
        "machine": {"cores": 16, "torch": "2.13", "date": "today"},
        "device_name": "NVIDIA H100 80GB HBM3",
        "planner_device": "H100-80GB",
        "peak_flops": 989e12,
        "command": "bash bench/gpu.sh",
        "train": [  # the checkpointed row is not the model's MFU: the plan reads the plain one
            {**train, "preset": "pythia-410m", "ac": 0, "mfu": 0.40, "mfu_full_attention": 0.41},
            {**train, "preset": "pythia-410m", "ac": 1, "mfu": 0.30, "mfu_full_attention": 0.31},
        ],
        "outer": {"preset": "pythia-31m", "target": "pythia-410m", "batch": 4, "seq_len": 1024, "seconds": [2.0]}
        | {"mfu": 0.02, "mfu_full_attention": 0.03, "peak_memory_gb": 30.0},
        "score": {"preset": "pythia-31m", "rows": 8192, "seq_len": 1024}
        | {dt: {"rows_per_s": 9e3, "mfu": 0.2, "mfu_ledger": 0.25} for dt in ("bfloat16", "float32")},
    }
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# x\n<!-- gpu:begin -->\n{render_section(run)}\n<!-- gpu:end -->\n")
    got = measured_mfu("H100-80GB", md)
    assert got["train"] == {"pythia-410m": pytest.approx(0.41)}
    assert got["bilevel"] == pytest.approx(0.03) and got["inference"] == pytest.approx(0.25)
    assert measured_mfu("A10G-24GB", md) == {}  # another device type: the assumption applies
    exp = load_experiment(REPO / "experiments" / "paper" / "pythia410m.yaml")
    stage = next(s for s in plan_experiment(exp, "H100-80GB", 8, md).stages if s.kind == "pretrain")
    assert "measured" in stage.mfu_note
    expected_hours = stage.flops * stage.time_factor / (0.41 * memory.DEVICES["H100-80GB"].bf16_flops) / 3600
    assert stage.gpu_hours == pytest.approx(expected_hours)
