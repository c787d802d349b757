"""The memory and local-disk tiers of the chunk cache, and the counters they keep.

Both hold plaintext chunks keyed by SHA-256 digest.  The memory tier is an
LRU bounded in bytes.  The disk tier is one file per chunk under
``DIR/chunks/xx/<hex>``, written to a temporary name and renamed, so a crash
never leaves a partial entry under a real name; every read is re-hashed, so a
flipped bit on disk is detected, the entry dropped, and the chunk refetched.
Neither tier knows about files or inodes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cachetools import LRUCache

log = logging.getLogger(__name__)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0  # bytes served from this tier
    requests: int = 0  # requests sent (store tier: ranged GETs)
    errors: int = 0  # corrupt entries, failed requests
    seconds: float = 0.0  # time spent waiting on this tier

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class MemoryTier:
    def __init__(self, max_bytes: int) -> None:
        self._lru: LRUCache[bytes, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self.stats = TierStats()

    def get(self, digest: bytes) -> bytes | None:
        return self._lru.get(digest)

    def put(self, digest: bytes, data: bytes) -> None:
        if len(data) <= self._lru.maxsize:
            self._lru[digest] = data

    @property
    def used_bytes(self) -> int:
        return int(self._lru.currsize)


class DiskTier:
    """Thread-safe: reads and writes run in worker threads, never on the event loop."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.dir = os.path.join(directory, "chunks")
        self.max_bytes = max_bytes
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # digest -> size, LRU order
        self._used = 0
        os.makedirs(self.dir, exist_ok=True)
        # The index is rebuilt in the background: a mount must not wait for a scan of
        # a large cache.  Until it is done, every digest may be on disk (see contains).
        self._scanned = threading.Event()
        threading.Thread(target=self._scan, name="disk-cache-scan", daemon=True).start()

    def _path(self, digest: bytes) -> str:
        h = digest.hex()
        return os.path.join(self.dir, h[:2], h)

    def _scan(self) -> None:
        """Rebuild the LRU index from the directory, oldest access first."""
        found = []
        for sub in os.scandir(self.dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)
                    continue
                try:
                    st = entry.stat()
                    found.append((st.st_atime_ns, bytes.fromhex(entry.name), st.st_size))
                except (OSError, ValueError):
                    continue
        with self._lock:
            old = self._index
            self._index = OrderedDict()
            for _t, digest, size in sorted(found):
                if digest not in old:
                    self._index[digest] = size
                    self._used += size
            self._index.update(old)  # what this process touched meanwhile is the most recent
        self._scanned.set()

    def wait_scanned(self, timeout: float | None = None) -> bool:
        return self._scanned.wait(timeout)

    def contains(self, digest: bytes) -> bool:
        """False only when the chunk is certainly not on disk (saves a thread hop)."""
        if not self._scanned.is_set():
            return True
        with self._lock:
            return digest in self._index

    def get(self, digest: bytes) -> bytes | None:
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:  # gone, unreadable, replaced by a directory...: a miss
            if not isinstance(err, FileNotFoundError):
                log.warning("disk cache: cannot read chunk %s (%s): %s", digest.hex()[:16], path, err)
                self.stats.errors += 1
            with self._lock:
                self._drop(digest)
            return None
        if hashlib.sha256(data).digest() != digest:
            log.warning("disk cache: chunk %s is corrupt on disk (%s); dropping it", digest.hex()[:16], path)
            self.stats.errors += 1
            with self._lock:
                self._drop(digest)
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        path = self._path(digest)
        with self._lock:
            if digest in self._index:
                return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except OSError as err:  # a full disk makes the cache smaller, not the mount fail
            log.warning("disk cache: cannot store chunk %s: %s", digest.hex()[:16], err)
            self.stats.errors += 1
            return
        with self._lock:
            if digest in self._index:  # another thread stored it meanwhile: count it once
                return
            self._index[digest] = len(data)
            self._used += len(data)
            victims = []
            while self._used > self.max_bytes and self._index:
                victim, size = self._index.popitem(last=False)
                self._used -= size
                victims.append(victim)
        for victim in victims:
            try:
                os.unlink(self._path(victim))
            except OSError:
                pass

    def _drop(self, digest: bytes) -> None:
        size = self._index.pop(digest, None)
        if size is not None:
            self._used -= size

    @property
    def used_bytes(self) -> int:
        return self._used
