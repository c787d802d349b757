"""The chunk pipeline of a build: cut, hash, dedup, compress, pack, upload.

The source thread walks the tree.  Small files go to worker threads in
batches of ~4 MiB, which read, cut (FastCDC), hash (SHA-256) and, for chunks
neither the store nor this build has yet, compress (zstd) and append them to
the open pack; large or sparse files are read and cut by the source thread
and their chunks handed over in batches the same way.  hashlib and zstandard release the GIL, so the workers use
both cores.  Full packs are uploaded on the store's loop thread while the
workers go on; a pack's index is written only after the pack itself, so an
index never names a pack that is not there.

With a ``delta`` source (the previous version of the image), a new chunk of a
file that version also has is stored as a delta against that file's chunk
when that is clearly smaller (cubefs/dedup/delta.py).

Invariants: ``known`` only grows, and maps a digest to a location that is
either already stored or in a pack that ``finish`` will upload before any
metadata referring to it.  ``_claimed`` makes sure each new chunk is
compressed and packed once even when two files share it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import zstandard
from pyfastcdc import FastCDC

from cubefs.dedup.delta import DeltaBases
from cubefs.dedup.tree import ChunkBatch
from cubefs.errors import BadInputError, CubefsError
from cubefs.format.packs import (
    CODEC_DELTA,
    CODEC_RAW,
    CODEC_ZSTD,
    PACK_HEADER,
    ChunkLocation,
    encode_index,
    index_key,
    pack_digest,
    pack_key,
)
from cubefs.remote.base import Store
from cubefs.remote.loop import LoopThread

# Chosen by measurement on Debian root filesystems: see docs/format.md, "Chunking".
CHUNK_AVG = 64 * 1024
CHUNK_MIN = 16 * 1024
CHUNK_MAX = 256 * 1024
PACK_TARGET = 8 * 1024 * 1024
ZSTD_LEVEL = 1
IN_FLIGHT_BYTES = 128 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024  # chunks handed to a worker at once (fewer hand-offs)
WHOLE_READ = 16 * 1024 * 1024  # files up to this size are read with one pread
MAX_UPLOADS = 4


def chunker_params() -> dict[str, object]:
    return {"algorithm": "fastcdc2020", "avg": CHUNK_AVG, "min": CHUNK_MIN, "max": CHUNK_MAX, "seed": 0}


@dataclass
class IngestStats:
    chunk_refs: int = 0
    new_chunks: int = 0
    new_stored_bytes: int = 0
    bytes_uploaded: int = 0


class _PackWriter:
    """Collects payloads by reference; one join at seal time (growing a bytearray
    would copy megabytes while holding the GIL)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = [PACK_HEADER]
        self.size = len(PACK_HEADER)
        self.entries: list[ChunkLocation] = []

    def add(self, digest: bytes, plain_len: int, codec: int, payload: bytes, base: ChunkLocation | None) -> None:
        self.entries.append(ChunkLocation(digest, "", self.size, len(payload), plain_len, codec, base))
        self.parts.append(payload)
        self.size += len(payload)


