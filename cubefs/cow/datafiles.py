"""The local files that hold a volume's written blocks.

Blocks are appended to the current data file of the writing process (a new
file per mount session, and after ``ROLL_AT`` bytes), so that two daemons
writing two clones never share a file, and each block is a (file, offset)
pair that never moves.  A block the active layer already owns is private to
it (snapshots freeze layers, clones start new ones), so it is overwritten in
place; every other write is copy-on-write into a new block.

Bytes are written before the index record that points at them is committed,
so a crash leaves at worst unreferenced bytes at the end of a file, never a
record pointing at nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os

import lmdb

from cubefs.cow.index import VolumeIndex

ROLL_AT = 1 << 30


class DataFiles:
    def __init__(self, index: VolumeIndex, block_size: int) -> None:
        self.index = index
        self.block_size = block_size
        self._fds: dict[int, int] = {}
        self._current = 0  # file id appended to, 0: none yet
        self._end = 0
        self._dirty: set[int] = set()
        self.written_bytes = 0

    def _fd(self, file_id: int) -> int:
        fd = self._fds.get(file_id)
        if fd is None:
            fd = os.open(self.index.data_path(file_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds[file_id] = fd
        return fd

    def append(self, txn: lmdb.Transaction, blocks: list[bytes | bytearray | memoryview]) -> list[tuple[int, int]]:
        """Write new blocks (``block_size`` bytes each) with one system call; their (file, offset)s."""
        if not self._current or self._end >= ROLL_AT:
            self._current = self.index.next_data_file(txn)
            self._end = 0
            # Held while this process lives: the collector never deletes a file being appended to.
            fcntl.flock(self._fd(self._current), fcntl.LOCK_SH)
        start = self._end
        size = sum(len(b) for b in blocks)
        try:
            n = os.pwritev(self._fd(self._current), blocks, start)
            if n != size:
                _write_rest(self._fd(self._current), b"".join(blocks)[n:], start + n)
        except OSError:
            if not start:  # the transaction that named this file is aborted by the error: name one again
                self._current = 0
            raise
        self._end += size
        self._dirty.add(self._current)
        self.written_bytes += size
        return [(self._current, start + i * self.block_size) for i in range(len(blocks))]

    def overwrite(self, loc: tuple[int, int], within: int, data: bytes | memoryview) -> None:
        n = os.pwrite(self._fd(loc[0]), data, loc[1] + within)
        if n != len(data):
            _write_rest(self._fd(loc[0]), memoryview(data)[n:], loc[1] + within + n)
        self._dirty.add(loc[0])
        self.written_bytes += len(data)

    def read(self, loc: tuple[int, int], within: int, size: int) -> bytes:
        data = os.pread(self._fd(loc[0]), size, loc[1] + within)
        return data if len(data) == size else data + bytes(size - len(data))

    def written(self) -> list[int]:
        """Every file this process wrote: an fsync flushes them all, since a background
        flush may have taken a file off the dirty list and not finished yet."""
        return sorted(self._fds)

    def take_dirty(self) -> list[int]:
        """The files written since the last call (for :meth:`sync`, maybe in another thread)."""
        dirty = sorted(self._dirty)
        self._dirty.clear()
        return dirty

    def sync(self, files: list[int]) -> None:
        """Make the blocks written to ``files`` durable (before the index is synced)."""
        for file_id in files:
            os.fdatasync(self._fds[file_id])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write_rest(fd: int, rest: bytes | memoryview, offset: int) -> None:
    """Finish a short write.  A write comes up short when the disk fills in the middle
    of it; writing the rest then fails with the reason (ENOSPC, EDQUOT, EFBIG), which
    reaches the application as itself, not as an EIO for a "short write"."""
    view = memoryview(rest)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "a write made no progress")
        view, offset = view[n:], offset + n
