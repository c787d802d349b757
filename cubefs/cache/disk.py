"""The node's disk cache: chunks in one LMDB environment shared by every mount.

Every ``cubefs mount`` (and ``cubefs serve``) on a node that uses the same
``--cache-dir`` opens the same environment; LMDB serializes writers across
processes and gives readers consistent snapshots without blocking them, so
a chunk one mount fetched is a disk hit for the next.  Entries hold a
chunk's *stored* bytes (as in its pack: usually zstd), 2-3x less disk and
I/O than plaintext, with an xxh64 of those bytes that is checked on every
read: a flipped bit is detected before decompression, the entry deleted and
the chunk fetched again.  The caller still verifies the SHA-256 of the
plaintext after decoding, as for any tier.

The layout is specified in docs/format.md ("Local disk cache"); readers
refuse an environment whose version they do not know.

Eviction is CLOCK (second chance) over insertion order: a hit sets the
entry's reference bit (batched: hits are remembered in memory and written
with the next write transaction, or every few seconds), and eviction walks
from the oldest entry, re-queueing referenced ones with the bit cleared and
deleting the rest until the cache is under 95% of its limit.  Why CLOCK and
not LRU: an exact LRU must write on every hit, and across processes every
write is a serialized LMDB transaction; see docs/benchmarks.md for the hit
ratios of LRU, FIFO and CLOCK on start-up traces.

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
from dataclasses import dataclass

import lmdb
import xxhash

from cubefs.cache.tiers import TierStats
from cubefs.errors import FormatVersionError

log = logging.getLogger(__name__)

VERSION = 1
ENTRY = struct.Struct("<BBHIQ")  # version codec reserved plain_len xxh64(stored bytes); then the stored bytes
ENTRY_OVERHEAD = 64  # bytes of LMDB bookkeeping counted per entry against the limit
MAP_SIZE = 1 << 40  # address space reserved, not disk: the file grows with what is stored
LOW_WATER = 0.95  # eviction frees down to this share of the limit
TOUCH_FLUSH_SECONDS = 5.0


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
            self.env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=4, metasync=False, readahead=False)
        except lmdb.Error as err:
            # A cache is disposable: a damaged one is set aside (for a post-mortem)
            # and a fresh one started, rather than failing every mount on the node.
            aside = f"{self.path}.damaged-{int(time.time())}"
            log.error("disk cache %s is unusable (%s); moving it to %s and starting afresh", self.path, err, aside)
            os.rename(self.path, aside)
            os.makedirs(self.path)
            self.env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=4, metasync=False, readahead=False)
        self._meta = self.env.open_db(b"meta")
        self._chunks = self.env.open_db(b"chunks")
        self._seqs = self.env.open_db(b"seqs")  # digest -> its key in clock + stored size (u32)
        self._clock = self.env.open_db(b"clock")  # seq (big-endian u64) -> digest + reference bit
        with self.env.begin(write=True) as txn:
            version = txn.get(b"version", db=self._meta)
            if version is None:
                txn.put(b"version", struct.pack("<I", VERSION), db=self._meta)
            elif struct.unpack("<I", version)[0] != VERSION:
                raise FormatVersionError(
                    f"disk cache {self.path}: format version {struct.unpack('<I', version)[0]} is not supported "
                    f"(this cubefs reads version {VERSION}); clear it with 'cubefs cache clear'"
                )
        self._lock = threading.Lock()
        self._touched: set[bytes] = set()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush_touched()
        self.env.close()

    # -- reads ----------------------------------------------------------------

    def contains(self, digest: bytes) -> bool:
        with self.env.begin(db=self._chunks, buffers=True) as txn:
            return txn.get(digest) is not None

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
                if version != VERSION or xxhash.xxh64_intdigest(data) != check:
                    bad.append(d)
                    continue
                found[d] = StoredChunk(codec, plain_len, data)
        if bad:
            for d in bad:
                log.warning("disk cache %s: chunk %s is damaged; dropping it", self.path, d.hex()[:16])
            self.stats.errors += len(bad)
            self.delete(bad)
        with self._lock:
            self._touched.update(found)
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
                seq, used = self._counters(txn)
                for digest, chunk in items:
                    if txn.get(digest, db=self._chunks) is not None:
                        continue
                    header = ENTRY.pack(VERSION, chunk.codec, 0, chunk.plain_len, xxhash.xxh64_intdigest(chunk.data))
                    txn.put(digest, header + chunk.data, db=self._chunks)
                    key = seq.to_bytes(8, "big")
                    txn.put(key, digest + b"\0", db=self._clock)
                    txn.put(digest, key + len(chunk.data).to_bytes(4, "little"), db=self._seqs)
                    seq += 1
                    used += len(chunk.data) + ENTRY_OVERHEAD
                    added += 1
                self._apply_touched(txn)
                if used > self.max_bytes:
                    used, seq = self._evict(txn, used, seq, int(self.max_bytes * LOW_WATER))
                self._set_counters(txn, seq, used)
        except lmdb.Error as err:
            log.warning("disk cache %s: cannot store %d chunks: %s", self.path, len(items), err)
            self.stats.errors += 1
            return 0
        return added

    def delete(self, digests: list[bytes]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                seq, used = self._counters(txn)
                for d in digests:
                    used -= self._remove(txn, d)
                self._set_counters(txn, seq, used)
        except lmdb.Error as err:
            log.warning("disk cache %s: cannot delete entries: %s", self.path, err)

    def flush_touched(self) -> None:
        """Write the reference bits of recent hits (CLOCK's "recently used")."""
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
            seq, used = self._counters(txn)
            self._apply_touched(txn)
            new_used, seq = self._evict(txn, used, seq, target_bytes)
            self._set_counters(txn, seq, new_used)
        return used - new_used

    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in (self._chunks, self._seqs, self._clock):
                txn.drop(db, delete=False)
            self._set_counters(txn, 0, 0)
        with self._lock:
            self._touched.clear()

    # -- bookkeeping ----------------------------------------------------------

    def digests(self) -> list[bytes]:
        with self.env.begin(db=self._chunks) as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    @property
    def used_bytes(self) -> int:
        with self.env.begin() as txn:
            return self._counters(txn)[1]

    def info(self) -> dict[str, int | str]:
        with self.env.begin() as txn:
            _seq, used = self._counters(txn)
            entries = txn.stat(self._chunks)["entries"]
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        return {"path": self.path, "entries": entries, "used_bytes": used, "limit_bytes": self.max_bytes,
                "file_bytes": file_bytes}

    def _counters(self, txn: lmdb.Transaction) -> tuple[int, int]:
        raw = txn.get(b"counters", db=self._meta)
        return struct.unpack("<QQ", raw) if raw else (0, 0)

    def _set_counters(self, txn: lmdb.Transaction, seq: int, used: int) -> None:
        txn.put(b"counters", struct.pack("<QQ", seq, max(used, 0)), db=self._meta)

    def _apply_touched(self, txn: lmdb.Transaction) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
            self._last_flush = time.monotonic()
        for d in touched:
            where = txn.get(d, db=self._seqs)
            if where is not None:
                txn.put(where[:8], d + b"\1", db=self._clock)

    def _remove(self, txn: lmdb.Transaction, digest: bytes) -> int:
        """Delete one entry; returns the bytes it counted for."""
        where = txn.get(digest, db=self._seqs)
        if where is None:
            return 0
        txn.delete(digest, db=self._chunks)
        txn.delete(digest, db=self._seqs)
        txn.delete(where[:8], db=self._clock)
        return int.from_bytes(where[8:12], "little") + ENTRY_OVERHEAD

    def _evict(self, txn: lmdb.Transaction, used: int, seq: int, target: int) -> tuple[int, int]:
        """CLOCK: from the oldest entry, referenced ones go to the back with the bit
        cleared, others are deleted, until ``used <= target``."""
        cursor = txn.cursor(db=self._clock)
        while used > target:
            if not cursor.key() and not cursor.first():  # past the end: wrap around; empty: done
                return (0 if txn.stat(self._clock)["entries"] == 0 else used), seq
            value = bytes(cursor.value())
            digest, referenced = value[:32], value[32:] == b"\1"
            cursor.delete()  # and move to the next entry
            where = txn.get(digest, db=self._seqs)
            if where is None:  # an orphan clock entry: nothing to account
                continue
            if referenced:
                key = seq.to_bytes(8, "big")
                seq += 1
                txn.put(key, digest + b"\0", db=self._clock)
                txn.put(digest, key + where[8:12], db=self._seqs)
            else:
                used -= int.from_bytes(where[8:12], "little") + ENTRY_OVERHEAD
                txn.delete(digest, db=self._chunks)
                txn.delete(digest, db=self._seqs)
        return used, seq