class Ingest:
    def __init__(
        self,
        store: Store,
        loop: LoopThread,
        known: dict[bytes, ChunkLocation],
        workers: int = 0,
        level: int = ZSTD_LEVEL,
        delta: DeltaBases | None = None,
    ) -> None:
        self.store = store
        self.loop = loop
        self.known = known
        self.level = level
        self.delta = delta
        self.stats = IngestStats()
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self._pack = _PackWriter()
        self._pool = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="chunk")
        self._budget = _ByteBudget(IN_FLIGHT_BYTES)
        self._uploads: list[Future[None]] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_UPLOADS)
        self._tls = threading.local()
        self._error: BaseException | None = None
        self._batch: list[tuple[bytes | Data, int, bytes]] = []
        self._batch_bytes = 0
        self._batch_future: Future[list[list[tuple[int, bytes, int]]]] = Future()

    # -- the source thread -------------------------------------------------
    def add_file(self, path: bytes, st_size: int, st_blocks: int, extents: list[ChunkBatch], name: bytes = b"") -> None:
        """Queue a regular file (``name``: its path in the image, for delta bases).  Small
        dense files are read, cut and hashed in a worker (syscalls are slow here, and
        the walk must not wait on them); large or sparse ones are streamed from this
        thread, data regions only."""
        if st_size == 0:
            return
        if st_size <= WHOLE_READ and st_blocks * 512 >= st_size:
            self._queue_small(path, st_size, extents, name)
            return
        try:
            fd = open_nofollow(path)
        except OSError as err:
            raise BadInputError(f"cannot read {os.fsdecode(path)}: {err.strerror}") from None
        try:
            for start, end in data_regions(fd, st_size):
                if end - start <= WHOLE_READ:
                    self.add_buffer(_pread_all(fd, end - start, start), start, extents, name)
                    continue
                pos = [start]

                def read(n: int, pos: list[int] = pos, end: int = end) -> bytes:
                    n = min(n, end - pos[0])
                    if n <= 0:
                        return b""
                    data = os.pread(fd, n, pos[0])
                    pos[0] += len(data)
                    return data

                self.add_stream(read, start, extents, name)
        finally:
            os.close(fd)

    def add_data(self, data: bytes, extents: list[ChunkBatch], name: bytes = b"") -> None:
        """Queue a small file already in memory (a tar member): cut and hashed in a worker,
        like a small file on disk, so the thread parsing the archive never cuts."""
        if data:
            self._queue_small(Data(data), len(data), extents, name)

    def _queue_small(self, source: bytes | Data, size: int, extents: list[ChunkBatch], name: bytes) -> None:
        # Small files travel in batches: one job per ~4 MiB, not one per file,
        # so the hand-off cost (futures, locks, GIL switches) is paid rarely.
        extents.append(_FileResult(self._batch_future, len(self._batch)))
        self._batch.append((source, size, name))
        self._batch_bytes += size
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= 256:
            self.flush_files()

    def flush_files(self) -> None:
        """Submit the pending batch of small files."""
        if not self._batch:
            return
        batch, nbytes, fut = self._batch, self._batch_bytes, self._batch_future
        self._batch, self._batch_bytes, self._batch_future = [], 0, Future()
        self._check_failed()
        self._budget.take(nbytes)
        job = self._pool.submit(self._files_job, batch)

        def done(f: Future[list[list[tuple[int, bytes, int]]]]) -> None:
            self._budget.give(nbytes)
            if f.cancelled():  # an aborted build
                fut.cancel()
                return
            err = f.exception()
            if err is not None:
                self._fail(err)
                fut.set_exception(err)
            else:
                fut.set_result(f.result())

        job.add_done_callback(done)

    def add_buffer(self, buf: bytes, base: int, extents: list[ChunkBatch], name: bytes = b"") -> None:
        """Cut an in-memory region (file offset ``base``) and queue its chunks."""
        self._submit_batched(self._cut(buf, base), extents, name)

    def add_stream(self, read: Callable[[int], bytes], base: int, extents: list[ChunkBatch], name: bytes = b"") -> int:
        """Cut a stream of unknown length (file offset ``base``); returns bytes read."""
        total = 0

        def chunks() -> Iterator[tuple[int, bytes]]:
            nonlocal total
            for c in self._chunker().cut_stream(_ReadOnly(read)):
                data = bytes(c.data)  # the view is only valid until the next chunk
                total += len(data)
                yield base + c.offset, data

        self._submit_batched(chunks(), extents, name)
        return total

    def _submit_batched(self, chunks: Iterable[tuple[int, bytes | memoryview]], extents: list[ChunkBatch],
                        name: bytes) -> None:
        """Queue chunks to the workers ~BATCH_BYTES at a time."""
        batch: list[tuple[int, bytes | memoryview]] = []
        size = 0
        for off, part in chunks:
            batch.append((off, part))
            size += len(part)
            if size >= BATCH_BYTES:
                self._submit(batch, size, extents, name)
                batch, size = [], 0
        if batch:
            self._submit(batch, size, extents, name)

    def _cut(self, buf: bytes, base: int) -> list[tuple[int, bytes | memoryview]]:
        if len(buf) <= CHUNK_MIN:  # FastCDC never cuts below the minimum: one chunk
            return [(base, buf)]
        view = memoryview(buf)
        return [(base + c.offset, view[c.offset : c.offset + c.length]) for c in self._chunker().cut_buf(view)]

    def _submit(self, batch: list[tuple[int, bytes | memoryview]], nbytes: int, extents: list[ChunkBatch],
                name: bytes) -> None:
        self._check_failed()
        self._budget.take(nbytes)
        fut = self._pool.submit(self._process, batch, [name] * len(batch))

        def done(f: Future[list[tuple[int, bytes, int]]]) -> None:
            self._budget.give(nbytes)
            if not f.cancelled() and f.exception() is not None:  # cancelled: an aborted build
                self._fail(f.exception())  # type: ignore[arg-type]

        fut.add_done_callback(done)
        extents.append(fut)

    def _fail(self, err: BaseException) -> None:
        """Remember the first failure; the source thread raises it at its next step."""
        if self._error is None:
            self._error = err

    def _check_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- worker threads ----------------------------------------------------
    def _chunker(self) -> FastCDC:
        """One FastCDC per thread: the object is documented as not safe to share."""
        cdc = getattr(self._tls, "cdc", None)
        if cdc is None:
            cdc = self._tls.cdc = FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
        return cdc

    def _compressor(self) -> zstandard.ZstdCompressor:
        z = getattr(self._tls, "z", None)
        if z is None:
            z = self._tls.z = zstandard.ZstdCompressor(level=self.level)
        return z

    def _files_job(self, files: list[tuple[bytes | Data, int, bytes]]) -> list[list[tuple[int, bytes, int]]]:
        """Read and cut a batch of small files, then hash, claim and pack all their
        chunks in one ``_process`` (two lock round trips per batch, not per file)."""
        parts: list[tuple[int, bytes | memoryview]] = []
        names: list[bytes] = []
        bounds = [0]
        for source, size, name in files:
            if isinstance(source, Data):
                data = source.data
            else:
                try:
                    fd = open_nofollow(source)
                    try:
                        data = _pread_all(fd, size, 0)
                    finally:
                        os.close(fd)
                except OSError as err:
                    raise BadInputError(f"cannot read {os.fsdecode(source)}: {err.strerror}") from None
            parts += self._cut(data, 0)
            names += [name] * (len(parts) - len(names))
            bounds.append(len(parts))
        done = self._process(parts, names)
        return [done[bounds[i] : bounds[i + 1]] for i in range(len(files))]

    def _process(self, batch: list[tuple[int, bytes | memoryview]], names: list[bytes]) -> list[tuple[int, bytes, int]]:
        """Hash a batch; under one lock claim the chunks nobody has; compress those
        outside the lock (as deltas where that pays); under one more lock append
        them to the open pack."""
        digests = [hashlib.sha256(part).digest() for _off, part in batch]
        with self._lock:
            self.stats.chunk_refs += len(batch)
            mine = []
            for i, d in enumerate(digests):
                if d not in self.known and d not in self._claimed:
                    self._claimed.add(d)
                    mine.append(i)
        z = self._compressor()
        payloads: list[tuple[bytes, int, ChunkLocation | None]] = []
        for i in mine:
            off, data = batch[i]
            payload = z.compress(data)
            alone = (payload, CODEC_ZSTD, None) if len(payload) < len(data) else (bytes(data), CODEC_RAW, None)
            delta = self.delta.encode(data, len(alone[0]), names[i], off) if self.delta and names[i] else None
            payloads.append(alone if delta is None else (delta[0], CODEC_DELTA, delta[1]))
        sealed = []
        if mine:
            with self._lock:
                for i, (payload, codec, base) in zip(mine, payloads, strict=True):
                    plain = len(batch[i][1])
                    self._pack.add(digests[i], plain, codec, payload, base)
                    self.stats.new_chunks += 1
                    self.stats.new_stored_bytes += len(payload)
                    if self._pack.size >= PACK_TARGET:
                        sealed.append(self._pack)
                        self._pack = _PackWriter()
        for pack in sealed:
            self._seal(pack)
        return [(off, d, len(part)) for (off, part), d in zip(batch, digests, strict=True)]

    def _seal(self, pack: _PackWriter) -> None:
        data = b"".join(pack.parts)
        name = pack_digest(data)
        locs = [replace(e, pack=name) for e in pack.entries]
        self._upload_slots.acquire()
        fut = self.loop.submit(self._upload(name, data, locs))

        def done(f: Future[None]) -> None:
            self._upload_slots.release()
            if not f.cancelled() and f.exception() is not None:
                self._fail(f.exception())  # type: ignore[arg-type]

        fut.add_done_callback(done)
        with self._lock:
            self._uploads.append(fut)
            for loc in locs:
                self.known[loc.digest] = loc

    async def _upload(self, name: str, data: bytes, locs: list[ChunkLocation]) -> None:
        await self.store.put(pack_key(name), data)
        index = encode_index(name, len(data), locs)
        await self.store.put(index_key(name), index)
        self.stats.bytes_uploaded += len(data) + len(index)

    # -- end of the build ----------------------------------------------------
    def finish(self) -> None:
        """Wait for every chunk job, upload the last pack, wait for every upload."""
        self.flush_files()
        self._pool.shutdown(wait=True)
        self._check_failed()
        if len(self._pack.entries):
            self._seal(self._pack)
            self._pack = _PackWriter()
        for fut in list(self._uploads):
            fut.result()
        self._check_failed()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        deadline = time.monotonic() + 30
        for fut in list(self._uploads):
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except (Exception, CubefsError):
                pass


