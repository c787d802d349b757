"""Whole image files kept as plain local files, for FUSE passthrough.

Why: a read served by the daemon costs a round trip and a copy per request
(0.66x the native disk for a sequential read from the warm disk cache, and
2.2-5.1x the extracted tree for an image already on the node); a file the
kernel reads itself from a local backing file (:mod:`cubefs.fuse.passthrough`)
costs nothing of the daemon's.  So a file whose every chunk is on the node is
written out once here, and later opens name it to the kernel.

Layout: ``<cache dir>/files/<k[:2]>/<k>``, private (0700 directories, 0600
files, root's like the rest of the cache), keyed by the file's *content key*
(its size and its chunks' digests at their offsets), so every image holding
the same file shares one copy.  A copy is written to a temporary name and
renamed, and is never trusted as it lies: :meth:`FileStore.verify` hashes
it against the image's chunk digests before its first use (a tampered or
truncated copy is removed, and the read goes through the daemon).  A copy
verified (or written by us from verified chunks) gets a mark beside it, its
inode number, size, mtime and ctime: while they are unchanged the copy is
what was verified (any write changes the ctime, which nothing can set back;
a replaced file has another inode), so a daemon started later uses it
without hashing it again.  Measured: re-hashing a 1 GiB copy at every
daemon's first open kept ``seqread`` at 349 MB/s through the daemon.

Bounded: ``max_bytes`` (least recently used first: a use touches the mark's mtime);
``cubefs cache clear`` drops them all and a cache trim trims them too
(cubefs.cache.disk.DiskCache).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import struct

log = logging.getLogger(__name__)

SUBDIR = "files"
TMP_PREFIX = ".tmp-"
MARK = ".ok"
VERIFY_BLOCK = 1 << 20


def files_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, SUBDIR)


def content_key(size: int, extents: list[tuple[int, bytes, int]]) -> str:
    """The key of a file: its size and (offset, chunk digest, length) of each extent."""
    h = hashlib.sha256(struct.pack("<Q", size))
    for off, digest, length in extents:
        h.update(struct.pack("<QQ", off, length))
        h.update(digest)
    return h.hexdigest()


class FileStore:
    def __init__(self, cache_dir: str, max_bytes: int, reserve: float | int = 0) -> None:
        self.directory = files_dir(cache_dir)
        self.max_bytes = max_bytes
        # the free space the disk cache leaves its filesystem (--cache-reserve: a share or bytes):
        # copies, written by default since passthrough is auto, leave it too
        self.reserve = reserve
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._remove_temporaries()
        self._used: int | None = None  # walked once, then counted (other daemons' copies show at the next walk)

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key)

    def _remove_temporaries(self) -> None:
        """Copies a daemon was writing when it stopped: never renamed, never used.  Only a
        dead writer's (its pid is in the name): every daemon and every cache trim makes a
        FileStore, and another live daemon's copy in progress must not vanish under it."""
        for root, _dirs, names in os.walk(self.directory):
            for name in names:
                if name.startswith(TMP_PREFIX) and not writer_alive(name.rpartition(".")[2]):
                    try:
                        os.unlink(os.path.join(root, name))
                    except OSError:
                        pass

    def begin(self, key: str, size: int = 0) -> tuple[int, str]:
        """A private temporary file to write ``key``'s copy of ``size`` bytes into: (fd, its
        path).  ENOSPC if writing it would eat into the filesystem's reserve."""
        if size and self.reserve:
            st = os.statvfs(os.path.dirname(self.directory))
            keep = int(st.f_blocks * st.f_frsize * self.reserve) if isinstance(self.reserve, float) else self.reserve
            if st.f_bavail * st.f_frsize - keep < size:
                raise OSError(errno.ENOSPC, f"a {size}-byte copy would leave less than the cache's reserve free")
        sub = os.path.dirname(self.path(key))
        # one level at a time: makedirs gives the parents it creates the umask's mode, and a
        # 'cubefs cache clear' under a live mount removes the top directory too
        for d in (self.directory, sub):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        tmp = os.path.join(sub, f"{TMP_PREFIX}{key}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return fd, tmp

    def commit(self, key: str, fd: int, tmp: str, size: int) -> None:
        """Give the written copy its name (atomically), then keep the store within its bound."""
        try:
            os.ftruncate(fd, size)  # a trailing hole
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        os.rename(tmp, self.path(key))
        self.mark(key)
        if self._used is None:
            self._used = self.used_bytes()
        else:
            self._used += size
        if self._used > self.max_bytes:
            self.evict(self.max_bytes, keep=key)
            self._used = self.used_bytes()

    def abort(self, fd: int, tmp: str) -> None:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass

    def verify(self, key: str, size: int, extents: list[tuple[int, bytes, int]]) -> bool:
        """True if ``key``'s copy holds exactly the image's bytes (every extent hashes to its
        chunk digest, the rest is zeros, the size is right); a copy that does not is
        removed.  Reads the whole file: cheap next to serving it, and the page cache it
        fills is the one the kernel then reads from."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            ok = st.st_size == size and st.st_uid == os.geteuid() and not st.st_mode & 0o077 \
                and _extents_match(fd, size, extents)
        except OSError:
            ok = False
        finally:
            os.close(fd)
        if not ok:
            log.warning("materialized file %s does not match its image: removed", path)
            self.remove(key)
        else:
            self.mark(key)
        return ok

    @staticmethod
    def _identity(path: str) -> str:
        st = os.stat(path, follow_symlinks=False)
        return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"

    def mark(self, key: str) -> None:
        """Remember that ``key``'s copy, as it is now, holds the image's bytes."""
        path = self.path(key)
        fd = os.open(path + MARK, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._identity(path))

    def trusted(self, key: str) -> bool:
        """True if ``key``'s copy is unchanged since it was verified or written."""
        path = self.path(key)
        try:
            with open(path + MARK) as f:
                return f.read() == self._identity(path)
        except OSError:
            return False

    def remove(self, key: str) -> None:
        for path in (self.path(key) + MARK, self.path(key)):
            try:
                os.unlink(path)
            except OSError:
                pass

    def touch(self, key: str) -> None:
        """Note a use, for eviction: on the mark, since touching the copy changes its ctime
        and so undoes its mark (measured: every other seqread sample re-hashed 1 GiB)."""
        try:
            os.utime(self.path(key) + MARK)
        except OSError:
            pass

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for root, _dirs, names in os.walk(self.directory):
            for name in names:
                if name.startswith(TMP_PREFIX) or name.endswith(MARK):
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                try:
                    used = os.stat(os.path.join(root, name + MARK)).st_mtime
                except OSError:
                    used = st.st_mtime
                out.append((max(st.st_mtime, used), st.st_blocks * 512, name))
        return out

    def used_bytes(self) -> int:
        return sum(used for _t, used, _n in self._entries())

    def evict(self, target: int, keep: str = "") -> int:
        """Remove the least recently used copies until at most ``target`` bytes remain;
        returns the bytes freed.  A copy the kernel has open stays readable (it holds the
        inode) and its space comes back when the last open ends."""
        entries = sorted(self._entries())
        used = sum(u for _t, u, _n in entries)
        freed = 0
        for _t, u, name in entries:
            if used - freed <= target:
                break
            if name == keep:
                continue
            self.remove(name)
            freed += u
        return freed


def clear_files(cache_dir: str) -> int:
    """Drop every materialized file of the cache in ``cache_dir``; returns the bytes freed."""
    directory = files_dir(cache_dir)
    if not os.path.isdir(directory):
        return 0
    freed = tree_bytes(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return freed


def tree_bytes(path: str) -> int:
    """The disk space the files under ``path`` take (allocated blocks, so holes are free)."""
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def trim_files(cache_dir: str, target: int) -> int:
    """Evict materialized files of ``cache_dir`` down to ``target`` bytes."""
    if not os.path.isdir(files_dir(cache_dir)):
        return 0
    return FileStore(cache_dir, target).evict(target)


def writer_alive(pid: str) -> bool:
    """Whether the process ``pid`` (a temporary's writer) still runs; a name with no pid is
    nobody's.  A reused pid keeps a dead writer's temporary until that process ends: a leak
    bounded by one copy, where a wrong guess would break a live copy."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _extents_match(fd: int, size: int, extents: list[tuple[int, bytes, int]]) -> bool:
    pos = 0
    for off, digest, length in sorted(extents):
        if off < pos or not _zeros(fd, pos, off):
            return False
        h = hashlib.sha256()
        done = 0
        while done < length:
            block = os.pread(fd, min(VERIFY_BLOCK, length - done), off + done)
            if not block:
                return False
            h.update(block)
            done += len(block)
        if h.digest() != digest:
            return False
        pos = off + length
    return _zeros(fd, pos, size)


def _zeros(fd: int, start: int, end: int) -> bool:
    while start < end:
        block = os.pread(fd, min(VERIFY_BLOCK, end - start), start)
        if not block or block.count(0) != len(block):
            return False
        start += len(block)
    return True
