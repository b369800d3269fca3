"""A two-node Ray cluster whose worker node cannot see the driver's files, with the run root in a local S3 server.

The head (0 CPUs: it hosts only Ray's own services and the driver) and a worker node that runs every task, actor
and Train worker. The worker node lives in its own mount namespace (``unshare --mount``) with a tmpfs over the
test's temporary directory, where the driver's run directory and node cache are: a driver-local path handed to
a worker fails there with FileNotFoundError. The pool and reference files are in the bucket too (a cluster's
inputs are). The driver is ``bliss-ray run`` in a subprocess (this session's own Ray stays as it is).
Four times in one run (mid-training, while Train starts a worker group, mid-scoring, mid-evaluation) the worker
node is killed and the next one (a new namespace, an empty cache) takes its place; the outputs must equal the
session's uninterrupted tiny run.

Ray 2.60's GCS, raylets and object managers listen on every interface whatever ``--node-ip-address`` says, and no
setting binds them to loopback. So the scenario runs in a network namespace of its own (``unshare --net``) whose one
interface is loopback: its S3 server, head, worker nodes and drivers can be reached from nowhere else. The first
test below is that namespace's launcher; the scenario skips outside it.

    .venv/bin/python -m pytest tests/test_two_node.py -q
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bliss_ray import storage
from tests.conftest import RAY_INTERNALS, REPO

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK_ONLY = "BLISS_TEST_LOOPBACK_ONLY"  # set inside the launcher's network namespace
UNINTERRUPTED = "BLISS_TEST_UNINTERRUPTED"  # the session's tiny run: what the scenario's outputs must equal
SCENARIO = "test_two_nodes_sharing_only_a_bucket_survive_four_lost_nodes_then_resume_on_a_new_head_and_report"
STUDIES = "test_a_sweep_and_a_comparison_on_two_nodes_sharing_only_a_bucket_survive_a_lost_node"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(pid: str, mark: str) -> bool:
    """Whether process ``pid``'s command line or one of its open files names ``mark``: Ray's agents retitle
    themselves (``ray::DashboardAgent``) but keep their node's log files open."""
    proc = Path("/proc") / pid
    if mark in (proc / "cmdline").read_bytes().decode(errors="replace"):
        return True
    for fd in proc.glob("fd/*"):
        with contextlib.suppress(OSError):  # closed since the listing
            if mark in os.readlink(fd):
                return True
    return False


def _kill_marked(mark: str) -> None:
    """SIGKILL every process that names ``mark`` (a node's private temp dir), until none is left: a killed raylet's
    agents are re-parented to init and ignore SIGTERM (docs/ray.md, "Two nodes on one machine"), and a process
    forked while the first pass ran escapes it. Never ``ray stop``."""
    for _ in range(20):
        marked = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if _names(pid, mark):
                    os.kill(int(pid), signal.SIGKILL)
                    marked.append(pid)
        if not marked:
            return
        time.sleep(0.2)


