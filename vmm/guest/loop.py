"""The agent's one event loop: epoll for fds, a queue of calls for work that is
always ready (regular files cannot be polled), and timers.  Single-threaded, so the
agent can fork helpers and processes safely at any moment.

epoll is used directly, each fd's registered mask kept here: ``selectors`` built a key
and a mapping view per registration change and per event, and a command sets and
clears interest ~10 times (its two pipes, the host port's writes) -- Python steps
that cost guest CPU under TCG."""

from __future__ import annotations

import heapq
import itertools
import select
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable

Cb = Callable[[], None]


READ, WRITE = select.EPOLLIN, select.EPOLLOUT
READY_R = ~select.EPOLLOUT  # what wakes a reader: input, hang-up, error (as selectors reads epoll)
READY_W = ~select.EPOLLIN


class Loop:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.fds: dict[int, list[Cb | None]] = {}  # fd -> [on_readable, on_writable]
        self.masks: dict[int, int] = {}             # fd -> the events it is registered for
        self.soon: deque[Cb] = deque()
        self.timers: list[tuple[float, int, Cb]] = []
        self._seq = itertools.count()
        self.running = True

    def _apply(self, fd: int) -> None:
        r, w = self.fds.get(fd, (None, None))
        mask = (READ if r else 0) | (WRITE if w else 0)
        if not mask:
            self.forget(fd)
            return
        old = self.masks.get(fd, 0)
        if mask != old:  # an unchanged interest is no call at all
            self.masks[fd] = mask
            (self.ep.modify if old else self.ep.register)(fd, mask)

    def reader(self, fd: int, cb: Cb | None) -> None:
        self.fds.setdefault(fd, [None, None])[0] = cb
        self._apply(fd)

    def writer(self, fd: int, cb: Cb | None) -> None:
        self.fds.setdefault(fd, [None, None])[1] = cb
        self._apply(fd)

    def forget(self, fd: int) -> None:
        self.fds.pop(fd, None)
        if self.masks.pop(fd, 0):
            try:
                self.ep.unregister(fd)
            except OSError:  # closed already: the kernel dropped it (as selectors ignores)
                pass

    def call_soon(self, cb: Cb) -> None:
        self.soon.append(cb)

    def call_later(self, delay: float, cb: Cb) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), cb))

    @staticmethod
    def _run(cb: Cb) -> None:
        try:
            cb()
        except Exception:
            traceback.print_exc(file=sys.stderr)

    def run(self) -> None:
        while self.running:
            timeout: float | None = None
            if self.soon:
                timeout = 0
            elif self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for fd, events in self.ep.poll(-1 if timeout is None else timeout):
                cbs = self.fds.get(fd)
                if cbs is not None and events & READY_R and cbs[0]:
                    self._run(cbs[0])
                cbs = self.fds.get(fd)
                if cbs is not None and events & READY_W and cbs[1]:
                    self._run(cbs[1])
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                self._run(heapq.heappop(self.timers)[2])
            for _ in range(len(self.soon)):
                self._run(self.soon.popleft())
