"""The node's restore gate: at most ``limit`` sandbox restores at once, the rest served in order.

A create that finds no pooled sandbox, a create from a snapshot, a fork's child and a pool
fill each restore a VM: QEMU starts, loads the template's or snapshot's memory, and the
restored guest's agent answers its first requests.  Under TCG all of that is CPU work, so
50 at once on 2 cores ran each 25x slower than alone, and one restored guest's agent took
longer than its answer timeout (60 s, ``vmm.vm.RESTORE_AGENT_TIMEOUT``): that create failed
with 500.  With the gate they queue: each restore runs at near its solo speed, in arrival
order, and a burst's last create waits for the ones before it instead of slowing them all.

A pooled create never passes the gate (taking a pooled sandbox is a resume, not a
restore).  A pool fill waits behind every queued create (``low``): a fill made while
callers wait would only be taken by one of them a pause and a resume later.  A caller
that went away while queued (its client closed the connection: the SDK's request timeout,
60 s) is dropped when its turn comes, never restored for nobody; a closing service fails
every queued caller at once (503).

A create (a caller that can go away: ``gone``) whose turn would come only after ``max_wait``
seconds (60: the queue ahead of it times the median of the last restores, over the slots;
a rollback or a fork's child is never refused) is not queued at all: 503 with
``Retry-After`` at once, nothing made.  Queued, it would wait past the SDK's request timeout
(60 s) and be dropped anyway, after holding its booking the whole time; answered now, a
cluster front places it on another node (a node's 503 made nothing) and a caller without one
knows when to come back.  Until the gate has seen a restore it refuses nothing.

Everything runs on the service's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cubefs.errors import CubefsError

POLL = 0.5  # seconds between looks at whether a queued caller is still there
MAX_WAIT = 60.0  # seconds: a create expected to wait longer is refused at once (the SDK gives up at 60)
RESTORES_KEPT = 16  # recent restores' durations the expected wait is the median of


class AdmissionError(CubefsError):
    """A queued restore that will not run: its caller left, or the service is stopping (503)."""


class QueueFullError(AdmissionError):
    """A create not queued: its turn would come too late (503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def default_limit() -> int:
    """One restore per host CPU: a restore under TCG keeps one core busy (QEMU's vCPU thread
    loading and translating the restored guest), so more than the CPUs only share them
    (docs/design.md, "Restores queue": the measurement)."""
    return max(1, os.cpu_count() or 1)


@dataclass
class _Waiter:
    granted: asyncio.Future[None]
    gone: Callable[[], bool] | None
    since: float = field(default_factory=time.monotonic)


class RestoreGate:
    def __init__(self, limit: int | None = None, max_wait: float = MAX_WAIT) -> None:
        self.limit = default_limit() if limit is None else limit
        if self.limit < 1:
            raise ValueError("the restore limit must be 1 or more")
        self.max_wait = max_wait  # 0: never refuse
        self.refused = 0  # creates answered 503 at once: their turn would have come after max_wait
        self.held: deque[float] = deque(maxlen=RESTORES_KEPT)  # seconds each recent restore held its slot
        self.running = 0
        self.peak = 0  # the most restores ever running at once: what a test checks against the limit
        self.dropped = 0  # callers gone before their turn
        self.waits: list[float] = []  # seconds queued, the last 1000 admitted
        self._queue: deque[_Waiter] = deque()
        self._low: deque[_Waiter] = deque()
        self._closed = False

    @property
    def queued(self) -> int:
        return sum(not w.granted.done() for w in (*self._queue, *self._low))

    @property
    def oldest_wait(self) -> float:
        """How long the longest-queued caller has waited so far (0 with none queued)."""
        now = time.monotonic()
        return max((now - w.since for w in (*self._queue, *self._low) if not w.granted.done()), default=0.0)

    @contextlib.asynccontextmanager
    async def slot(self, gone: Callable[[], bool] | None = None, low: bool = False) -> AsyncIterator[None]:
        """Hold one of the ``limit`` restore slots for the body; wait in order for it first
        (``QueueFullError`` at once when that wait would pass ``max_wait``, for a caller that can
        go away, ``gone``: an API create; a rollback, a fork's child or a pool fill waits)."""
        await self._acquire(gone, low)
        t0 = time.monotonic()
        try:
            yield
            self.held.append(time.monotonic() - t0)
        finally:
            self._release()

    def expected_wait(self) -> float:
        """Seconds a create arriving now would wait for its slot: the creates queued ahead of it
        and itself, ``limit`` at a time, each the median of the recent restores (0 when a slot is
        free or no restore was seen yet)."""
        ahead = sum(not w.granted.done() for w in self._queue)
        if (self.running < self.limit and not ahead) or not self.held:
            return 0.0
        typical = sorted(self.held)[len(self.held) // 2]
        return math.ceil((ahead + 1) / self.limit) * typical

    async def _acquire(self, gone: Callable[[], bool] | None, low: bool) -> None:
        if self._closed:
            raise AdmissionError("the sandbox service is stopping")
        if gone is not None and not low and self.max_wait and (wait := self.expected_wait()) > self.max_wait:
            self.refused += 1
            raise QueueFullError(f"the node's restore queue is full: a sandbox asked now would start in ~{wait:.0f} s "
                                 f"(over {self.max_wait:.0f}); try again later or on another node",
                                 max(1, math.ceil(wait - self.max_wait)))
        ahead = self._queue if not low else (*self._queue, *self._low)
        if self.running < self.limit and not any(not w.granted.done() for w in ahead):
            self._take(0.0)
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), gone)
        (self._low if low else self._queue).append(waiter)
        try:
            while True:
                done, _ = await asyncio.wait({waiter.granted}, timeout=POLL)
                if done:
                    waiter.granted.result()  # AdmissionError if dropped or closed
                    return
                if gone is not None and gone():
                    self._drop(waiter)
                    waiter.granted.result()
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                self._release()  # granted as the caller was cancelled: the slot goes to the next
            else:
                waiter.granted.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                (self._low if low else self._queue).remove(waiter)

    def _take(self, waited: float) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.waits.append(waited)
        del self.waits[:-1000]

    def _drop(self, waiter: _Waiter) -> None:
        if not waiter.granted.done():
            self.dropped += 1
            waiter.granted.set_exception(AdmissionError("the caller went away while its restore was queued"))

    def _release(self) -> None:
        self.running -= 1
        while self.running < self.limit and not self._closed:
            waiter = self._next()
            if waiter is None:
                return
            if waiter.gone is not None and waiter.gone():
                self._drop(waiter)
                continue
            self._take(time.monotonic() - waiter.since)
            waiter.granted.set_result(None)

    def _next(self) -> _Waiter | None:
        for queue in (self._queue, self._low):
            while queue:
                waiter = queue.popleft()
                if not waiter.granted.done():
                    return waiter
        return None

    def close(self) -> None:
        """Fail every queued caller now, and every later one (the service is stopping)."""
        self._closed = True
        for waiter in (*self._queue, *self._low):
            if not waiter.granted.done():
                waiter.granted.set_exception(AdmissionError("the sandbox service is stopping"))

    def metrics(self) -> list[str]:
        lines = ["# TYPE cubefs_sandbox_restores_running gauge", f"cubefs_sandbox_restores_running {self.running}",
                 "# TYPE cubefs_sandbox_restores_running_peak gauge",
                 f"cubefs_sandbox_restores_running_peak {self.peak}",
                 "# TYPE cubefs_sandbox_restores_limit gauge", f"cubefs_sandbox_restores_limit {self.limit}",
                 "# TYPE cubefs_sandbox_restore_queue gauge", f"cubefs_sandbox_restore_queue {self.queued}",
                 "# TYPE cubefs_sandbox_restore_queue_oldest_seconds gauge",
                 f"cubefs_sandbox_restore_queue_oldest_seconds {self.oldest_wait:.3f}",
                 "# TYPE cubefs_sandbox_restore_queue_dropped_total counter",
                 f"cubefs_sandbox_restore_queue_dropped_total {self.dropped}",
                 "# TYPE cubefs_sandbox_restore_queue_refused_total counter",
                 f"cubefs_sandbox_restore_queue_refused_total {self.refused}",
                 "# TYPE cubefs_sandbox_restore_expected_wait_seconds gauge",
                 f"cubefs_sandbox_restore_expected_wait_seconds {self.expected_wait():.3f}"]
        if self.waits:
            xs = sorted(self.waits)
            lines.append("# TYPE cubefs_sandbox_restore_queue_seconds summary")
            for q in (0.5, 0.95, 0.99, 1.0):
                lines.append(f'cubefs_sandbox_restore_queue_seconds{{quantile="{q}"}} '
                             f"{xs[min(len(xs) - 1, int(q * len(xs)))]:.4f}")
        return lines
