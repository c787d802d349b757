"""Worker threads shared fairly by many owners (the resolver's sandboxes).

A plain thread pool is one FIFO: a guest that queues 1,000 slow queries (names whose
authority never answers: 2 s each at the upstream) keeps every worker busy for minutes and
every other sandbox's DNS waits behind it.  Here each owner has its own queue, bounded
(``per_owner``: past it a job is refused, and the caller counts the drop), and at most
``running`` of its jobs run at once; the workers take owners in turn (round robin), so one
owner's backlog costs the others at most ``running`` workers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable


class FairQueue:
    def __init__(self, workers: int, per_owner: int, running: int, name: str = "worker") -> None:
        self.per_owner, self.running = per_owner, running
        self._jobs: dict[Hashable, deque[Callable[[], None]]] = {}
        self._busy: dict[Hashable, int] = {}
        self._turns: deque[Hashable] = deque()  # owners with a job that may run now
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._work, name=f"{name} {i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def pending(self, owner: Hashable) -> int:
        """Jobs of ``owner`` queued or running."""
        with self._cond:
            return len(self._jobs.get(owner, ())) + self._busy.get(owner, 0)

    def submit(self, owner: Hashable, job: Callable[[], None]) -> bool:
        """Queue ``job`` for ``owner``; False (not queued) past its bound or once closed."""
        with self._cond:
            if self._stop:
                return False
            jobs = self._jobs.setdefault(owner, deque())
            if len(jobs) + self._busy.get(owner, 0) >= self.per_owner:
                return False
            jobs.append(job)
            if len(jobs) == 1 and self._busy.get(owner, 0) < self.running:
                self._turns.append(owner)
                self._cond.notify()
            return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._jobs.clear()
            self._turns.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(5)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._turns and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                owner = self._turns.popleft()
                jobs = self._jobs[owner]
                job = jobs.popleft()
                self._busy[owner] = self._busy.get(owner, 0) + 1
                if jobs and self._busy[owner] < self.running:
                    self._turns.append(owner)  # its next job waits for the others' turns
            try:
                job()
            finally:
                with self._cond:
                    self._busy[owner] -= 1
                    jobs = self._jobs.get(owner)
                    if jobs and owner not in self._turns:
                        self._turns.append(owner)
                        self._cond.notify()
                    if not jobs and not self._busy[owner]:
                        self._jobs.pop(owner, None)
                        self._busy.pop(owner, None)
