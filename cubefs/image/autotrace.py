"""Publishing start-up traces without a manual step.

Every image mount records the chunks its start-up reads (``ImageFS.record_trace``,
a window from the first read).  When the recording has been quiet for
:data:`QUIET_SECONDS`, and again as the mount ends, the mount publishes what it
read that the image's trace does not name yet: it GETs the current trace,
merges (:func:`cubefs.format.trace.merge_traces`: the old order first, its own
new chunks after, bounded) and PUTs the result.  A mount whose reads the trace
already covers writes nothing, so once an image's start-up is known its later
starts cost the store no PUT.

**Concurrent publishers.**  Two nodes starting the same image may both read,
merge and write; S3 (and the ``file://`` store) make the last PUT win, so the
first writer's chunks could be lost.  The store interface has no conditional
PUT (not every S3-compatible server honours ``If-Match``), so the merge is made
to tolerate a lost update instead: after writing, the publisher waits a random
50-300 ms, reads the trace back and, if its chunks are missing, merges and
writes again (up to :data:`ATTEMPTS` times).  And whatever is still lost is
published again by the next start that reads it.  A trace is only ever a
prefetch order, so a lost update costs a later start some speed, never
correctness.

**Never trusted blindly.**  A stored trace that cannot be decoded, or is too
large, is logged and replaced by this mount's own recording (it would be
ignored by every reader anyway).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from cubefs.errors import CorruptDataError, CubefsError, FormatVersionError, ObjectNotFoundError
from cubefs.format.trace import decode_trace_doc, encode_trace, merge_traces, trace_key
from cubefs.image.fs import ImageFS
from cubefs.remote.base import Store
from cubefs.remote.loop import LoopThread

log = logging.getLogger(__name__)

# A start-up is the reads of the first minute: a sandbox's command has imported what it
# needs well before (import pandas: 2-3 s cold here); later reads are its work, not its start.
RECORD_SECONDS = 60.0
# Publish once no new chunk has been read for this long: Python's imports read new
# chunks every few ms while they run, so a second of quiet means the start is over.
QUIET_SECONDS = 1.0
ATTEMPTS = 5
MAX_FAILURES = 3
EXIT_TIMEOUT = 2.0  # the most an unmount waits for the last publish (a store that is down)


async def publish_trace(store: Store, image_digest: str, nchunks: int, mine: list[int],
                        stored_len: Callable[[int], int], label: str = "",
                        settle: tuple[float, float] = (0.05, 0.3)) -> dict[str, Any]:
    """Merge ``mine`` into the stored trace of ``image_digest`` (asyncio: the store's loop).

    Returns what happened: ``chunks`` in the stored trace, ``added`` by this call,
    ``written`` (PUTs made) and ``stored_bytes`` the trace prefetches."""
    key = trace_key(image_digest)
    written = 0
    merged: list[int] = []
    added = 0
    for _attempt in range(ATTEMPTS):
        current, starts = await _current(store, key, image_digest, nchunks, label)
        merged = merge_traces(current, mine, stored_len)
        have = set(current)
        added = sum(1 for c in merged if c not in have)
        if added == 0:
            break  # everything this mount read that fits is in the stored trace
        await store.put(key, encode_trace(image_digest, merged, starts + 1))
        written += 1
        await asyncio.sleep(random.uniform(*settle))
        check, _ = await _current(store, key, image_digest, nchunks, label)
        if set(merged) <= set(check):
            break
        log.info("image %s: another node wrote the trace at the same time; merging again", label)
    return {"chunks": len(merged), "added": added, "written": written,
            "stored_bytes": sum(stored_len(c) for c in merged)}


async def _current(store: Store, key: str, digest: str, nchunks: int, label: str) -> tuple[list[int], int]:
    try:
        blob = await store.get(key)
    except ObjectNotFoundError:
        return [], 0
    try:
        return decode_trace_doc(blob, digest, nchunks)
    except (CorruptDataError, FormatVersionError) as err:
        log.warning("image %s: the stored trace is unusable (%s); replacing it", label, err)
        return [], 0


class TracePublisher:
    """Publishes one mount's recording (see the module docstring)."""

    def __init__(self, image_fs: ImageFS, store: Store, loop: LoopThread, known: list[int], label: str,
                 quiet: float = QUIET_SECONDS) -> None:
        self.fs = image_fs
        self.store = store
        self.loop = loop
        self.label = label
        self.quiet = quiet
        self.covered = set(known)  # chunks the stored trace names, as far as this mount knows
        self.published = 0  # PUTs made
        self.failures = 0  # publishes that failed in a row (a read-only credential, a store that is down)
        self.last: dict[str, Any] = {}

    def _sizes(self) -> Callable[[int], int]:
        return lambda idx: self.fs.chunk_refs([idx])[0].stored_len

    def pending(self) -> list[int]:
        """This mount's recording, if it holds a chunk the stored trace lacks."""
        trace = self.fs.trace
        if trace is None or all(c in self.covered for c in trace):
            return []
        return list(trace)

    def _publishing(self, mine: list[int]) -> Any:
        image = self.fs.image
        return publish_trace(self.store, image.digest, image.nchunks, mine, self._sizes(), self.label)

    def _done(self, result: dict[str, Any], mine: list[int], t0: float) -> dict[str, Any]:
        self.covered.update(mine)
        self.published += result["written"]
        self.last = result
        self.fs.trace_published = {**result, "publishes": self.published}
        if result["written"]:
            log.info("image %s: published its start-up trace: %d chunks read, %d new, %d in the trace "
                     "(%d stored bytes), in %.3fs", self.label, len(mine), result["added"], result["chunks"],
                     result["stored_bytes"], time.monotonic() - t0)
        return result

    async def publish(self) -> dict[str, Any]:
        """Publish now (trio), whether or not the recording is quiet."""
        mine = self.pending() if self.fs.trace is not None else []
        t0 = time.monotonic()
        if not mine:
            size = self._sizes()
            return {"chunks": len(self.covered), "added": 0, "written": 0,
                    "stored_bytes": sum(size(c) for c in self.covered)}
        return self._done(await self.loop.trio_run(self._publishing(mine)), mine, t0)

    async def run(self) -> None:
        """Publish each time the recording goes quiet with something new; never fails the mount.
        After MAX_FAILURES failures in a row (a read-only credential) it stops trying."""
        while self.failures < MAX_FAILURES:
            await trio.sleep(self.quiet / 2)
            if not self.pending() or time.monotonic() - self.fs.trace_last < self.quiet:
                continue
            try:
                await self.publish()
                self.failures = 0
            except CubefsError as err:
                self.failures += 1
                last = self.failures >= MAX_FAILURES
                log.warning("image %s: publishing its trace failed (%s); %s", self.label, err,
                            "giving up for this mount" if last else "retrying later")
                await trio.sleep(10 * self.quiet * self.failures)

    def publish_at_exit(self) -> None:
        """The last publish, as the mount ends (blocking, bounded by EXIT_TIMEOUT)."""
        mine = self.pending()
        if not mine or self.failures >= MAX_FAILURES:
            return
        t0 = time.monotonic()
        try:
            result = self.loop.run(asyncio.wait_for(self._publishing(mine), EXIT_TIMEOUT))
        except (CubefsError, TimeoutError) as err:
            log.warning("image %s: publishing its trace at unmount failed: %s", self.label, str(err) or "timed out")
            return
        self._done(result, mine, t0)
