"""The pyfuse3 transport: kernel FUSE requests → :class:`cubefs.fsops.ImageFS`.

Also the mount daemon's main: fetch the image metadata (the only thing a
mount fetches up front), mount, tell the parent process the mount is live,
then serve FUSE requests, the control socket and background fetches on one
trio loop until unmounted.

Kernel caching is on throughout: an image never changes, so entries and
attributes are cached for an hour and file pages survive ``open`` (keep_cache).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio
from cachetools import LRUCache

from cubefs import control
from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import DiskTier, MemoryTier
from cubefs.catalog import load_image, load_manifest
from cubefs.fsops import Attr, FsError, ImageFS
from cubefs.remote import RetryPolicy, make_store
from cubefs.remote.loop import LoopThread

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


def _never_fatal(method: Any) -> Any:
    """pyfuse3 ends its main loop on any exception but FUSEError, which unmounts the
    filesystem: turn every unexpected error into EIO for that one request."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("FUSE %s%r failed; answering EIO", method.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class FuseOps(pyfuse3.Operations):
    """Thin: every method translates types and errors, nothing more."""

    def __init__(self, fs: ImageFS) -> None:
        super().__init__()
        self.fs = fs
        self.reads = 0
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

    @_never_fatal
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:  # type: ignore[override]
        self.ops["lookup"] += 1
        try:
            ino = self.fs.lookup_ino(parent_inode, name)
            return self._entry_of(ino)
        except FsError as err:
            if err.errno == errno.ENOENT:
                # A negative entry (ino 0) the kernel caches: Python probes many
                # paths that do not exist, and the image never changes.
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0  # type: ignore[assignment]
                neg.entry_timeout = CACHE_TIMEOUT
                return neg
            raise pyfuse3.FUSEError(err.errno) from None

    @_never_fatal
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:  # type: ignore[override]
        self.ops["getattr"] += 1
        try:
            return self._entry_of(inode)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None

    @_never_fatal
    async def readlink(self, inode: int, ctx: Any) -> bytes:  # type: ignore[override]
        self.ops["readlink"] += 1
        try:
            return self.fs.readlink(inode)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None

    @_never_fatal
    async def opendir(self, inode: int, ctx: Any) -> int:  # type: ignore[override]
        self.ops["opendir"] += 1
        try:
            self.fs.readdir(inode, 0)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        return inode

    @_never_fatal
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:  # type: ignore[override]
        self.ops["readdir"] += 1
        for name, ino, nxt in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry_of(ino), nxt):  # type: ignore[arg-type]
                break

    @_never_fatal
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:  # type: ignore[override]
        self.ops["open"] += 1
        try:
            self.fs.open(inode, flags)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # type: ignore[arg-type]

    @_never_fatal
    async def read(self, fh: int, off: int, size: int) -> bytes:  # type: ignore[override]
        self.ops["read"] += 1
        try:
            data = await self.fs.read(fh, off, size)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        self.reads += 1
        self.read_bytes += len(data)
        return data

    @_never_fatal
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:  # type: ignore[override]
        self.ops["getxattr"] += 1
        try:
            return self.fs.getxattr(inode, name)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None

    @_never_fatal
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:  # type: ignore[override]
        self.ops["listxattr"] += 1
        try:
            return self.fs.listxattr(inode)
        except FsError as err:
            raise pyfuse3.FUSEError(err.errno) from None

    @_never_fatal
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:  # type: ignore[override]
        self.ops["statfs"] += 1
        s = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = s["bsize"]
        st.f_blocks = s["blocks"]
        st.f_bfree = st.f_bavail = s["bfree"]
        st.f_files = s["files"]
        st.f_ffree = st.f_favail = s["ffree"]
        st.f_namemax = s["namemax"]
        return st

    async def flush(self, fh: int) -> None:  # type: ignore[override]
        # ENOSYS once makes the kernel stop sending FLUSH on every close(): a
        # read-only image has nothing to flush, and each request is a round trip.
        self.ops["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_never_fatal
    async def release(self, fh: int) -> None:  # type: ignore[override]
        self.ops["release"] += 1

    @_never_fatal
    async def releasedir(self, fh: int) -> None:  # type: ignore[override]
        self.ops["releasedir"] += 1

    @_never_fatal
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:  # type: ignore[override]
        self.ops["access"] += 1
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True


@dataclass
class MountOptions:
    ref: str
    mountpoint: str
    store_url: str | None
    s3_endpoint: str | None
    cache_dir: str
    memory_cache: int = 256 * 1024 * 1024
    disk_cache: int = 10 * 1024 * 1024 * 1024
    readahead: int = 4 * 1024 * 1024
    pack_readahead: int = 0
    read_timeout: float = 60.0
    store_attempts: int = 4
    store_timeout: float = 10.0
    allow_other: bool = os.geteuid() == 0  # non-root needs user_allow_other in /etc/fuse.conf


def run_daemon(opts: MountOptions, notify: Any = None) -> int:
    """Mount and serve until unmounted; ``notify(msg)`` reports ready or an error."""
    mountpoint = os.path.abspath(opts.mountpoint)
    loop = LoopThread()
    store = make_store(
        opts.store_url,
        opts.s3_endpoint,
        RetryPolicy(attempts=opts.store_attempts, timeout=opts.store_timeout, max_backoff=1.0),
    )
    t0 = time.monotonic()
    try:
        loop.run(store.open(create=False))
        manifest = loop.run(load_manifest(store, opts.ref))
        image, chunkmap = loop.run(load_image(store, manifest))
    except BaseException:
        loop.run(store.close())
        loop.close()
        raise
    log.info(
        "image %s (sha256:%s): %d inodes, metadata loaded in %.3fs from %s",
        manifest.ref, image.digest[:12], len(image), time.monotonic() - t0, store.url,
    )
    memory = MemoryTier(opts.memory_cache)
    disk = DiskTier(opts.cache_dir, opts.disk_cache) if opts.disk_cache > 0 else None
    source = ChunkSource(store, loop, memory, disk, label=manifest.ref)
    fs = ImageFS(image, chunkmap, source, manifest.ref, readahead=opts.readahead, read_timeout=opts.read_timeout,
                 pack_readahead=opts.pack_readahead)
    ops = FuseOps(fs)

    options = set(pyfuse3.default_options)
    options |= {"fsname=cubefs", "subtype=cubefs", "ro"}
    if opts.allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)

    def get_stats() -> dict[str, Any]:
        return {
            "image": manifest.ref,
            "digest": f"sha256:{image.digest}",
            "mountpoint": mountpoint,
            "store": store.url,
            "pid": os.getpid(),
            "reads": ops.reads,
            "read_bytes": ops.read_bytes,
            "read_errors": fs.read_errors,
            "requests": dict(ops.ops),
            "tiers": source.stats(),
            "store_requests": store.stats.as_dict(),
        }

    control.write_registry(
        mountpoint,
        {"mountpoint": mountpoint, "pid": os.getpid(), "image": manifest.ref, "store": store.url,
         "socket": control.socket_path(mountpoint)},
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            source.start(nursery)
            await nursery.start(control.serve_control, control.socket_path(mountpoint), get_stats)

            def stop(*_a: object) -> None:
                pyfuse3.terminate()

            token = trio.lowlevel.current_trio_token()
            signal.signal(signal.SIGTERM, lambda *_a: token.run_sync_soon(stop))
            signal.signal(signal.SIGINT, lambda *_a: token.run_sync_soon(stop))
            if notify is not None:
                notify("ready")
            await pyfuse3.main(max_tasks=128)
            nursery.cancel_scope.cancel()

    unmount = True
    try:
        trio.run(main)
    except BaseException:
        log.exception("mount daemon for %s failed", mountpoint)
        raise
    finally:
        try:
            pyfuse3.close(unmount=unmount)
        finally:
            control.remove_registry(mountpoint)
            loop.run(store.close())
            loop.close()
            log.info("unmounted %s", mountpoint)
    return 0
