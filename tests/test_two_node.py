"""A two-node Ray cluster whose worker node cannot see the driver's files, with the run root in a local S3 server.

The head (0 CPUs: it hosts only Ray's own services and the driver) and a worker node that runs every task, actor
and Train worker. The worker node lives in its own mount namespace (``unshare --mount``) with a tmpfs over the
test's temporary directory, where the driver's run directory and node cache are: a driver-local path handed to
a worker fails there with FileNotFoundError. The pool and reference files are in the bucket too (a cluster's
inputs are). The driver is ``bliss-ray run`` in a subprocess (this session's own Ray stays as it is).
Mid warm-up, worker node 1 is killed and node 2 (a new namespace, an empty cache) takes its place.

Ray 2.60's GCS, raylets and object managers listen on every interface whatever ``--node-ip-address`` says, and no
setting binds them to loopback. So the scenario runs in a network namespace of its own (``unshare --net``) whose one
interface is loopback: its S3 server, head, worker nodes and drivers can be reached from nowhere else. The first
test below is that namespace's launcher; the scenario skips outside it.

    .venv/bin/python -m pytest tests/test_two_node.py -q
"""

import contextlib
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

import pytest
import yaml

from bliss_ray import storage
from tests.conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK_ONLY = "BLISS_TEST_LOOPBACK_ONLY"  # set inside the launcher's network namespace
SCENARIO = "test_two_nodes_sharing_only_a_bucket_survive_a_dead_node_then_resume_on_a_new_head_and_report"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_marked(mark: str) -> None:
    """SIGKILL every process whose command line names ``mark`` (a node's private temp dir): a killed raylet's
    agents are re-parented to init and ignore SIGTERM (docs/ray.md, "Two nodes on one machine"). Never ``ray stop``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid), signal.SIGKILL)


class Cluster:
    """A head node and worker nodes on 127.0.0.1, each with its own short temp dir; ``stop`` kills them all."""

    def __init__(self, hidden: Path):
        self.hidden, self.port = hidden, _free_port()
        self.env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
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
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.marks += [spill, cache]
        return proc

    def wait_for_cpus(self, cpus: float, timeout_s: float = 120) -> None:
        code = (
            f"import ray, time; ray.init(address={self.address!r}, log_to_driver=False)\n"
            "t = time.time()\n"
            f"while ray.cluster_resources().get('CPU', 0) < {cpus} and time.time() - t < {timeout_s}:\n"
            "    time.sleep(0.5)\n"
            "print(ray.cluster_resources().get('CPU', 0))"
        )
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip().endswith(str(float(cpus))), out.stdout[-1000:] + out.stderr[-2000:]

    def stop(self) -> None:
        for mark in self.marks:
            _kill_marked(mark)
        for mark in self.marks:
            shutil.rmtree(mark, ignore_errors=True)


def _refused_namespaces() -> str | None:
    """Why this machine cannot give the scenario its namespaces (network for the whole scenario, mount for each
    worker node), or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        return "needs root, unshare(1) and ip(8) for namespaces of its own"
    probe = subprocess.run(["unshare", "--net", "--mount", "ip", "link", "set", "lo", "up"], capture_output=True)
    return f"this machine refuses unshare --net --mount: {probe.stderr.decode().strip()}" if probe.returncode else None


