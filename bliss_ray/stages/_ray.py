"""Ray glue shared by the stages: the embedded Ray session, resource budgets, Train configs, checkpoint hygiene.

Budgets are explicit because on a small machine an actor or worker group that claims every logical CPU starves
Ray Data's read/write tasks and hangs forever without an error (docs/ray.md, "Resources on small machines"):
Train workers take ``resources.cpus_per_worker`` CPUs, Data actors ``resources.data_actor_cpus``, Tune trial
drivers ~0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

from bliss_ray import storage
from bliss_ray.config import ResourcesConfig
from bliss_ray.costs.memory import DEVICES
from bliss_ray.stages import _faults
from bliss_ray.train.dcp_store import StoreReader
from bliss_ray.train.host_memory import worker_env

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# keep worker logs readable: no per-save progress bars, no tokenizer fork warnings
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def train_env(res: ResourcesConfig) -> dict[str, str]:
    """Ray Train's settings: its controller reads them from the environment of the process that calls ``fit()`` (a
    driver, or a Tune trial on any node) and passes them to the workers, so ``fit`` sets them there from the stage's
    own resources, never trusting whatever environment that process inherited."""
    env = {
        # a cold GPU node (autoscaler, image pull, boot) takes minutes to join: Train's default waits 60 s
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(res.worker_start_timeout_s),
        # Train's controller notices that the workers finished only at its next poll (default every 2 s), so every
        # stage's end would wait up to that long for it (docs/ray.md, "The controller")
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    if cluster_ceiling() is None and len([n for n in ray.nodes() if n["Alive"]]) == 1:
        # one machine and no autoscaler is never preempted by a cloud provider, and Train's preemption watcher is
        # one more actor process started in series with every Train stage's workers (docs/design.md)
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def ensure_ray(res: ResourcesConfig, quiet: bool = False) -> bool:
    """Start (or join, with ``ray_address``) Ray unless already initialised. Returns True if started here."""
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": not quiet}
    address = res.ray_address or ("auto" if os.environ.get("RAY_ADDRESS") else None)  # inside `ray job submit`
    if address in (None, "local"):
        # never attach to a cluster somebody started with `ray start` on this machine (docs/ray.md, "Resources on
        # small machines")
        kwargs |= {
            "address": "local",
            "num_cpus": res.num_cpus or os.cpu_count(),
            "object_store_memory": 512 * 1024**2,
        }
        if res.dashboard:
            kwargs |= _local_dashboard()
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="bliss_ray_"))  # isolated from stale clusters
    else:
        kwargs["address"] = address
    if faults := _faults.env_vars():  # a Tune trial's process starts from its raylet's environment, not ours
        kwargs["runtime_env"] = {"env_vars": faults}
    ray.init(**kwargs)
    return True


def check_run_root(res: ResourcesConfig, store: str) -> None:
    """Refuse a local run root on a cluster of several nodes (or one that can grow): workers on other nodes cannot
    see this machine's disk. Joins the cluster to count its nodes; an embedded local Ray is one machine."""
    address = res.ray_address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if storage.is_remote(store) or (address in (None, "local") and not ray.is_initialized()):
        return
    ensure_ray(res)
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    if nodes > 1 or cluster_ceiling() is not None:
        grows = "" if cluster_ceiling() is None else " and an autoscaler that adds more"
        raise storage.StorageError(
            f"--out {store} is a local path, but the Ray cluster has {nodes} nodes{grows}, whose workers cannot see "
            "this machine's disk: give a run root in an object store (s3://…, gs://…)"
        )


def _local_dashboard() -> dict:
    """The embedded Ray's dashboard (``resources.dashboard``), and the address of its State API for every process.

    Train's PlacementGroupCleaner asks the State API every second whether the controller lives. Without the
    dashboard it logs "Failed to query Ray Train Controller actor state" all run long (to the run's log file, not
    the console) and its clean-up of a dead controller's placement group never fires; and with another Ray
    instance on the machine the State API client cannot tell which cluster is ours (it finds several GCS
    processes) unless ``RAY_API_SERVER_ADDRESS`` names it. Workers inherit the variable from the raylet, which
    inherits it from here (docs/ray.md, "The State API and the dashboard"). It is off by default because it costs
    a dozen processes and a gigabyte of memory, and on a loaded small machine the raylet can give up waiting for
    the dashboard agent's port file, failing ``ray.init``."""
    if "RAY_API_SERVER_ADDRESS" in os.environ:
        return {"include_dashboard": None}
    with socket.socket() as s:  # a free port now; Ray binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": None, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def cluster_ceiling() -> dict[str, float] | None:
    """The most of each resource the cluster can ever have: what its autoscaler publishes (the launcher's or
    KubeRay's ``max_workers`` × node types; a negative amount is unbounded), or None on a fixed cluster (``ray
    start`` by hand, the embedded local Ray), where what is up now is all there will be (docs/ray.md,
    "Autoscaling")."""
    return ray._private.state.state.get_max_resources_from_cluster_config()


