"""HSDP on CPU (gloo, 4 ranks as 2 replicas × 2 shards, torch.multiprocessing): the same training as one worker,
with gradients reduced after every micro-batch or only the last; the reductions each takes per optimizer step;
its sharded checkpoint read back into a plain model; the pure parts of the mesh.

    .venv/bin/python -m pytest tests/test_hsdp.py -q
"""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bliss_ray.data.tokens import micro_batches
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm, load_lm
from bliss_ray.train import fsdp
from bliss_ray.train.dcp_store import StoreReader
from bliss_ray.train.loop import make_optimizer, train_lm
from bliss_ray.train.settings import TrainSettings

pytestmark = pytest.mark.timeout(300)

VOCAB, SEQ_LEN, ROWS, STEPS, LR = 512, 32, 256, 3, 1e-3
WORLD, SHARD, MICRO = 4, 2, 8  # 2 × 2 mesh; 8 micro-batches of 1 row per rank and step: 32 rows a step
GLOBAL = WORLD * MICRO
ARCH = arch_from_preset("pythia-micro", VOCAB)  # 1 block: 2 FSDP units (the block, the root)
UNITS = ARCH.n_layer + 1
SETTINGS = TrainSettings(steps=STEPS, warmup_steps=0, lr=LR, micro_batch_seqs=1, global_batch_seqs=GLOBAL)
SYNCS = ("every_micro_batch", "last_micro_batch")


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (ROWS, SEQ_LEN), dtype=np.int32)  # (rows, L)


def _train(model, rank: int, world: int, micro_seqs: int, grad_sync: str) -> torch.optim.Optimizer:
    """``STEPS`` steps of the global batch of ``GLOBAL`` rows, this rank's ``micro_seqs``-row micro-batches of it."""
    tokens = _tokens()
    opt = make_optimizer(model, LR, (0.9, 0.95), 0.1)
    train_lm(
        model,
        opt,
        start_step=0,
        end_step=STEPS,
        lr_at=lambda s: LR,
        batches_at=lambda s: micro_batches(tokens, s, GLOBAL, micro_seqs, rank, world, 0),
        settings=SETTINGS,
        stage="hsdp",
        precision="fp32",
        grad_sync=grad_sync,
    )
    return opt


def _counting(counts: dict) -> None:
    """Count FSDP2's gradient reductions: its reduce-scatters within a shard group, and its all-reduces across
    replicas (the only ``all_reduce`` calls given a group: the loop's own sums use the default one)."""
    reduce_scatter, all_reduce = dist.reduce_scatter_single, dist.all_reduce

    def counted_reduce_scatter(*args, **kwargs):
        counts["reduce_scatter"] += 1
        return reduce_scatter(*args, **kwargs)

    def counted_all_reduce(*args, **kwargs):
        counts["all_reduce"] += kwargs.get("group") is not None
        return all_reduce(*args, **kwargs)

    dist.reduce_scatter_single, dist.all_reduce = counted_reduce_scatter, counted_all_reduce


def _rank_main(rank: int, out: str) -> None:
    """One rank: for each gradient sync, train an HSDP model, export it (HF weights on rank 0) and write its DCP
    checkpoint; rank 0 records the reductions of each run."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    counts: dict = {}
    _counting(counts)
    for sync in SYNCS:
        model = fsdp.shard(build_lm(ARCH, SEQ_LEN), torch.device("cpu"), "fp32", shard_size=SHARD)
        counts |= {"reduce_scatter": 0, "all_reduce": 0}
        opt = _train(model, rank, WORLD, 1, sync)
        ran = dict(counts)
        fsdp.export_hf(model, Path(out) / sync / "hf")
        fsdp.save(model, opt, Path(out) / sync / "dcp")
        if rank == 0:
            (Path(out) / sync / "counts.json").write_text(json.dumps(ran))
    _read_own_shards(model, rank, Path(out) / SYNCS[-1])
    dist.destroy_process_group()


def _read_own_shards(trained, rank: int, run: Path) -> None:
    """A resuming rank: other weights, then the checkpoint read in place through a ``StoreReader``; records the
    bytes it read and whether its shards came back equal to the trained model's."""
    model = fsdp.shard(build_lm(ARCH, SEQ_LEN, seed=1), torch.device("cpu"), "fp32", shard_size=SHARD)
    reader = StoreReader(pafs.LocalFileSystem(), str(run / "dcp"))
    fsdp.load(model, make_optimizer(model, LR, (0.9, 0.95), 0.1), reader)
    equal = all(
        torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), trained.parameters(), strict=True)
    )
    (run / f"read_rank{rank}.json").write_text(json.dumps({"bytes": reader.bytes_read, "equal": equal}))


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    """Both gradient syncs on the 2 × 2 mesh, in one group of 4 processes, and the one-worker reference (8
    micro-batches of 4 rows: the same 32 rows a step)."""
    out = tmp_path_factory.mktemp("hsdp")
    mp.start_processes(_rank_main, args=(str(out),), nprocs=WORLD, join=True, start_method="spawn")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    reference = build_lm(ARCH, SEQ_LEN)
    ref_opt = _train(reference, 0, 1, GLOBAL // MICRO, "every_micro_batch")
    return out, reference, ref_opt


@pytest.mark.parametrize("sync", SYNCS)
def test_hsdp_trains_as_one_worker(hsdp_runs, sync):
    """Same tolerance as ``test_fsdp.py``'s parity: only fp32 summation order differs (accumulation vs reduce-scatter
    and all-reduce); a wrong reduction (a replica's gradients left out, summed instead of averaged) moves whole
    tensors by ~lr and fails."""
    out, reference, _ = hsdp_runs
    weights, ref, init = load_lm(out / sync / "hf").state_dict(), reference.state_dict(), build_lm(ARCH, SEQ_LEN)
    assert weights.keys() == ref.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=1e-5, msg=name)
    moved = max((w - init.state_dict()[n]).abs().max().item() for n, w in weights.items())
    assert moved > 1e-3  # it trained: the comparison is not between two untouched models


