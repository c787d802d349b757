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

import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import lmdb
import xxhash

from cubefs.cache import lmdbcheck
from cubefs.cache.files import clear_files, tree_bytes, trim_files
from cubefs.cache.hot import SHARE, clear_hot, hot_dir, trim_hot
from cubefs.cache.tiers import DiskStats
from cubefs.errors import CubefsError, FormatVersionError, UsageError

log = logging.getLogger(__name__)

VERSION = 2  # of the environment's layout (1: CLOCK queues)
ENTRY_VERSION = 1  # of an entry's header
ENTRY = struct.Struct("<BBHIQ")  # version codec reserved plain_len xxh64(stored bytes); then the stored bytes
ENTRY_OVERHEAD = 64  # bytes of LMDB bookkeeping counted per entry against the limit
MAX_STORED = 64 << 20  # no chunk is stored bigger (chunks are KiBs to a few MiB): more is a damaged tree
MAP_SIZE = 1 << 40  # address space reserved, not disk: the file grows with what is stored
LOW_WATER = 0.95  # eviction frees down to this share of the limit
TOUCH_FLUSH_SECONDS = 5.0
SMALL, MAIN = b"\0", b"\1"  # queue bytes
SMALL_SHARE = 0.1  # of the limit, for the probationary queue
MAX_HITS = 3
GHOST_UNIT = 64 * 1024  # the ghost list holds about as many digests as the cache holds chunks
DEFAULT_RESERVE = "5%"  # of the cache's filesystem left free (--cache-reserve)
RESERVE_ENV = "CUBEFS_CACHE_RESERVE"  # how --cache-reserve reaches a daemon the mount server forks
QUARANTINE_MARK = ".bad-"  # chunks.lmdb.bad-TIME-PID: a damaged cache set aside
OLD_MARK = ".damaged-"  # what older cubefs versions named them
QUARANTINE_LOG = "quarantine.log"  # one line per cache set aside: unix time, name, what was wrong
KEEP_QUARANTINED_SECONDS = 24 * 3600  # for a post-mortem; then removed at the next open
MAX_QUARANTINES = 5  # by one process: more means a failing disk, and the cache is switched off
_T = TypeVar("_T")


class CacheFullError(CubefsError):
    """The cache's filesystem is too full even to delete from it."""


def parse_reserve(text: str | float | int) -> float | int:
    """``5%`` (a share of the filesystem, as a float) or a size like ``2G`` (bytes)."""
    if isinstance(text, (int, float)):
        return text
    t = text.strip()
    try:
        if t.endswith("%"):
            share = float(t[:-1]) / 100
            if not 0 <= share < 1:
                raise ValueError(t)
            return share
        units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        unit = t[-1].upper() if t and t[-1].isalpha() else ""
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except (ValueError, KeyError):
        raise UsageError(f"cache reserve {text!r}: give a share like 5% or a size like 2G") from None


@dataclass(slots=True)
class StoredChunk:
    """A chunk as its pack holds it: what the disk cache and peers exchange."""

    codec: int
    plain_len: int
    data: bytes


