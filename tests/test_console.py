"""The console (stage lines, live progress, failures), the status table and the TensorBoard files, without Ray:
a fake progress channel stands in for rank 0 (the end-to-end proof in a pseudo-terminal is test_console_e2e.py).

    .venv/bin/python -m pytest tests/test_console.py -q
"""

import io
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bliss_ray.watch.console import StageConsole, describe, reason_of
from bliss_ray.watch.status import FAILED, RUNNING, format_status, headline, last_metrics
from bliss_ray.watch.tracking import TensorBoardTracker

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _records(key_total: int, steps: range, t0: float, step_s: float = 0.5) -> list[dict]:
    return [
        {
            "step": s,
            "phase": "stable",
            "loss": 10.0 / s,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 2048.0,
            "step_s": step_s,
            "done_steps": s,
            "total_steps": key_total,
            "memory_gb": 0.75,
            "time": t0 + s * step_s,
        }
        for s in steps
    ]


class FakeChannel:
    """Hands out prepared batches of records, one batch per poll, like the board drained by the driver."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.keys = []

    def __call__(self, key):
        self.keys.append(key)
        return self.batches.pop(0) if self.batches else []


def test_describe_names_loss_speed_memory_and_eta():
    rec = _records(10, range(3, 4), 0.0)[0] | {"flops_per_s": 3.3e9, "mfu": 0.021}
    text = describe(rec, eta_s=75)
    assert "loss 3.3333" in text
    assert "2.05k tok/s" in text
    assert "3.3GFLOP/s MFU 2.1%" in text
    assert "mem 0.75 GB" in text
    assert "ETA 1:15" in text
    bilevel = describe({"upper_loss": 5.0, "lower_loss": 6.0, "weight_entropy": 2.0, "done_steps": 1})
    assert "upper 5.0000 lower 6.0000" in bilevel and "H(w) 2.000" in bilevel


def test_plain_console_prints_start_progress_and_end_without_control_characters(tmp_path):
    out = io.StringIO()
    d = tmp_path / "r0.pretrain-abc"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 6, "phase": "stable", "loss": 4.5}) + "\n")
    t0 = time.time()
    channel = FakeChannel([[], _records(6, range(1, 3), t0), _records(6, range(3, 7), t0)])
    console = StageConsole(out, tty=False, poll=channel, interval_s=0.0, poll_s=0.05)
    st = SimpleNamespace(key="r0.pretrain", kind="pretrain", round=0)
    with console.stage(st, d) as finished:
        time.sleep(0.5)  # several polls
        assert (d / RUNNING).exists()
        finished({"final_step": 6})
    text = out.getvalue()
    assert not CONTROL.search(text.replace("\n", ""))
    lines = text.splitlines()
    assert "start r0.pretrain" in lines[0]
    assert any("r0.pretrain step 2/6" in line and "loss 5.0000" in line for line in lines)
    assert any("r0.pretrain step 6/6" in line and "ETA 0:00" in line for line in lines)
    assert "done  r0.pretrain" in lines[-1] and "step 6, loss 4.5" in lines[-1]
    assert not (d / RUNNING).exists()
    assert set(channel.keys) == {d.name}  # the channel is keyed by the stage directory


def test_tty_console_draws_a_bar_and_clears_it(tmp_path):
    out = io.StringIO()
    channel = FakeChannel([_records(4, range(1, 5), time.time())])
    console = StageConsole(out, tty=True, poll=channel, poll_s=0.05)
    st = SimpleNamespace(key="warmup", kind="warmup", round=None)
    with console.stage(st, tmp_path) as finished:
        time.sleep(0.3)
        finished({"final_step": 4})
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert re.search(r"warmup .*4/4", text)
    assert text.rstrip().splitlines()[-1].lstrip("\r").split(" ", 1)[1].startswith("done  warmup")


def test_a_restart_is_announced(tmp_path):
    out = io.StringIO()
    t0 = time.time()
    batches = [_records(6, range(1, 5), t0), _records(6, range(4, 7), t0 + 10)]  # steps 4.. again: a replay
    console = StageConsole(out, tty=False, poll=FakeChannel(batches), interval_s=0.0, poll_s=0.05)
    with console.stage(SimpleNamespace(key="r1.pretrain", kind="pretrain", round=1), tmp_path) as finished:
        time.sleep(0.4)
        finished({"final_step": 6})
    assert "r1.pretrain: workers restarted, resuming at step 4" in out.getvalue()
    # a group lost with its node never sent the records it buffered: the new group's first record (it carries its
    # start time) is the restart, although its steps go on from the last ones seen
    out = io.StringIO()
    later = _records(6, range(4, 7), t0 + 10)
    later[0]["worker_start_time"] = t0 + 9
    batches = [_records(6, range(1, 2), t0), later]
    console = StageConsole(out, tty=False, poll=FakeChannel(batches), interval_s=0.0, poll_s=0.05)
    with console.stage(SimpleNamespace(key="warmup", kind="warmup", round=0), tmp_path) as finished:
        time.sleep(0.4)
        finished({"final_step": 6})
    assert out.getvalue().count("warmup: workers restarted, resuming at step 4") == 1, out.getvalue()


def test_a_failed_stage_prints_one_reason_and_leaves_a_marker(tmp_path):
    out = io.StringIO()
    console = StageConsole(out, tty=False, log_path="/runs/x/logs/run.log", poll_s=0.05)
    st = SimpleNamespace(key="tokenize", kind="tokenize", round=None)
    with pytest.raises(RuntimeError), console.stage(st, tmp_path):
        raise RuntimeError("tokenize: 40/100 rows (40.0%) were quarantined, more than data.max_bad_frac=5.0%")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "FAILED tokenize" in lines[1]
    assert "RuntimeError: tokenize: 40/100 rows" in lines[1] and "details: /runs/x/logs/run.log" in lines[1]
    marker = json.loads((tmp_path / FAILED).read_text())
    assert marker["reason"].startswith("RuntimeError: tokenize: 40/100") and marker["log"] == "/runs/x/logs/run.log"
    assert console.failed == "tokenize"


def test_reason_of_digs_the_worker_error_out_of_ray_wrappers():
    wrapped = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "loop.py", line 120, in train_lm\n    raise NonFiniteLossError(\n'
        "bliss_ray.train.loop.NonFiniteLossError: stage 'r0.pretrain': non-finite loss at step 3\n"
    )
    assert reason_of(wrapped) == "NonFiniteLossError: stage 'r0.pretrain': non-finite loss at step 3"
    assert reason_of(ValueError("bad value\nmore")) == "ValueError: bad value"


def test_headlines_of_finished_stages(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"domain_share": {"wiki": {"pool": 0.5, "selected": 0.7}, "web": {"pool": 0.5, "selected": 0.3}}})
    )
    text = headline("select", {"selected": 20, "pool_size": 100, "method": "topk"}, tmp_path)
    assert text == "20/100 rows (topk); shares wiki 0.70 (pool 0.50), web 0.30 (pool 0.50)"
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in ({"phase": "stable", "loss": 5.0}, {"phase": "decay", "loss": 4.0})) + "\n"
    )
    assert last_metrics(tmp_path, "stable")["loss"] == 5.0
    assert headline("pretrain", {"final_step": 6}, tmp_path) == "step 6, loss 5, after decay 4"


def test_status_table_names_the_error_and_the_log():
    rows = [
        {"key": "tokenizer", "identity": "a1", "state": "done", "seconds": 75, "headline": "vocab 2048"},
        {"key": "tokenize", "identity": "b2", "state": "failed", "seconds": None, "headline": ""},
        {"key": "r0.select", "identity": "c3", "state": "pending", "seconds": None, "headline": ""},
    ]
    for r in rows:
        r.setdefault("error", None)
        r.setdefault("log", None)
    rows[1] |= {"error": "RuntimeError: too many bad rows", "log": "runs/x/logs/run.log"}
    text = format_status(Path("runs/x"), rows)
    assert text.splitlines()[0] == "runs/x: 1 done, 1 failed, 1 pending"
    assert "done        tokenizer      a1    1m15s  vocab 2048" in text
    assert "error: RuntimeError: too many bad rows" in text and "details: runs/x/logs/run.log" in text


def test_variants_sharing_a_run_root_keep_their_own_event_files(tmp_path):
    """Two methods of a comparison run the same stage key into one root: neither purges the other's steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0 = time.time()
    for variant, scale in (("bliss-aaaa", 1.0), ("random-bbbb", 2.0)):
        tracker = TensorBoardTracker(tmp_path, variant)
        tracker.steps(
            "r1.pretrain", "pretrain", [r | {"loss": scale * r["loss"]} for r in _records(6, range(4, 7), t0)]
        )
        tracker.close()
    for variant, scale in (("bliss-aaaa", 1.0), ("random-bbbb", 2.0)):
        acc = EventAccumulator(str(tmp_path / "tb" / variant / "r1.pretrain"))
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
            (s, pytest.approx(scale * 10.0 / s)) for s in (4, 5, 6)
        ]


