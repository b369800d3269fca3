"""What a person sees while a pipeline runs: a start and an end line per stage, live progress, one clear failure.

``StageConsole.stage`` wraps one stage: it prints ``start``, writes the stage's ``_RUNNING.json`` marker, and
while the stage runs a watcher thread reads the stage's per-step records (``poll``, fed from rank 0 by
``bliss_ray.watch.progress``) about once a second into a progress view and into the trackers
(``bliss_ray.watch.tracking``). In a terminal the view is a tqdm bar (step/total, loss, tokens/s, FLOP/s and MFU where
known, memory, ETA) that is cleared when the stage ends; elsewhere (CI, ``ray job submit`` logs, a file) it is a
plain line every ``interval_s`` seconds with no control characters. The stage ends with ``done`` and its headline
outputs, or ``FAILED`` with its reason; the traceback goes to the log (``route_logs``), not the screen.

    console = StageConsole(poll=BoardReader(), trackers=[TensorBoardTracker(run_root)])
    with console.stage(st, stage_dir) as done:
        done(outputs)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from bliss_ray.watch.status import RunningLease, clear_running, headline, mark_failed

log = logging.getLogger("bliss_ray")

WHAT = {
    "tokenizer": "train (or load) the tokenizer",
    "tokenize": "Ray Data: validate, tokenize and pack the pool",
    "select": "select rows",
    "warmup": "Ray Train: warm up the proxy",
    "pretrain": "Ray Train: pretrain the target (+ decay branch)",
    "bilevel": "Ray Train: bilevel optimisation of the score model",
    "score": "Ray Data: score the pool shard",
    "probe": "Ray Train: MATES oracle probes",
    "influence": "MATES influence model",
    "evaluate": "lm-eval on the decay-branch checkpoints",
    "report": "tables and figures",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CONSOLE_LOGGER = "bliss_ray.console"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe(record: dict, eta_s: float | None = None) -> str:
    """The fields of one progress record, as the console prints them (no step counter: the bar has it)."""
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "upper_loss" in record:
        parts.append(f"upper {record['upper_loss']:.4f} lower {record['lower_loss']:.4f}")
    if "weight_entropy" in record:
        parts.append(f"H(w) {record['weight_entropy']:.3f}")
    if record.get("tokens_per_s"):
        parts.append(f"{_si(record['tokens_per_s'])} tok/s")
    if record.get("flops_per_s"):
        parts.append(f"{_si(record['flops_per_s'])}FLOP/s" + (f" MFU {record['mfu']:.1%}" if "mfu" in record else ""))
    if record.get("memory_gb") is not None:
        parts.append(f"mem {record['memory_gb']:.2f} GB")
    if eta_s is not None:
        parts.append(f"ETA {clock(eta_s)}")
    return "  ".join(parts)


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class _Rate:
    """Seconds per step from the records seen this attempt (a restart starts a new one), for the ETA."""

    def __init__(self):
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def eta(self, rec: dict) -> float | None:
        point = (int(rec["done_steps"]), float(rec["time"]))
        self.first = self.first or point
        self.last = point
        left = rec["total_steps"] - point[0]
        if point[0] > self.first[0]:
            per_step = (point[1] - self.first[1]) / (point[0] - self.first[0])
        else:
            per_step = rec.get("step_s") or rec.get("outer_step_s")
        return None if per_step is None else max(left, 0) * per_step


class _View:
    """A stage's live view: a tqdm bar in a terminal, periodic plain lines elsewhere."""

    def __init__(self, console: StageConsole, key: str, kind: str):
        self.console, self.key, self.t0 = console, key, time.monotonic()
        self.rate, self.last_line = _Rate(), 0.0
        self.unprinted: str | None = None  # a plain progress line not yet printed
        self.bar = None
        if console.tty:
            fmt = "  {desc} [{elapsed}]{postfix}"  # until rank 0's first record says how many steps there are
            width = _columns(console.stream)  # a pseudo-terminal nobody sized says 0: tqdm would draw nothing
            self.bar = tqdm(
                total=None, desc=key, file=console.stream, bar_format=fmt, leave=False, dynamic_ncols=width > 0
            )
            if width <= 0:
                self.bar.ncols = 120
            train = kind in ("warmup", "pretrain", "bilevel", "probe")
            self.bar.set_postfix_str("starting workers" if train else "running", refresh=True)

    def update(self, records: list[dict]) -> None:
        if not records:
            if self.bar is not None:
                self.bar.refresh()  # the elapsed time keeps moving
            elif time.monotonic() - max(self.last_line, self.t0) >= 3 * self.console.interval_s:
                self._plain(f"{self.key} running, {clock(time.monotonic() - self.t0)} elapsed")
            return
        eta = None
        for r in records:
            # a worker group's first record carries its start time: after records of an earlier group, a restart,
            # whether or not that group's last records (buffered on a lost node) ever arrived
            last = self.rate.last
            restarted = last is not None and ("worker_start_time" in r or r["done_steps"] <= last[0])
            if last is None and r["done_steps"] > 1:
                self.console.line(f"      {self.key}: resumed from a checkpoint at step {r['step']}")
            elif restarted:
                self.console.line(f"      {self.key}: workers restarted, resuming at step {r['step']}")
                self.rate = _Rate()
            eta = self.rate.eta(r)
        rec = records[-1]
        text = describe(rec, eta)
        if self.bar is not None:
            self.bar.bar_format = "  {desc} {bar:16} {n_fmt}/{total_fmt} [{elapsed}]{postfix}"
            self.bar.total = rec["total_steps"]
            self.bar.n = rec["done_steps"]
            self.bar.set_postfix_str(text, refresh=True)
        else:
            self.unprinted = f"{self.key} step {rec['done_steps']}/{rec['total_steps']}  {text}"
            if self.last_line == 0.0 or time.monotonic() - self.last_line >= self.console.interval_s:
                self._plain(self.unprinted)

    def _plain(self, text: str) -> None:
        self.last_line, self.unprinted = time.monotonic(), None
        self.console.line(f"      {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.unprinted:  # the last state between two periodic lines: a finished stage shows where it ended
            self._plain(self.unprinted)


class StageConsole:
    """Start/end lines, live views and failure messages of one pipeline invocation.

    ``stream``: where people look (default stderr); ``tty``: draw bars (default: whether ``stream`` is a
    terminal); ``poll(stage_dir_name) -> records``: the progress channel; ``trackers``: ``bliss_ray.watch.tracking``
    objects (``stage_start``, ``steps`` from the watcher thread, ``stage_end``, ``stage_failed``); ``events() ->
    lines``: what else happened while a stage runs (``stages._ray.LostNodes``), each a line under the stage's key;
    ``log_path``: the file that holds tracebacks and Ray's own output, named in failure messages."""

    def __init__(
        self,
        stream=None,
        tty: bool | None = None,
        poll: Callable[[str], list[dict]] | None = None,
        trackers: list | None = None,
        events: Callable[[], list[str]] | None = None,
        log_path: str | None = None,
        interval_s: float = 10.0,
        poll_s: float = 1.0,
    ):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.poll, self.events, self.log_path = poll, events, log_path
        self.trackers = trackers if trackers is not None else []  # the caller's list: it may fill it later
        self.interval_s, self.poll_s = interval_s, poll_s
        self._lock = threading.Lock()
        self.failed: str | None = None  # the key of the stage that failed, once one has

    def line(self, text: str) -> None:
        text = f"{time.strftime('%H:%M:%S')} {text}"
        with self._lock:
            if self.tty:
                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(_CONTROL.sub("", text) + "\n")
            self.stream.flush()

    def skipped(self, st, d: Path, outputs: dict) -> None:
        self.line(f"skip {st.key:<15} done earlier ({d.name})")

    @contextlib.contextmanager
    def stage(self, st, d: Path, loc: str | None = None) -> Iterator[Callable[[dict], None]]:
        """Around one stage's run in its local directory ``d`` whose location in the store is ``loc`` (default:
        ``d``; where the status markers go); call the yielded function with its outputs once they are written."""
        t0 = time.monotonic()
        loc = loc or d
        self.line(f"start {st.key:<14} {WHAT.get(st.kind, st.kind)}")
        lease = RunningLease(loc).start()
        self._each_tracker("stage_start", st.key, st.kind, d)
        view = _View(self, st.key, st.kind)
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(st, d, view, stop), daemon=True, name="bliss-progress")
        watcher.start()
        result: dict = {}
        try:
            yield result.update
        except Exception as e:
            self._finish(watcher, stop, view, lease)
            reason = reason_of(e)
            log.error("stage %s failed: %s\n%s", st.key, reason, "".join(traceback.format_exception(e)))
            mark_failed(loc, reason, self.log_path)
            self.failed = st.key
            self._each_tracker("stage_failed", st.key)
            where = f"; details: {self.log_path}" if self.log_path else ""
            self.line(f"FAILED {st.key} after {time.monotonic() - t0:.1f}s: {reason}{where}")
            raise
        except BaseException:  # Ctrl-C: the _RUNNING marker stays; `status` shows the stage as interrupted
            self._finish(watcher, stop, view, lease)
            raise
        self._finish(watcher, stop, view, lease)
        clear_running(loc)
        self._each_tracker("stage_end", st.key, st.kind, st.round, result, loc)  # the published stage
        try:
            summary = headline(st.kind, result, loc)
        except Exception:  # outputs of an older layout: the stage is done all the same
            log.exception("headline of %s", st.key)
            summary = ""
        self.line(f"done  {st.key:<14} {time.monotonic() - t0:6.1f}s  {summary}")

    def _each_tracker(self, method: str, *args) -> None:
        for tracker in self.trackers:
            try:
                getattr(tracker, method)(*args)
            except Exception:  # a tracker (a full disk, an unreachable MLflow server) must never fail a stage
                log.exception("tracker %s.%s", type(tracker).__name__, method)

    def _finish(self, watcher: threading.Thread, stop: threading.Event, view: _View, lease: RunningLease) -> None:
        lease.stop()
        stop.set()
        watcher.join()
        view.close()

    def _watch(self, st, d: Path, view: _View, stop: threading.Event) -> None:
        """Drain the stage's records until it ends, then once more (rank 0's last flush races the end)."""
        while True:
            final = stop.wait(self.poll_s)
            if self.poll is None:
                records = []
            elif final and hasattr(self.poll, "final"):
                records = self.poll.final(d.name)
            else:
                records = self.poll(d.name)
            for rec in records:
                if "worker_start_time" in rec:  # logged: the console's latency from the workers' start
                    log.info(
                        "first progress update of %s: %.1f s after its train function started",
                        st.key,
                        time.time() - rec["worker_start_time"],
                    )
            try:
                for text in self.events() if self.events else []:
                    self.line(f"      {st.key}: {text}")
                for tracker in self.trackers:
                    tracker.steps(st.key, st.kind, records)
                if records or not final:
                    view.update(records)  # the last records too: the screen (and a log) ends on the last step
            except Exception:  # a display or tracker problem must never fail the stage
                log.exception("progress of %s", st.key)
            if final:
                return


