"""Giving back the space of dead blocks inside data files that still hold live ones.

A block dies when no record points at it any more (a file removed or
overwritten after a snapshot that is then removed, a truncation); before
this module the collector could only delete a data file with no live block
at all, so one live 64 KiB block pinned a whole file (20 rounds of writing
and deleting a 10 MB file left 192 MiB on disk for 64 KiB of live data).

Two steps, both on *idle* files only: files no process appends to, locked
``LOCK_EX`` by the collector (:func:`idle_files`) inside a write transaction,
where appenders create and lock their files (cow/datafiles.py), so no file
can start being appended to while the collector works on it.

* **Punch** (:func:`punch_dead`): ``fallocate(PUNCH_HOLE)`` over every range
  no record points at.  It needs no free space, so a volume that filled its
  disk gets its space back this way first.  A dead block never comes back to
  life (only appends, into locked files, and flatten/prune, which copy live
  records, make records point at bytes), and the index view that says "dead"
  is made durable before any hole is punched.
* **Compact** (:func:`compact_file`): a file whose dead fraction is at least
  the threshold has its live blocks copied into a new file, which is
  ``fdatasync``-ed; then the records are repointed, ``BATCH`` blocks per
  write transaction; then the index is synced, then the old file is
  unlinked.  Killed at any point, nothing is lost: before a flip the new file
  is unreferenced (the next collection deletes it), after the last flip the
  old one is.  Blocks of a frozen layer never change, so they are copied
  before the transaction; a block of an active layer may be overwritten in
  place by its daemon, which only does so inside a write transaction, so it
  is copied (again) inside the flip's own transaction, which then syncs the
  new file before committing: the daemon stalls for at most one batch
  (4 MiB) of I/O.  A flip commits only if the index's generation
  (cow/index.py) is the one the scan saw: a flatten or prune in between could
  have made new records point into the old file.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable

import lmdb

from cubefs.cow.index import BLOCK_LOC, U64, VolumeIndex

log = logging.getLogger(__name__)

BATCH = 64  # blocks repointed per write transaction (4 MiB of 64 KiB blocks)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
PAUSE_ENV = "CUBEFS_TEST_COMPACT_PAUSE"  # tests only: seconds to sleep at each step, to kill us there

Refs = dict[int, list[bytes]]  # offset of a live block -> keys of the records pointing at it


class Stale(Exception):
    """The index changed under a compaction in a way its scan could not see: try next time."""


def _pause() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def file_id(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    try:
        return int(stem, 16) if dot and ext == "blk" else None
    except ValueError:
        return None


def idle_files(index: VolumeIndex) -> dict[int, int]:
    """{file id: descriptor locked LOCK_EX} of every data file no process appends to.
    Call it inside a write transaction (appenders create and lock theirs inside one)."""
    out: dict[int, int] = {}
    data_dir = os.path.join(index.directory, "data")
    for name in sorted(os.listdir(data_dir)):
        fid = file_id(name)
        if fid is None:
            continue
        try:
            fd = os.open(os.path.join(data_dir, name), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        out[fid] = fd
    return out


def scan(index: VolumeIndex, txn: lmdb.Transaction, detail: set[int]) -> tuple[dict[int, int], dict[int, Refs]]:
    """(live blocks of every file, the records pointing into each file of ``detail``)."""
    counts: dict[int, set[int]] = {}
    refs: dict[int, Refs] = {f: {} for f in detail}
    for key, raw in txn.cursor(db=index.db["blocks"]):
        if len(raw) < BLOCK_LOC.size:
            continue  # a block of zeros
        fid, off = BLOCK_LOC.unpack(raw[:BLOCK_LOC.size])
        counts.setdefault(fid, set()).add(off)
        if fid in refs:
            refs[fid].setdefault(off, []).append(bytes(key))
    return {f: len(offs) for f, offs in counts.items()}, refs


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch(fd: int, start: int, length: int) -> bool:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def punch_dead(fd: int, live: Refs, block_size: int) -> int:
    """Punch holes over every range of the file no live block covers; bytes freed."""
    before = allocated(fd)
    size = os.fstat(fd).st_size
    pos = 0
    for off in [*sorted(live), size]:
        if off > pos and not _punch(fd, pos, off - pos):
            return 0  # the filesystem cannot: compaction alone will do
        pos = max(pos, off + block_size)
    return max(0, before - allocated(fd))


def compact_file(index: VolumeIndex, src_id: int, src_fd: int, live: Refs, block_size: int, gen: int,
                 pace: Callable[[int], None]) -> tuple[int, int]:
    """Copy the live blocks of ``src_id`` into a new file, repoint their records, delete it.
    Returns (bytes copied, the index generation now).  Raises :class:`Stale` (or OSError,
    e.g. ENOSPC) having lost nothing: whatever was flipped points at the new file."""
    data_dir = os.path.join(index.directory, "data")
    with index.write() as txn:
        if index.generation(txn) != gen:
            raise Stale
        dst_id = index.next_data_file(txn)
        dst_fd = os.open(index.data_path(dst_id), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(dst_fd, fcntl.LOCK_SH)  # not idle for another collector until we are done
    flipped = False
    copied = 0
    try:
        offsets = sorted(live)
        where = {off: i * block_size for i, off in enumerate(offsets)}
        written: dict[int, int] = {}  # bytes copied to where[off]
        dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # the new file's name is durable before any record names it
        finally:
            os.close(dir_fd)
        for i in range(0, len(offsets), BATCH):
            batch = offsets[i : i + BATCH]
            for off in batch:
                written[off] = _copy(src_fd, off, dst_fd, where[off], block_size)
            os.fdatasync(dst_fd)
            copied += len(batch) * block_size
            pace(len(batch) * block_size)
            _pause()
            with index.write() as txn:
                if index.generation(txn) != gen:
                    raise Stale
                frozen: dict[int, bool] = {}
                again = False
                for off in batch:
                    old = BLOCK_LOC.pack(src_id, off)
                    for key in live[off]:
                        raw = txn.get(key, db=index.db["blocks"])
                        if raw is None or bytes(raw) != old:
                            continue  # deleted or rewritten since the scan
                        layer = U64.unpack(key[:8])[0]
                        if layer not in frozen:
                            frozen[layer] = bool(index.layer_info(txn, layer).get("frozen"))
                        if not frozen[layer]:  # its daemon may have overwritten it in place since
                            written[off] = _copy(src_fd, off, dst_fd, where[off], block_size, written[off])
                            again = True
                        txn.put(key, BLOCK_LOC.pack(dst_id, where[off]), db=index.db["blocks"])
                if again:
                    os.fdatasync(dst_fd)
                gen = index.bump_generation(txn)
            flipped = True
        index.sync()  # the flips are durable before the old bytes go
        _pause()
        os.unlink(index.data_path(src_id))
        return copied, gen
    except BaseException:
        if not flipped:
            os.unlink(index.data_path(dst_id))  # nothing points at it, and only we hold it
        raise
    finally:
        os.close(dst_fd)


def _copy(src_fd: int, off: int, dst_fd: int, to: int, block_size: int, over: int = 0) -> int:
    """Copy one block without its trailing zeros: the rest of its place stays a hole (the new
    file is ours alone, never written there), which reads as zeros, as a block written only
    in part was (cubefs/volume/fs.py: _put_range; a block cut short by a crash reads so too).
    ``over``: what an earlier copy wrote there, zeroed where this one is shorter.  Returns
    the bytes written."""
    data = os.pread(src_fd, block_size, off).rstrip(b"\0")
    if len(data) < over:
        data += bytes(over - len(data))
    if data and os.pwrite(dst_fd, data, to) != len(data):
        raise OSError(errno.ENOSPC, "short write while compacting")
    return len(data)
