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
from cubefs.remote import RetryingStore, RetryPolicy, store_session
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
        data = await self.fs.read(fh, off, size)
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
    policy = RetryPolicy(attempts=opts.store_attempts, timeout=opts.store_timeout, max_backoff=1.0)
    with store_session(opts.store_url, opts.s3_endpoint, policy=policy) as (loop, store):
        return _serve_image(opts, notify, loop, store)


def _serve_image(opts: MountOptions, notify: Any, loop: LoopThread, store: RetryingStore) -> int:
    mountpoint = os.path.abspath(opts.mountpoint)
    t0 = time.monotonic()
    manifest = loop.run(load_manifest(store, opts.ref))
    image, chunkmap = loop.run(load_image(store, manifest))
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
            "reads": ops.ops["read"] - fs.read_errors,
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

    try:
        trio.run(main)
    except BaseException:
        log.exception("mount daemon for %s failed", mountpoint)
        raise
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            control.remove_registry(mountpoint)
            log.info("unmounted %s", mountpoint)
    return 0
