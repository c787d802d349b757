"""One writer per volume: the daemon that mounts it holds ``locks/NAME.lock``.

Two daemons writing one active layer would each overwrite blocks in place
that the other also thinks it owns, so a second mount of a mounted volume
fails.  The lock file says where the volume is mounted, so that commands
which must go through the daemon (a rollback, which has to invalidate the
kernel's caches) can find it.  ``flock`` locks die with their process: a
killed daemon never leaves a volume locked.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from cubefs.cow.index import VolumeError, VolumeIndex


def _path(index: VolumeIndex, volume: str) -> str:
    return os.path.join(index.directory, "locks", f"{volume}.lock")


class VolumeLock:
    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def take(cls, index: VolumeIndex, volume: str, mountpoint: str) -> VolumeLock:
        path = _path(index, volume)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = holder_of(index, volume) or {}
            raise VolumeError(f"volume {volume} is already mounted at {holder.get('mountpoint', '?')} "
                              f"(pid {holder.get('pid', '?')})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"mountpoint": mountpoint, "pid": os.getpid()}).encode(), 0)
        return cls(fd, path)

    def unlink(self) -> None:
        """Remove the lock file while holding it (a removed volume's lock must not stay behind:
        one file per volume ever made).  A mount that opened it before waits on nothing: its
        non-blocking flock fails, and the volume is gone from the index anyway."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def holder_of(index: VolumeIndex, volume: str) -> dict[str, Any] | None:
    """Where the volume is mounted, or None if no live daemon holds it."""
    try:
        fd = os.open(_path(index, volume), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0)
            try:
                return dict(json.loads(raw))
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
