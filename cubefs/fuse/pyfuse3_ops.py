"""The pyfuse3 transport (``cubefs mount --transport pyfuse3``): libfuse's requests → ImageFS.

The default transport is :mod:`cubefs.fuse.kernel`, which speaks the protocol
itself so that it can ask the kernel to cache more (see there).  This one is
kept for hosts where that is not wanted, and as a cross-check: the fidelity
tests run through both.  pyfuse3 serves one session per process.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from typing import Any

import pyfuse3
from cachetools import LRUCache

from cubefs.image.fs import Attr, FsError, ImageFS

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 3600.0


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino  # type: ignore[assignment]
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = a.mode  # type: ignore[assignment]
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 65536
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


def _request(method: Any) -> Any:
    """Every FUSE handler goes through here: count it by operation, turn FsError into
    its errno, and any other exception into EIO for that one request -- pyfuse3
    ends its main loop (unmounting the filesystem) on anything but FUSEError."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: FuseOps, *args: Any) -> Any:
        self.ops[name] += 1
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        except Exception:
            log.exception("FUSE %s%r failed; answering EIO", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class FuseOps(pyfuse3.Operations):
    """Thin: every method translates types; ``_request`` translates errors."""

    def __init__(self, fs: ImageFS) -> None:
        super().__init__()
        self.fs = fs
        self.read_bytes = 0
        self.ops: Counter[str] = Counter()  # requests by operation, for stats and metrics
        # The image never changes, so an inode's reply is built once; a directory
        # listing (readdirplus) would otherwise rebuild hundreds per request.
        self._entries: LRUCache[int, pyfuse3.EntryAttributes] = LRUCache(maxsize=65536)

    def _entry_of(self, ino: int) -> pyfuse3.EntryAttributes:
        e = self._entries.get(ino)
        if e is None:
            e = self._entries[ino] = _entry(self.fs.getattr(ino))
        return e

    @_request
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:  # type: ignore[override]
        try:
            return self._entry_of(self.fs.lookup_ino(parent_inode, name))
        except FsError as err:
            if err.errno != errno.ENOENT:
                raise
            # A negative entry (ino 0) the kernel caches: Python probes many
            # paths that do not exist, and the image never changes.
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0  # type: ignore[assignment]
            neg.entry_timeout = CACHE_TIMEOUT
            return neg

    @_request
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:  # type: ignore[override]
        return self._entry_of(inode)

    @_request
    async def readlink(self, inode: int, ctx: Any) -> bytes:  # type: ignore[override]
        return self.fs.readlink(inode)

    @_request
    async def opendir(self, inode: int, ctx: Any) -> int:  # type: ignore[override]
        self.fs.opendir(inode)
        return inode

    @_request
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:  # type: ignore[override]
        for name, ino, nxt in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry_of(ino), nxt):  # type: ignore[arg-type]
                break

    @_request
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:  # type: ignore[override]
        self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # type: ignore[arg-type]

    @_request
    async def read(self, fh: int, off: int, size: int) -> bytes:  # type: ignore[override]
        data = b"".join(await self.fs.read(fh, off, size))
        self.read_bytes += len(data)
        return data

    @_request
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:  # type: ignore[override]
        return self.fs.getxattr(inode, name)

    @_request
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:  # type: ignore[override]
        return self.fs.listxattr(inode)

    @_request
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:  # type: ignore[override]
        s = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = s["bsize"]
        st.f_blocks = s["blocks"]
        st.f_bfree = st.f_bavail = s["bfree"]
        st.f_files = s["files"]
        st.f_ffree = st.f_favail = s["ffree"]
        st.f_namemax = s["namemax"]
        return st

    @_request
    async def flush(self, fh: int) -> None:  # type: ignore[override]
        # ENOSYS once makes the kernel stop sending FLUSH on every close(): a
        # read-only image has nothing to flush, and each request is a round trip.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_request
    async def release(self, fh: int) -> None:  # type: ignore[override]
        pass

    @_request
    async def releasedir(self, fh: int) -> None:  # type: ignore[override]
        pass

    @_request
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:  # type: ignore[override]
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True



class Pyfuse3Transport:
    def __init__(self, fs: ImageFS, mountpoint: str, fsname: str, allow_other: bool) -> None:
        self.fuse = FuseOps(fs)
        self.ops = self.fuse.ops
        self.mountpoint = mountpoint
        self.options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=cubefs", "ro"}
        if allow_other:
            self.options.add("allow_other")
        self._initialized = False

    @property
    def read_bytes(self) -> int:
        return self.fuse.read_bytes

    def mount(self) -> None:
        pyfuse3.init(self.fuse, self.mountpoint, self.options)
        self._initialized = True

    async def serve(self) -> None:
        await pyfuse3.main(max_tasks=128)

    def stop(self) -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            pyfuse3.close(unmount=True)