class Cluster:
    """A head node and worker nodes on 127.0.0.1, each with its own short temp dir; ``stop`` kills them all."""

    def __init__(self, hidden: Path):
        self.hidden, self.port = hidden, _free_port()
        self.env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        # the GCS calls a node dead after 5 missed health checks, one a second (Ray's default: every 3 s): a killed
        # node's work moves sooner, and four kills cost less of CI's time
        self.env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
        self.env.pop("RAY_ADDRESS", None)
        self.marks: list[str] = []
        self.address = f"127.0.0.1:{self.port}"

    def _temp(self, name: str) -> str:
        path = f"/tmp/{name}{self.port}"  # short: unix socket paths must stay under 107 bytes
        self.marks.append(path)
        return path

    def start_head(self) -> None:
        cmd = [RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0"]
        cmd += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self._temp('rh')}"]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)

    def start_worker(self, n: int) -> subprocess.Popen:
        """A worker node in its own mount namespace: the test's temp dir (the driver's files) is an empty tmpfs."""
        temp, spill, cache = self._temp(f"rw{n}_"), f"/var/tmp/rs{n}_{self.port}", f"/var/tmp/rc{n}_{self.port}"
        ray = f"exec {RAY} start --address={self.address} --node-ip-address=127.0.0.1 --num-cpus=4 "
        ray += f"--temp-dir={temp} --object-spilling-directory={spill} --block"
        script = f"mount -t tmpfs tmpfs {self.hidden} && mkdir -p {spill} {cache} && {ray}"
        env = self.env | {"BLISS_CACHE_DIR": cache}
        with open(f"/var/tmp/rl{n}_{self.port}.log", "w") as log:  # what `ray start` said, for a failed join
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.marks += [spill, cache, log.name]
        return proc

    def add_worker(self, n: int, tries: int = 3) -> None:
        """Start worker node ``n`` and wait until it is up. A ``ray start`` that gives up (its raylet has 30 s to
        register with the GCS, too few on a loaded 2-core machine) is started again."""
        for _ in range(tries):
            node = self.start_worker(n)
            code = (
                f"import ray, time; ray.init(address={self.address!r}, log_to_driver=False)\n"
                f"while not [x for x in ray.nodes() if x['Alive'] and '/rw{n}_' in x['ObjectStoreSocketName']]:\n"
                "    time.sleep(0.5)\n"
            )
            checker = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=subprocess.DEVNULL)
            t0 = time.perf_counter()
            while checker.poll() is None and node.poll() is None and time.perf_counter() - t0 < 180:
                time.sleep(0.5)
            if checker.poll() == 0:
                return
            checker.kill()
            _kill_marked(f"/tmp/rw{n}_{self.port}")
        said = Path(f"/var/tmp/rl{n}_{self.port}.log").read_text()[-3000:]
        raise AssertionError(f"worker node {n} did not join in {tries} tries; its last ray start said:\n{said}")

    def stop(self) -> None:
        for mark in self.marks:
            _kill_marked(mark)
        for mark in map(Path, self.marks):
            if mark.is_dir():
                shutil.rmtree(mark, ignore_errors=True)
            else:
                mark.unlink(missing_ok=True)