class Data:
    """A small file's bytes, queued with the paths of small files on disk."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _FileResult:
    """One file's share of a batch job: ``result()`` is that file's chunk list."""

    __slots__ = ("_fut", "_i")

    def __init__(self, fut: Future[list[list[tuple[int, bytes, int]]]], i: int) -> None:
        self._fut = fut
        self._i = i

    def result(self) -> list[tuple[int, bytes, int]]:
        return self._fut.result()[self._i]


class _ReadOnly:
    """pyfastcdc's stream reader protocol over a plain ``read(n)`` function."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read


class _ByteBudget:
    """Bounds the bytes queued for workers, so a huge input never piles up in RAM."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cv = threading.Condition()

    def take(self, n: int) -> None:
        with self._cv:
            while self.used and self.used + n > self.limit:
                self._cv.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


NOATIME = getattr(os, "O_NOATIME", 0)


def open_nofollow(path: bytes, extra: int = 0) -> int:
    """Open for reading without following a symlink or touching the atime."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | extra
    try:
        return os.open(path, flags | NOATIME)
    except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
        return os.open(path, flags)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:  # short reads are legal; a shrinking file ends the loop
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    if size == 0:
        return []
    regions = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, min(end, size)))
            pos = end
    except OSError:
        return [(0, size)]
    return regions