def reason_of(e: BaseException) -> str:
    """The root cause of a stage failure in one line: for a Ray Train/Data failure, the worker's own exception
    line (Ray wraps it in several layers of traceback text)."""
    text = str(e)
    found = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    ray_wrappers = {"RayTaskError", "RayActorError", "TrainingFailedError", "WorkerGroupError", "ControllerError"}
    found = [(name, msg) for name, msg in found if not name.startswith(tuple(ray_wrappers))]
    if found:
        name, msg = found[-1]
        return f"{name}: {msg.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def route_logs(log_path: Path, verbose: bool):
    """Send this process's stdout/stderr (Ray's driver messages, streamed worker output, C++ core-worker lines,
    Python logging) to ``log_path``, and return a stream to the original terminal for the console. With
    ``verbose`` nothing is redirected (everything also stays on screen). Returns (console stream, restore)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    if verbose:
        lines = _console_logger(sys.stderr, handler)
        return sys.stderr, lambda: _drop_handlers(lines, logging.getLogger(), handler)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2), os.dup(1)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for h in logging.getLogger().handlers:  # stream handlers made earlier write to the file now too: drop them
        if isinstance(h, logging.StreamHandler) and h is not handler:
            logging.getLogger().removeHandler(h)
    lines = _console_logger(console, handler)

    def restore() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 2)
        os.dup2(saved[1], 1)
        for fd_ in saved:
            os.close(fd_)
        _drop_handlers(lines, logging.getLogger(), handler)
        handler.close()

    return console, restore


def _console_logger(stream, file_handler: logging.Handler) -> logging.Logger:
    """``CONSOLE_LOGGER``: lines for the person watching (``console_line``), on ``stream`` and in the log file, from
    code that has no console of its own (a Tune callback, restored with its sweep in a new driver)."""
    lines = logging.getLogger(CONSOLE_LOGGER)
    screen = logging.StreamHandler(stream)
    screen.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    lines.handlers[:] = [screen, file_handler]
    lines.propagate, lines.level = False, logging.INFO
    return lines


def _drop_handlers(lines: logging.Logger, root: logging.Logger, file_handler: logging.Handler) -> None:
    lines.handlers.clear()
    root.removeHandler(file_handler)


def console_line(text: str) -> None:
    """A line on the console of whichever command runs this process (``route_logs``), timestamped like the
    console's own; nowhere when none does."""
    logging.getLogger(CONSOLE_LOGGER).info(_CONTROL.sub("", text))