def _refused_namespaces() -> str | None:
    """Why this machine cannot give the scenario its namespaces (network for the whole scenario, mount for each
    worker node), or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        return "needs root, unshare(1) and ip(8) for namespaces of its own"
    probe = subprocess.run(["unshare", "--net", "--mount", "ip", "link", "set", "lo", "up"], capture_output=True)
    return f"this machine refuses unshare --net --mount: {probe.stderr.decode().strip()}" if probe.returncode else None


# In CI (the tier's slowest test): one pipeline run that four node deaths interrupt. Extended: a sweep and a
# comparison on two nodes.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2700)
@pytest.mark.parametrize("scenario", [SCENARIO, pytest.param(STUDIES, marks=pytest.mark.extended)])
def test_the_two_node_scenario_runs_where_only_loopback_exists(tiny_run, scenario):
    """Launches a scenario in a new network namespace with loopback up and nothing else, in a fresh pytest (its own
    S3 server and Ray processes, all in the namespace) that compares its outputs with the session's tiny run;
    passes when the scenario passed there."""
    if reason := _refused_namespaces():
        pytest.skip(reason)
    pytest_cmd = f"exec {sys.executable} -m pytest -q -p no:cacheprovider {__file__}::{scenario}"
    proc = subprocess.run(
        ["unshare", "--net", "bash", "-c", f"ip link set lo up && {pytest_cmd}"],
        env=os.environ | {LOOPBACK_ONLY: "1", UNINTERRUPTED: str(tiny_run[0].root.parent)},
        capture_output=True,
        text=True,
        timeout=2600,
        cwd=REPO,
    )
    assert proc.returncode == 0 and re.search(r"\b1 passed\b", proc.stdout), proc.stdout[-8000:] + proc.stderr[-2000:]
    print(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def cluster(tmp_path):
    if not os.environ.get(LOOPBACK_ONLY):
        pytest.skip("runs inside test_the_two_node_scenario_runs_where_only_loopback_exists (loopback only)")
    assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a loopback-only network namespace"
    c = Cluster(tmp_path)
    try:
        c.start_head()
        c.add_worker(1)
        yield c
    finally:
        c.stop()


def _experiment(tmp_path: Path, bucket: str) -> Path:
    """experiments/tiny.yaml with its pool and reference in the bucket (the same files: the same outputs)."""
    inputs = storage.join(bucket, "inputs")
    for name in ("pool-00000.parquet", "pool-00001.parquet", "reference.parquet"):
        storage.write_bytes(storage.join(inputs, name), (REPO / "data" / "corpus" / name).read_bytes())
    exp = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    exp["data"] |= {
        "pool": [storage.join(inputs, "pool-00000.parquet"), storage.join(inputs, "pool-00001.parquet")],
        "reference": [storage.join(inputs, "reference.parquet")],
    }
    path = tmp_path / "two_node.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _driver(config: Path, out: str, address: str, cache: Path, *extra: str) -> tuple[list[str], dict]:
    """``bliss-ray run`` against the cluster, as a fresh head would run it: its command and environment."""
    env = os.environ | {"BLISS_CACHE_DIR": str(cache), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "bliss_ray.cli", "run", str(config), "--out", out]
    return [*cmd, "--set", f"resources.ray_address={address}", "--no-plan-check", *extra], env


def _run(config: Path, out: str, address: str, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd, env = _driver(config, out, address, cache, *extra)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)


# the four places a lost node interrupts, in the order the tiny pipeline reaches them: the first three pauses fire
# once in the first worker to reach them, the fourth in the first evaluation task
FAULTS = (
    ("warmup training", {"at": "step", "stage": "warmup", "step": 5}),  # after its checkpoint at step 3
    ("r1.bilevel's start", {"at": "launch", "stage": "r1.bilevel"}),
    ("r1.score's scoring", {"at": "score"}),
    ("evaluation", {"at": "evaluate"}),
)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_nodes_sharing_only_a_bucket_survive_four_lost_nodes_then_resume_on_a_new_head_and_report(
    cluster, s3_bucket, tmp_path
):
    """The tiny pipeline with ``--out s3://…``, every Train worker, Data actor and evaluation task on the one worker
    node. Four times a fault holds the work (warm-up training once its checkpoint at step 3 is registered; r1.bilevel
    while Train starts its worker group; a scoring batch; an evaluation task); the test SIGKILLs the node (raylet and
    every process it started) and starts the next one in a new namespace with an empty cache. The same command ends
    with exit code 0, every stage's outputs equal the session's uninterrupted tiny run (same settings, same data),
    the console names each lost node and each retry, and nothing of a stage is on the driver's disk. Then a new head
    (no local trace of the first driver) reruns the command: nothing recomputes; ``bliss-ray report`` works from
    the bucket."""
    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run

    config = _experiment(tmp_path, s3_bucket)
    out = storage.join(s3_bucket, "runs")
    run = Run(load_experiment(config), out)
    markers = [Path(f"/var/tmp/fault{i}_{cluster.port}") for i in range(len(FAULTS))]  # both namespaces see /var/tmp
    cluster.marks += [str(m) for m in markers]
    pauses = [f | {"once": str(m), "seconds": 900} for (_, f), m in zip(FAULTS, markers, strict=True)]
    cmd, env = _driver(config, out, cluster.address, tmp_path / "driver1")
    env["BLISS_FAULTS"] = json.dumps({"pause": pauses})
    env["BLISS_STORAGE_BYTES_FILE"] = str(tmp_path / "driver_bytes.json")  # what the driver moved, at its exit
    log = tmp_path / "driver.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        driver = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        snapshot = storage.join(run.store, "_ray", run.dir("warmup").name, "checkpoint_manager_snapshot.json")
        for node, ((where, _), marker) in enumerate(zip(FAULTS, markers, strict=True), start=1):
            ready = (lambda: _registered_step(snapshot) >= 3) if where == "warmup training" else (lambda: True)
            _wait_for(lambda m=marker, r=ready: m.exists() and r(), driver, log, where)
            _kill_marked(next(m for m in cluster.marks if f"/rw{node}_" in m))  # the node's raylet, workers, agents
            cluster.add_worker(node + 1)
        code = driver.wait(timeout=1200)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first_s = time.perf_counter() - t0
    console = log.read_text()
    assert code == 0, console[-4000:]
    _assert_retries_shown(console)
    _assert_outputs_equal(run, Run(load_experiment(REPO / "experiments" / "tiny.yaml"), os.environ[UNINTERRUPTED]))
    assert any(p.is_file() for p in Path(f"/var/tmp/rc5_{cluster.port}").rglob("*")), "node 5 built no cache"
    # the driver's disk holds no stage output: only its console log and TensorBoard files (also in the bucket)
    driver_runs = tmp_path / "driver1" / "runs"
    assert [p.relative_to(driver_runs) for p in driver_runs.glob("*/*") if p.name not in ("logs", "tb")] == []
    assert storage.listdir(storage.join(run.store, "logs"), ".log")
    _assert_the_driver_moved_less_than_the_models(run, json.loads((tmp_path / "driver_bytes.json").read_text()))
    _assert_a_new_head_recomputes_nothing(config, out, cluster.address, tmp_path, run, first_s)


def _wait_for(condition, driver: subprocess.Popen, log: Path, where: str, timeout_s: float = 600) -> None:
    t0 = time.perf_counter()
    while not condition():
        assert driver.poll() is None, f"the driver ended before the kill in {where}:\n" + log.read_text()[-4000:]
        assert time.perf_counter() - t0 < timeout_s, f"no kill point in {where}:\n" + log.read_text()[-4000:]
        time.sleep(0.5)


def _assert_retries_shown(console: str) -> None:
    """Each lost node is a console line under the stage it interrupted, and so is each retry: Train's restart of the
    warm-up from its checkpoint, the bilevel stage's second attempt (Train gives up on a group that loses its node
    while it starts), Ray's own reruns of scoring and evaluation (named by the node's line)."""
    lost = re.findall(r"^\S+ +(\S+): node 127\.0\.0\.1 \(\w+\) lost \(", console, re.M)
    assert lost[:1] == ["warmup"] and {"r1.bilevel", "r1.score", "evaluate"} <= set(lost), console[-6000:]
    assert re.search(r"^\S+ +warmup: workers restarted, resuming at step 4$", console, re.M), console[-6000:]
    attempt = r"^\S+ +r1\.bilevel: attempt 1 of 3 lost its infrastructure \((\w+)"
    assert re.search(attempt, console, re.M), console[-6000:]
    assert len(re.findall(r"^\S+ done ", console, re.M)) == len(re.findall(r"^\S+ start ", console, re.M))


def _assert_outputs_equal(run, uninterrupted) -> None:
    """Selections, scores and weights (proxy, score model, target) of the interrupted run equal the uninterrupted
    run's, and so do the evaluation results; the warm-up resumed from its checkpoint at step 3."""
    import pyarrow.parquet as pq
    from safetensors.torch import load as load_tensors

    def read(r, key, *sub):
        return storage.read_bytes(r.uri(key, *sub))

    state = torch.load(io.BytesIO(read(run, "warmup", "state", "train_state.pt")), weights_only=True)
    assert state["resumed_from"] == [3]
    for key, sub in [("warmup", "state/model"), ("r1.bilevel", "score_model"), ("r1.pretrain", "decay")]:
        a, b = (load_tensors(read(r, key, *sub.split("/"), "model.safetensors")) for r in (run, uninterrupted))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a), key
    for key in ("r0.select", "r1.select"):
        a, b = (pq.read_table(io.BytesIO(read(r, key, "selected.parquet")))["row_id"] for r in (run, uninterrupted))
        assert a.equals(b), key
    a, b = (_scores(r.uri("r1.score", "scores")) for r in (run, uninterrupted))
    assert a.keys() == b.keys() and np.allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, atol=1e-6)
    a, b = ([c["paper_average"] for c in r.outputs("evaluate")["checkpoints"]] for r in (run, uninterrupted))
    assert a == b


