"""Block volumes: a VM's disk as one file of a volume, so it snapshots, rolls back and clones in O(1).

A block volume is an empty volume (no base image) whose root directory holds
one regular file, ``disk``, inode 2, whose size is the disk's capacity
(docs/format.md, "Block volumes").  Its bytes are the file's 64 KiB blocks in
the volume's layers, so nothing new is in the index: snapshot, rollback,
clone, ``volume gc`` and compaction work on it unchanged, a host-side
``cubefs mount --volume`` shows the disk as ``/disk``, and a snapshot is a
consistent disk as long as nothing was half-written into it (the VM paused,
or its filesystem frozen).  Why a file and not a table of its own: a second
block table would need its own walk, its own collector and its own
compaction; the file's blocks already have all three, and measured per
request the file's bookkeeping (one inode record copied up per write) is a
small part of serving one (docs/benchmarks.md, "Block disk").

The vhost-user-blk back-end that serves it to QEMU is ``vmm/vhost_user_blk.py``
(``cubefs mount --volume NAME SOCKET --transport vhost-user-blk``).
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from cubefs.cow.index import ROOT_INO, Inode, Volume, VolumeIndex
from cubefs.errors import UsageError
from cubefs.image.fs import FsError

DISK_NAME = b"disk"
DISK_INO = 2
SECTOR = 512
MAX_SIZE = 1 << 50  # 1 PiB: past any disk a VM gets here; block numbers stay far inside u64


def create_block_volume(index: VolumeIndex, name: str, size: int) -> Volume:
    """A new block volume of ``size`` bytes (a multiple of 512), all zeros: one transaction,
    nothing written (a block never written reads as zeros)."""
    if size <= 0 or size % SECTOR or size > MAX_SIZE:
        raise UsageError(f"a block volume's size must be a positive multiple of 512 bytes up to 1 PiB, not {size}")
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    root = Inode(stat.S_IFDIR | 0o755, uid, gid, now, now, now, 0, 2)
    disk = Inode(stat.S_IFREG | 0o600, uid, gid, now, now, now, size, 1)
    return index.create_volume(name, None, root, DISK_INO + 1, files=((DISK_NAME, DISK_INO, disk),))


def disk_of(fs: Any) -> tuple[int, int]:
    """(inode, size in bytes) of the disk a :class:`cubefs.volume.fs.VolumeFS` (a volume, or
    one of its snapshots) shows; UsageError if it is not a block volume."""
    try:
        ino = fs.lookup_ino(ROOT_INO, DISK_NAME) if fs.base is None else 0
        attr = fs.getattr(ino) if ino else None
    except FsError:
        attr = None
    if attr is None or not stat.S_ISREG(attr.mode) or attr.size % SECTOR:
        raise UsageError(f"volume {fs.name} is not a block volume (make one with 'cubefs volume create NAME "
                         "--block SIZE')")
    return ino, attr.size


def export_disk(index: VolumeIndex, volume: str, snapshot: str | None, path: str, chunk: int = 4 << 20) -> int:
    """Write the disk's bytes to ``path`` (a new file, 0600), sparse where the disk reads as
    zeros; bytes written.  A volume being served changes under the reader: export a snapshot
    of it (a mounted volume is refused)."""
    from cubefs.cow.lock import holder_of
    from cubefs.volume.fs import VolumeFS

    if snapshot is None and (holder := holder_of(index, volume)) is not None:
        raise UsageError(f"volume {volume} is being served at {holder.get('mountpoint', '?')}: snapshot it and "
                         f"export the snapshot ({volume}@SNAPSHOT)")
    fs = VolumeFS(index, volume, None, f"export of {volume}", snapshot)
    try:
        ino, size = disk_of(fs)
    except BaseException:
        fs.close()
        raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        zeros = bytes(chunk)
        for off in range(0, size, chunk):
            data = b"".join(fs.read_now(ino, off, min(chunk, size - off)) or [])
            if data != zeros[: len(data)]:
                os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    finally:
        fs.close()
    os.close(fd)
    return size
