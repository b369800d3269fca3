"""Batched vs per-sample hypergradient c_i, and the cost of one BLISS outer step vs a plain training step.

What:

* ``c_i speedup: X`` — time of the per-sample loop ``ci_loop`` (one batch-1 forward+backward per sample)
  ÷ time of the batched ghost path ``ci_ghost`` (the default ``ci_chunk_seqs`` = 8 sequences per chunk) for
  c_i = ⟨∇CE_i, z⟩ at batch 32, for a tiny GPT-NeoX proxy and a pythia-31m-like proxy. Goal on CPU ≥ 1.0.
  Like for like: both accumulate in the model's dtype (float32), as ghost does; the loop's float64 mode (the
  reference of the equality tests) is slower and would flatter ghost. Both paths must agree with
  the float64 reference (max relative differences printed) or the speedup means nothing.
* ``outer step / plain step: Y`` — one ``outer_step`` (K = 1, Q = 3, score-model step, γ = 0 so no target)
  ÷ one plain proxy training step (``train_lm``: forward, backward, clip, AdamW) on the same batch. Goal on CPU
  ≤ 10. A γ > 0 variant with a target of the proxy's size is reported as detail.

How: random token batches (speed does not depend on the values), fp32 on CPU, the same torch thread count for
everything; one untimed warm-up call each, then the two sides alternate (A B B A ...) ``--reps`` times and each
ratio is the median of the back-to-back pairs.

Threads: 1 by default (``--threads``), the same on both sides. On a 2-core machine shared with other users, a
2-thread OpenMP pool spin-waits through its partner's lost time slices: a bare step then takes longer and burns
several times the CPU of a 1-thread step, which buries any orchestration overhead in scheduling noise.

    .venv/bin/python bench/hypergrad.py             # c_i for both proxies, outer/plain for tiny: ~3 min
    .venv/bin/python bench/hypergrad.py --outer-proxies tiny 31m   # + the 31M outer step (~3 more min)
    .venv/bin/python bench/hypergrad.py --quick     # tiny proxy only, 1 rep
"""

from __future__ import annotations

import argparse

from _common import alternate, line, median, paired_ratio, timed, write_json

PROXIES = {  # label → (preset, vocabulary, seq_len)
    "tiny": ("pythia-tiny-proxy", 8192, 128),  # the demo's proxy: 2 layers × 64, the demo's BPE vocabulary
    "31m": ("pythia-31m", 8192, 64),  # Pythia-31M's 6 × 256 trunk, demo vocabulary, modest seq_len (CPU)
}


def measure_ci(label: str, args, device) -> dict:
    from _workloads import ci_pair

    preset, vocab, seq_len = PROXIES[label]
    loop, ghost, err = ci_pair(preset, vocab, seq_len, args.batch, device, args.chunk)  # also the warm-up
    if max(err.values()) > 1e-3:  # float32 rounding is ~1e-5 here; more means a wrong c_i, not a slow one
        raise AssertionError(f"c_i paths disagree with the float64 reference: {err}")
    t = alternate({"loop": lambda: timed(loop), "ghost": lambda: timed(ghost)}, args.reps)
    speedup = paired_ratio(t["loop"], t["ghost"])
    cond = f"{preset} V={vocab} L={seq_len}, B={args.batch}, chunk={args.chunk}, {args.threads} threads, fp32 both"
    text = line(
        "c_i speedup",
        speedup,
        f"{label}: {cond}; loop {median(t['loop']):.2f}s, ghost {median(t['ghost']):.2f}s; max rel diff to the "
        f"fp64 reference: loop {err['loop']:.1e}, ghost {err['ghost']:.1e}",
    )
    return {"speedup": speedup, "seconds": t, "max_rel_diff": err, "conditions": cond, "line": text}


def measure_outer(label: str, args, device, with_target: bool) -> dict:
    from _workloads import bilevel_step, train_step

    preset, vocab, seq_len = PROXIES[label]
    target = preset if with_target else None
    outer, outer_flops, _ = bilevel_step(preset, target, vocab, seq_len, args.batch, args.ref_batch, device)
    plain, plain_flops, _ = train_step(preset, vocab, seq_len, args.batch, device)
    outer(), plain()  # warm-up
    t = alternate({"outer": lambda: timed(outer), "plain": lambda: timed(plain)}, args.reps)
    ratio = paired_ratio(t["outer"], t["plain"])
    cond = (
        f"{preset} V={vocab} L={seq_len}, B={args.batch}, ref B={args.ref_batch}, K=1 Q=3, "
        + (f"γ=0.01 with a {target} target" if target else "γ=0, no target")
        + f"; ledger FLOPs ratio {outer_flops / plain_flops:.2f}"
    )
    label_text = "outer step / plain step" if not with_target else "outer step (with KL target) / plain step"
    text = line(
        label_text, ratio, f"{label}: {cond}; outer {median(t['outer']):.2f}s, plain {median(t['plain']):.2f}s"
    )
    return {
        "ratio": ratio,
        "seconds": t,
        "ledger_flops_ratio": outer_flops / plain_flops,
        "conditions": cond,
        "line": text,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny proxy only, 1 rep (smoke)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ref-batch", type=int, default=8, help="reference sequences per outer step (demo: 8)")
    p.add_argument("--chunk", type=int, default=8, help="ci_ghost chunk (BilevelSettings.ci_chunk_seqs default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--proxies", nargs="+", default=list(PROXIES), choices=list(PROXIES), help="for c_i")
    p.add_argument("--outer-proxies", nargs="+", default=["tiny"], choices=list(PROXIES), help="for outer/plain")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.proxies = 1, ["tiny"]

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result: dict = {"ci": {}, "outer": {}, "outer_with_target": {}}
    for label in args.proxies:
        result["ci"][label] = measure_ci(label, args, device)
    for label in args.outer_proxies:  # 31m: slow on CPU; opt in with --outer-proxies tiny 31m
        result["outer"][label] = measure_outer(label, args, device, with_target=False)
    if not args.quick:
        result["outer_with_target"]["tiny"] = measure_outer("tiny", args, device, with_target=True)
    result["lines"] = [r["line"] for part in ("ci", "outer", "outer_with_target") for r in result[part].values()]
    write_json("hypergrad", result)
    return result


if __name__ == "__main__":
    main()