# In CI (the tier's slowest test): one pipeline run that a node death interrupts
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1700)
def test_the_two_node_scenario_runs_where_only_loopback_exists():
    """Launches the scenario in a new network namespace with loopback up and nothing else, in a fresh pytest (its
    own S3 server and Ray processes, all in the namespace); passes when the scenario passed there."""
    if reason := _refused_namespaces():
        pytest.skip(reason)
    pytest_cmd = f"exec {sys.executable} -m pytest -q -p no:cacheprovider {__file__}::{SCENARIO}"
    proc = subprocess.run(
        ["unshare", "--net", "bash", "-c", f"ip link set lo up && {pytest_cmd}"],
        env=os.environ | {LOOPBACK_ONLY: "1"},
        capture_output=True,
        text=True,
        timeout=1600,
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
        c.start_worker(1)
        c.wait_for_cpus(4)
        yield c
    finally:
        c.stop()


def _experiment(tmp_path: Path, bucket: str, **sections) -> Path:
    """experiments/tiny.yaml with its pool and reference in the bucket, a short evaluation, and ``sections``
    merged into its sections."""
    inputs = storage.join(bucket, "inputs")
    for name in ("pool-00000.parquet", "pool-00001.parquet", "reference.parquet"):
        storage.write_bytes(storage.join(inputs, name), (REPO / "data" / "corpus" / name).read_bytes())
    exp = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    exp["data"] |= {
        "pool": [storage.join(inputs, "pool-00000.parquet"), storage.join(inputs, "pool-00001.parquet")],
        "reference": [storage.join(inputs, "reference.parquet")],
    }
    exp["eval"] |= {"tasks": ["bliss_ref_cloze"], "limit": 10}
    for name, values in sections.items():
        exp[name] |= values
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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_nodes_sharing_only_a_bucket_survive_a_dead_node_then_resume_on_a_new_head_and_report(
    cluster, s3_bucket, tmp_path
):
    """The tiny pipeline with ``--out s3://…``, its Train workers and Data actors on worker node 1. A fault holds
    the warm-up's worker (40 steps, a checkpoint every 4) before step 15, once checkpoint 12 (or 8) is in the
    bucket; the test SIGKILLs node 1 (raylet and every process it started) and starts node 2 in a new namespace
    with an empty cache. Ray Train restarts the group there from the last checkpoint in the bucket: the warm-up
    ends at exactly step 40 with every step logged once, and every later stage runs on node 2 from what it cached
    anew. Every stage output is in the bucket and none on the driver's disk. Then a new head (no local trace of the
    first driver) reruns the command: nothing recomputes, and ``bliss-ray report`` works from the bucket."""
    import io

    import torch

    from bliss_ray.config import load_experiment
    from bliss_ray.pipeline import Run

    warmup = {"steps": 40, "warmup_steps": 2, "ckpt_every_steps": 4}
    config = _experiment(tmp_path, s3_bucket, warmup=warmup)
    out = storage.join(s3_bucket, "runs")
    run = Run(load_experiment(config), out)
    held = Path(f"/var/tmp/held{cluster.port}")  # outside the hidden dir: both namespaces see it
    cluster.marks.append(str(held))
    cmd, env = _driver(config, out, cluster.address, tmp_path / "driver1")
    env["BLISS_FAULTS"] = json.dumps({"pause": {"stage": "warmup", "step": 14, "once": str(held), "seconds": 900}})
    log = tmp_path / "driver.log"
    train_run = storage.join(run.store, "_ray", run.dir("warmup").name)  # Train runs are named after the stage dir
    snapshot = storage.join(train_run, "checkpoint_manager_snapshot.json")
    t0 = time.perf_counter()
    with log.open("w") as f:
        driver = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        while not (held.exists() and _registered_step(snapshot) >= 8):
            assert driver.poll() is None, "the driver ended before the kill:\n" + log.read_text()[-4000:]
            assert time.perf_counter() - t0 < 600, "no kill point reached:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        registered = _registered_step(snapshot)
        _kill_marked(next(m for m in cluster.marks if "/rw1_" in m))  # node 1's raylet, workers and agents
        cluster.start_worker(2)
        code = driver.wait(timeout=1200)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first_s = time.perf_counter() - t0
    console = log.read_text()
    assert code == 0, console[-4000:]

    state = torch.load(io.BytesIO(storage.read_bytes(run.uri("warmup", "state", "train_state.pt"))), weights_only=True)
    assert state["step"] == 40
    assert len(state["resumed_from"]) == 1 and 8 <= state["resumed_from"][0] <= 12, (state["resumed_from"], registered)
    steps = [json.loads(line)["step"] for line in storage.read_bytes(run.uri("warmup", "metrics.jsonl")).splitlines()]
    assert steps == list(range(1, 41))  # each step logged once: replayed steps overwrite, nothing is lost
    cache2 = Path(f"/var/tmp/rc2_{cluster.port}")
    assert any(p.is_file() for p in cache2.rglob("*")), "node 2 did not build its own cache"

    for st in run.stages:  # every stage finished, in the bucket
        assert storage.exists(run.uri(st.key, "_SUCCESS")), st.key
    assert storage.exists(run.uri("r1.pretrain", "decay", "model.safetensors"))
    # the driver's disk holds no stage output: only its console log and TensorBoard files (also in the bucket)
    driver_runs = tmp_path / "driver1" / "runs"
    left = [p.relative_to(driver_runs) for p in driver_runs.glob("*/*") if p.name not in ("logs", "tb")]
    assert left == []
    assert storage.listdir(storage.join(run.store, "logs"), ".log")

    # a new head: no local trace of the first driver; the same command recomputes nothing
    shutil.rmtree(tmp_path / "driver1")
    t0 = time.perf_counter()
    again = _run(config, out, cluster.address, tmp_path / "driver2")
    again_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    console = again.stdout + again.stderr
    assert not re.findall(r"^\S+ start ", console, re.M), console[-3000:]
    assert len(re.findall(r"^\S+ skip ", console, re.M)) == len(run.stages), console[-3000:]
    assert again_s < first_s / 3, (again_s, first_s)

    report = subprocess.run(
        [sys.executable, "-m", "bliss_ray.cli", "report", run.store, "--out", str(tmp_path / "report")],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| bliss (" in (tmp_path / "report" / "report.md").read_text()


def _registered_step(snapshot: str) -> int:
    """The step of the latest checkpoint Train registered in the bucket (0 if none yet, or caught mid-write)."""
    try:
        latest = json.loads(storage.read_bytes(snapshot))["latest_checkpoint_result"]
    except (TypeError, ValueError, KeyError):  # not there yet (None), or caught mid-write
        return 0
    return int((latest or {}).get("metrics", {}).get("step", 0))