def test_tensorboard_files_read_back_with_tensorboards_reader_and_replays_are_purged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path)
    t0 = time.time()
    tracker.steps("warmup", "warmup", _records(6, range(1, 5), t0))
    tracker.steps("warmup", "warmup", _records(6, range(3, 7), t0))  # workers restarted at step 3
    decay = [r | {"phase": "decay", "step": r["step"] + 6, "loss": 1.0} for r in _records(8, range(1, 3), t0)]
    tracker.steps("warmup", "warmup", decay)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "warmup"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gb", "decay/loss"} <= set(tags)
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]  # the dead attempt's steps 3-4 are replaced, not doubled
    assert loss[0][1] == pytest.approx(10.0)
    assert [e.step for e in acc.Scalars("decay/loss")] == [7, 8]


def test_step_reporter_survives_pickling_and_flushes_first_then_every_interval(monkeypatch):
    """Rank 0's sender: built on the driver, shipped to the worker (pickled), first record out at once, then
    batches every ``flush_s``, and the last step always; FLOP/s from the ledger's FLOPs per token."""
    import pickle

    from bliss_ray.watch import progress as _progress

    sent = []

    class FakeBoard:
        class put:  # mirrors an actor method: board.put.remote(...)
            @staticmethod
            def remote(key, records):
                sent.append((key, [r["step"] for r in records]))
                stamped.extend(r["step"] for r in records if "worker_start_time" in r)
                return "ref"

    monkeypatch.setattr(_progress, "board", lambda: FakeBoard)
    waited = []
    monkeypatch.setattr(_progress.ray, "get", lambda ref, timeout=None: waited.append(ref))
    stamped = []
    t0 = time.time()
    reporter = pickle.loads(pickle.dumps(_progress.StepReporter("warmup-x", 10, 5, flops_per_token=6.0, flush_s=60)))
    assert t0 <= reporter._received <= time.time()  # unpickled on the worker: its train function's start
    for step in range(11, 16):
        reporter({"step": step, "loss": 1.0, "tokens_per_s": 100.0})
    assert sent == [("warmup-x", [11]), ("warmup-x", [12, 13, 14, 15])]
    assert stamped == [11]  # only the first record says when the worker started (the console's latency line)
    assert waited == ["ref"] and not reporter._failed  # only the last step's send is waited for
    reporter({"step": "not a number"})  # a broken record is dropped, never raised into the training loop
    assert reporter._failed


