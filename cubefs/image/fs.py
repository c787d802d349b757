"""The filesystem operations on an image, independent of any transport.

This is the one dispatcher behind every way an image is served: FUSE
mounts (:mod:`cubefs.fuse`), and the vhost-user-fs backend for VMs later.
Operations take inode numbers and return plain values or raise
:class:`FsError` with an errno; transports translate both.

Read path: a ``read`` maps the byte range to the file's chunk extents and
asks the chunk source for them, plus up to ``readahead`` bytes of the chunks
that follow in the same file, which the source fetches in the same merged
GETs or in the background.  Holes in sparse files read as zeros without a
fetch.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeAlias

import trio

from cubefs.cache.source import ChunkSource, ChunkUnavailable
from cubefs.format.image import (
    F_ATIME,
    F_CTIME,
    F_GID,
    F_MODE,
    F_MTIME,
    F_NLINK,
    F_PAYLOAD,
    F_RDEV,
    F_SIZE,
    F_UID,
    F_XATTRS,
    Image,
)
from cubefs.format.packs import ChunkLocation, ChunkMap, locate
from cubefs.format.trace import MAX_CHUNKS

log = logging.getLogger(__name__)

Buffer: TypeAlias = bytes | memoryview
DIR_FILES = 2  # files of one directory read before its other files are prefetched...
DIR_FRACTION = 0.1  # ...and at least this share of its files: see ImageFS._dir_neighbours
DIR_FILE_MAX = 1024 * 1024  # larger files are not prefetched as neighbours (a shared object read in part)
HOT_PIECE = 1024 * 1024  # stored bytes per background range of a hot pack's rest: ranges in parallel
HOT_SHARE = 1.3  # a hot pack's rest is fetched only while the bytes asked stay <= this x the bytes read


class FsError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class StateError(ValueError):
    """A saved FUSE session state (a VM's, restored) that this filesystem cannot take over:
    malformed, or made for another filesystem.  The message says which."""


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class ImageFS:
    """Read-only operations over one image."""

    def __init__(
        self,
        image: Image,
        chunkmap: ChunkMap,
        source: ChunkSource,
        label: str,
        readahead: int = 4 * 1024 * 1024,
        read_timeout: float = 60.0,
        pack_readahead: int = 0,
        dir_prefetch: int = 0,
        stream: int = 0,
        hot_pack: int = 0,
    ) -> None:
        self.image = image
        self.chunkmap = chunkmap
        self.source = source
        self.label = label
        self.readahead = readahead
        self.pack_readahead = pack_readahead
        self.read_timeout = read_timeout
        self.read_errors = 0
        # Directory neighbours: the parent each file was looked up in, the files of each
        # directory read so far, and the directories already prefetched.
        self.dir_prefetch = dir_prefetch
        self._parent: dict[int, int] = {}
        self._dir_reads: dict[int, set[int]] = {}
        self._dirs_done: set[int] = set()
        self._dir_sizes: dict[int, int] = {}  # regular files per directory, counted once
        self._listed: set[int] = set()  # directories whose entries' parent is recorded
        self.dir_prefetches = 0
        # Hot packs: the files of each pack that reads missed (up to hot_pack), the packs fetched whole.
        self.hot_pack = hot_pack
        self._pack_misses: dict[int, set[int]] = {}
        self._packs_done: set[int] = set()
        # Per pack, asked + its rest at its last walk that found the share too small: the rest
        # shrinks by at most what is asked after, so no walk can succeed before the allowance
        # reaches this (a walk builds the refs of a pack's ~2000 chunks: ms of the event loop).
        self._pack_need: dict[int, float] = {}
        self.hot_packs = 0
        self.bytes_read = 0  # plaintext bytes reads asked for (the share HOT_SHARE bounds)
        self.stream = stream
        self._last_pack = 0
        if stream > 0:
            source.stream_after(self._stream_plan)
        self.trace: list[int] | None = None  # chunk indices in first-read order, when recording
        self._traced: set[int] = set()
        self.trace_last = 0.0  # monotonic time a new chunk was last noted
        self._trace_until: float | None = None  # recording stops then (None: at the size bound only)
        self._trace_window: float | None = None
        self.trace_published: dict[str, int] = {}  # the last publish of the recording (cubefs.image.autotrace)

    def export_refs(self) -> dict[str, object]:
        """What the kernel holds of an image, for a session moved to another daemon: nothing
        to count (FORGETs are ignored: an image's inodes live as long as the mount), but
        its node IDs are this image's inode numbers, so the image is named."""
        return {"kind": "image", "image": self.image.digest}

    def import_refs(self, refs: dict[str, object]) -> int:
        if refs.get("kind") != "image":
            raise StateError(f"the saved state is a {refs.get('kind')}'s; this daemon serves an image")
        if refs.get("image") != self.image.digest:
            raise StateError(f"the saved state is for image sha256:{str(refs.get('image'))[:12]}; this daemon "
                             f"serves sha256:{self.image.digest[:12]} (its node IDs would name other files)")
        return 0

    def record_trace(self, window: float | None = None) -> None:
        """From now on, note every chunk the first time a read touches it, for
        ``window`` seconds from the first read (None: until the trace is full,
        :data:`~cubefs.format.trace.MAX_CHUNKS`).  A start-up trace must not grow
        with what a long-lived sandbox reads hours later; the set costs ~100 bytes
        a chunk, a few hundred KiB at most."""
        self.trace = []
        self._trace_window = window
        self._trace_until = None

    @property
    def recording(self) -> bool:
        """Whether new chunks are still being noted."""
        if self.trace is None or len(self.trace) >= MAX_CHUNKS:
            return False
        return self._trace_until is None or time.monotonic() < self._trace_until

    def _note(self, extents: list[tuple[int, int]]) -> None:
        assert self.trace is not None
        new = [idx for _off, idx in extents if idx not in self._traced]
        if not new:
            return
        now = time.monotonic()
        if self._trace_until is None and self._trace_window is not None:
            self._trace_until = now + self._trace_window  # the window opens at the first read
        elif not self.recording:
            return
        for idx in new:
            if idx not in self._traced and len(self.trace) < MAX_CHUNKS:
                self._traced.add(idx)
                self.trace.append(idx)
        self.trace_last = now

    def _record(self, ino: int) -> list:  # type: ignore[type-arg]
        if ino < 1 or ino > len(self.image):
            raise FsError(errno.ENOENT)
        return self.image.record(ino)

    def getattr(self, ino: int) -> Attr:
        r = self._record(ino)
        mode = r[F_MODE]
        size = r[F_SIZE]
        if stat.S_ISREG(mode):
            offs, idxs = self.image.extents(ino)
            data = sum(self.image.chunk(i)[1] for i in idxs) if len(offs) < 4096 else size
            blocks = (min(data, size) + 4095) // 4096 * 8
        else:
            blocks = (size + 511) // 512
        return Attr(
            ino, mode, r[F_NLINK], r[F_UID], r[F_GID], r[F_RDEV], size, blocks, r[F_ATIME], r[F_MTIME], r[F_CTIME]
        )

    def lookup_ino(self, parent: int, name: bytes) -> int:
        r = self._record(parent)
        if not stat.S_ISDIR(r[F_MODE]):
            raise FsError(errno.ENOTDIR)
        if name == b".":
            return parent
        ino = self.image.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        if self.dir_prefetch > 0:
            self._parent[ino] = parent
        return ino

    def opendir(self, ino: int) -> None:
        if not stat.S_ISDIR(self._record(ino)[F_MODE]):
            raise FsError(errno.ENOTDIR)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, int, int]]:
        """Entries from index ``start``: (name, ino, next offset), lazily: a transport
        stops when its reply buffer is full, so a listing stays linear in its size."""
        r = self._record(ino)
        if not stat.S_ISDIR(r[F_MODE]):
            raise FsError(errno.ENOTDIR)
        entries = r[F_PAYLOAD]
        if self.dir_prefetch > 0 and start == 0 and ino not in self._listed and ino not in self._dirs_done:
            # The kernel learns most entries from READDIRPLUS, without a LOOKUP each (Python
            # lists every package directory it imports from): their parent is known here or
            # never, and _dir_neighbours never fired for those files (pandas: 551 files opened).
            # Once a directory: a listing repeated (or _dir_neighbours' own) adds nothing.
            self._listed.add(ino)
            for e in entries:
                self._parent.setdefault(e[1], ino)
        return ((entries[i][0], entries[i][1], i + 1) for i in range(start, len(entries)))

    def readlink(self, ino: int) -> bytes:
        r = self._record(ino)
        if not stat.S_ISLNK(r[F_MODE]):
            raise FsError(errno.EINVAL)
        return r[F_PAYLOAD]

    def open(self, ino: int, flags: int) -> None:
        r = self._record(ino)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        if stat.S_ISDIR(r[F_MODE]):
            raise FsError(errno.EISDIR)

    def listxattr(self, ino: int) -> list[bytes]:
        return [k for k, _v in self._record(ino)[F_XATTRS]]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        for k, v in self._record(ino)[F_XATTRS]:
            if k == name:
                return v
        raise FsError(errno.ENODATA)

    def statfs(self) -> dict[str, int]:
        used = self.chunkmap.stored_bytes()
        return {
            "bsize": 4096,
            "blocks": (used + 4095) // 4096,
            "bfree": 0,
            "files": len(self.image),
            "ffree": 0,
            "namemax": 255,
        }

    def chunk_refs(self, indices: list[int]) -> list[ChunkLocation]:
        return [self._ref(i) for i in indices]

    def _ref(self, idx: int) -> ChunkLocation:
        return locate(self.image, self.chunkmap, idx)

    def _read_plan(self, ino: int, offset: int, size: int) -> tuple[int, list[tuple[int, int]], list[ChunkLocation]]:
        """(size clipped to EOF, overlapping extents, their chunk refs) of a read.  Not counted
        in ``bytes_read`` here: a read that misses memory is planned twice (``read_now``'s
        inline try, then ``read``), and counted twice it let hot packs past their share."""
        r = self._record(ino)
        if not stat.S_ISREG(r[F_MODE]):
            raise FsError(errno.EISDIR if stat.S_ISDIR(r[F_MODE]) else errno.EINVAL)
        fsize = r[F_SIZE]
        if offset >= fsize or size <= 0:
            return 0, [], []
        size = min(size, fsize - offset)
        extents = self.image.chunks_for_range(ino, offset, size)
        if self.trace is not None:
            self._note(extents)
        return size, extents, [self._ref(idx) for _off, idx in extents]

    def read_now(self, ino: int, offset: int, size: int) -> list[Buffer] | None:
        """The read answered without waiting (memory hits, holes, EOF), else None.
        Lets a transport reply inline instead of starting a task: most reads of
        a warm mount are this.  The answer is a list of buffers (views of cached
        chunks, zeros for holes) for the transport to write with one writev: a
        1 MiB read assembled into one new object cost 2 ms in page faults and
        copies here, more than everything else in a warm read."""
        size, extents, refs = self._read_plan(ino, offset, size)
        datas = self.source.from_memory(refs)
        if datas is None:
            return None  # counted by the read() that follows
        self.bytes_read += size
        if refs and self.readahead > 0:
            self._keep_ahead(ino, offset + size)
        return _assemble(offset, size, extents, datas)

    def _keep_ahead(self, ino: int, end: int) -> None:
        """Asynchronous read-ahead: when a reader served from memory gets within half
        a window of the end of what is loaded or loading, start the next window
        in the background, so a sequential reader never stops to wait for it."""
        offs, idxs = self.image.extents(ino)
        i = bisect_left(offs, end + self.readahead // 2)
        if i < len(idxs) and not self.source.has(self._ref(idxs[i]).digest):
            self.source.fetch_in_background(self._readahead(ino, end))

    async def read(self, ino: int, offset: int, size: int) -> list[Buffer]:
        """The read, as a list of buffers (see read_now)."""
        size, extents, refs = self._read_plan(ino, offset, size)
        self.bytes_read += size
        datas = self.source.from_memory(refs, hot=False)  # the common case: no read-ahead work at all
        try:
            if datas is None:
                ahead = self._readahead(ino, offset + size)
                # Chunks already on their way (a trace's prefetch) are on the node, and the source
                # would drop the speculation on their pack neighbours (ChunkSource._load); the
                # first look at them builds the chunk map's pack order (ChunkMap.by_pack): 5 ms of
                # the event loop for numpy's image alone, ~30 with the prefetch's threads beside it,
                # at a remount's first READ, which waited it.
                on_way = all(self.source.has(r.digest) for r in refs)
                neighbours = ([] if on_way else self._pack_neighbours(refs + ahead)) + self._dir_neighbours(ino)
                # Hot packs count the read's chunks the store or a peer is asked for (both speculate on packs).
                hot = partial(self._hot_pack, ino) if not on_way and self.hot_pack > 0 and self.pack_readahead > 0 \
                    else None
                if refs:
                    self._last_pack = self.chunkmap.pack_number(refs[-1].pack)
                with trio.fail_after(self.read_timeout):
                    datas = await self.source.get_many(refs, ahead, neighbours, on_miss=hot)
        except (ChunkUnavailable, trio.TooSlowError) as err:
            self.read_errors += 1
            what = str(err) or f"timed out after {self.read_timeout:.0f}s"
            log.error("image %s: read of inode %d [%d+%d] failed: %s", self.label, ino, offset, size, what)
            raise FsError(errno.EIO) from None
        return _assemble(offset, size, extents, datas)

    def lseek(self, ino: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE over the file's extents, so ``cp --sparse`` and
        backup tools skip the holes of a sparse file instead of reading zeros."""
        r = self._record(ino)
        fsize = r[F_SIZE]
        if offset < 0 or offset >= fsize:
            raise FsError(errno.ENXIO)
        offs, idxs = self.image.extents(ino) if stat.S_ISREG(r[F_MODE]) else ([], [])
        i = max(bisect_right(offs, offset) - 1, 0)
        if whence == os.SEEK_DATA:
            for j in range(i, len(offs)):
                end = offs[j] + self.image.chunk(idxs[j])[1]
                if end > offset:
                    return max(offs[j], offset)
            raise FsError(errno.ENXIO)
        if whence == os.SEEK_HOLE:
            pos = offset
            for j in range(i, len(offs)):
                if offs[j] > pos:
                    break
                pos = max(pos, offs[j] + self.image.chunk(idxs[j])[1])
            return min(pos, fsize)
        raise FsError(errno.EINVAL)

    def _pack_neighbours(self, refs: list[ChunkLocation]) -> list[ChunkLocation]:
        """Chunks that follow the last of ``refs`` in its pack, up to ``pack_readahead``
        stored bytes.  The builder packs a directory's files together, so these are
        the files read next (a package's other modules); fetched in ranges of
        their own, in parallel, they save the round trips that importing them one
        by one costs without delaying the read that asked."""
        if self.pack_readahead <= 0 or not refs:
            return []
        last = max(refs, key=lambda r: (r.pack, r.offset))
        offs, idxs = self.chunkmap.by_pack()[self.chunkmap.pack_number(last.pack)]
        return self._take(idxs[bisect_right(offs, last.offset) :], self.pack_readahead, stored=True)

    def _hot_pack(self, ino: int, missed: list[ChunkLocation]) -> None:
        """The rest of a pack, once ``hot_pack`` distinct files of it have missed (``missed``:
        a read's chunks sent to the store or a peer, ChunkSource.get_many's ``on_miss``; a
        disk-cache hit is no miss): fetched in the background in ranges of HOT_PIECE stored
        bytes, from the latest miss on (wrapping round), several at once.  Import order is not
        pack order: a first start of pandas (+10 ms) came back to one pack at six offsets in
        250 ms (4.37M, 3.1M, 0.87M, 4.24M, 1.69M, 4.13M), a round trip each, and its pack
        neighbours (the 512 KiB after a miss) caught none of them.  Bounded by HOT_SHARE: a
        pack is fetched only while the bytes asked of the store and peers
        (``ChunkSource.asked_bytes``: each chunk once, this read's own and queued ranges
        included), with the pack's rest, stay within that share of the plaintext read so far,
        so an image read a little (``import json``) is not fetched whole.  Files are counted,
        not chunks: counting chunks heated deb-numpy's packs on one shared object's page
        faults (41.8 MB fetched for 42.2 MB read, a slower start).  Measured with 2 files
        (coldstart.py --variants, alternated with --hot-pack 0, 5 rounds, +10 ms): pandas'
        chain 103-106 -> 44-50 at share 1.5 (first start / pull 0.50 vs 0.70, 5 of 5 rounds
        faster), 98-100 -> 50-58 at 1.3 (0.43 vs 0.59, 4 of 5); at 1.5 ``import json``
        heated a pack in 1 sample of 10 (19.8 MB fetched for 13.1 MB read, 1.51x: json reads
        1.28x without any), at 1.3 only when its reads were 17.6 MB (1.12x)."""
        allowed = HOT_SHARE * self.bytes_read
        asked = self.source.asked_bytes
        if asked >= allowed:
            return  # no pack could go hot now: none of the walks below
        last: dict[int, ChunkLocation] = {}  # each pack once a call, at its latest miss
        for ref in missed:
            last[self.chunkmap.pack_number(ref.pack)] = ref
        # files, not chunks: a shared object's page faults are one file read; and small files
        # only, like a directory's neighbours: a big file read in part (libc, libm, node's
        # binary) says nothing of the modules packed next to it
        small = self.image.record(ino)[F_SIZE] <= DIR_FILE_MAX
        for n, ref in last.items():
            if n in self._packs_done:
                continue
            seen = self._pack_misses.setdefault(n, set())
            if len(seen) < self.hot_pack and small:
                seen.add(ino)
            if len(seen) < self.hot_pack or allowed < self._pack_need.get(n, 0):
                continue
            offs, idxs = self.chunkmap.by_pack()[n]
            at = bisect_right(offs, ref.offset)
            rest = [r for r in (self._ref(i) for i in idxs[at:] + idxs[:at]) if not self.source.has(r.digest)]
            size = sum(r.stored_len for r in rest)
            if asked + size > allowed:
                self._pack_need[n] = asked + size
                continue  # not yet: a later miss may find the share grown
            self._packs_done.add(n)
            del self._pack_misses[n]
            self._pack_need.pop(n, None)
            if not rest:
                continue
            self.hot_packs += 1
            asked += size
            log.debug("image %s: pack %d is hot: fetching its other %d chunks (%.1f MB)", self.label, n,
                      len(rest), size / 1e6)
            piece: list[ChunkLocation] = []
            budget = HOT_PIECE
            for r in rest:
                piece.append(r)
                budget -= r.stored_len
                if budget <= 0:
                    self.source.fetch_in_background(piece)
                    piece, budget = [], HOT_PIECE
            self.source.fetch_in_background(piece)

    def _dir_neighbours(self, ino: int) -> list[ChunkLocation]:
        """The other files of ``ino``'s directory, once DIR_FILES of its files, and a
        tenth of them, have missed the cache: up to ``dir_prefetch`` stored bytes,
        small files first, each whole.  Python imports a package's modules one after
        another, each a round trip when lazy; misses in a package's ``__pycache__``
        say the rest follows.  The share keeps a big directory a start reads little
        of (the standard library's ``__pycache__``: ``import json`` reads ~20 of
        ~500) from being guessed: with two misses alone, ``import json`` fetched
        17.5 MB for 11.1 MB read (13.0 MB without the lever), over issue 18's
        1.5x bound."""
        parent = self._parent.get(ino)
        if self.dir_prefetch <= 0 or parent is None or parent in self._dirs_done:
            return []
        seen = self._dir_reads.setdefault(parent, set())
        seen.add(ino)
        if len(seen) < DIR_FILES:
            return []
        if parent not in self._dir_sizes:
            self._dir_sizes[parent] = sum(1 for _n, child, _x in self.readdir(parent, 0)
                                          if stat.S_ISREG(self.image.record(child)[F_MODE]))
        if len(seen) < DIR_FRACTION * self._dir_sizes[parent]:
            return []
        self._dirs_done.add(parent)
        del self._dir_reads[parent]
        files = []
        for _name, child, _next in self.readdir(parent, 0):
            if child in seen:
                continue
            r = self.image.record(child)
            if stat.S_ISREG(r[F_MODE]) and 0 < r[F_SIZE] <= DIR_FILE_MAX:
                files.append((r[F_SIZE], child))
        out: list[ChunkLocation] = []
        budget = self.dir_prefetch
        for _size, child in sorted(files):
            for idx in self.image.extents(child)[1]:
                ref = self._ref(idx)
                out.append(ref)
                budget -= ref.stored_len
            if budget <= 0:
                break
        if out:
            self.dir_prefetches += 1
        return out

    def _stream_plan(self) -> list[ChunkLocation]:
        """The image in pack order, from the pack of the latest read miss on (wrapping
        around), up to ``stream`` stored bytes: where a start is reading now is what it
        reads next; the rest is the full copy a node converges to."""
        packs = sorted(self.chunkmap.by_pack().items())
        first = next((i for i, (n, _p) in enumerate(packs) if n == self._last_pack), 0)
        out: list[ChunkLocation] = []
        budget = self.stream
        for _n, (_offs, idxs) in packs[first:] + packs[:first]:
            for idx in idxs:
                ref = self._ref(idx)
                if not self.source.has(ref.digest):
                    out.append(ref)
                    budget -= ref.stored_len
                if budget <= 0:
                    return out
        return out

    def _readahead(self, ino: int, end: int) -> list[ChunkLocation]:
        """The file's chunks after ``end``, up to ``readahead`` plaintext bytes."""
        if self.readahead <= 0:
            return []
        offs, idxs = self.image.extents(ino)
        return self._take(idxs[bisect_left(offs, end) :], self.readahead, stored=False)

    def _take(self, idxs: list[int], budget: int, stored: bool) -> list[ChunkLocation]:
        """Refs for chunk indices in order until ``budget`` bytes (stored or plain)."""
        out = []
        for idx in idxs:
            ref = self._ref(idx)
            out.append(ref)
            budget -= ref.stored_len if stored else ref.plain_len
            if budget <= 0:
                break
        return out


_ZEROS = memoryview(bytes(1 << 20))


def _assemble(offset: int, size: int, extents: list[tuple[int, int]], datas: list[bytes]) -> list[Buffer]:
    """The ``size`` bytes at ``offset``, as views of the chunks that overlap them
    and zeros for holes, in order."""
    parts: list[Buffer] = []
    pos = offset
    end = offset + size
    for (foff, _idx), data in zip(extents, datas):
        lo = max(foff, pos)
        hi = min(foff + len(data), end)
        if hi <= lo:
            continue
        if lo > pos:
            parts.append(_zeros(lo - pos))
        parts.append(memoryview(data)[lo - foff : hi - foff])
        pos = hi
    if pos < end:
        parts.append(_zeros(end - pos))
    return parts


def _zeros(n: int) -> Buffer:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
