"""One storage layer for run roots: local paths and object-store URIs (``s3://``, ``gs://``, …) via pyarrow.fs.

A *location* is a string: a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands. Store options
ride in the URI's query string (``s3://bkt/runs?region=us-east-1&endpoint_override=http://127.0.0.1:9000``), so a
worker on another node resolves the same store from the location alone, with no environment to forward.
Credentials come only from the environment or the instance/workload identity; nothing here writes them anywhere.

Why pyarrow.fs and not fsspec (docs/design.md, "Storage: run roots in object stores"): Ray Train, Tune and Data
resolve their storage with it, it ships S3, GCS, Azure and HDFS in the pyarrow wheel we already pin, and
``copy_files`` is a threaded C++ bulk copy. Single-object writes are atomic on object stores, so a marker
(``_SUCCESS``) written last is what readers trust; local writes go through a temporary file and ``os.replace`` for
the same guarantee. ``copy_tree`` copies inside one store without the bytes passing through this process (S3's and
GCS's server-side copy), and ``bytes_moved`` counts what did pass through it: a driver's count stays small when
checkpoints and training arrays go store-to-store or are built on worker nodes.

    from bliss_ray import storage
    storage.write_json(storage.join(root, "r0.select-ab12", "outputs.json"), {...})
    local = storage.local_copy(storage.join(root, "tokenizer-cd34", "tokenizer"))  # node-local cache
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bliss_ray import node_cache


class StorageError(RuntimeError):
    """A store that cannot be reached, read or written, named by its location."""


# bytes this process has read from and written to object stores through this module
_MOVED = {"read": 0, "written": 0}
_MOVED_LOCK = threading.Lock()  # ranged reads count from several threads


def _moved(loc: str | Path, read: int = 0, written: int = 0) -> None:
    if is_remote(loc):
        with _MOVED_LOCK:
            _MOVED["read"] += read
            _MOVED["written"] += written


def bytes_moved() -> dict[str, int]:
    """Bytes this process has read from (``read``) and written to (``written``) object stores through this module
    (local files and server-side copies are not counted: neither passes through a network to this process)."""
    return dict(_MOVED)


def _write_bytes_moved(path: str) -> None:
    Path(path).write_text(json.dumps(bytes_moved() | {"pid": os.getpid()}) + "\n")


if os.environ.get("BLISS_STORAGE_BYTES_FILE"):  # a test's driver reports its traffic when it exits
    atexit.register(_write_bytes_moved, os.environ["BLISS_STORAGE_BYTES_FILE"])


def is_remote(loc: str | Path) -> bool:
    return "://" in str(loc) and not str(loc).startswith("file://")


def join(loc: str | Path, *parts: str) -> str:
    """``loc/part/…``, keeping a URI's query string (store options) at the end."""
    base, _, query = str(loc).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + (f"?{query}" if query else "")


def name(loc: str | Path) -> str:
    return str(loc).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def parent(loc: str | Path) -> str:
    base, _, query = str(loc).partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + (f"?{query}" if query else "")