def test_mlflow_tracker_through_rays_integration_reads_back_offline(tmp_path):
    """``tracking: [mlflow]``: one run per stage in a local SQLite store (no server, no network), per-step metrics
    by step, the stage's settings as parameters, round summaries, FINISHED / FAILED status."""
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev and tracking extras")
    from mlflow.tracking import MlflowClient

    from bliss_ray.watch.mlflow_tracker import MLflowTracker

    d = tmp_path / "r1.select-abc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"settings": {"selection": {"keep_frac": 0.2, "rule": "topk"}}}))
    (d / "manifest.json").write_text(json.dumps({"domain_share": {"wiki": {"pool": 0.5, "selected": 0.7}}}))
    tracker = MLflowTracker(tmp_path, "tiny")
    tracker.stage_start("r1.select", "select", d)
    tracker.steps("r1.select", "select", _records(4, range(1, 5), time.time()))
    tracker.stage_end("r1.select", "select", 1, {}, d)
    tracker.stage_start("r1.pretrain", "pretrain", d)
    tracker.stage_failed("r1.pretrain")
    tracker.close()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert set(runs) == {"r1.select", "r1.pretrain"}
    select = runs["r1.select"]
    assert select.info.status == "FINISHED" and runs["r1.pretrain"].info.status == "FAILED"
    assert select.data.params["selection.keep_frac"] == "0.2"
    assert select.data.tags["bliss_ray.stage_dir"] == d.name
    loss = client.get_metric_history(select.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in loss) == [(s, pytest.approx(10.0 / s)) for s in range(1, 5)]
    share = client.get_metric_history(select.info.run_id, "selection/share/wiki")
    assert [(m.step, m.value) for m in share] == [(1, pytest.approx(0.7))]


