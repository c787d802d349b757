"""Before a snapshot or rollback of a mounted volume, what the kernel holds dirty goes to the daemon.

A write through ``write(2)`` reaches the daemon before the call returns
(unless the volume is mounted ``--writeback-cache``: then every write stays a
dirty page in the kernel), but a write through a shared ``mmap`` stays a
dirty page in the kernel until it is written back, up to
``dirty_expire_centisecs`` (30 s) later.  A snapshot is
promised to contain everything written before it, as an LVM snapshot does
(it freezes the filesystem, which flushes dirty pages first).  So the
snapshot commands call ``syncfs`` on the mountpoint first: the kernel sends
every dirty page as a WRITE, and returns once the daemon has answered them
all, i.e. once they are in the volume index.  A rollback flushes first too:
pages written back after it would land in the snapshot's state.

Only from a process other than the daemon (the CLI): the daemon answers
those WRITEs on its one thread, and would wait on itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from cubefs.cow.lock import holder_of

log = logging.getLogger(__name__)


def flush_mounted(index: Any, volume: str) -> str | None:
    """syncfs the mount of ``volume`` if a daemon serves it on a directory (not a
    vhost-user socket, whose guest keeps its own page cache); returns the mountpoint
    flushed, or None."""
    holder = holder_of(index, volume)
    mountpoint = holder.get("mountpoint") if holder else None
    if not isinstance(mountpoint, str) or not os.path.isdir(mountpoint) or not os.path.ismount(mountpoint):
        return None
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:  # unmounted in between: nothing dirty is left to flush
        log.debug("no flush of %s before the snapshot: %s", mountpoint, err)
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)  # no os.syncfs in 3.11; find_library runs ldconfig
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {mountpoint}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return mountpoint
