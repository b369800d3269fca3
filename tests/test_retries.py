"""A stage interrupted by lost infrastructure runs again in the same command; any other error fails it at once. The
classification of Ray's errors (``stages._ray.lost_infrastructure``) and the executor's bounded retries, without
a Ray cluster (the two-node test loses real nodes).

    .venv/bin/python -m pytest tests/test_retries.py -q
"""

import io
import time

import pytest
import ray.exceptions
import ray.train
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

from bliss_ray.pipeline import Run
from bliss_ray.stages._ray import lost_infrastructure
from bliss_ray.stages.executor import execute
from bliss_ray.train.loop import NonFiniteLossError
from bliss_ray.watch.console import StageConsole
from tests.conftest import load_tiny

ACTOR_ID = b"\x01" * 16


def _lost_actor():
    return ray.exceptions.ActorUnavailableError("the actor's node is unreachable", ACTOR_ID)


def _chained(cause: BaseException) -> RuntimeError:
    try:
        raise cause
    except BaseException as e:
        try:
            raise RuntimeError("the stage's own wrapper") from e
        except RuntimeError as wrapper:
            return wrapper


@pytest.mark.parametrize(
    "error,lost",
    [
        # a worker's node lost while the group starts its train function: final to Train, ours to retry
        (ray.train.ControllerError(_lost_actor()), True),
        (ray.train.ControllerError(ray.exceptions.ActorDiedError()), True),
        # start failures and timeouts: Train retried them up to controller_failure_limit already
        (ray.train.ControllerError(WorkerGroupStartupFailedError("a worker died starting")), False),
        (ray.train.ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), False),
        # a worker group's failure: Train retried it up to max_failures; a worker's own error is never ours
        (ray.train.WorkerGroupError("group failed", {0: _lost_actor()}), False),
        (ray.train.ControllerError(ValueError("a bug in a callback")), False),
        # Ray Data, tasks, the driver: a lost node's objects and actors, possibly inside a task's error or a chain
        (ray.exceptions.ObjectLostError("00" * 28, "owner", "call site"), True),
        (ray.exceptions.RayTaskError("map_batches", "traceback", ray.exceptions.NodeDiedError("gone")), True),
        (_chained(ray.exceptions.OwnerDiedError("00" * 28, "owner", "call site")), True),
        (ray.exceptions.RayTaskError("f", "traceback", ValueError("bad row")), False),
        (NonFiniteLossError("stage 'warmup': non-finite loss at step 3"), False),
        (RuntimeError("the cluster has 0 GPU but the stage asks for 1"), False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_lost_infrastructure_is_told_from_the_stages_own_errors(error, lost):
    assert (lost_infrastructure(error) is not None) is lost


class _Runner:
    """Fails the tokenizer stage with ``errors`` in turn, then succeeds."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, run, st, d):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"vocab_size": 300}


def _execute(tmp_path, runner, retries=2):
    run = Run(load_tiny(**{"resources.stage_retries": retries}), tmp_path)
    screen = io.StringIO()
    try:
        return execute(run, until="tokenizer", runner=runner, console=StageConsole(screen, tty=False)), screen
    finally:
        runner.screen = screen.getvalue()


def test_a_stage_that_lost_its_node_runs_again_and_says_why(tmp_path):
    runner = _Runner(ray.train.ControllerError(_lost_actor()), _chained(ray.exceptions.ActorDiedError()))
    results, screen = _execute(tmp_path, runner)
    assert runner.calls == 3 and results["tokenizer"]["vocab_size"] == 300
    lines = [line for line in screen.getvalue().splitlines() if "lost its infrastructure" in line]
    assert len(lines) == 2 and "attempt 1 of 3" in lines[0] and "ActorUnavailableError" in lines[0], lines


def test_retries_are_bounded_and_other_errors_fail_at_once(tmp_path):
    lost = _Runner(*[ray.train.ControllerError(_lost_actor()) for _ in range(3)])
    with pytest.raises(ray.train.ControllerError):
        _execute(tmp_path / "a", lost, retries=2)
    assert lost.calls == 3 and "FAILED tokenizer" in lost.screen
    bug = _Runner(ValueError("a bad setting"))
    with pytest.raises(ValueError):
        _execute(tmp_path / "b", bug)
    assert bug.calls == 1 and "lost its infrastructure" not in bug.screen


def test_a_local_run_root_is_refused_on_a_cluster_of_several_nodes(tmp_path, monkeypatch):
    """Workers on another node cannot see this machine's disk: ``--out`` must be an object store there."""
    from bliss_ray.stages import _ray
    from bliss_ray.storage import StorageError

    run = Run(load_tiny(**{"resources.ray_address": "auto"}), tmp_path)
    monkeypatch.setattr(_ray.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(_ray, "cluster_ceiling", lambda: None)
    monkeypatch.setattr(_ray.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(StorageError, match=r"--out .* is a local path, but the Ray cluster has 2 nodes"):
        execute(run, until="tokenizer", runner=_Runner(), console=StageConsole(io.StringIO(), tty=False))
    monkeypatch.setattr(_ray.ray, "nodes", lambda: [{"Alive": True}])  # one machine: a local root is fine
    assert execute(run, until="tokenizer", runner=_Runner(), console=StageConsole(io.StringIO(), tty=False))


def test_a_node_lost_while_a_stage_runs_is_a_line_under_the_stage(tmp_path, monkeypatch):
    """Ray reruns a lost node's work by itself (Train from its checkpoint, Data's actors and tasks, a retried task)
    without a word: ``LostNodes`` names the node and its death on the console, once, under the running stage."""
    from types import SimpleNamespace

    from bliss_ray.stages import _ray

    def node(i: int, alive: bool) -> dict:
        reason = "" if alive else "health check failed"
        return {
            "NodeID": f"{i:02d}" * 14,
            "NodeManagerAddress": f"10.0.0.{i}",
            "Alive": alive,
            "DeathReasonMessage": reason,
        }

    cluster = [[node(1, True), node(2, True)], [node(1, True), node(2, False), node(3, True)]]
    monkeypatch.setattr(_ray.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(_ray.ray, "nodes", lambda: cluster[0] if len(cluster) == 1 else cluster.pop(0))
    screen = io.StringIO()
    console = StageConsole(screen, tty=False, events=_ray.LostNodes(), poll_s=0.02)
    with console.stage(SimpleNamespace(key="r1.score", kind="score", round=1), tmp_path) as finished:
        time.sleep(0.3)
        finished({})
    lost = [line for line in screen.getvalue().splitlines() if "lost" in line]
    assert len(lost) == 1, screen.getvalue()
    assert "r1.score: node 10.0.0.2 (02020202) lost (health check failed); Ray reruns its work elsewhere" in lost[0]


def test_pauses_fire_once_each_where_they_are_aimed(tmp_path, monkeypatch):
    """``BLISS_FAULTS`` pauses, as the two-node test aims them: a training step, a Train function's delivery to its
    workers (held while it is unpickled there), a scoring batch; each fires once (its marker), nothing else fires."""
    import json
    import pickle

    from bliss_ray.stages import _faults

    held = []
    monkeypatch.setattr(_faults.time, "sleep", held.append)
    pauses = [
        {"at": "step", "stage": "warmup", "step": 5, "once": str(tmp_path / "a"), "seconds": 7},
        {"at": "launch", "stage": "r1.bilevel", "once": str(tmp_path / "b"), "seconds": 8},
        {"at": "score", "once": str(tmp_path / "c"), "seconds": 9},
    ]
    monkeypatch.setenv(_faults.ENV, json.dumps({"pause": pauses}))
    _faults.at_step("warmup", 4, 0), _faults.at_step("r0.pretrain", 5, 0), _faults.hold("evaluate")
    assert held == []
    _faults.at_step("warmup", 5, 0), _faults.at_step("warmup", 5, 0)
    assert _faults.on_launch("r1.pretrain", len) is len  # nothing aimed at it: the function itself
    fn = _faults.on_launch("r1.bilevel", lambda: "trained")
    assert held == [7.0]  # wrapping holds nothing: unpickling in a worker does
    assert pickle.loads(pickle.dumps(_faults.on_launch("r1.bilevel", _faults.env_vars)))() == _faults.env_vars()
    _faults.hold("score"), _faults.hold("score")
    assert held == [7.0, 8.0, 9.0] and fn() == "trained"