def _wandb_records(run_dir: Path) -> tuple[str, list[dict], int | None, dict]:
    """The name, history rows (metrics and ``_step``), exit code and config of an offline W&B run, read with W&B's
    own record reader from its ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(next(run_dir.glob("run-*.wandb"))))
    rows, exit_code, name, config = [], None, None, {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
            rows.append({k: v for k, v in items.items() if not k.startswith("_")} | {"_step": record.history.step.num})
        elif kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "run":
            name = record.run.display_name
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    return name, rows, exit_code, config


def test_wandb_tracker_through_rays_integration_reads_back_offline(tmp_path, monkeypatch):
    """``tracking: [wandb]`` in offline mode (nothing leaves the machine): one run per stage under ``<run>/wandb``,
    per-step metrics at their steps, the decay branch under ``decay/``, round summaries, failed stages marked."""
    pytest.importorskip("wandb", reason="wandb is in the dev and tracking extras")
    from bliss_ray.watch.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    d = tmp_path / "r1.select-abc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"settings": {"selection": {"keep_frac": 0.2}}}))
    (d / "manifest.json").write_text(json.dumps({"domain_share": {"wiki": {"pool": 0.5, "selected": 0.7}}}))
    tracker = WandbTracker(tmp_path, "tiny")
    tracker.stage_start("r1.pretrain", "pretrain", d)
    records = _records(6, range(1, 5), time.time())
    records[-1]["phase"] = "decay"
    tracker.steps("r1.pretrain", "pretrain", records)
    tracker.steps("r1.pretrain", "pretrain", records[:2])  # a replay after a worker restart adds nothing
    tracker.stage_end("r1.pretrain", "pretrain", 1, {}, d)
    tracker.stage_start("r1.select", "select", d)
    tracker.stage_end("r1.select", "select", 1, {}, d)
    tracker.stage_start("r2.pretrain", "pretrain", d)
    tracker.stage_failed("r2.pretrain")
    tracker.close()

    runs = {}
    for path in (tmp_path / "wandb" / "wandb").glob("offline-run-*"):
        name, history, exit_code, config = _wandb_records(path)
        runs[name] = (history, exit_code, config)
    assert set(runs) == {"r1.pretrain", "r1.select", "r2.pretrain"}
    history, exit_code, config = runs["r1.pretrain"]
    by_step = {row["_step"]: row for row in history}
    assert [by_step[s]["loss"] for s in (1, 2, 3)] == pytest.approx([10.0, 5.0, 10.0 / 3])
    assert by_step[4]["decay/loss"] == pytest.approx(2.5) and "loss" not in by_step[4]
    assert sum(1 for row in history if "loss" in row) == 3  # the replayed steps were not logged twice
    assert exit_code == 0
    assert runs["r1.select"][:2] == ([{"selection/share/wiki": pytest.approx(0.7), "_step": 1}], 0)
    assert runs["r2.pretrain"][:2] == ([], 1)  # the failed stage
    assert config["selection.keep_frac"] == "0.2"  # the stage settings are the run config (as strings)


def test_opt_in_dashboard_names_its_state_api_for_every_process(monkeypatch):
    """``resources.dashboard: true``: a free local port for the dashboard, and RAY_API_SERVER_ADDRESS pointing at it
    (inherited by the raylet and every worker, so the placement-group cleaner's State API client finds this
    cluster even when the machine runs other Ray instances); a preset address is left alone."""
    from bliss_ray.stages._ray import _local_dashboard

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    kwargs = _local_dashboard()
    assert kwargs["include_dashboard"] is None  # never fail ray.init because of the dashboard
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kwargs['dashboard_port']}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert _local_dashboard() == {"include_dashboard": None}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_progress_board_delivers_every_record_once_even_when_a_read_times_out(ray_local):
    """The real channel: rank 0's reporter → named actor → driver's reader. A read whose answer the driver gave
    up on (a stray read executing late) must not swallow records: the board drops only acknowledged ones."""
    from bliss_ray.watch.progress import BoardReader, StepReporter, board

    key = "warmup-board-test"
    reporter = StepReporter(key, start_step=0, total_steps=20, flush_s=0.0)  # every record flushed at once
    reader = BoardReader(timeout_s=30)
    got = []
    for step in range(1, 11):
        reporter({"step": step, "loss": 1.0 / step})
    ray_local.get(board().read.remote(key, 0))  # a read whose answer nobody takes
    deadline = time.time() + 60
    while len(got) < 10 and time.time() < deadline:
        got += reader(key)
    for step in range(11, 21):
        reporter({"step": step, "loss": 1.0 / step})
    ray_local.get(board().read.remote(key, 0))  # a late read with an old count: drops nothing unacknowledged
    while len(got) < 20 and time.time() < deadline:
        got += reader(key)
    assert [r["step"] for r in got] == list(range(1, 21))
    assert got[-1]["done_steps"] == 20 and got[-1]["total_steps"] == 20
    assert reader(key) == []  # nothing twice
    reporter({"step": 20, "loss": 0.0})  # rank 0's last flush, racing the end of the stage
    assert [r["loss"] for r in reader.final(key)] == [0.0]


def test_records_the_live_channel_missed_are_backfilled_from_metrics_jsonl(tmp_path):
    """A stage whose records reached the driver only in part (a busy board, a restarted driver): at its end the
    tracker writes the steps after the last live one from the stage's metrics.jsonl, each once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tmp_path / "r0.pretrain-abc"
    d.mkdir()
    rows = [{"step": s, "phase": "stable" if s <= 4 else "decay", "loss": 10.0 / s} for s in range(1, 7)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracker = TensorBoardTracker(tmp_path)
    tracker.steps("r0.pretrain", "pretrain", _records(4, range(1, 3), time.time()))  # live: steps 1-2 only
    tracker.stage_end("r0.pretrain", "pretrain", 0, {}, d)
    acc = EventAccumulator(str(tmp_path / "tb" / "r0.pretrain"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("decay/loss")] == [5, 6]
    assert [e.step for e in acc.Scalars("memory_gb")] == [1, 2]  # live-only fields stay where they were sent
