"""FUSE passthrough for an image's files that are whole on the node.

Why: with ``FOPEN_PASSTHROUGH`` (Linux 6.9+, ``CONFIG_FUSE_PASSTHROUGH``) an
OPEN answer names a *backing file* and the kernel then serves that open's
reads, mmap and splice from it itself, with no request to the daemon: a
file of the image read at the speed of the local disk.  The backing file is
the file's copy in the node's :class:`~cubefs.cache.files.FileStore`,
written once from chunks already on the node and verified against the
image's digests before a daemon first uses it.

The price: the kernel must send us OPEN (and RELEASE) for every open, which
"no open" (server.py) had spared (6.18 names a backing file only in an OPEN
answer, and no FOPEN flag spares the RELEASE).  OPEN is answered inline; what
it costs is the daemon's wake-up: 23 us back to back, 90-220 us with 0.2-1 ms
between opens, the close 75 us more (queuing the RELEASE wakes the daemon):
the same wake-up the default path pays once per Python open for its isatty
ioctl.  Measured (tools/bench/warm_ab.py, 30 rounds alternated, load 1.6-2.4):
warm runs 1.33-1.42x the extracted tree with it against 1.20-1.21x without
(``import numpy`` 175 OPENs more, +22 ms; pandas 548, +75 ms); an image on the
node (coldstart_remount, load ~4) 1.11-1.34x slower; a 1 GiB sequential read
from the node 0.25-0.45 -> 0.45-0.76 of the native disk in session 13's runs
(:meth:`Passthrough.copied_chunks` then took its chunks out of the trace
prefetch: the read ran within 5% of the same copy read directly, the rest
the virtio disk's own spread, 0.4-2.4 GB/s).  So ``auto`` negotiates it
only for an image holding a file of AUTO_MIN_FILE or more, ``--passthrough``
always; and only where it can be used at all: a kernel
FUSE mount of an image with a disk cache, a kernel offering it, not
disabled by ``CUBEFS_PASSTHROUGH=0`` in the daemon's environment.  Where it is
refused (no kernel support; ``FUSE_DEV_IOC_BACKING_OPEN`` needs
CAP_SYS_ADMIN) the mount goes on as before, said once in the log and in
``cubefs stats``.

When a file is written out: as the daemon serves it.  The bytes a read
through the daemon answers with (from chunks verified as they were fetched)
are also written, by a writer thread, at their offset in a temporary copy;
when the reads have covered the whole file (a program read it whole:
Python's imports, a sequential reader), the copy is renamed into place and
the next open is a passthrough one.  No byte is read twice for it, and a
first start never waits for it.  Reads that hop about (more than
MAX_FRAGMENTS separate ranges) or a writer that falls behind give the copy
up; such a file is written out from the chunks in the background at its
second open.  Measured on issue 18's
``seqread`` (1 GiB): a copy written only after the reader finished was cut
short by the unmount of every sample and never used.

Only files of MIN_SIZE (1 MiB) and more: measured, ``import json`` of an
image already on the node (new daemon, kernel caches dropped) took 0.138 s
with its 31 files passed through against 0.069 s through the daemon: each
small copy costs cold lookups and reads of its own, where the daemon reads
a few pages of one LMDB file (session 10).  Small files still cost the OPEN round trip.

The kernel's rule that decides the rest: an inode open in cached mode cannot
be opened in passthrough (and back) until every such open is released, or
the open fails with EIO.  So a file goes to passthrough only at an open when
no cached open of it is live (an mmap keeps its open).  Its backing id lives
while it has passthrough opens and is closed at the last one's RELEASE: the
kernel holds a registered file until then, so ids kept for the mount's life
had pinned every copy an eviction or ``cubefs cache clear`` removed.

Safety: the copy is ours (root's, 0600 in a 0700 directory), read-only to
the kernel (registered from an ``O_RDONLY`` descriptor); a user of the mount
never names a path, only an inode, so it cannot swap the backing file.  A
daemon that replaces a dead one (kernel.KernelSession.adopt) does not know
the backing ids its predecessor registered, so it serves every open in
cached mode (an inode still open in passthrough fails a cached open with
EIO until those opens end).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from operator import itemgetter
from typing import Any

import trio

from cubefs.cache.files import FileStore, content_key
from cubefs.format.image import F_MODE, F_SIZE
from cubefs.fuse import protocol as p

log = logging.getLogger(__name__)

ENV = "CUBEFS_PASSTHROUGH"  # "0": never (the fault-injection beside the real test)
MIN_SIZE = 1 << 20  # smaller files stay on the daemon path: see the module docstring
VERIFY_INLINE = 4 << 20  # a copy up to this size is verified within the open that first wants it
BATCH = 16 << 20  # bytes of chunks asked for at a time while writing a copy
FH_CACHED = 1
FH_PASSTHROUGH = 2
MAX_TEES = 64  # files being copied as they are served, at once
MAX_FRAGMENTS = 64  # separate ranges served of one file before its copy is given up
QUEUE = 256  # writes waiting for the writer thread before a copy is given up
CLOSE_WAIT = 10.0  # seconds an unmounting daemon waits for its writer


SHARE = 2  # the copies may take up to 1/SHARE of the disk cache's size, on top of it
# ``auto`` (the recommended default, see the module docstring): negotiated only for an image
# holding a regular file of this size or more.  Why this size: a warm open costs ~0.1 ms more
# with passthrough negotiated (its OPEN round trip; 175 opens of ``import numpy`` +22 ms),
# a file read from the disk cache ~1.7 ms a MB less (daemon ~400 MB/s, its copy ~1.3 GB/s):
# a 64 MiB file read once pays for ~1,000 opens.  The four start-up images of issue 18 hold
# none (their largest, apt's 48 MiB package list, is never read by a start), and their warm
# and on-the-node starts were slower with it (see the module docstring).
AUTO_MIN_FILE = 64 << 20


_BIG: dict[str, bool] = {}  # image digest -> has_big_file (a mount server's daemons share images)


def has_big_file(image: Any) -> bool:
    """Whether ``image`` holds a regular file with AUTO_MIN_FILE or more of stored bytes (a
    sparse file's holes do not count: a big ``lastlog`` is not a data set), once per image
    digest in a process (a spare answers it ahead for the daemon it becomes).  Asked at INIT,
    on a remount's path: a walk of every record in a generator took the INIT phase from 0.41
    to 1.85 ms (deb-python, 8,350 inodes, coldstart_remount medians), so the largest size is
    taken first with ``map`` and ``max`` (C loops) and the records walked only when it passes."""
    key = getattr(image, "digest", None)
    found = _BIG.get(key) if isinstance(key, str) else None
    if found is None:
        inodes = getattr(image, "inodes", None)
        if inodes is None:
            inodes = [image.record(ino) for ino in range(1, len(image) + 1)]
        found = bool(inodes) and max(map(itemgetter(F_SIZE), inodes)) >= AUTO_MIN_FILE and any(
            sum(image.chunk(i)[1] for i in image.extents(ino)[1]) >= AUTO_MIN_FILE
            for ino, r in enumerate(inodes, 1) if r[F_SIZE] >= AUTO_MIN_FILE and stat.S_ISREG(r[F_MODE]))
        if isinstance(key, str):
            _BIG[key] = found
    return found


def disabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "no", "off", "false")


def for_mount(fs: Any, device_fd: Callable[[], int], auto: bool = False) -> Passthrough | None:
    """The passthrough of a kernel mount of ``fs``: an image with a disk cache (its copies
    live beside the chunks), else None.  ``auto``: negotiated only if the image is worth
    it (:meth:`Passthrough.worth_it`)."""
    disk = getattr(getattr(fs, "source", None), "disk", None)
    if getattr(fs, "writable", False) or disk is None or not hasattr(fs, "image"):
        return None
    if auto:  # the store only if negotiated: an auto mount that declines touches no files/ directory
        return Passthrough(fs, lambda: FileStore(disk.directory, disk.max_bytes // SHARE, disk.reserve), device_fd,
                           auto)
    try:
        store = FileStore(disk.directory, disk.max_bytes // SHARE, disk.reserve)
    except OSError as err:
        log.warning("image %s: no FUSE passthrough: cannot use %s: %s", fs.label, disk.directory, err)
        return None
    return Passthrough(fs, store, device_fd, auto)


class Passthrough:
    """One image mount's passthrough: which inodes have a backing id, what to write out."""

    def __init__(self, fs: Any, store: FileStore | Callable[[], FileStore], device_fd: Callable[[], int],
                 auto: bool = False) -> None:
        self.fs = fs  # an ImageFS
        self.auto = auto  # negotiate only where worth_it()
        # the copies' store, or what makes it (auto: made once negotiated, see negotiate)
        self._store: FileStore | None = store if isinstance(store, FileStore) else None
        self._make_store = None if isinstance(store, FileStore) else store
        self.device_fd = device_fd
        self.active = False
        self.state = "not negotiated"
        self._backing: dict[int, int] = {}  # ino -> backing id
        self._cached: Counter[int] = Counter()  # ino -> live opens in cached mode
        self._passed: Counter[int] = Counter()  # ino -> live opens answered with its backing id
        self._opens: Counter[int] = Counter()
        self._keys: dict[int, tuple[str, int, list[tuple[int, bytes, int]]]] = {}
        self._verified: set[str] = set()
        self._busy: set[str] = set()  # being written or verified
        self._limit = trio.CapacityLimiter(1)
        self.counts: Counter[str] = Counter()
        self._tees: dict[int, _Tee] = {}
        self._writer: _Writer | None = None

    @property
    def store(self) -> FileStore:
        if self._store is None:
            assert self._make_store is not None
            self._store = self._make_store()
        return self._store

    # -- INIT --------------------------------------------------------------

    def negotiate(self, kernel_flags: int) -> bool:
        """Whether to ask for passthrough at INIT (the server then answers OPEN)."""
        if disabled_by_env():
            self._refuse(f"disabled ({ENV}=0)")
        elif self.auto and not self.worth_it():
            self.active = False  # the mount's normal case: no log line
            self.state = f"off: auto: no file of {AUTO_MIN_FILE >> 20} MiB or more in the image"
        elif not kernel_flags & p.PASSTHROUGH:
            self._refuse("the kernel offers no FUSE passthrough (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH)")
        else:
            try:
                _ = self.store  # auto mode makes it here: a directory that cannot be used refuses it
            except OSError as err:
                self._refuse(f"cannot use the cache's files/ directory: {err}")
            else:
                self.active = True
                self.state = "passthrough"
        return self.active

    def worth_it(self) -> bool:
        """Whether the image holds a regular file of AUTO_MIN_FILE or more.  See AUTO_MIN_FILE
        for why, and :func:`has_big_file` for what it costs."""
        return has_big_file(self.fs.image)

    def _refuse(self, why: str) -> None:
        if self.active or self.state == "not negotiated":
            log.info("image %s: no FUSE passthrough: %s; every read goes through the daemon", self.fs.label, why)
        self.active = False
        self.state = f"off: {why}"

    # -- OPEN / RELEASE ------------------------------------------------------

    def open(self, ino: int) -> int | Coroutine[Any, Any, int]:
        """The backing id to answer this open with (0: cached mode), or a coroutine that
        finds out (a small copy verified first)."""
        self._opens[ino] += 1
        self.counts["opens"] += 1
        self._collect()
        if not self.active:
            return self._cached_open(ino)
        bid = self._backing.get(ino)
        if bid is not None:
            return self._passthrough_open(ino, bid)
        info = self._info(ino)
        if info is None:
            return self._cached_open(ino)
        key, size, _extents = info
        if self._cached[ino] or key in self._busy:
            return self._cached_open(ino)
        if key in self._verified or self.store.trusted(key):
            self._verified.add(key)
            return self._register(ino, key)
        if os.path.exists(self.store.path(key)):
            if size <= VERIFY_INLINE:
                return self._verify_then_register(ino)
            self._busy.add(key)
            self._spawn(self._verify, ino)
        elif self._opens[ino] >= 2:
            self.wanted(ino)
        return self._cached_open(ino)

    def served(self, ino: int, offset: int, parts: list[Any]) -> None:
        """A read of ``ino`` answered by the daemon with ``parts`` at ``offset``: copy it."""
        if not self.active or ino in self._backing:
            return
        n = sum(len(x) for x in parts)
        tee = self._tees.get(ino)
        if tee is None:
            info = self._info(ino)
            if n == 0 or info is None or len(self._tees) >= MAX_TEES:
                return
            key, size, _extents = info
            if key in self._busy or key in self._verified or os.path.exists(self.store.path(key)):
                return
            try:
                fd, tmp = self.store.begin(key, size)
            except OSError as err:
                log.debug("no copy of inode %d: %s", ino, err)
                return
            tee = _Tee(key, size, fd, tmp)
            self._tees[ino] = tee
            self._busy.add(key)
        if n == 0:
            return
        if self._writer is None:
            self._writer = _Writer(self.store)
        if not tee.add(offset, offset + n) or not self._writer.put(("write", tee, offset, list(parts))):
            self._give_up(ino, tee)
        elif tee.complete():
            del self._tees[ino]
            if not self._writer.put(("commit", tee)):
                self._give_up(ino, tee)

    def _give_up(self, ino: int, tee: _Tee) -> None:
        self._tees.pop(ino, None)
        assert self._writer is not None
        self._writer.put(("abort", tee), force=True)

    def _collect(self) -> None:
        """Copies the writer thread finished (or gave up) since last time."""
        if self._writer is None:
            return
        while self._writer.done:
            key, size, ok = self._writer.done.popleft()
            self._busy.discard(key)
            if ok:
                self._verified.add(key)
                self.counts["materialized_files"] += 1
                self.counts["materialized_bytes"] += size

    def release(self, ino: int, fh: int) -> None:
        if fh == FH_CACHED and self._cached[ino] > 0:
            self._cached[ino] -= 1
            if not self._cached[ino]:
                del self._cached[ino]
        elif fh == FH_PASSTHROUGH and self._passed[ino] > 0:
            self._passed[ino] -= 1
            if not self._passed[ino]:
                del self._passed[ino]
                self._close_backing(ino)

    def _passthrough_open(self, ino: int, bid: int) -> int:
        self._passed[ino] += 1
        self.counts["passthrough_opens"] += 1
        return bid

    def _close_backing(self, ino: int) -> None:
        """FUSE_DEV_IOC_BACKING_CLOSE of ``ino``'s backing id at its last passthrough release.
        The kernel holds a registered file open until its id is closed, whatever became of its
        name: ids kept for the mount's life pinned every copy an eviction, trim or clear had
        removed (their space never came back).  The kernel drops the inode's own reference to
        the backing file before it sends that RELEASE (fs/fuse/iomode.c), so the next open
        registers the copy afresh without conflict."""
        bid = self._backing.pop(ino, None)
        if bid is None:
            return
        try:
            fcntl.ioctl(self.device_fd(), p.DEV_IOC_BACKING_CLOSE, struct.pack("<I", bid))
        except OSError as err:
            log.warning("image %s: backing id %d of inode %d not closed: %s", self.fs.label, bid, ino, err)
        else:
            self.counts["backing_closed"] += 1

    def wanted(self, ino: int) -> None:
        """A copy of ``ino`` is worth having (read to its end, opened again): write it out
        in the background if it is not there."""
        if not self.active or ino in self._backing:
            return
        info = self._info(ino)
        if info is None or info[0] in self._busy or info[0] in self._verified:
            return
        self._busy.add(info[0])
        self._spawn(self._materialize, ino)

    def copied_chunks(self, wanted: Iterable[int]) -> set[int]:
        """Of the chunk indices ``wanted`` (a trace), those only the kernel's reads of local
        copies need: a mount's trace prefetch leaves them out.

        Why: a remount's trace prefetch read the chunks of a file served by passthrough from
        the disk cache for nobody, on the same disk as the kernel's reads of the copy
        (``tools/bench/seqread.py --compare``, 1 GiB: the remount paged in 321 MB of the
        cache's data.mdb; with this, 116 KiB).  Only big files with a chunk in ``wanted`` are
        looked at (a content key and a mark each), and a chunk that a big file without a
        trusted copy shares (images are deduplicated) stays in.  Empty unless passthrough was
        negotiated: INIT is answered before the prefetch starts (cubefs.fuse.kernel serve)."""
        if not self.active:
            return set()
        want = set(wanted)
        image = self.fs.image
        copied: set[int] = set()
        served: set[int] = set()
        for ino in range(1, len(image) + 1):
            r = image.record(ino)
            if not stat.S_ISREG(r[F_MODE]) or r[F_SIZE] < MIN_SIZE:
                continue
            idxs = image.extents(ino)[1]
            if want.isdisjoint(idxs):
                continue
            info = self._info(ino)
            trusted = info is not None and (info[0] in self._verified or self.store.trusted(info[0]))
            (copied if trusted else served).update(idxs)
        return (copied - served) & want

    def _cached_open(self, ino: int) -> int:
        self._cached[ino] += 1
        return 0

    def _info(self, ino: int) -> tuple[str, int, list[tuple[int, bytes, int]]] | None:
        """(content key, size, extents) of a regular file of at least MIN_SIZE, else None."""
        info = self._keys.get(ino)
        if info is None:
            r = self.fs.image.record(ino)
            if not stat.S_ISREG(r[F_MODE]) or r[F_SIZE] < MIN_SIZE:
                return None
            offs, idxs = self.fs.image.extents(ino)
            extents = []
            for off, idx in zip(offs, idxs, strict=True):
                digest, length = self.fs.image.chunk(idx)
                extents.append((off, digest, length))
            info = (content_key(r[F_SIZE], extents), r[F_SIZE], extents)
            self._keys[ino] = info
        return info

    def _register(self, ino: int, key: str) -> int:
        """FUSE_DEV_IOC_BACKING_OPEN of ``key``'s copy: its backing id (0 if refused)."""
        try:
            fd = os.open(self.store.path(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            self._verified.discard(key)
            return self._cached_open(ino)
        try:
            arg = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
            bid = fcntl.ioctl(self.device_fd(), p.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                self._refuse(f"the kernel refused a backing file ({os.strerror(err.errno)}; it needs "
                             f"CAP_SYS_ADMIN)")
            else:
                log.warning("image %s: backing file for inode %d refused: %s", self.fs.label, ino, err)
            return self._cached_open(ino)
        finally:
            os.close(fd)
        self._backing[ino] = bid
        self.store.touch(key)
        return self._passthrough_open(ino, bid)

    async def _verify_then_register(self, ino: int) -> int:
        if await self._checked(ino) and not self._cached[ino] and ino not in self._backing:
            return self._register(ino, self._keys[ino][0])
        if ino in self._backing:
            return self._passthrough_open(ino, self._backing[ino])
        return self._cached_open(ino)

    async def _checked(self, ino: int) -> bool:
        key, size, extents = self._keys[ino]
        self._busy.add(key)
        try:
            ok = await trio.to_thread.run_sync(self.store.verify, key, size, extents)
        finally:
            self._busy.discard(key)
        if ok:
            self._verified.add(key)
        else:
            self.counts["verify_failures"] += 1
            self.wanted(ino)  # written again, from the chunks
        return ok

    async def _verify(self, ino: int) -> None:
        async with self._limit:
            await self._checked(ino)

    async def _materialize(self, ino: int) -> None:
        key, size, _extents = self._keys[ino]
        try:
            async with self._limit:
                fd, tmp = await trio.to_thread.run_sync(self.store.begin, key, size)
                try:
                    await self._write(ino, fd)
                except BaseException:
                    self.store.abort(fd, tmp)
                    raise
                await trio.to_thread.run_sync(self.store.commit, key, fd, tmp, size)
            self._verified.add(key)  # written from chunks verified as they were read
            self.counts["materialized_files"] += 1
            self.counts["materialized_bytes"] += size
        finally:
            self._busy.discard(key)

    async def _write(self, ino: int, fd: int) -> None:
        offs, idxs = self.fs.image.extents(ino)
        i = 0
        while i < len(idxs):
            j, batch = i, 0
            while j < len(idxs) and (j == i or batch < BATCH):
                batch += self.fs.image.chunk(idxs[j])[1]
                j += 1
            datas = await self.fs.source.get_many(self.fs.chunk_refs(idxs[i:j]))
            pieces = list(zip(offs[i:j], datas, strict=True))
            await trio.to_thread.run_sync(_pwrite_all, fd, pieces)
            i = j

    def _spawn(self, work: Callable[[int], Coroutine[Any, Any, None]], ino: int) -> None:
        async def run() -> None:
            try:
                await work(ino)
            except Exception as err:  # a copy is an optimisation: never the mount's failure
                log.warning("image %s: no local copy of inode %d: %s", self.fs.label, ino, err)

        try:
            trio.lowlevel.spawn_system_task(run)
        except RuntimeError:  # outside trio (a test driving the server by hand)
            key = self._keys[ino][0]
            self._busy.discard(key)

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """At unmount: let the writer finish the copies it was given (a file read whole
        just before the unmount, as a benchmark does), within ``wait`` seconds."""
        if self._writer is not None:
            for ino, tee in list(self._tees.items()):
                self._give_up(ino, tee)
            self._writer.stop(wait)

    def stats(self) -> dict[str, Any]:
        self._collect()
        return {"state": self.state, "opens": self.counts["opens"],
                "passthrough_opens": self.counts["passthrough_opens"],
                "backing_files": len(self._backing), "backing_closed": self.counts["backing_closed"],
                "materialized_files": self.counts["materialized_files"],
                "materialized_bytes": self.counts["materialized_bytes"],
                "verify_failures": self.counts["verify_failures"]}


def _pwrite_all(fd: int, pieces: list[tuple[int, bytes]]) -> None:
    for off, data in pieces:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n


class _Tee:
    """A copy being written as the file is served: which byte ranges it holds."""

    def __init__(self, key: str, size: int, fd: int, tmp: str) -> None:
        self.key, self.size, self.fd, self.tmp = key, size, fd, tmp
        self.failed = False  # a write failed (a full disk): the copy is never renamed into place
        self.ranges: list[list[int]] = []  # sorted, disjoint [start, end)

    def add(self, start: int, end: int) -> bool:
        """Note [start, end); False once the ranges are too many to be worth it."""
        merged: list[list[int]] = []
        for r in self.ranges:
            if r[1] < start or r[0] > end:
                merged.append(r)
            else:
                start, end = min(start, r[0]), max(end, r[1])
        merged.append([start, end])
        merged.sort()
        self.ranges = merged
        return len(merged) <= MAX_FRAGMENTS

    def complete(self) -> bool:
        return len(self.ranges) == 1 and self.ranges[0][0] <= 0 and self.ranges[0][1] >= self.size


class _Writer:
    """One thread that writes copies, so that the serve loop only hands it buffers."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.done: deque[tuple[str, int, bool]] = deque()  # (key, size, renamed into place)
        self._thread = threading.Thread(target=self._run, name="cubefs-copies", daemon=True)
        self._thread.start()

    def stop(self, wait: float) -> None:
        self.queue.put(("stop", None))
        self._thread.join(wait)

    def put(self, item: tuple[Any, ...], force: bool = False) -> bool:
        if not force and self.queue.qsize() >= QUEUE:
            return False
        self.queue.put(item)
        return True

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item[0] == "stop":
                return
            try:
                tee = item[1]
                if item[0] == "write":
                    if not tee.failed:
                        _pwrite_all(tee.fd, [(item[2] + sum(len(x) for x in item[3][:i]), x)
                                             for i, x in enumerate(item[3])])
                elif item[0] == "commit" and not tee.failed:
                    self.store.commit(tee.key, tee.fd, tee.tmp, tee.size)
                    self.done.append((tee.key, tee.size, True))
                else:
                    self.store.abort(tee.fd, tee.tmp)
                    self.done.append((tee.key, tee.size, False))
            except Exception as err:  # a copy is an optimisation: never the mount's failure
                log.warning("local copy not written: %s", err)
                item[1].failed = True
                if item[0] != "write":
                    self.done.append((item[1].key, item[1].size, False))
