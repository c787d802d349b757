"""Object-store backends behind one interface; :func:`open_store` picks one by URL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from cubefs.errors import UsageError
from cubefs.remote.base import RetryingStore, RetryPolicy, Store, StoreStats

if TYPE_CHECKING:
    from cubefs.remote.loop import LoopThread

__all__ = ["RetryPolicy", "RetryingStore", "Store", "StoreStats", "default_store_url", "make_store", "store_session"]


def default_store_url() -> str:
    """The embedded default: a directory under the user's data dir (or $CUBEFS_STORE)."""
    env = os.environ.get("CUBEFS_STORE")
    if env:
        return env
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return "file://" + os.path.join(data, "cubefs", "store")


def make_store(url: str | None, s3_endpoint: str | None = None, policy: RetryPolicy | None = None) -> RetryingStore:
    """Build (not yet open) the store for ``url``; raises UsageError on a bad URL."""
    url = url or default_store_url()
    parsed = urlparse(url)
    backend: Store
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file:// store URL must be file:///absolute/path, got {url!r}")
        from cubefs.remote.local import LocalStore

        backend = LocalStore(parsed.path)
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise UsageError(f"s3:// store URL needs a bucket: s3://BUCKET/PREFIX, got {url!r}")
        from cubefs.remote.s3 import S3Store

        backend = S3Store(parsed.netloc, parsed.path, s3_endpoint)
    else:
        raise UsageError(f"unknown store URL {url!r}: use file:///abs/dir or s3://bucket/prefix")
    return RetryingStore(backend, policy)


@contextlib.contextmanager
def store_session(
    url: str | None, s3_endpoint: str | None = None, *, create: bool = False, policy: RetryPolicy | None = None
) -> Iterator[tuple[LoopThread, RetryingStore]]:
    """An opened store and the loop thread it runs on, both closed on exit.

    ``create`` makes a missing bucket or directory (writers); readers leave it off."""
    from cubefs.remote.loop import LoopThread

    loop = LoopThread()
    store = make_store(url, s3_endpoint, policy)
    try:
        loop.run(store.open(create=create))
        yield loop, store
    finally:
        try:
            loop.run(store.close())
        finally:
            loop.close()
