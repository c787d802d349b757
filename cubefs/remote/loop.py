"""The bridge between the store (asyncio) and its callers (threads and trio).

Invariants (see docs/design.md, "Concurrency"):

* Every store coroutine runs on exactly one asyncio event loop, owned by one
  daemon thread (:class:`LoopThread`).  The S3 client's connection pool is
  bound to that loop and is never touched elsewhere.
* Threads (the builder's workers) call :meth:`LoopThread.run` and block.
* Trio tasks (the FUSE daemon) call :meth:`LoopThread.trio_run`, which parks
  the *task*, not a thread: the asyncio future's done-callback hands the
  result back with ``TrioToken.run_sync_soon``.  A cancelled trio task
  cancels the asyncio future, so a timed-out FUSE read stops its GETs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "cubefs-asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block this (non-loop) thread for its result."""
        return self.submit(coro).result()

    async def trio_run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from trio without parking a worker thread."""
        import trio

        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut = self.submit(coro)

        def wake(_f: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
        return fut.result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()
