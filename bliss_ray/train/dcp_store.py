"""A sharded (DCP) checkpoint read where it lies: each rank reads the byte ranges of its own shards from any pyarrow
filesystem (an object store, a node's disk), not a downloaded copy of every rank's files.

DCP's load plan decides which parts of which files a rank needs (its shards of the model and AdamW state, from
``.metadata``); ``torch.distributed.checkpoint.FileSystemReader`` reads them by seeking in each file, so a reader
over a filesystem with random access reads only those ranges. A resuming 1B run's rank then reads its 1/N of
the ~12 GB of weights and AdamW state, not all of it.

    reader = StoreReader(checkpoint.filesystem, f"{checkpoint.path}/dcp")
    fsdp.load(model, optimizer, reader)      # dcp.load(state, storage_reader=reader)
    reader.bytes_read                        # what this rank read
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pyarrow.fs as pafs
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader


class _Counted(io.RawIOBase):
    """A seekable read-only view of a pyarrow file that adds what it reads to ``counter[0]``."""

    def __init__(self, f: pafs.NativeFile, counter: list[int]):
        super().__init__()
        self.f, self.counter = f, counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.counter[0] += n
        return n


class _ArrowFileSystem(FileSystemBase):
    """DCP's filesystem interface over a pyarrow filesystem, for reading."""

    def __init__(self, fs: pafs.FileSystem, counter: list[int]):
        self.fs, self.counter = fs, counter

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise ValueError(f"a StoreReader only reads ({path}: mode {mode!r})")
        with self.fs.open_input_file(str(path)) as f:
            yield _Counted(f, self.counter)

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def exists(self, path) -> bool:
        return self.fs.get_file_info(str(path)).type != pafs.FileType.NotFound

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # never chosen by DCP on its own: a StoreReader is always passed explicitly

    def rename(self, path, new_path) -> None:
        raise NotImplementedError("a StoreReader never writes")

    def mkdir(self, path) -> None:
        raise NotImplementedError("a StoreReader never writes")

    def rm_file(self, path) -> None:
        raise NotImplementedError("a StoreReader never writes")


class StoreReader(FileSystemReader):
    """``FileSystemReader`` over ``path`` of the pyarrow filesystem ``fs``; ``bytes_read`` counts what it read."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        super().__init__(path)
        self._counter = [0]
        self.fs = _ArrowFileSystem(fs, self._counter)
        self.path = str(path)

    @property
    def bytes_read(self) -> int:
        return self._counter[0]
