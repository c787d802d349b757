"""The chunk pipeline of a build: cut, hash, dedup, compress, pack, upload.

The source thread reads file data and cuts it (FastCDC, ~5 GB/s); each chunk
becomes a job for a worker thread, which hashes it (SHA-256) and, if neither
the store nor this build has it yet, compresses it (zstd) and appends it to
the open pack.  hashlib and zstandard release the GIL, so the workers use
both cores.  Full packs are uploaded on the store's loop thread while the
workers go on; a pack's index is written only after the pack itself, so an
index never names a pack that is not there.

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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard
from pyfastcdc import FastCDC

from cubefs.dedup.tree import PendingChunk
from cubefs.errors import CubefsError
from cubefs.format.packs import (
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
ZSTD_LEVEL = 3
IN_FLIGHT_BYTES = 128 * 1024 * 1024
MAX_UPLOADS = 4


def chunker_params() -> dict[str, object]:
    return {"algorithm": "fastcdc2020", "avg": CHUNK_AVG, "min": CHUNK_MIN, "max": CHUNK_MAX, "seed": 0}


@dataclass
class IngestStats:
    files: int = 0
    logical_bytes: int = 0
    chunk_refs: int = 0
    new_chunks: int = 0
    new_plain_bytes: int = 0
    new_stored_bytes: int = 0
    reused_chunks: int = 0
    packs_uploaded: int = 0
    bytes_uploaded: int = 0


class _PackWriter:
    def __init__(self) -> None:
        self.buf = bytearray(PACK_HEADER)
        self.entries: list[tuple[bytes, int, int, int, int]] = []

    def add(self, digest: bytes, plain_len: int, codec: int, payload: bytes) -> tuple[int, int]:
        off = len(self.buf)
        self.buf += payload
        self.entries.append((digest, off, len(payload), plain_len, codec))
        return off, len(payload)


class Ingest:
    def __init__(self, store: Store, loop: LoopThread, known: dict[bytes, ChunkLocation], workers: int = 0) -> None:
        self.store = store
        self.loop = loop
        self.known = known
        self.stats = IngestStats()
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self._pack = _PackWriter()
        self._pool = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="chunk")
        self._inflight = threading.BoundedSemaphore(IN_FLIGHT_BYTES // CHUNK_MAX)
        self._uploads: list[Future[None]] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_UPLOADS)
        self._tls = threading.local()
        self._error: BaseException | None = None
        self._cdc = FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
        self.progress: Callable[[], None] | None = None

    # -- the source thread -------------------------------------------------
    def add_stream(self, read: Callable[[int], bytes], base: int, extents: list[tuple[int, PendingChunk]]) -> int:
        """Cut a stream into chunks starting at file offset ``base``; returns bytes read."""
        total = count = 0

        class _Reader:
            def read(self, n: int) -> bytes:
                return read(n)

        for c in self._cdc.cut_stream(_Reader()):
            self._check_failed()
            data = bytes(c.data)
            self._inflight.acquire()
            fut = self._pool.submit(self._process, data)
            fut.add_done_callback(lambda _f: self._inflight.release())
            extents.append((base + c.offset, fut))
            total += len(data)
            count += 1
        self.stats.chunk_refs += count
        return total

    def add_fd(self, fd: int, size: int, extents: list[tuple[int, PendingChunk]]) -> None:
        """Chunk a regular file's data regions (holes of sparse files are skipped)."""
        for start, end in data_regions(fd, size):
            pos = [start]

            def read(n: int, pos: list[int] = pos, end: int = end) -> bytes:
                n = min(n, end - pos[0])
                if n <= 0:
                    return b""
                data = os.pread(fd, n, pos[0])
                pos[0] += len(data)
                return data

            self.add_stream(read, start, extents)

    def _check_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- worker threads ----------------------------------------------------
    def _compressor(self) -> zstandard.ZstdCompressor:
        z = getattr(self._tls, "z", None)
        if z is None:
            z = self._tls.z = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return z

    def _process(self, data: bytes) -> tuple[bytes, int]:
        digest = hashlib.sha256(data).digest()
        with self._lock:
            if digest in self.known or digest in self._claimed:
                self.stats.reused_chunks += digest in self.known
                return digest, len(data)
            self._claimed.add(digest)
        payload = self._compressor().compress(data)
        codec = CODEC_ZSTD
        if len(payload) >= len(data):
            payload, codec = data, CODEC_RAW
        sealed = None
        with self._lock:
            _off, slen = self._pack.add(digest, len(data), codec, payload)
            self.stats.new_chunks += 1
            self.stats.new_plain_bytes += len(data)
            self.stats.new_stored_bytes += slen
            if len(self._pack.buf) >= PACK_TARGET:
                sealed, self._pack = self._pack, _PackWriter()
        if sealed is not None:
            self._seal(sealed)
        return digest, len(data)

    def _seal(self, pack: _PackWriter) -> None:
        data = bytes(pack.buf)
        name = pack_digest(data)
        locs = [ChunkLocation(d, name, o, s, p, c) for d, o, s, p, c in pack.entries]
        self._upload_slots.acquire()
        fut = self.loop.submit(self._upload(name, data, locs))

        def done(f: Future[None]) -> None:
            self._upload_slots.release()
            if f.exception() is not None and self._error is None:
                self._error = f.exception()

        fut.add_done_callback(done)
        with self._lock:
            self._uploads.append(fut)
            for loc in locs:
                self.known[loc.digest] = loc

    async def _upload(self, name: str, data: bytes, locs: list[ChunkLocation]) -> None:
        await self.store.put(pack_key(name), data)
        index = encode_index(name, len(data), locs)
        await self.store.put(index_key(name), index)
        self.stats.packs_uploaded += 1
        self.stats.bytes_uploaded += len(data) + len(index)

    # -- end of the build ----------------------------------------------------
    def finish(self) -> None:
        """Wait for every chunk job, upload the last pack, wait for every upload."""
        self._pool.shutdown(wait=True)
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