def _assert_the_driver_moved_less_than_the_models(run, moved: dict) -> None:
    """The driver only orchestrates: final checkpoints go store-to-store and training arrays are built on the worker
    node, so all it read from and wrote to the bucket (markers, configs, ids, the tokenizer, its logs) is less than
    the models and training states its stages published."""
    import pyarrow.fs as pafs

    def tree_bytes(loc: str) -> int:
        fs, path = storage.resolve(loc)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sum(i.size for i in infos if i.type == pafs.FileType.File)

    outputs = {"warmup": ("state",), "pretrain": ("state", "decay"), "bilevel": ("score_model", "proxy")}
    models = [run.uri(s.key, sub) for s in run.stages for sub in outputs.get(s.kind, ())]
    model_bytes, driver_bytes = sum(map(tree_bytes, models)), moved["read"] + moved["written"]
    print(f"driver moved {moved['read']} B read + {moved['written']} B written; stages published {model_bytes} B")
    assert 0 < driver_bytes < model_bytes, (moved, model_bytes)


def _scores(uri: str) -> dict[int, float]:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(["row_id", "score"])
    return dict(zip(table["row_id"].to_pylist(), table["score"].to_pylist(), strict=True))


def _assert_a_new_head_recomputes_nothing(config: Path, out: str, address: str, tmp_path: Path, run, first_s) -> None:
    """No local trace of the first driver: the same command skips every stage, and the report reads the bucket."""
    shutil.rmtree(tmp_path / "driver1")
    t0 = time.perf_counter()
    again = _run(config, out, address, tmp_path / "driver2")
    again_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    console = again.stdout + again.stderr
    assert not re.findall(r"^\S+ start ", console, re.M), console[-3000:]
    assert len(re.findall(r"^\S+ skip ", console, re.M)) == len(run.stages), console[-3000:]
    assert again_s < first_s / 3, (again_s, first_s)
    assert "| bliss (" in _report_from_a_fresh_head(run.store, tmp_path / "report")