class DiskCache:
    def __init__(self, directory: str, max_bytes: int, reserve: str | float | int | None = None) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "chunks.lmdb")
        self.max_bytes = max_bytes
        self.reserve = parse_reserve(os.environ.get(RESERVE_ENV) or DEFAULT_RESERVE if reserve is None else reserve)
        self.stats = DiskStats()
        self.disabled = False  # set after MAX_QUARANTINES: every call is then a miss
        self._lock = threading.Lock()
        self._heal_lock = threading.Lock()
        self._touched: Counter[bytes] = Counter()
        self._last_flush = time.monotonic()
        self._retired: list[_Env] = []  # damaged environments: never used again, closed with the cache
        self._reserve_reached = False
        _private_dir(directory)
        _remove_quarantined(directory, older_than=KEEP_QUARANTINED_SECONDS)
        with _DirLock(directory):
            try:
                self.env = self._start()
            except (lmdb.Error, _OldCache, _Unsafe) as err:
                # A cache is disposable: a damaged or outdated one is set aside (for a
                # post-mortem) and a fresh one started, rather than failing every mount.
                self._set_aside(str(err))
                self.env = self._start()

    def _start(self) -> _Env:
        """Open ``self.path``, checking that it is safe to map first (see lmdbcheck)."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        _private_files(self.path)
        data = os.path.join(self.path, "data.mdb")
        fd = os.open(data, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            found = lmdbcheck.problem(fd)
            if found is not None:
                raise _Unsafe(found)
            e = self._open(fd)
        except BaseException:
            os.close(fd)
            raise
        return e

    def _open(self, fd: int) -> _Env:
        env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=8, metasync=False, mode=0o700)
        st = os.fstat(fd)
        e = _Env(env, env.open_db(b"meta"), env.open_db(b"chunks"),
                 env.open_db(b"where"),  # digest -> queue key (queue byte + BE seq) + stored size (u32)
                 env.open_db(b"queues"),  # queue key -> digest + hit count (u8)
                 env.open_db(b"ghost"),  # digest -> BE seq
                 env.open_db(b"ghost-order"),  # BE seq -> digest
                 fd, (st.st_dev, st.st_ino))
        with env.begin(write=True) as txn:
            raw = txn.get(b"version", db=e.meta)
            version = struct.unpack("<I", raw)[0] if raw else None
            if version is None:
                txn.put(b"version", struct.pack("<I", VERSION), db=e.meta)
            elif version > VERSION:
                env.close()
                raise FormatVersionError(
                    f"disk cache {self.path}: format version {version} is not supported "
                    f"(this cubefs reads version {VERSION}); clear it with 'cubefs cache clear'"
                )
            elif version < VERSION:
                env.close()
                raise _OldCache(f"format version {version}, from an older cubefs")
        return e

    def close(self) -> None:
        self.flush_touched()
        for e in [*self._retired, self.env]:
            e.env.close()
            os.close(e.fd)
        self._retired.clear()

    # -- healing ----------------------------------------------------------------

    def _current(self) -> _Env | None:
        """The environment to use now, or None (disabled).  Checked on every call,
        because damage can arrive while the cache is open: another process may have
        set this one aside (then the one in its place is opened), or the file may
        have been truncated or its meta pages overwritten, and LMDB would then read
        past the end of the mapping (SIGBUS) rather than fail."""
        if self.disabled:
            return None
        e = self.env
        try:
            st = os.stat(os.path.join(self.path, "data.mdb"))
            moved = (st.st_dev, st.st_ino) != e.ident
        except OSError:
            moved = True
        if moved:
            self._heal(e, None)
        else:
            found = lmdbcheck.problem(e.fd)
            if found is None:
                return e
            self._heal(e, found)
        return None if self.disabled else self.env

    def _heal(self, e: _Env, problem: str | None) -> None:
        """``e`` is damaged (``problem``), or was replaced by another process (None):
        set it aside if it is still the one in place, and start on a fresh one."""
        with self._heal_lock:
            if self.env is not e or self.disabled:
                return  # another thread did it
            with _DirLock(self.directory):
                try:
                    st = os.stat(os.path.join(self.path, "data.mdb"))
                    in_place = (st.st_dev, st.st_ino) == e.ident
                except OSError:
                    in_place = False
                if problem is not None and in_place:
                    self._set_aside(problem)
                try:
                    fresh = self._start()
                except (lmdb.Error, _OldCache, _Unsafe, OSError, FormatVersionError) as err:
                    if problem is None and isinstance(err, (lmdb.Error, _OldCache, _Unsafe)):
                        try:  # what another process left in place is damaged too
                            self._set_aside(str(err))
                            fresh = self._start()
                        except (lmdb.Error, _OldCache, _Unsafe, OSError, FormatVersionError) as again:
                            self._disable(str(again))
                            return
                    else:
                        self._disable(str(err))
                        return
            self._retired.append(e)
            self.env = fresh
            if self.stats.quarantined >= MAX_QUARANTINES:
                self._disable(f"set aside {self.stats.quarantined} times by this process")

    def _set_aside(self, problem: str) -> None:
        """Move the cache in place to ``chunks.lmdb.bad-TIME`` (the caller holds the dir lock)."""
        aside = f"{self.path}{QUARANTINE_MARK}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        n = 0
        while os.path.exists(aside if not n else f"{aside}.{n}"):
            n += 1
        aside = aside if not n else f"{aside}.{n}"
        os.rename(self.path, aside)
        self.stats.quarantined += 1
        log.error("disk cache %s is damaged (%s); set aside as %s, a fresh one started; reads go to the "
                  "other tiers meanwhile", self.directory, problem, os.path.basename(aside))
        try:
            fd = os.open(os.path.join(self.directory, QUARANTINE_LOG),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{int(time.time())} {os.path.basename(aside)} {problem}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # a full disk: the log line above says it

    def _disable(self, why: str) -> None:
        self.disabled = True
        log.error("disk cache %s disabled for this process (%s); reads go to the other tiers", self.directory, why)

    def _guard(self, what: str, default: _T, work: Callable[[_Env], _T]) -> _T:
        """``work(env)``, or ``default`` if the cache is damaged (then healed) or disabled."""
        e = self._current()
        if e is None:
            return default
        try:
            return work(e)
        except _NoSpace:
            raise
        except lmdb.Error as err:
            if _is_no_space(err):
                raise _NoSpace(str(err)) from err
            if self.env is not e:
                return default  # a lookup in an environment another thread retired meanwhile
            self._heal(e, f"{what}: {type(err).__name__}: {err}")
        except (_Damaged, struct.error, IndexError, ValueError) as err:
            self._heal(e, f"{what}: {type(err).__name__}: {err}")
        return default

    # -- reads ----------------------------------------------------------------

    def present(self, digests: list[bytes]) -> list[bytes]:
        """Those of ``digests`` the cache has an entry for, in their order, without reading
        the entries' bytes (a lookup touches the tree's pages, not a chunk's): what
        ChunkSource needs to know before it loads them a few at a time."""

        def work(e: _Env) -> list[bytes]:
            with e.env.begin(db=e.chunks, buffers=True) as txn:
                return [d for d in digests if txn.get(d) is not None]

        return self._guard("read", [], work)

    def get_many(self, digests: list[bytes]) -> dict[bytes, StoredChunk]:
        """The entries present and intact; a damaged entry is deleted (a miss), a
        damaged cache set aside (all misses).  Never raises for what is on disk."""
        bad: list[bytes] = []

        def work(e: _Env) -> dict[bytes, StoredChunk]:
            found: dict[bytes, StoredChunk] = {}
            with e.env.begin(db=e.chunks, buffers=True) as txn:
                for d in digests:
                    value = txn.get(d)
                    if value is None:
                        continue
                    if len(value) > ENTRY.size + MAX_STORED:
                        # Reading it could run past the end of the file: the tree is damaged.
                        raise _Damaged(f"entry {d.hex()[:16]} claims {len(value)} bytes")
                    if len(value) < ENTRY.size:
                        bad.append(d)
                        continue
                    version, codec, _r, plain_len, check = ENTRY.unpack_from(value)
                    # Hashed in place first: the hash faults the entry's pages in from disk
                    # without the GIL (xxhash lets go of it), the copy then finds them resident.
                    # Copied first, every page fault of a cache the kernel dropped stalled the
                    # daemon's event loop, its LOOKUPs and READs from memory, under the GIL.
                    payload = value[ENTRY.size :]
                    if version != ENTRY_VERSION or xxhash.xxh64_intdigest(payload) != check:
                        bad.append(d)
                        continue
                    found[d] = StoredChunk(codec, plain_len, bytes(payload))
            return found

        found = self._guard("read", {}, work)
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
        Caching stops, serving never does: below the free-space reserve of the cache's
        filesystem, or on a full disk, the chunks are counted in ``not_cached`` and
        skipped; a damaged cache is set aside.  Nothing already stored is touched."""
        if not items:
            return 0
        room = self._room_above_reserve()
        if room is not None:
            # A batch can be a whole prefetched directory (tens of MiB): it is cached up to
            # the reserve, not refused whole because its last chunks would not fit.
            fits = 0
            for _d, c in items:
                room -= len(c.data) + ENTRY_OVERHEAD
                if room < 0:
                    break
                fits += 1
            self.stats.not_cached += len(items) - fits
            items = items[:fits]
            if not items:
                return 0

        def work(e: _Env) -> int:
            added = 0
            with e.env.begin(write=True) as txn:
                book = self._book(e, txn)
                for digest, chunk in items:
                    if txn.get(digest, db=e.where) is not None:  # 13 bytes, not the chunk
                        continue
                    header = ENTRY.pack(ENTRY_VERSION, chunk.codec, 0, chunk.plain_len,
                                        xxhash.xxh64_intdigest(chunk.data))
                    txn.put(digest, header + chunk.data, db=e.chunks)
                    seq = txn.get(digest, db=e.ghost)
                    if seq is not None:  # evicted from probation not long ago: it is wanted
                        txn.delete(digest, db=e.ghost)
                        txn.delete(seq, db=e.ghost_order)
                    self._enqueue(e, txn, book, MAIN if seq is not None else SMALL, digest, len(chunk.data), 0)
                    book.used += len(chunk.data) + ENTRY_OVERHEAD
                    added += 1
                self._apply_touched(e, txn)
                if book.used > self.max_bytes:
                    self._evict(e, txn, book, int(self.max_bytes * LOW_WATER))
                self._save(e, txn, book)
            return added

        try:
            return self._guard("write", 0, work)
        except _NoSpace as err:
            log.warning("disk cache %s: the disk is full; %d chunks not cached (%s)", self.path, len(items), err)
            self.stats.not_cached += len(items)
            return 0

    def _room_above_reserve(self) -> int | None:
        """The bytes the cache may still add before eating into the free space it leaves
        its filesystem (``None``: unknown, no limit).  Checked per batch (one statvfs,
        ~1 µs); said once in the log each time the reserve is reached, and quarantined
        copies are dropped then."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        keep = int(total * self.reserve) if isinstance(self.reserve, float) else self.reserve
        room = st.f_bavail * st.f_frsize - keep
        below = room <= 0
        if below and not self._reserve_reached:
            log.warning("disk cache %s: its filesystem is down to its reserve of %d bytes free; not caching "
                        "more until space comes back (reads are served as before)", self.directory, keep)
            _remove_quarantined(self.directory, older_than=0)
        elif not below and self._reserve_reached:
            log.info("disk cache %s: free space is above the reserve again; caching", self.directory)
        self._reserve_reached = below
        return max(room, 0)

    def delete(self, digests: list[bytes]) -> None:
        def work(e: _Env) -> None:
            with e.env.begin(write=True) as txn:
                book = self._book(e, txn)
                for d in digests:
                    self._remove(e, txn, book, d)
                self._save(e, txn, book)

        try:
            self._guard("delete", None, work)
        except _NoSpace as err:
            log.warning("disk cache %s: cannot delete entries: %s", self.path, err)

    def flush_touched(self) -> None:
        """Write the hit counts of recent hits."""
        with self._lock:
            if not self._touched:
                return

        def work(e: _Env) -> None:
            with e.env.begin(write=True) as txn:
                self._apply_touched(e, txn)

        try:
            self._guard("hit counts", None, work)
        except _NoSpace as err:
            log.warning("disk cache %s: cannot record hits: %s", self.path, err)

    def trim(self, target_bytes: int) -> int:
        """Evict down to ``target_bytes``; returns the bytes freed.  A damaged cache is
        set aside (all of it freed); on a full disk, where even deleting needs a page
        or two, quarantined copies go first and the trim is tried again, then
        :class:`CacheFullError`."""
        def work(e: _Env) -> int:
            with e.env.begin(write=True) as txn:
                book = self._book(e, txn)
                before = book.used
                self._apply_touched(e, txn)
                self._evict(e, txn, book, target_bytes)
                self._save(e, txn, book)
            return before - book.used

        before = self.used_bytes
        copies = trim_files(self.directory, target_bytes // 2)  # passthrough copies: cubefs.cache.files
        copies += trim_hot(self.directory, target_bytes // SHARE)  # images' start-up chunks: cubefs.cache.hot
        for attempt in (1, 2):
            try:
                e = self.env
                freed = self._guard("trim", -1, work)
                return copies + (before if freed < 0 or self.env is not e else freed)
            except _NoSpace as err:
                if attempt == 2 or not _remove_quarantined(self.directory, older_than=0):
                    raise CacheFullError(f"cannot trim the disk cache {self.path}: its filesystem is full "
                                         f"({err}); free some space, or 'cubefs cache clear' drops it all") from err
        return 0

    def clear(self) -> int:
        """Drop every entry, and every quarantined copy; returns the bytes freed."""
        def work(e: _Env) -> None:
            with e.env.begin(write=True) as txn:
                for db in (e.chunks, e.where, e.queues, e.ghost, e.ghost_order):
                    txn.drop(db, delete=False)
                self._save(e, txn, _Book(0, 0, 0))

        freed = self.used_bytes
        freed += _remove_quarantined(self.directory, older_than=0)
        freed += clear_files(self.directory)  # passthrough copies: cubefs.cache.files
        freed += clear_hot(self.directory)  # images' start-up chunks: cubefs.cache.hot
        try:
            self._guard("clear", None, work)
        except _NoSpace:
            # Even a drop needs a page: start afresh instead, as for damage.
            e = self.env
            self._heal(e, "the disk is full")
            freed += _remove_quarantined(self.directory, older_than=0)
        with self._lock:
            self._touched.clear()
        return freed

    # -- bookkeeping ----------------------------------------------------------

    def digests(self) -> list[bytes]:
        def work(e: _Env) -> list[bytes]:
            with e.env.begin(db=e.chunks) as txn:
                return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

        try:
            return self._guard("listing", [], work)
        except _NoSpace:
            return []

    @property
    def used_bytes(self) -> int:
        def work(e: _Env) -> int:
            with e.env.begin() as txn:
                return self._book(e, txn).used

        try:
            return self._guard("counters", 0, work)
        except _NoSpace:
            return 0

    def info(self) -> dict[str, int | str]:
        def work(e: _Env) -> tuple[_Book, int, int]:
            with e.env.begin() as txn:
                return self._book(e, txn), txn.stat(e.chunks)["entries"], txn.stat(e.ghost)["entries"]

        try:
            book, entries, ghosts = self._guard("counters", (_Book(0, 0, 0), 0, 0), work)
        except _NoSpace:
            book, entries, ghosts = _Book(0, 0, 0), 0, 0
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        return {"path": self.path, "entries": entries, "used_bytes": book.used, "probation_bytes": book.small,
                "ghost_entries": ghosts, "limit_bytes": self.max_bytes, "file_bytes": file_bytes,
                "quarantined": self.stats.quarantined, "quarantined_total": _quarantine_count(self.directory),
                "quarantined_bytes": _quarantined_bytes(self.directory),
                "hot_bytes": tree_bytes(hot_dir(self.directory)),  # images' start-up chunks: cubefs.cache.hot
                "reserve_bytes": self.reserve_bytes(), "free_bytes": _free_bytes(self.directory),
                "disabled": int(self.disabled)}

    def reserve_bytes(self) -> int:
        """The free space the cache leaves its filesystem, in bytes."""
        if not isinstance(self.reserve, float):
            return self.reserve
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 0
        return int(st.f_blocks * st.f_frsize * self.reserve)

    def _book(self, e: _Env, txn: lmdb.Transaction) -> _Book:
        raw = txn.get(b"counters", db=e.meta)
        return _Book(*struct.unpack("<QQQ", raw)) if raw else _Book(0, 0, 0)

    def _save(self, e: _Env, txn: lmdb.Transaction, book: _Book) -> None:
        txn.put(b"counters", struct.pack("<QQQ", book.seq, max(book.used, 0), max(book.small, 0)), db=e.meta)

    def _enqueue(self, e: _Env, txn: lmdb.Transaction, book: _Book, queue: bytes, digest: bytes, size: int,
                 hits: int) -> None:
        key = queue + book.seq.to_bytes(8, "big")
        book.seq += 1
        txn.put(key, digest + bytes([hits]), db=e.queues)
        txn.put(digest, key + size.to_bytes(4, "little"), db=e.where)
        if queue == SMALL:
            book.small += size + ENTRY_OVERHEAD

    def _apply_touched(self, e: _Env, txn: lmdb.Transaction) -> None:
        with self._lock:
            touched, self._touched = self._touched, Counter()
            self._last_flush = time.monotonic()
        for d, n in touched.items():
            where = txn.get(d, db=e.where)
            if where is not None:
                value = txn.get(where[:9], db=e.queues)
                if value is not None:
                    txn.put(where[:9], d + bytes([min(value[32] + n, MAX_HITS)]), db=e.queues)

    def _remove(self, e: _Env, txn: lmdb.Transaction, book: _Book, digest: bytes) -> None:
        where = txn.get(digest, db=e.where)
        if where is None:
            return
        size = int.from_bytes(where[9:13], "little") + ENTRY_OVERHEAD
        txn.delete(digest, db=e.chunks)
        txn.delete(digest, db=e.where)
        txn.delete(where[:9], db=e.queues)
        book.used -= size
        if where[:1] == SMALL:
            book.small -= size

    def _head(self, e: _Env, txn: lmdb.Transaction, queue: bytes) -> tuple[bytes, bytes, int] | None:
        """(key, digest, hits) of the oldest entry of ``queue``."""
        cursor = txn.cursor(db=e.queues)
        if not cursor.set_range(queue) or cursor.key()[:1] != queue:
            return None
        value = cursor.value()
        return bytes(cursor.key()), bytes(value[:32]), value[32]

    def _evict(self, e: _Env, txn: lmdb.Transaction, book: _Book, target: int) -> None:
        """S3-FIFO until ``used <= target`` (see the module docstring)."""
        small_limit = int(self.max_bytes * SMALL_SHARE)
        while book.used > target:
            small = self._head(e, txn, SMALL) if book.small > small_limit else None
            head = small or self._head(e, txn, MAIN) or self._head(e, txn, SMALL)
            if head is None:  # nothing left: the books are wrong, start them over
                book.used = book.small = 0
                return
            key, digest, hits = head
            where = txn.get(digest, db=e.where)
            size = int.from_bytes(where[9:13], "little") if where is not None else 0
            if key[:1] == SMALL and hits > 0:  # read again while on probation: promote
                txn.delete(key, db=e.queues)
                book.small -= size + ENTRY_OVERHEAD
                self._enqueue(e, txn, book, MAIN, digest, size, 0)
            elif key[:1] == MAIN and hits > 0:  # still in use: once more round
                txn.delete(key, db=e.queues)
                self._enqueue(e, txn, book, MAIN, digest, size, hits - 1)
            else:
                if where is not None:
                    self._remove(e, txn, book, digest)
                else:  # a queue entry without its record: drop it
                    txn.delete(key, db=e.queues)
                if key[:1] == SMALL:
                    self._remember(e, txn, book, digest)

    def _remember(self, e: _Env, txn: lmdb.Transaction, book: _Book, digest: bytes) -> None:
        """Put an evicted probationer on the ghost list, bounded to what main could hold."""
        seq = book.seq.to_bytes(8, "big")
        book.seq += 1
        txn.put(digest, seq, db=e.ghost)
        txn.put(seq, digest, db=e.ghost_order)
        if txn.stat(e.ghost)["entries"] > max(16, self.max_bytes // GHOST_UNIT):
            cursor = txn.cursor(db=e.ghost_order)
            if cursor.first():
                txn.delete(bytes(cursor.value()), db=e.ghost)
                cursor.delete()


@dataclass(slots=True)
class _Book:
    """The counters kept in ``meta``: next sequence number, bytes used, bytes on probation."""

    seq: int
    used: int
    small: int


class _OldCache(Exception):
    """A cache written by an older cubefs: set aside, not read."""


@dataclass(slots=True)
class _Env:
    """One open environment, its named databases, and the file it maps (a descriptor
    for the pre-read checks, and its identity to notice it was replaced)."""

    env: lmdb.Environment
    meta: lmdb._Database
    chunks: lmdb._Database
    where: lmdb._Database
    queues: lmdb._Database
    ghost: lmdb._Database
    ghost_order: lmdb._Database
    fd: int
    ident: tuple[int, int]


class _Unsafe(Exception):
    """The file would make LMDB read past its end (see lmdbcheck)."""


class _Damaged(Exception):
    """A record no intact cache can hold."""


class _NoSpace(Exception):
    """The cache's filesystem is full (or over quota): not damage."""