def cluster_has_gpus() -> bool:
    """Whether GPUs are up now or an autoscaler can start some: ``use_gpu: null`` means GPUs if ever possible."""
    ceiling = cluster_ceiling() or {}
    return ray.cluster_resources().get("GPU", 0) > 0 or ceiling.get("GPU", 0) != 0


def use_gpu(res: ResourcesConfig) -> bool:
    return cluster_has_gpus() if res.use_gpu is None else res.use_gpu


class LostNodes:
    """The nodes lost since the last call, one console line each. Ray moves their work by itself (Train restarts its
    worker group from the last checkpoint, Ray Data restarts its actors and reruns their tasks, a task is retried)
    and says nothing on the console: these lines name the cause of those retries."""

    def __init__(self):
        self.alive: set[str] | None = None

    def __call__(self) -> list[str]:
        if not ray.is_initialized():
            return []
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        lost = [n for n in nodes if self.alive is not None and n["NodeID"] in self.alive - alive]
        self.alive = alive
        return [
            f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}) lost ({n.get('DeathReasonMessage') or 'no reason'}); "
            "Ray reruns its work elsewhere"
            for n in lost
        ]


def start_worker(threads: int | None) -> tuple[int, int]:
    """Inside a Train worker: set torch's threads (``resources.torch_threads``, else this node's cores ÷ the workers
    on this node: the driver's core count says nothing about a worker node's); returns (rank, world size)."""
    ctx = ray.train.get_context()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    return ctx.get_world_rank(), ctx.get_world_size()


@contextlib.contextmanager
def resumed_checkpoint() -> Iterator[Path | None]:
    """Inside a Train worker: a local copy of the checkpoint an earlier attempt registered (None on a first
    attempt), removed when the block ends: everything needed is loaded by then. A sharded checkpoint's DCP data
    files are not copied (a 1B model's with AdamW state is ~12 GB): each rank reads its own shards where they lie,
    through ``resumed_shards``."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    local = Path(tempfile.mkdtemp(prefix="resume_"))
    shard = re.compile(r"dcp/.*\.distcp")
    storage.download_files(ckpt.path, local, keep=lambda rel: not shard.fullmatch(rel), filesystem=ckpt.filesystem)
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def resumed_shards() -> StoreReader | None:
    """Inside a Train worker: a reader of the resumed checkpoint's DCP shards in place (None on a first attempt)."""
    ckpt = ray.train.get_checkpoint()
    return None if ckpt is None else StoreReader(ckpt.filesystem, f"{ckpt.path.rstrip('/')}/dcp")


def accelerator_type(res: ResourcesConfig, kind: str) -> str | None:
    """Ray's accelerator type a stage of this kind asks for: its ``resources.gpu_type_for(kind)``, when it uses a
    GPU at all."""
    device = res.gpu_type_for(kind)
    return DEVICES[device].ray_type if device is not None and use_gpu(res) else None


def _typed(per_worker: dict, typed: str | None) -> dict:
    """``per_worker`` plus the accelerator type as the resource Ray places it by (``accelerator_type:<type>``)."""
    return per_worker | ({f"accelerator_type:{typed}": 0.001} if typed else {})


def scaling_config(res: ResourcesConfig, workers: int, kind: str) -> ray.train.ScalingConfig:
    """A Train stage's workers: ``resources_per_worker`` of the stage's accelerator type, packed onto the fewest
    nodes (``PACK``, best effort: a group larger than a node spills onto the next). Packing keeps the collectives
    on a node's NVLink or PCIe rather than its network, and makes each node's ranks a whole HSDP shard group:
    Ray Train numbers one node's workers consecutively, and ``resources.hsdp_shard_size`` defaults to them."""
    gpu = use_gpu(res)
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if gpu else {})
    typed = accelerator_type(res, kind)
    check_schedulable(_typed(per_worker, typed), workers)
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpu,
        resources_per_worker=per_worker,
        accelerator_type=typed,
        placement_strategy="PACK",
    )