# Extended (beyond CI's budget: a sweep with evaluation and a comparison with MATES are twelve more stages on two
# nodes): `make test-extended`
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(2400)
def test_a_sweep_and_a_comparison_on_two_nodes_sharing_only_a_bucket_survive_a_lost_node(cluster, s3_bucket, tmp_path):
    """The tiny Table-2 sweep cut to two arms (the score head with and without its sigmoid, one seed; every trial
    runs the pipeline through evaluation) and the tiny comparison (one seed), their run roots and Tune's storage in
    the bucket, every trial driver, Train worker, Data actor and evaluation task on the worker node. The session's
    tiny run, uploaded, is the finished setup (and the comparison's BLISS). A pause holds the sweep's first bilevel
    worker and then the comparison's first pretraining; each time the test kills the node and starts the next. Both
    commands finish, every trial and variant with them (Tune reruns a trial whose driver died with its node, from
    the stages and checkpoints in the bucket); the console names the lost nodes; the drivers keep nothing but their
    logs; a fresh head reads both reports from the bucket."""
    out, storage_uri = storage.join(s3_bucket, "runs"), storage.join(s3_bucket, "sweeps")
    storage.upload(Path(os.environ[UNINTERRUPTED]) / "tiny", storage.join(out, "tiny"))
    tree = yaml.safe_load((REPO / "experiments" / "sweeps" / "table2_proxy_sigmoid_tiny.yaml").read_text())
    tree |= {"space": {"bilevel.use_sigmoid": {"grid": [True, False]}}, "seeds": [0], "labels": {}}
    sweep = tmp_path / "table2.yaml"
    sweep.write_text(yaml.safe_dump(tree))
    commands = {
        "sweep": ["sweep", str(sweep), "--storage", storage_uri],
        "compare": ["compare", str(REPO / "experiments" / "compare" / "tiny.yaml"), "--seeds", "0"],
    }
    # global steps: the tiny r1.pretrain runs steps 6-11, with a checkpoint at 9
    pauses = {"sweep": {"stage": "r1.bilevel", "step": 5}, "compare": {"stage": "r1.pretrain", "step": 10}}
    for node, (name, command) in enumerate(commands.items(), start=1):
        marker = Path(f"/var/tmp/study{node}_{cluster.port}")
        cluster.marks.append(str(marker))
        cache = tmp_path / f"{name}_driver"
        env = os.environ | {"BLISS_CACHE_DIR": str(cache), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        env |= {"BLISS_FAULTS": json.dumps({"pause": pauses[name] | {"once": str(marker), "seconds": 900}})}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "bliss_ray.cli", *command, "--out", out]
        cmd += ["--set", f"resources.ray_address={cluster.address}", "--no-plan-check"]
        log = tmp_path / f"{name}.log"
        with log.open("w") as f:
            driver = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            _wait_for(marker.exists, driver, log, name, timeout_s=1200)
            _kill_marked(f"/tmp/rw{node}_{cluster.port}")
            cluster.add_worker(node + 1)
            code = driver.wait(timeout=1800)
        finally:
            if driver.poll() is None:
                driver.kill()
        console = log.read_text()
        assert code == 0, console[-5000:]
        assert re.search(r"\bnode 127\.0\.0\.1 \(\w+\) lost \(", console), console[-5000:]  # sweep: no stage key
        # nothing of Ray's on the console, streamed worker output ("(task pid=N) ...") included: it is in the logs
        ray_lines = [line for line in console.splitlines() if re.search(RAY_INTERNALS + r"|\bpid=\d+\)", line)]
        assert ray_lines == [], console[-5000:]
        stage_dirs = [p for p in (cache / "runs").rglob("*") if p.is_dir() and re.search(r"-[0-9a-f]{12}$", p.name)]
        assert stage_dirs == [], stage_dirs  # the driver's disk holds no stage: only logs and TensorBoard files
        # and its node cache no model, checkpoint or training array: only small inputs it reads (the tokenizer, a
        # selection's row ids, MATES's reference set)
        copies = [p.name for p in (cache / "copies").glob("*-*")] if (cache / "copies").is_dir() else []
        assert not [c for c in copies if re.sub(r"-[0-9a-f]{12}$", "", c) in HEAVY_OUTPUTS], copies
    _assert_study_reports_from_a_fresh_head(out, tree["name"], tmp_path)


