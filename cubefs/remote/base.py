"""The one small interface every object-store backend implements.

Everything above ``remote/`` (the builder, the chunk cache) talks to a store
only through :class:`Store`, so a backend is four operations on opaque keys:
whole and ranged GET, PUT, LIST and DELETE.  Backends are asyncio-native;
callers on trio reach them through :mod:`cubefs.remote.loop`.

Backends raise :class:`~cubefs.errors.ObjectNotFoundError` for a missing key,
:class:`~cubefs.errors.StoreUnavailableError` for anything a retry may fix and
:class:`~cubefs.errors.StoreError` for the rest; :class:`RetryingStore` adds
retries, backoff and timeouts on top of any backend.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cubefs.errors import CorruptDataError, StoreError, StoreUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StoreStats:
    """Counters a store keeps so that callers can report what crossed the wire."""

    gets: int = 0
    bytes_read: int = 0
    puts: int = 0
    bytes_written: int = 0
    retries: int = 0
    failures: int = 0
    get_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class Store(abc.ABC):
    """An object store holding immutable, content-addressed objects (plus manifests)."""

    url: str
    stats: StoreStats

    @abc.abstractmethod
    async def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return exactly ``length`` bytes from ``start``; a short object is an error."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` atomically: a reader sees the old object, the new one, or none."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool:
        from cubefs.errors import ObjectNotFoundError

        try:
            await self.get_range(key, 0, 0)
        except ObjectNotFoundError:
            return False
        return True

    async def open(self, create: bool = True) -> None:
        """Get ready; with ``create``, make the bucket or directory if missing.  Idempotent.

        Readers pass ``create=False``: a mount must not create buckets, and it
        saves a round trip before the first useful request."""

    async def close(self) -> None:
        """Release connections; the store may not be used afterwards."""

    def describe(self) -> dict[str, Any]:
        """Where requests go and what signs them (``cubefs stats``); empty for a local store."""
        return {}


@dataclass
class RetryPolicy:
    """Retries with exponential backoff and full jitter, under a per-attempt timeout.

    The worst case a caller waits is bounded: ``attempts * timeout`` plus the
    backoff sleeps (at most ``max_backoff`` each).  The mount's read path uses a
    short policy so that a dead store becomes ``EIO`` quickly, not a hang.
    """

    attempts: int = 5
    timeout: float = 30.0
    base_backoff: float = 0.1
    max_backoff: float = 2.0
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        return self.rng.uniform(0, min(self.max_backoff, self.base_backoff * 2**attempt))


class RetryingStore(Store):
    """Wraps a backend with retries and timeouts; counts every request."""

    def __init__(self, backend: Store, policy: RetryPolicy | None = None) -> None:
        self.backend = backend
        self.url = backend.url
        self.policy = policy or RetryPolicy()
        self.stats = StoreStats()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        last: Exception | None = None
        for attempt in range(self.policy.attempts):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.policy.backoff(attempt))
            try:
                return await asyncio.wait_for(fn(), self.policy.timeout)
            except (StoreUnavailableError, TimeoutError) as err:
                last = err
                log.debug("store %s: %s failed (attempt %d): %s", self.url, what, attempt + 1, err)
        self.stats.failures += 1
        reason = str(last) or type(last).__name__
        raise StoreUnavailableError(
            f"store {self.url}: {what} failed after {self.policy.attempts} attempts: {reason}"
        )

    async def get(self, key: str) -> bytes:
        t0 = time.monotonic()
        data = await self._call(f"GET {key}", lambda: self.backend.get(key))
        self.stats.gets += 1
        self.stats.bytes_read += len(data)
        self.stats.get_seconds += time.monotonic() - t0
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        t0 = time.monotonic()
        data = await self._call(
            f"GET {key} [{start}+{length}]", lambda: self.backend.get_range(key, start, length)
        )
        self.stats.gets += 1
        self.stats.bytes_read += len(data)
        self.stats.get_seconds += time.monotonic() - t0
        if len(data) != length:
            raise CorruptDataError(
                f"store {self.url}: object {key} is truncated: asked for {length} bytes "
                f"at offset {start}, got {len(data)}"
            )
        return data

    async def put(self, key: str, data: bytes) -> None:
        await self._call(f"PUT {key}", lambda: self.backend.put(key, data))
        self.stats.puts += 1
        self.stats.bytes_written += len(data)

    async def list(self, prefix: str) -> list[str]:
        return await self._call(f"LIST {prefix}", lambda: self.backend.list(prefix))

    async def delete(self, key: str) -> None:
        await self._call(f"DELETE {key}", lambda: self.backend.delete(key))

    async def exists(self, key: str) -> bool:
        return await self._call(f"HEAD {key}", lambda: self.backend.exists(key))

    async def open(self, create: bool = True) -> None:
        await self._call("connect", lambda: self.backend.open(create))

    async def close(self) -> None:
        await self.backend.close()

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()


def check_key(key: str) -> None:
    """Keys are made by cubefs itself; refuse anything that could escape a prefix."""
    if not key or key.startswith("/") or ".." in key.split("/") or "\0" in key:
        raise StoreError(f"invalid object key {key!r}")
