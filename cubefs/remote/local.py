"""``file:///abs/dir``: the embedded default store, objects as files in a directory.

Writes go to a temporary file in the same directory, are fsynced and renamed
into place, so a crash never leaves a half-written object under its real key.
File I/O runs in the loop's default thread pool so the event loop never blocks.

The store holds every byte of every image: its directories are made 0700 and
its objects 0600 whatever the umask, and a root an older version left open to
others is closed (0700) when its owner opens it (issue 12).  Share a store
between users through S3, not through a directory's mode bits.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import Callable
from typing import TypeVar

from cubefs.errors import ObjectNotFoundError, StoreError
from cubefs.remote.base import Store, StoreStats, check_key

T = TypeVar("T")


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise StoreError(f"file:// store needs an absolute path, got {root!r}")
        self.root = os.path.normpath(root)
        self.url = f"file://{self.root}"
        self.stats = StoreStats()

    def _path(self, key: str) -> str:
        check_key(key)
        return os.path.join(self.root, key)

    async def _run(self, fn: Callable[[], T], key: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except FileNotFoundError:
            raise ObjectNotFoundError(self.url, key) from None
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise StoreError(f"store {self.url}: no space left writing {key}") from None
            raise StoreError(f"store {self.url}: {key}: {err.strerror}") from None

    async def open(self, create: bool = True) -> None:
        def prepare() -> None:
            if create:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            try:
                st = os.stat(self.root)
            except FileNotFoundError:
                return
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(self.root, 0o700)

        await self._run(prepare, "")

    async def get(self, key: str) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return await self._run(read, key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, length, start) if length else b""
            finally:
                os.close(fd)

        return await self._run(read, key)

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def write() -> None:
            d = os.path.dirname(path)
            os.makedirs(d, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")  # 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise

        await self._run(write, key)

    async def list(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            out = []
            base = os.path.join(self.root, os.path.dirname(prefix))
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    key = os.path.relpath(os.path.join(dirpath, name), self.root)
                    if key.startswith(prefix):
                        out.append(key)
            return sorted(out)

        return await self._run(walk, prefix)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._run(lambda: os.unlink(path), key)

    async def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))
