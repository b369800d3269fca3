"""This node's cache of copies from the store: one directory per location, built once under a lock, verified by
the sizes recorded when it was built, held by the processes that use it, and kept under a size cap by evicting
the least recently used copies that no process holds.

``storage.local_copy`` is its client (it knows what a location is and how to copy one); this module knows only
directories on this node. Its layout, in the copies directory (``storage.cache_root() / "copies"``):

    <key>/             the copy
    <key>.sizes.json   its files' sizes, written once the copy is complete; its modification time is its last use
    <key>.lock         flocked exclusively while the copy is checked or built
    <key>.hold         flocked shared by every process that uses the copy; evicting it takes it exclusively
    .evict.lock        one eviction at a time, so two builders do not both count on the same free bytes

The cap is ``BLISS_CACHE_MAX_GB`` (10^9 bytes; fractions allowed), a setting of the node (the cluster configs
set it per node type), else half of what the cache could have on its disk (``cap_bytes``). A copy is held by
the process that took it until the process ends (a Train worker, an actor) or, inside a ``holding()`` block,
until the block ends (a task in a reused Ray worker, a stage run by a long-lived driver). The kernel drops a
dead process's flocks, so a crash never leaves a copy held. Copies that start at once may pass the cap by what
they are still fetching: each one makes room for itself only.

    path = take(copies, "tokenizer-ab12cd34ef56", lambda: 2_000_000, lambda dest: download(loc, dest))
    with holding():
        path = take(...)  # released when the block ends
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

CAP_ENV = "BLISS_CACHE_MAX_GB"
GB_BYTES = 10**9
# The rest of the disk stays for what the node writes itself: stage directories before their upload, Ray's
# spilled objects and logs, a driver's working directories of remote runs.
DISK_SHARE = 0.5

log = logging.getLogger("bliss_ray")
_held: dict[Path, IO] = {}  # hold file -> this process's open handle on it, which carries the shared flock
_held_guard = threading.Lock()


def cap_bytes(copies: Path, cached_bytes: int) -> int:
    """How many bytes the copies may take: ``BLISS_CACHE_MAX_GB``, else half of the free disk at ``copies`` plus
    the ``cached_bytes`` already there. Counting its own bytes keeps the cap from shrinking as the cache fills, so
    a process started later does not evict what an earlier one just copied."""
    setting = os.environ.get(CAP_ENV)
    if not setting:
        return int((shutil.disk_usage(copies).free + cached_bytes) * DISK_SHARE)
    try:
        cap_gb = float(setting)
        if not 0 <= cap_gb < math.inf:  # refuses nan too
            raise ValueError
    except ValueError:
        raise ValueError(f"{CAP_ENV}={setting!r}: expected a finite number of GB (10^9 bytes), 0 or more") from None
    return int(cap_gb * GB_BYTES)


def take(copies: Path, key: str, incoming_bytes: Callable[[], int], fetch: Callable[[Path], None]) -> Path:
    """The copy ``key`` (a directory in ``copies``), held by this process and marked used now; built first when it
    is absent or damaged: ``incoming_bytes()`` says what building it writes (room is made for that first) and
    ``fetch(dest)`` writes it. Several processes of a node asking at once build it once."""
    copies.mkdir(parents=True, exist_ok=True)
    dest, hold = copies / key, copies / f"{key}.hold"
    newly_held = _hold(hold)  # before the check, so that a copy found whole cannot be evicted before its use
    try:
        with _locked(copies / f"{key}.lock"):
            if not _verified(dest):
                _record_of(dest).unlink(missing_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                _make_room(copies, key, incoming_bytes())
                fetch(dest)
                _record(dest)
            now_ns = time.time_ns()  # finer than the kernel's file clock: uses a moment apart still order
            os.utime(_record_of(dest), ns=(now_ns, now_ns))
    except BaseException:
        if newly_held:
            _release(hold)
        raise
    return dest


@contextlib.contextmanager
def holding():
    """Copies first taken inside the block are held until it ends instead of until the process ends: for work
    whose process outlives it (a task in a reused Ray worker, a stage of a driver that runs many)."""
    with _held_guard:
        before = set(_held)
    try:
        yield
    finally:
        with _held_guard:
            taken = set(_held) - before
        for hold in taken:
            _release(hold)


def _hold(hold: Path) -> bool:
    """Hold a copy for this process: a shared flock on its hold file, kept open. False when already held."""
    with _held_guard:
        if hold in _held:
            return False
        handle = open(hold, "a")  # noqa: SIM115 -- kept open: the flock lasts as long as the handle
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits while this copy is being evicted
        _held[hold] = handle
        return True


def _release(hold: Path) -> None:
    with _held_guard:
        handle = _held.pop(hold, None)
    if handle is not None:
        handle.close()  # closing drops the flock


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _make_room(copies: Path, key: str, incoming_bytes: int) -> None:
    """Evict the least recently used copies no process holds until ``incoming_bytes`` more fit under the cap. When
    what is held leaves no room, the copy is made anyway (a stage never fails for cache space), with a warning."""
    with _locked(copies / ".evict.lock"):
        entries = _entries(copies, besides=key)
        cached_bytes = sum(size for _, _, size in entries)
        cap = cap_bytes(copies, cached_bytes)
        for _, other, size in sorted(entries):  # least recently used first
            if cached_bytes + incoming_bytes <= cap:
                return
            if _evict(copies, other):
                cached_bytes -= size
        if cached_bytes + incoming_bytes > cap:
            log.warning(
                "node cache %s: copying %s (%d bytes) passes its cap of %d bytes (%s): the %d bytes cached are "
                "held by work running on this node; copying anyway",
                copies,
                key,
                incoming_bytes,
                cap,
                CAP_ENV,
                cached_bytes,
            )


def _entries(copies: Path, besides: str) -> list[tuple[int, str, int]]:
    """(last use in ns, key, bytes) of every copy in ``copies`` but ``besides``. One without a record (a build
    under way, or one a crash cut short) counts its bytes on disk and as used longest ago."""
    out = []
    for dest in copies.iterdir():
        if not dest.is_dir() or dest.name == besides:
            continue
        record = _record_of(dest)
        try:
            out.append((record.stat().st_mtime_ns, dest.name, sum(json.loads(record.read_text()).values())))
        except (OSError, ValueError):
            out.append((0, dest.name, _disk_bytes(dest)))
    return out


def _disk_bytes(dest: Path) -> int:
    total = 0
    for parent, _, files in os.walk(dest):
        for f in files:
            with contextlib.suppress(OSError):  # a build under way renames and removes files while we look
                total += os.path.getsize(os.path.join(parent, f))
    return total


def _evict(copies: Path, key: str) -> bool:
    """Remove the copy ``key`` unless a process holds it (builders hold what they build); True when removed. Its
    lock files stay: removing one that another process has open would let two processes lock two different files."""
    with open(copies / f"{key}.hold", "a") as hold:
        try:
            fcntl.flock(hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        _record_of(copies / key).unlink(missing_ok=True)  # first: a copy half removed is never taken as whole
        shutil.rmtree(copies / key, ignore_errors=True)
    return True


def _record_of(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}.sizes.json")


def _record(dest: Path) -> None:
    sizes = {str(p.relative_to(dest)): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    _record_of(dest).write_text(json.dumps(sizes))


def _verified(dest: Path) -> bool:
    record = _record_of(dest)
    if not (dest.is_dir() and record.exists()):
        return False
    try:
        sizes = json.loads(record.read_text())
    except ValueError:  # a record a crash cut short
        return False
    return all((dest / rel).is_file() and (dest / rel).stat().st_size == n for rel, n in sizes.items())