def task_options(res: ResourcesConfig, kind: str, cpus: float, at_least: int = 1, gpu: bool | None = None) -> dict:
    """Ray options of a task or actor a stage starts (an evaluation task, a probe or scoring actor): its CPUs, a GPU
    of the stage's accelerator type when the stage uses one (``gpu``, default: when the cluster has GPUs), and the
    default scheduling strategy, so that a Tune trial's placement group (sized for the trial's own process) never
    captures it. Fails at once, naming the resource, when ``at_least`` of them can never be scheduled: an actor
    pool would otherwise wait for them forever."""
    gpu = use_gpu(res) if gpu is None else gpu
    typed = accelerator_type(res, kind) if gpu else None
    check_schedulable(_typed({"CPU": cpus} | ({"GPU": 1} if gpu else {}), typed), at_least)
    options = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0, "scheduling_strategy": "DEFAULT"}
    if typed:
        options["accelerator_type"] = typed
    if faults := _faults.env_vars():  # a reliability test's faults reach the processes on every node
        options["runtime_env"] = {"env_vars": faults}
    return options


# the most of each resource this process has seen a fixed cluster have at once
_SEEN: dict[str, float] = {}


def _fixed_cluster_has() -> dict[str, float]:
    """What a fixed cluster can provide: the most of each resource seen up at once. A node lost mid-run is usually
    replaced (a spot group, a KubeRay pod, a node restarted by hand): a request it met before waits for that node,
    bounded by Train's start timeout, rather than failing while the replacement boots."""
    for key, amount in ray.cluster_resources().items():
        _SEEN[key] = max(_SEEN.get(key, 0.0), amount)
    return dict(_SEEN)


def check_schedulable(per_worker: dict, workers: int) -> None:
    """Fail fast, naming the resource, when a request can never be scheduled: more than a fixed cluster has had, or
    more than an autoscaling cluster can grow to. A request within an autoscaler's ceiling waits for nodes
    (bounded by ``resources.worker_start_timeout_s`` × ``resources.controller_failure_limit``)."""
    ceiling = cluster_ceiling()
    have = _fixed_cluster_has() if ceiling is None else ceiling
    what = "the Ray cluster has" if ceiling is None else "the cluster's autoscaler can provide at most"
    for key, amount in per_worker.items():
        need, most = amount * workers, have.get(key, 0)
        if key.startswith("accelerator_type:") and most <= 0 and (ceiling is None or most == 0):
            raise RuntimeError(
                f"{what} no {key.split(':', 1)[1]} GPU (a node type with resource {key}); the stage asks for one: set "
                "resources.gpu_type (or resources.gpu_types) to a type the cluster's node types declare"
            )
        if (ceiling is None or most >= 0) and need > most + 1e-9:
            raise RuntimeError(
                f"{what} {most:g} {key} but the stage asks for {workers} workers × {amount:g} {key} = {need:g}; "
                f"lower resources.train_workers / resources.cpus_per_worker, or set resources.use_gpu=false"
            )


def storage_path(res: ResourcesConfig, run_store: str) -> str:
    """Where Train keeps checkpoints: ``resources.storage_path``, else the run's own store (``<run>/_ray``)."""
    return res.storage_path or storage.join(run_store, "_ray")


def run_config(name: str, storage: str, res: ResourcesConfig, callbacks: list | None = None) -> ray.train.RunConfig:
    """Deterministic name ⇒ rerunning the same stage resumes from its last registered checkpoint (Train V2).
    ``callbacks``: Ray Train ``UserCallback``s that see every report (a sweep forwards rank 0's to Tune)."""
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k in os.environ}
    # the CPU allocator setting must be there at process start
    env |= _faults.env_vars() | QUIET_ENV | worker_env(gpu=use_gpu(res))
    return ray.train.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(
            max_failures=res.max_failures, controller_failure_limit=res.controller_failure_limit
        ),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=callbacks or [],
    )