@functools.lru_cache(maxsize=32)
def _remote_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a store root (``scheme://authority?options``) and the path pyarrow gives that root. One
    client per root: creating an S3 client per call costs milliseconds and sockets. How an authority maps to a path
    is pyarrow's (s3/gs: the bucket; abfs: the container of ``container@account``; hdfs: nothing)."""
    base, _, query = root.partition("?")
    fs, path = pafs.FileSystem.from_uri(f"{base}/_" + (f"?{query}" if query else ""))
    return fs, path.removesuffix("_")


def resolve(loc: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the in-filesystem path of a location."""
    loc = str(loc)
    if not is_remote(loc):
        return pafs.LocalFileSystem(), str(Path(loc.removeprefix("file://")).resolve())
    base, _, query = loc.partition("?")
    scheme, rest = base.split("://", 1)
    authority, _, path = rest.partition("/")
    fs, root = _remote_fs(f"{scheme}://{authority}" + (f"?{query}" if query else ""))
    return fs, (root + path).rstrip("/")


def exists(loc: str | Path) -> bool:
    fs, p = resolve(loc)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(loc: str | Path) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    fs, p = resolve(loc)
    try:
        with fs.open_input_stream(p) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    _moved(loc, read=len(data))
    return data


def range_reader(loc: str | Path):
    """``read(offset, nbytes)``: byte ranges of the object at ``loc``, each one ranged GET on an object store, safe to
    call from several threads; for a process that needs a few parts of a large object, not a copy of it."""
    fs, p = resolve(loc)
    f = fs.open_input_file(p)

    def read(offset: int, nbytes: int) -> bytes:
        data = f.read_at(nbytes, offset)
        _moved(loc, read=len(data))
        return data

    return read


def read_json(loc: str | Path):
    data = read_bytes(loc)
    return None if data is None else json.loads(data)


def write_bytes(loc: str | Path, data: bytes) -> None:
    """Write one file atomically: readers see the old content or the new, never a part."""
    fs, p = resolve(loc)
    if not is_remote(loc):
        path = Path(p)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(p) as f:  # one PUT: atomic on S3 and GCS
        f.write(data)
    _moved(loc, written=len(data))


def write_table(loc: str | Path, table: pa.Table, **options) -> None:
    """Write ``table`` as one parquet file (``pq.write_table``'s ``options``), atomically as ``write_bytes``."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    write_bytes(loc, sink.getvalue().to_pybytes())


def read_table(loc: str | Path) -> pa.Table:
    """One parquet file, read whole (a location's bytes: no dataset discovery beside it)."""
    return pq.read_table(pa.BufferReader(read_bytes(loc)))


def write_json(loc: str | Path, obj) -> None:
    write_bytes(loc, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def listdir(loc: str | Path, suffix: str = "", dirs: bool = False) -> list[str]:
    """Locations of the files (``dirs``: directories) directly under ``loc`` whose names end with ``suffix``,
    sorted; [] if none."""
    fs, p = resolve(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    kind = pafs.FileType.Directory if dirs else pafs.FileType.File
    names = sorted(i.base_name for i in infos if i.type == kind and i.base_name.endswith(suffix))
    return [join(loc, n) for n in names]


def remove(loc: str | Path) -> None:
    """Delete a file or a directory tree; nothing if it is absent."""
    fs, p = resolve(loc)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    dst_fs.create_dir(dst, recursive=True)
    # S3 destinations with threads deadlock in some arrow builds (apache/arrow#32372); Ray Train does the same
    threads = not isinstance(dst_fs, pafs.S3FileSystem)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=threads)


def _tree_bytes(fs: pafs.FileSystem, path: str) -> int:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def size(loc: str | Path) -> int:
    """Bytes of the file, or of every file of the directory tree, at ``loc`` (0 if nothing is there)."""
    fs, p = resolve(loc)
    info = fs.get_file_info(p)
    return info.size if info.type == pafs.FileType.File else _tree_bytes(fs, p)


def upload(local_dir: str | Path, loc: str | Path) -> None:
    """Copy a local directory tree to a location (no-op when they are the same directory)."""
    fs, p = resolve(loc)
    src = str(Path(local_dir).resolve())
    if not is_remote(loc) and src == p:
        return
    _copy(pafs.LocalFileSystem(), src, fs, p)
    _moved(loc, written=_tree_bytes(pafs.LocalFileSystem(), src))


def download(loc: str | Path, local_dir: str | Path) -> None:
    fs, p = resolve(loc)
    _copy(fs, p, pafs.LocalFileSystem(), str(Path(local_dir).resolve()))
    _moved(loc, read=_tree_bytes(pafs.LocalFileSystem(), str(Path(local_dir).resolve())))


def copy_tree(src: str | Path, dst: str | Path, keep=lambda rel: True) -> int:
    """Copy the file or directory tree at ``src`` to ``dst`` (only the files whose path relative to ``src`` passes
    ``keep(rel)``); returns the bytes copied. Within one object store each file is one server-side copy (S3's
    CopyObject, GCS's rewrite): nothing passes through this process, whatever the size. One S3 CopyObject takes
    objects up to 5 GB, and a safetensors shard or a DCP file is far below that. Between different stores, or a
    store and this disk, the files stream through this process (and count in ``bytes_moved``)."""
    src_fs, s = resolve(src)
    dst_fs, d = resolve(dst)
    info = src_fs.get_file_info(s)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{src}: nothing there to copy")
    files = [info] if info.type == pafs.FileType.File else src_fs.get_file_info(pafs.FileSelector(s, recursive=True))
    files = [(f, f.path[len(s) :].lstrip("/")) for f in files if f.type == pafs.FileType.File]
    same = is_remote(src) == is_remote(dst) and src_fs.equals(dst_fs)
    total, made = 0, set()
    for f, rel in files:
        if not keep(rel):
            continue
        target = f"{d}/{rel}" if rel else d
        if (parent_dir := target.rsplit("/", 1)[0]) not in made:
            dst_fs.create_dir(parent_dir, recursive=True)
            made.add(parent_dir)
        if same:
            src_fs.copy_file(f.path, target)
        else:
            with src_fs.open_input_stream(f.path) as r, dst_fs.open_output_stream(target) as w:
                shutil.copyfileobj(r, w, 16 * 1024**2)
            _moved(src, read=f.size)
            _moved(dst, written=f.size)
        total += f.size
    return total


def download_files(loc: str | Path, local_dir: str | Path, keep, filesystem: pafs.FileSystem | None = None) -> int:
    """Copy the files under ``loc`` whose path relative to it passes ``keep(rel)`` into ``local_dir``, keeping
    their relative paths (a light local view of a run: its JSON and metrics, not its models). Returns the count.
    ``filesystem``: ``loc`` is a path in it (as Ray Train gives a checkpoint's), not a location."""
    fs, root = (filesystem, str(loc)) if filesystem is not None else resolve(loc)
    remote = not isinstance(fs, pafs.LocalFileSystem)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    n = 0
    for info in infos:
        rel = info.path[len(root) :].lstrip("/")
        if info.type != pafs.FileType.File or not keep(rel):
            continue
        dest = Path(local_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f:
            dest.write_bytes(f.read())
        _MOVED["read"] += info.size if remote else 0
        n += 1
    return n


def check_writable(loc: str | Path) -> None:
    """Fail before compute when ``loc`` cannot be written, naming it and what failed (a probe object, removed)."""
    probe = join(loc, f".bliss_write_check-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        if read_bytes(probe) != b"ok":
            raise StorageError(f"{loc}: a file written there reads back differently")
        remove(probe)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"run root {loc} is not writable: {type(e).__name__}: {e}") from e


def cache_root() -> Path:
    """This node's local space for remote runs (``BLISS_CACHE_DIR``, else the temp dir): the copies of store
    locations (``copies/``, ``node_cache``) and a remote run's working directories. Never the source of truth."""
    return Path(os.environ.get("BLISS_CACHE_DIR") or Path(tempfile.gettempdir()) / "bliss_ray_cache")


def local_copy(loc: str | Path) -> Path:
    """A local directory with the contents of ``loc``: ``loc`` itself when it is local, else this node's copy.

    The copy is keyed by the location (stage directories are identity-addressed, so a location's content never
    changes once its stage is done), built once per node under a file lock (several workers of one node ask at
    once), and verified against the sizes recorded when it was built; a copy that fails the check is rebuilt. The
    calling process holds the copy until it exits, or until the ``node_cache.holding()`` block around the call
    ends; to stay under its cap, the node's cache evicts the least recently used copies that no process holds.
    """
    if not is_remote(loc):
        return Path(resolve(loc)[1])
    key = name(loc) + "-" + hashlib.sha256(str(loc).encode()).hexdigest()[:12]
    return node_cache.take(cache_root() / "copies", key, lambda: _bytes_to_copy(loc), lambda d: download(loc, d))


def _bytes_to_copy(loc: str | Path) -> int:
    """The bytes of every file under ``loc``; fails naming ``loc`` when nothing is there."""
    if not exists(loc):
        raise StorageError(f"{loc}: nothing there to copy (a stage that never finished?)")
    fs, p = resolve(loc)
    return sum(i.size for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File)