def _is_no_space(err: lmdb.Error) -> bool:
    """A full disk or quota (the C binding keeps only the message of an errno it has no class for)."""
    return (isinstance(err, lmdb.DiskError) or getattr(err, "code", 0) in (errno.ENOSPC, errno.EDQUOT)
            or str(err).endswith(os.strerror(errno.EDQUOT)))


class _DirLock:
    """An exclusive ``flock`` on the cache directory: one process at a time sets a
    cache aside and starts the next, so two never start two."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> _DirLock:
        self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def _private_dir(directory: str) -> None:
    """The cache directory, made 0700 if it is ours (an older cubefs made it 0755).
    A shared directory (sticky, like /tmp) or someone else's is left alone: the
    environment inside it is made private instead."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, stat.S_IMODE(st.st_mode) & 0o700)


def _private_files(path: str) -> None:
    """``chunks.lmdb`` 0700 and its files 0600, whatever an older cubefs left."""
    if stat.S_IMODE(os.stat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    for name in ("data.mdb", "lock.mdb"):
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(os.path.join(path, name), 0o600)


def _quarantined(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if n.startswith("chunks.lmdb" + QUARANTINE_MARK) or n.startswith("chunks.lmdb" + OLD_MARK)]


def _remove_quarantined(directory: str, older_than: float) -> int:
    """Remove the caches set aside more than ``older_than`` seconds ago; the bytes freed."""
    freed = 0
    now = time.time()
    for path in _quarantined(directory):
        try:
            if now - os.stat(path).st_mtime < older_than:
                continue
            freed += tree_bytes(path)
            shutil.rmtree(path)
        except OSError as err:
            log.warning("cannot remove the damaged cache %s: %s", path, err)
    return freed


def _quarantined_bytes(directory: str) -> int:
    return sum(tree_bytes(p) for p in _quarantined(directory))


def _quarantine_count(directory: str) -> int:
    try:
        with open(os.path.join(directory, QUARANTINE_LOG), "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
