"""The memory tier of the chunk cache, and the counters every tier keeps.

The memory tier holds verified plaintext chunks keyed by SHA-256 digest, in
an LRU bounded in bytes; it lives and dies with its mount.  The disk tier,
shared by the node's mounts, is :mod:`cubefs.cache.disk`.
"""

from __future__ import annotations

import logging
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


@dataclass
class DiskStats(TierStats):
    """The disk tier's counters, and what keeps it healthy (see cubefs.cache.disk)."""

    quarantined: int = 0  # damaged caches set aside (and a fresh one started) by this process
    not_cached: int = 0  # verified chunks not stored: the free-space reserve was reached or the disk was full


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
