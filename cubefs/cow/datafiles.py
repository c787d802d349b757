"""The local files that hold a volume's written blocks.

Blocks are appended to the current data file of the writing process (a new
file per mount session, and after ``ROLL_AT`` bytes), so that two daemons
writing two clones never share a file, and each block is a (file, offset)
pair that only a collector moves (cow/compact.py: a read that finds its file
gone looks the block up again).  A block the active layer already owns is private to
it (snapshots freeze layers, clones start new ones), so it is overwritten in
place; every other write is copy-on-write into a new block.

Bytes are written before the index record that points at them is committed,
so a crash leaves at worst unreferenced bytes at the end of a file, never a
record pointing at nothing.
"""

from __future__ import annotations

import contextlib
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

    def _fd(self, file_id: int, create: bool = False) -> int:
        """The file's descriptor; only a new file is created: a file the compactor moved
        blocks out of and deleted must not come back empty (a read retries, see :meth:`read`)."""
        fd = self._fds.get(file_id)
        if fd is None:
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            try:
                fd = os.open(self.index.data_path(file_id), flags, 0o600)
            except FileNotFoundError:
                raise BlockMoved(file_id) from None
            self._fds[file_id] = fd
        return fd

    def append(self, txn: lmdb.Transaction, blocks: list[bytes | bytearray | memoryview]) -> list[tuple[int, int]]:
        """Write new blocks with one system call; their (file, offset)s.  Each block takes
        ``block_size`` bytes of the file; the last may be given shorter (a fresh block written
        only in part), and the rest of its place is left a hole, which reads as zeros."""
        if any(len(b) != self.block_size for b in blocks[:-1]):  # they are written back to back
            raise ValueError("only the last block appended may be short")
        if not self._current or self._end >= ROLL_AT:
            self._current = self.index.next_data_file(txn)
            self._end = 0
            # Created and locked inside the transaction that allocated its id, and held until
            # :meth:`roll`: the collector never touches a file being appended to.
            fcntl.flock(self._fd(self._current, create=True), fcntl.LOCK_SH)
        start = self._end
        size = sum(len(b) for b in blocks)
        try:
            n = os.pwritev(self._fd(self._current), blocks, start)
            if n != size:
                _write_rest(self._fd(self._current), b"".join(blocks)[n:], start + n)
        except OSError:
            # What a failed write left past ``start`` must go: the next append writes there
            # again, and a short block leaves the rest of its place unwritten, which must read
            # as zeros, not as this write's bytes.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd(self._current), start)
            if not start:  # the transaction that named this file is aborted by the error: name one again
                self._current = 0
            raise
        self._end += len(blocks) * self.block_size
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
        """Raises :class:`BlockMoved` if the file is gone: the compactor moved its blocks
        after the caller looked up ``loc`` (look it up again)."""
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
            fd = self._fds.get(file_id)
            if fd is not None:
                os.fdatasync(fd)

    @property
    def current(self) -> int:
        """The file appended to (0: none yet)."""
        return self._current

    def roll(self) -> int:
        """Stop appending to the current file (the next block starts a new one) and unlock it,
        so the collector may compact it; the file that was current, or 0."""
        old, self._current, self._end = self._current, 0, 0
        fd = self._fds.get(old)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return old

    def prune(self) -> int:
        """Close the descriptors of files the compactor deleted (their space is freed only
        when the last descriptor closes); the number closed.  Call it where no other thread
        uses this object's descriptors."""
        closed = 0
        for file_id, fd in list(self._fds.items()):
            if file_id == self._current or file_id in self._dirty:
                continue
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)
                del self._fds[file_id]
                closed += 1
        return closed

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class BlockMoved(Exception):
    """A data file was deleted after its blocks were moved to another: look the block up again."""

    def __init__(self, file_id: int) -> None:
        super().__init__(file_id)
        self.file_id = file_id


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
