"""Ray Train stage vs a bare PyTorch loop: steady-state tokens/s and the stage's fixed start/stop cost.

What: the same model (``pythia-tiny`` with the demo's 8192-token BPE vocabulary), batch (16 × 128 tokens, one
micro-batch, as the demo's pretraining), data (the bundled pool, packed), seed and torch thread count, trained
(a) in this process by ``bliss_ray.train.loop.train_lm`` — the bare loop — and (b) by the Ray Train stage
``bliss_ray.stages.train_lm.fit_lm`` with 1 worker (``resources.cpus_per_worker=1``, same threads), which runs the
same ``train_lm`` inside a ``TorchTrainer`` worker. Both prepare the next step's batch on a background thread
(``bliss_ray.data.tokens.Prefetcher``, as the stage worker does), so neither side gets a data path the other lacks.

How: both log per-step wall times (``step_s``, from ``train_lm``'s metrics). Steady-state tokens/s is tokens per
step ÷ the median ``step_s`` after the first ``--skip`` steps (allocator and thread-pool warm-up). Bare and Ray
runs alternate (bare, ray, ray, bare, ...) and the ratio is the median of the per-pair ratios, so the load of
other users of the machine hits both alike. Both save one final checkpoint (model + optimizer), so the fixed
overhead — (wall − Σ step_s) of the stage minus the same for the bare loop — is what Ray adds: worker-group
start, checkpoint reporting and copy-out, shutdown; goal ≤ 10 s per stage (every round runs 2–3 such stages).
``ray.init`` is excluded (once per driver; reported apart). Also reported: CPU-seconds of the whole process tree
per run (``_common.TreeCpu``), Ray ÷ bare — robust to other users' load, fixed costs included.

Threads: 1 by default (``--threads``), the same on both sides. On a 2-core machine shared with other users, a
2-thread OpenMP pool spin-waits through its partner's lost time slices: a bare step then takes longer and burns
several times the CPU of a 1-thread step, which buries any orchestration overhead in scheduling noise.

    .venv/bin/python bench/train_overhead.py            # 3 pairs × 40 steps, ~3 min on 2 cores
    .venv/bin/python bench/train_overhead.py --quick    # 1 pair × 20 steps
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common
import _fixtures
import _ray_timeline
from _common import alternate, line, median, paired_ratio, write_json


def _settings(args):
    """The training settings of both sides (the demo's pretraining, without the decay branch)."""
    from bliss_ray.train.settings import TrainSettings

    return TrainSettings(
        steps=args.steps,
        warmup_steps=6,
        decay_steps=0,
        lr=2e-3,
        micro_batch_seqs=args.batch,
        global_batch_seqs=args.batch,
        ckpt_every_steps=args.steps,  # one checkpoint, at the end: per-step times stay comparable
    )


def bare_run(args, arch, tok_dir: Path, data_dir: Path, work: Path) -> dict:
    """``train_lm`` in this process, saving the same final checkpoint the stage saves."""
    import torch

    from bliss_ray.data.tokens import Prefetcher, TokenArray, micro_batches
    from bliss_ray.models.lm import build_lm
    from bliss_ray.train.checkpoint import save_train_state
    from bliss_ray.train.host_memory import retain_freed_memory
    from bliss_ray.train.loop import make_optimizer, train_lm
    from bliss_ray.train.schedule import wsd_lr

    t = _settings(args)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    retain_freed_memory(torch.device("cpu"))  # as the stage worker does
    tok = _fixtures.load_tok(tok_dir)
    tokens = TokenArray.open(data_dir).tokens
    model = build_lm(arch, args.seq_len, seed=0, eos_token_id=tok.eos_token_id)
    opt = make_optimizer(model, t.lr, (0.9, 0.95), 0.1)
    history: list[dict] = []
    # the stage's background batch preparation, so the comparison measures Ray, not the prefetch thread
    prefetch = Prefetcher(lambda s: micro_batches(tokens, s, args.batch, args.batch, 0, 1, 0), pin=False)
    train_lm(
        model,
        opt,
        start_step=0,
        end_step=t.steps,
        lr_at=lambda s: wsd_lr(s, t.lr, t.warmup_steps),
        batches_at=prefetch,
        settings=t,
        stage="bench",
        log=history.append,
        save=lambda step, skipped: save_train_state(work / "ckpt", model, opt, step, tokenizer=tok, metrics=history),
    )
    return {"wall_s": time.perf_counter() - t0, "step_s": [m["step_s"] for m in history]}


def ray_run(args, arch, tok_dir: Path, data_dir: Path, work: Path) -> dict:
    """The Ray Train stage, 1 worker; a fresh run name each time (a reused one would resume, not train)."""
    from bliss_ray.config import ResourcesConfig
    from bliss_ray.stages import train_lm as stage
    from bliss_ray.train.checkpoint import read_metrics

    res = ResourcesConfig(cpus_per_worker=1.0, torch_threads=args.threads, max_failures=0)
    spec = stage.LMTrainSpec(
        stage="bench",
        arch=arch,
        seq_len=args.seq_len,
        tokenizer_dir=str(tok_dir),
        data_dir=str(data_dir),
        init_dir=None,
        start_step=0,
        train=_settings(args),
        round_index=0,
        seed=0,
        resources=res,
    )
    out = work / "stage"
    out.mkdir(parents=True)
    t0, epoch0 = time.perf_counter(), time.time()
    result = stage.fit_lm(spec, out, str(work / "ray_storage"), workers=1)
    wall = time.perf_counter() - t0
    history = [m for m in read_metrics(out / "metrics.jsonl") if "step_s" in m]
    assert result["final_step"] == args.steps and len(history) == args.steps, (result, len(history))
    return {"wall_s": wall, "step_s": [m["step_s"] for m in history], "window": (epoch0, time.time())}


def _logs_dir() -> str:
    import ray

    return ray._private.worker.global_worker.node.get_logs_dir_path()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 pair of runs × 20 steps (smoke)")
    p.add_argument("--reps", type=int, default=3, help="bare/ray pairs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first steps excluded from the steady state")
    p.add_argument("--arch", default="pythia-tiny")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.steps = 1, 20

    from bliss_ray.models.arch import arch_from_preset

    arch = arch_from_preset(args.arch, args.vocab)
    tok_dir = _fixtures.tokenizer_dir(args.vocab)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data_dir = tmp / "data"
    _fixtures.token_array(_fixtures.packed_pool(args.seq_len, args.vocab, n_files=2), data_dir)
    t0 = time.perf_counter()
    _common.start_ray()
    ray_init_s = time.perf_counter() - t0

    tokens_per_step = args.batch * args.seq_len
    runs: dict[str, list[dict]] = {"bare": [], "ray": []}
    counter = iter(range(10**6))

    def case(name, fn):
        def go():
            with _common.TreeCpu() as cpu:  # this process + Ray's daemons and workers
                r = fn(args, arch, tok_dir, data_dir, tmp / f"{name}{next(counter)}")
            runs[name].append(r | {"cpu_s": cpu.seconds})
            return tokens_per_step / median(r["step_s"][args.skip :])  # steady-state tokens/s

        return go

    tps = alternate({"bare": case("bare", bare_run), "ray": case("ray", ray_run)}, args.reps)
    fixed = [
        (r["wall_s"] - sum(r["step_s"])) - (b["wall_s"] - sum(b["step_s"]))
        for r, b in zip(runs["ray"], runs["bare"], strict=True)
    ]
    ratio = paired_ratio(tps["ray"], tps["bare"])
    cpu_ratio = paired_ratio([r["cpu_s"] for r in runs["ray"]], [r["cpu_s"] for r in runs["bare"]])
    cond = f"{args.arch} V={args.vocab}, {args.batch}×{args.seq_len} tokens/step, {args.threads} threads, " + (
        f"{args.steps} steps (first {args.skip} excluded), {args.reps} alternating pairs, median"
    )
    print(f"bare loop tokens/s: {median(tps['bare']):,.0f}   Ray Train (1 worker) tokens/s: {median(tps['ray']):,.0f}")
    # what the fixed cost is made of: the processes of the last stage (one run after others, as in a pipeline)
    timeline = "processes started by the last Ray stage (spawned→Ray connected→actor constructed, s after it began): "
    window = runs["ray"][-1]["window"]
    timeline += _ray_timeline.render(_ray_timeline.processes(_logs_dir(), *window))
    phases = "Train's worker group start, from its controller's log (s after the stage began): "
    phases += _ray_timeline.render_phases(_ray_timeline.train_phases(_logs_dir(), *window))
    lines = [
        line("train_overhead ratio (Ray Train / bare tokens/s)", ratio, cond + "; goal >= 0.95"),
        line(
            "Ray Train stage fixed start/stop overhead [s]",
            median(fixed),
            "wall - sum(step_s), minus bare's; goal <= 10 per stage",
            "{:.1f}",
        ),
        line("CPU-seconds per run, Ray stage / bare", cpu_ratio, "whole process tree, fixed costs included"),
        line("ray.init [s] (excluded)", ray_init_s, "", "{:.1f}"),
    ]
    print(timeline)
    print(phases)
    lines += [timeline, phases]
    result = {
        "cpu_ratio": cpu_ratio,
        "cpu_s": {k: [r["cpu_s"] for r in v] for k, v in runs.items()},
        "ratio": ratio,
        "tokens_per_s": {k: median(v) for k, v in tps.items()},
        "tokens_per_s_runs": tps,
        "fixed_overhead_s": median(fixed),
        "fixed_overhead_s_runs": fixed,
        "ray_init_s": ray_init_s,
        "wall_s": {k: [r["wall_s"] for r in v] for k, v in runs.items()},
        "step_s": {k: [r["step_s"] for r in v] for k, v in runs.items()},
        "conditions": cond,
        "lines": lines,
    }
    write_json("train_overhead", result)
    return result


if __name__ == "__main__":
    main()