@pytest.mark.parametrize("sync,per_step", [("every_micro_batch", MICRO), ("last_micro_batch", 1)])
def test_gradient_reductions_per_optimizer_step(hsdp_runs, sync, per_step):
    """Every FSDP unit reduce-scatters within its shard group and all-reduces across replicas 8 times a step
    (once per micro-batch) or once (on the last)."""
    out, _, _ = hsdp_runs
    counts = json.loads((out / sync / "counts.json").read_text())
    assert counts == {"reduce_scatter": per_step * UNITS * STEPS, "all_reduce": per_step * UNITS * STEPS}


def test_hsdp_checkpoint_loads_into_a_plain_model(hsdp_runs):
    """Replicas hold equal shards and DCP writes each once: a single process reads the whole model and AdamW state
    back, equal to the HF export and to the reference's AdamW moments."""
    out, reference, ref_opt = hsdp_runs
    plain = build_lm(ARCH, SEQ_LEN, seed=1)  # other initial weights: everything must come from the checkpoint
    opt = make_optimizer(plain, LR, (0.9, 0.95), 0.1)
    fsdp.load(plain, opt, out / "last_micro_batch" / "dcp")
    exported, state = load_lm(out / "last_micro_batch" / "hf").state_dict(), plain.state_dict()
    assert exported.keys() == state.keys() and all(torch.equal(state[k], w) for k, w in exported.items())
    for got, want in zip(plain.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(opt.state[got]["exp_avg"], ref_opt.state[want]["exp_avg"], rtol=1e-4, atol=1e-6)


def test_a_resuming_rank_reads_only_its_own_shards_in_place(hsdp_runs):
    """Through a ``StoreReader`` each rank reads the byte ranges of its shard of the weights and AdamW state (half
    of the data on a 2-way shard group; replicas read the same half), the ``.metadata`` and, per stored tensor,
    ``torch.load``'s zip records (with this model's tiny tensors ~1/3 more): well under the whole checkpoint that a
    copy of the directory would read, and they load exactly."""
    out, _, _ = hsdp_runs
    files = {f.name: f.stat().st_size for f in (out / SYNCS[-1] / "dcp").iterdir()}
    data = sum(size for name, size in files.items() if name.endswith(".distcp"))
    reads = [json.loads((out / SYNCS[-1] / f"read_rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["equal"] for r in reads)
    assert all(data / 2 < r["bytes"] < 0.75 * sum(files.values()) for r in reads), (files, reads)


def test_mesh_shape_and_node_groups():
    assert fsdp.mesh_shape(16, 8) == (2, 8)
    with pytest.raises(ValueError, match=r"resources\.hsdp_shard_size: 3 does not divide the 8"):
        fsdp.mesh_shape(8, 3)
    assert fsdp.node_shard_size([8, 8]) == 8
    assert fsdp.node_shard_size([4, 2, 4]) == 2  # uneven nodes: groups that still never span two


def test_the_stage_groups_a_nodes_workers_unless_told(monkeypatch):
    """In a Train worker, HSDP's shard group is ``resources.hsdp_shard_size``, else the workers on a node (the
    greatest common divisor of every rank's local world size; one process here, whose own it is)."""
    from bliss_ray.config import ResourcesConfig
    from bliss_ray.stages import train_lm

    class Context:
        def get_local_world_size(self) -> int:
            return 8

    monkeypatch.setattr(train_lm.ray.train, "get_context", Context)
    cpu = torch.device("cpu")
    assert train_lm._shard_size(ResourcesConfig(parallelism="hsdp", train_workers=16), cpu) == 8
    assert train_lm._shard_size(ResourcesConfig(parallelism="hsdp", train_workers=16, hsdp_shard_size=4), cpu) == 4
    assert train_lm._shard_size(ResourcesConfig(parallelism="fsdp", train_workers=16), cpu) is None
