"""The node's disk cache: chunks in one LMDB environment shared by every mount.

Every ``cubefs mount`` (and ``cubefs serve``) on a node that uses the same
``--cache-dir`` opens the same environment; LMDB serializes writers across
processes and gives readers consistent snapshots without blocking them, so
a chunk one mount fetched is a disk hit for the next.  Entries hold a
chunk's *stored* bytes (as in its pack: usually zstd), 2-3x less disk and
I/O than plaintext, with an xxh64 of those bytes that is checked on every
read: a flipped bit is detected before decompression, the entry deleted and
the chunk fetched again.  Only chunks whose SHA-256 was verified are written.

The layout is specified in docs/format.md ("Local disk cache"); readers
refuse an environment whose version they do not know.

Eviction is S3-FIFO (Yang et al., SOSP 2023), chosen by measurement
(tools/bench/eviction.py, docs/benchmarks.md): on a start-up workload with
occasional one-off scans it keeps 25-29% more bytes hitting than LRU or
CLOCK in small caches, because a chunk read once never pushes out the shared
base layers.  New chunks enter a small FIFO (10% of the limit); those read
again before they reach its head move to the main FIFO, the others leave and
are remembered in a ghost list, and a chunk found in the ghost list comes
back straight into main.  Main re-queues a chunk whose hit count is above
zero (decrementing it) instead of evicting it.  Hits are counted in memory
and written with the next write transaction (or within 5 s): an exact LRU
would need a serialized cross-process write per hit.

Thread-safe: every method may run in any thread (LMDB read transactions are
per thread; the one write transaction at a time is LMDB's own lock).  Never
share an instance across ``fork``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

import lmdb
import xxhash

from cubefs.cache.tiers import TierStats
from cubefs.errors import FormatVersionError

log = logging.getLogger(__name__)

VERSION = 2  # of the environment's layout (1: CLOCK queues)
ENTRY_VERSION = 1  # of an entry's header
ENTRY = struct.Struct("<BBHIQ")  # version codec reserved plain_len xxh64(stored bytes); then the stored bytes
ENTRY_OVERHEAD = 64  # bytes of LMDB bookkeeping counted per entry against the limit
MAP_SIZE = 1 << 40  # address space reserved, not disk: the file grows with what is stored
LOW_WATER = 0.95  # eviction frees down to this share of the limit
TOUCH_FLUSH_SECONDS = 5.0
SMALL, MAIN = b"\0", b"\1"  # queue bytes
SMALL_SHARE = 0.1  # of the limit, for the probationary queue
MAX_HITS = 3
GHOST_UNIT = 64 * 1024  # the ghost list holds about as many digests as the cache holds chunks


@dataclass(slots=True)
class StoredChunk:
    """A chunk as its pack holds it: what the disk cache and peers exchange."""

    codec: int
    plain_len: int
    data: bytes


class DiskCache:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self.path = os.path.join(directory, "chunks.lmdb")
        self.max_bytes = max_bytes
        self.stats = TierStats()
        os.makedirs(self.path, exist_ok=True)
        try:
            self.env = self._open()
        except (lmdb.Error, _OldCache) as err:
            # A cache is disposable: a damaged or outdated one is set aside (for a
            # post-mortem) and a fresh one started, rather than failing every mount.
            aside = f"{self.path}.damaged-{int(time.time())}"
            log.error("disk cache %s is unusable (%s); moving it to %s and starting afresh", self.path, err, aside)
            os.rename(self.path, aside)
            os.makedirs(self.path)
            self.env = self._open()
        self._lock = threading.Lock()
        self._touched: Counter[bytes] = Counter()
        self._last_flush = time.monotonic()

    def _open(self) -> lmdb.Environment:
        env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=8, metasync=False)
        self._meta = env.open_db(b"meta")
        self._chunks = env.open_db(b"chunks")
        self._where = env.open_db(b"where")  # digest -> queue key (queue byte + BE seq) + stored size (u32)
        self._queues = env.open_db(b"queues")  # queue key -> digest + hit count (u8)
        self._ghost = env.open_db(b"ghost")  # digest -> BE seq
        self._ghost_order = env.open_db(b"ghost-order")  # BE seq -> digest
        with env.begin(write=True) as txn:
            raw = txn.get(b"version", db=self._meta)
            version = struct.unpack("<I", raw)[0] if raw else None
            if version is None:
                txn.put(b"version", struct.pack("<I", VERSION), db=self._meta)
            elif version > VERSION:
                env.close()
                raise FormatVersionError(
                    f"disk cache {self.path}: format version {version} is not supported "
                    f"(this cubefs reads version {VERSION}); clear it with 'cubefs cache clear'"
                )
            elif version < VERSION:
                env.close()
                raise _OldCache(f"format version {version}, from an older cubefs")
        return env

    def close(self) -> None:
        self.flush_touched()
        self.env.close()

    # -- reads ----------------------------------------------------------------

    def get_many(self, digests: list[bytes]) -> dict[bytes, StoredChunk]:
        """The entries present and intact; a damaged entry is deleted (a miss)."""
        found: dict[bytes, StoredChunk] = {}
        bad: list[bytes] = []
        with self.env.begin(db=self._chunks, buffers=True) as txn:
            for d in digests:
                value = txn.get(d)
                if value is None:
                    continue
                if len(value) < ENTRY.size:
                    bad.append(d)
                    continue
                version, codec, _r, plain_len, check = ENTRY.unpack_from(value)
                data = bytes(value[ENTRY.size :])
                if version != ENTRY_VERSION or xxhash.xxh64_intdigest(data) != check:
                    bad.append(d)
                    continue
                found[d] = StoredChunk(codec, plain_len, data)
        if bad:
            for d in bad:
                log.warning("disk cache %s: chunk %s is damaged; dropping it", self.path, d.hex()[:16])
            self.stats.errors += len(bad)
            self.delete(bad)
        with self._lock:
            self._touched.update(found.keys())
            flush = time.monotonic() - self._last_flush > TOUCH_FLUSH_SECONDS
        if flush:
            self.flush_touched()
        return found

    # -- writes ---------------------------------------------------------------

    def put_many(self, items: list[tuple[bytes, StoredChunk]]) -> int:
        """Store chunks not yet present, in one transaction; evict if over the limit.
        A full disk or any LMDB error makes the cache smaller, never a read fail:
        it is logged and counted, and nothing already stored is touched."""
        added = 0
        try:
            with self.env.begin(write=True) as txn:
                book = self._book(txn)
                for digest, chunk in items:
                    if txn.get(digest, db=self._where) is not None:  # 13 bytes, not the chunk
                        continue
                    header = ENTRY.pack(ENTRY_VERSION, chunk.codec, 0, chunk.plain_len,
                                        xxhash.xxh64_intdigest(chunk.data))
                    txn.put(digest, header + chunk.data, db=self._chunks)
                    seq = txn.get(digest, db=self._ghost)
                    if seq is not None:  # evicted from probation not long ago: it is wanted
                        txn.delete(digest, db=self._ghost)
                        txn.delete(seq, db=self._ghost_order)
                    self._enqueue(txn, book, MAIN if seq is not None else SMALL, digest, len(chunk.data), 0)
                    book.used += len(chunk.data) + ENTRY_OVERHEAD
                    added += 1
                self._apply_touched(txn)
                if book.used > self.max_bytes:
                    self._evict(txn, book, int(self.max_bytes * LOW_WATER))
                self._save(txn, book)
        except lmdb.Error as err:
            log.warning("disk cache %s: cannot store %d chunks: %s", self.path, len(items), err)
            self.stats.errors += 1
            return 0
        return added

    def delete(self, digests: list[bytes]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                book = self._book(txn)
                for d in digests:
                    self._remove(txn, book, d)
                self._save(txn, book)
        except lmdb.Error as err:
            log.warning("disk cache %s: cannot delete entries: %s", self.path, err)

    def flush_touched(self) -> None:
        """Write the hit counts of recent hits."""
        with self._lock:
            if not self._touched:
                return
        try:
            with self.env.begin(write=True) as txn:
                self._apply_touched(txn)
        except lmdb.Error as err:
            log.warning("disk cache %s: cannot record hits: %s", self.path, err)

    def trim(self, target_bytes: int) -> int:
        """Evict down to ``target_bytes``; returns the bytes freed."""
        with self.env.begin(write=True) as txn:
            book = self._book(txn)
            before = book.used
            self._apply_touched(txn)
            self._evict(txn, book, target_bytes)
            self._save(txn, book)
        return before - book.used

    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in (self._chunks, self._where, self._queues, self._ghost, self._ghost_order):
                txn.drop(db, delete=False)
            self._save(txn, _Book(0, 0, 0))
        with self._lock:
            self._touched.clear()

    # -- bookkeeping ----------------------------------------------------------

    def digests(self) -> list[bytes]:
        with self.env.begin(db=self._chunks) as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    @property
    def used_bytes(self) -> int:
        with self.env.begin() as txn:
            return self._book(txn).used

    def info(self) -> dict[str, int | str]:
        with self.env.begin() as txn:
            book = self._book(txn)
            entries = txn.stat(self._chunks)["entries"]
            ghosts = txn.stat(self._ghost)["entries"]
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        return {"path": self.path, "entries": entries, "used_bytes": book.used, "probation_bytes": book.small,
                "ghost_entries": ghosts, "limit_bytes": self.max_bytes, "file_bytes": file_bytes}

    def _book(self, txn: lmdb.Transaction) -> _Book:
        raw = txn.get(b"counters", db=self._meta)
        return _Book(*struct.unpack("<QQQ", raw)) if raw else _Book(0, 0, 0)

    def _save(self, txn: lmdb.Transaction, book: _Book) -> None:
        txn.put(b"counters", struct.pack("<QQQ", book.seq, max(book.used, 0), max(book.small, 0)), db=self._meta)

    def _enqueue(self, txn: lmdb.Transaction, book: _Book, queue: bytes, digest: bytes, size: int, hits: int) -> None:
        key = queue + book.seq.to_bytes(8, "big")
        book.seq += 1
        txn.put(key, digest + bytes([hits]), db=self._queues)
        txn.put(digest, key + size.to_bytes(4, "little"), db=self._where)
        if queue == SMALL:
            book.small += size + ENTRY_OVERHEAD

    def _apply_touched(self, txn: lmdb.Transaction) -> None:
        with self._lock:
            touched, self._touched = self._touched, Counter()
            self._last_flush = time.monotonic()
        for d, n in touched.items():
            where = txn.get(d, db=self._where)
            if where is not None:
                value = txn.get(where[:9], db=self._queues)
                if value is not None:
                    txn.put(where[:9], d + bytes([min(value[32] + n, MAX_HITS)]), db=self._queues)

    def _remove(self, txn: lmdb.Transaction, book: _Book, digest: bytes) -> None:
        where = txn.get(digest, db=self._where)
        if where is None:
            return
        size = int.from_bytes(where[9:13], "little") + ENTRY_OVERHEAD
        txn.delete(digest, db=self._chunks)
        txn.delete(digest, db=self._where)
        txn.delete(where[:9], db=self._queues)
        book.used -= size
        if where[:1] == SMALL:
            book.small -= size

    def _head(self, txn: lmdb.Transaction, queue: bytes) -> tuple[bytes, bytes, int] | None:
        """(key, digest, hits) of the oldest entry of ``queue``."""
        cursor = txn.cursor(db=self._queues)
        if not cursor.set_range(queue) or cursor.key()[:1] != queue:
            return None
        value = cursor.value()
        return bytes(cursor.key()), bytes(value[:32]), value[32]

    def _evict(self, txn: lmdb.Transaction, book: _Book, target: int) -> None:
        """S3-FIFO until ``used <= target`` (see the module docstring)."""
        small_limit = int(self.max_bytes * SMALL_SHARE)
        while book.used > target:
            small = self._head(txn, SMALL) if book.small > small_limit else None
            head = small or self._head(txn, MAIN) or self._head(txn, SMALL)
            if head is None:  # nothing left: the books are wrong, start them over
                book.used = book.small = 0
                return
            key, digest, hits = head
            where = txn.get(digest, db=self._where)
            size = int.from_bytes(where[9:13], "little") if where is not None else 0
            if key[:1] == SMALL and hits > 0:  # read again while on probation: promote
                txn.delete(key, db=self._queues)
                book.small -= size + ENTRY_OVERHEAD
                self._enqueue(txn, book, MAIN, digest, size, 0)
            elif key[:1] == MAIN and hits > 0:  # still in use: once more round
                txn.delete(key, db=self._queues)
                self._enqueue(txn, book, MAIN, digest, size, hits - 1)
            else:
                if where is not None:
                    self._remove(txn, book, digest)
                else:  # a queue entry without its record: drop it
                    txn.delete(key, db=self._queues)
                if key[:1] == SMALL:
                    self._remember(txn, book, digest)

    def _remember(self, txn: lmdb.Transaction, book: _Book, digest: bytes) -> None:
        """Put an evicted probationer on the ghost list, bounded to what main could hold."""
        seq = book.seq.to_bytes(8, "big")
        book.seq += 1
        txn.put(digest, seq, db=self._ghost)
        txn.put(seq, digest, db=self._ghost_order)
        if txn.stat(self._ghost)["entries"] > max(16, self.max_bytes // GHOST_UNIT):
            cursor = txn.cursor(db=self._ghost_order)
            if cursor.first():
                txn.delete(bytes(cursor.value()), db=self._ghost)
                cursor.delete()


@dataclass(slots=True)
class _Book:
    """The counters kept in ``meta``: next sequence number, bytes used, bytes on probation."""

    seq: int
    used: int
    small: int


class _OldCache(Exception):
    """A cache written by an older cubefs: set aside, not read."""