def torch_trainer(
    worker: Callable[[dict], None],
    loop_config: dict,
    res: ResourcesConfig,
    workers: int,
    config: ray.train.RunConfig,
    kind: str,
) -> TorchTrainer:
    """A TorchTrainer whose workers run ``worker(loop_config)``, placed as a stage of ``kind`` asks.

    ``loop_config`` travels inside the worker function, which Train keeps in an object that only the workers fetch,
    not as Train's ``train_loop_config``: Train's controller unpickles that one (docs/ray.md, "The controller"),
    and bliss_ray's spec classes in it would make the controller import bliss_ray's stages, the models and
    transformers before it started any worker, in series with every stage's start (docs/design.md, "Where a Train
    stage's fixed cost goes")."""
    stage = getattr(loop_config.get("spec"), "stage", config.name)
    train_fn = _faults.on_launch(stage, functools.partial(worker, loop_config))
    return TorchTrainer(train_fn, scaling_config=scaling_config(res, workers, kind), run_config=config)


# Lost infrastructure: a node, an actor or worker process, an object whose copies were all on a lost node. A stage
# interrupted by one of these is run again (``stages.executor``) and resumes from what it saved.
LOST = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError: their node died or is unreachable
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ObjectFetchTimedOutError
    ray.exceptions.TaskPlacementGroupRemoved,
    ray.exceptions.ActorPlacementGroupRemoved,
)


def lost_infrastructure(error: BaseException) -> BaseException | None:
    """The lost infrastructure that caused ``error``, if Ray itself did not retry it; None when the stage's own code,
    data or settings caused it. Ray Train retries a worker group's failures (``max_failures``) and its start
    failures and timeouts (``controller_failure_limit``): when those limits are spent the error is final. Other
    errors in Train's controller are final to Train however they were caused — a worker's node lost while the group
    starts its train function surfaces as ``ControllerError(ActorUnavailableError)`` (docs/ray.md, "The
    controller") — and those caused by a lost node are ours to retry, as are those of Ray Data, tasks and actors.
    Follows a Ray task's wrapped cause and Python's exception chain."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray.train.WorkerGroupError):
            return None  # Train retried it up to max_failures
        if isinstance(e, ray.train.ControllerError):
            retried = isinstance(e.controller_failure, (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError))
            todo += [] if retried else [e.controller_failure]
            continue
        if isinstance(e, LOST):
            return e
        if isinstance(e, ray.exceptions.RayTaskError):
            todo.append(e.cause)
        todo += [e.__cause__, e.__context__]
    return None


def fit(worker: Callable[[dict], None], loop_config: dict, res, workers: int, config, kind: str) -> ray.train.Result:
    """Fit a TorchTrainer of ``workers`` running ``worker(loop_config)`` for a stage of ``kind``, then delete the
    checkpoint directories that Train never registered (``gc_orphan_checkpoints``). Train's settings (``train_env``)
    are set in this process first: it may be a Tune trial whose environment never saw the driver's."""
    os.environ.update(train_env(res))
    result = torch_trainer(worker, loop_config, res, workers, config, kind).fit()
    gc_orphan_checkpoints(config.storage_path, config.name)
    return result


def report(metrics: dict, ckpt_dir: Path | None) -> None:
    """``ray.train.report`` from every rank (it is a barrier); only rank 0 passes a checkpoint directory."""
    ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
    ray.train.report(metrics, checkpoint=ckpt)


def gc_orphan_checkpoints(train_storage: str, name: str) -> list[str]:
    """Delete checkpoint dirs that Train never registered (left behind when a worker dies right after
    uploading; docs/ray.md, "Checkpoints"), locally or in an object store. Returns the removed locations."""
    run = storage.join(train_storage, name)
    snapshot = storage.read_bytes(storage.join(run, "checkpoint_manager_snapshot.json"))
    if snapshot is None:
        return []
    text = snapshot.decode()
    removed = [d for d in storage.listdir(run, dirs=True) if storage.name(d).startswith("checkpoint_")]
    removed = [d for d in removed if storage.name(d) not in text]
    for d in removed:
        storage.remove(d)
    return removed


def final_checkpoint(result: ray.train.Result, train_storage: str, name: str) -> str:
    """The location of the final checkpoint of the Train run ``name`` under ``train_storage``: where Train wrote it,
    in the store itself, so that a stage copies its files store-to-store (``storage.copy_tree``) and they never
    pass through the driver."""
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see {result.path}")
    return storage.join(train_storage, name, storage.name(result.checkpoint.path))