# what a stage writes that grows with the model or the selection: never on a driver's disk
HEAVY_OUTPUTS = (
    "state",
    "model",
    "decay",
    "branches",
    "score_model",
    "influence_model",
    "data",
    "train_data",
    "candidates",
)


def _assert_study_reports_from_a_fresh_head(out: str, sweep_name: str, tmp_path: Path) -> None:
    """Both studies' results, read from the bucket by a process that never saw the drivers' files."""
    import pyarrow.parquet as pq

    results = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, sweep_name, "sweep_results.parquet"))))
    assert results.num_rows == 2 and set(results["status"].to_pylist()) == {"ok"}, results.to_pylist()
    compare = storage.read_bytes(storage.join(out, "tiny", "compare", "report.md")).decode()
    assert all(f"| {name}" in compare for name in ("bliss", "mates", "random", "random_flops")), compare[:3000]
    assert "sigmoid" in _report_from_a_fresh_head(storage.join(out, sweep_name), tmp_path / "report")


def _report_from_a_fresh_head(location: str, dest: Path) -> str:
    """``bliss-ray report`` of a run or sweep in the bucket, by a process with an empty node cache: its report.md."""
    env = os.environ | {"PYTHONPATH": str(REPO), "BLISS_CACHE_DIR": str(dest.with_name(dest.name + "_cache"))}
    cmd = [sys.executable, "-m", "bliss_ray.cli", "report", location, "--out", str(dest)]
    report = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert report.returncode == 0, report.stderr[-3000:]
    return (dest / "report.md").read_text()


def _registered_step(snapshot: str) -> int:
    """The step of the latest checkpoint Train registered in the bucket (0 if none yet, or caught mid-write)."""
    try:
        latest = json.loads(storage.read_bytes(snapshot))["latest_checkpoint_result"]
    except (TypeError, ValueError, KeyError):  # not there yet (None), or caught mid-write
        return 0
    return int((latest or {}).get("metrics", {}).get("step", 0))
