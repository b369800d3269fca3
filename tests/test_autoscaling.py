"""The autoscaler adds worker nodes for a scoring job that the head cannot host, and removes them once idle.

Ray's fake multi-node provider (``ray.autoscaler._private.fake_multi_node``, what ``ray.cluster_utils.
AutoscalingCluster`` drives) starts "nodes" as extra raylets on this machine. The head has 1 CPU and no ``scorer``
resource; a Ray Data job maps a score function over rows with an actor pool of 2 actors that each need
``scorer: 1``, which only the ``scorer_node`` worker type offers. So the autoscaler must launch 2 workers, the
job finishes, and with ``idle_timeout_minutes: 0.05`` the idle workers are terminated a few seconds later.

It needs its own Ray cluster (the session's ``ray_local`` instance cannot autoscale), so a subprocess starts
one with ``ray start --head --autoscaling-config`` in a private temp dir and on free ports, runs the job, and
prints the alive-node count over time. ``AutoscalingCluster.start()`` itself is not used: it runs
``ray stop --force``, which kills every Ray instance on the machine (other users' included), and the 2.60 wheel
lacks the ``example.yaml`` its constructor reads; the config below is that example's, with our node types.

    .venv/bin/python -m pytest tests/test_autoscaling.py -q -s        # prints the observed node counts
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DRIVER = r"""
import json, os, signal, socket, subprocess, sys, threading, time

import numpy as np
import ray
import ray.data

tmp = sys.argv[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ip = ray.util.get_node_ip_address()
port = free_port()
config = {  # ray/autoscaler/_private/fake_multi_node/example.yaml, with this test's node types
    "cluster_name": "bliss_autoscaling_test",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "scorer_node": {"resources": {"CPU": 1, "scorer": 1, "object_store_memory": 100 * 1024**2},
                        "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.05,  # 3 s: idle workers go away quickly
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}
cfg = os.path.join(tmp, "autoscaling.json")
with open(cfg, "w") as f:
    json.dump(config, f)
env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
head = subprocess.Popen(
    [ray_cli, "start", "--head", "--block", f"--autoscaling-config={cfg}", f"--port={port}", "--num-cpus=1",
     f"--temp-dir={tmp}", "--include-dashboard=false", "--object-store-memory=100000000",
     f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
     f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
    env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "head.log"), "w"), start_new_session=True,
)
t0 = time.monotonic()
counts = []
try:
    for _ in range(120):  # the head is up once its address file exists
        if os.path.exists(os.path.join(tmp, "ray_current_cluster")):
            break
        time.sleep(0.5)
    ray.init(address=f"{ip}:{port}", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def watch():
        while True:
            n = sum(node["Alive"] for node in ray.nodes())
            if not counts or counts[-1][1] != n:
                counts.append((round(time.monotonic() - t0, 1), n))
                print(f"t={counts[-1][0]:6.1f}s alive nodes={n}", flush=True)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(1.5)

    class Scorer:  # a stand-in score model: one linear layer over 16 features
        def __init__(self):
            self.w = np.random.default_rng(0).normal(size=16)

        def __call__(self, batch):
            time.sleep(0.5)  # ~8 s of work for one actor: the second comes up (~3 s later) while work is left
            x = np.stack([np.sin(batch["id"] * (k + 1)) for k in range(16)], axis=1)
            return {"id": batch["id"], "score": x @ self.w, "node": [ray.get_runtime_context().get_node_id()] * len(x)}

    ds = ray.data.range(4000, override_num_blocks=16).map_batches(
        Scorer, batch_size=250, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5, resources={"scorer": 1})
    out = ds.to_pandas()
    job_done = round(time.monotonic() - t0, 1)
    print(f"t={job_done:6.1f}s scoring job done: {len(out)} rows on {out['node'].nunique()} node(s)", flush=True)
    head_id = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not counts or counts[-1][1] != 1):
        time.sleep(0.5)
    time.sleep(1.0)
    summary = {"counts": counts, "job_done_s": job_done, "rows": len(out),
               "scoring_nodes": sorted(set(out["node"])), "head": head_id}
    print("SUMMARY " + json.dumps(summary), flush=True)
finally:
    ray.shutdown()
    try:
        os.killpg(head.pid, signal.SIGTERM)  # the head's process group: gcs, raylet, monitor and fake nodes
        head.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(head.pid, signal.SIGKILL)
"""


def _leftovers(tmp: str) -> list[int]:
    """Processes whose command line mentions this test's private Ray temp dir (only ones this test started)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if tmp.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
# extended: in CI, test_reliability checks requests against an autoscaler's ceiling and the bounded wait
@pytest.mark.extended
def test_autoscaler_adds_workers_for_the_scoring_pool_and_removes_them_when_idle():
    tmp = tempfile.mkdtemp(prefix="bra_", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    env |= {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, tmp], env=env, capture_output=True, text=True, timeout=360
        )
    finally:
        stray = _leftovers(tmp)  # normally none: the driver stops the head's process group
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
    print(proc.stdout + f"stray processes killed after the driver: {len(stray)}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(lines[0].removeprefix("SUMMARY "))
    counts = [n for _, n in s["counts"]]
    peak = counts.index(max(counts))
    assert counts[0] == 1, s  # the head alone before the job
    assert max(counts) == 3, s  # one scorer_node per actor: 2 workers added
    assert counts[-1] == 1 and peak < len(counts) - 1, s  # ... and removed once idle
    assert s["rows"] == 4000 and s["head"] not in s["scoring_nodes"] and len(s["scoring_nodes"]) == 2, s
