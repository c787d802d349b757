"""The agent's one event loop: selectors for fds, a queue of calls for work that is
always ready (regular files cannot be polled), and timers.  Single-threaded, so the
agent can fork helpers and processes safely at any moment."""

from __future__ import annotations

import heapq
import itertools
import selectors
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable

Cb = Callable[[], None]


class Loop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.fds: dict[int, list[Cb | None]] = {}  # fd -> [on_readable, on_writable]
        self.soon: deque[Cb] = deque()
        self.timers: list[tuple[float, int, Cb]] = []
        self._seq = itertools.count()
        self.running = True

    def _apply(self, fd: int) -> None:
        r, w = self.fds.get(fd, (None, None))
        mask = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
        registered = fd in self.sel.get_map()
        if not mask:
            self.fds.pop(fd, None)
            if registered:
                self.sel.unregister(fd)
        elif registered:
            self.sel.modify(fd, mask)
        else:
            self.sel.register(fd, mask)

    def reader(self, fd: int, cb: Cb | None) -> None:
        self.fds.setdefault(fd, [None, None])[0] = cb
        self._apply(fd)

    def writer(self, fd: int, cb: Cb | None) -> None:
        self.fds.setdefault(fd, [None, None])[1] = cb
        self._apply(fd)

    def forget(self, fd: int) -> None:
        self.fds.pop(fd, None)
        if fd in self.sel.get_map():
            self.sel.unregister(fd)

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
            for key, mask in self.sel.select(timeout):
                r, w = self.fds.get(key.fd, (None, None))
                if mask & selectors.EVENT_READ and r:
                    self._run(r)
                r, w = self.fds.get(key.fd, (None, None))
                if mask & selectors.EVENT_WRITE and w:
                    self._run(w)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                self._run(heapq.heappop(self.timers)[2])
            for _ in range(len(self.soon)):
                self._run(self.soon.popleft())
