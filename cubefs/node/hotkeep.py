"""When a mount keeps its image's start-up chunks in the node's hot file (cubefs.cache.hot).

Once the start-up is over (the trace's prefetch done, no new chunk read for AFTER s) a mount
writes the image's hot file if it does not already hold that start-up: the trace's chunks in
its order, then those this start read first that the trace lacks.  A first start (no trace
yet) writes one too, so the first remount after it has it.  A mount that ends before then
(a bench's, a short sandbox's) does it as it exits: at most one trace's worth of reads from
the disk cache and one sequential write (``import json``: 5 MB in 36 ms), after its trace is
published.  A remount whose hot file already holds its start-up writes nothing.

The file is only an optimisation ("never a dead mount", docs/design.md): every step here fails
soft (a warning naming the image; the mount goes on without the file), whatever the error: an
OSError, the disk cache's lmdb.Error, a bug's KeyError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from cubefs.cache.hot import SHARE, HotFile, keep_hot, touch
from cubefs.cache.source import ChunkUnavailable, decode_cached
from cubefs.format.packs import CODEC_DELTA

if TYPE_CHECKING:
    from cubefs.cache.disk import DiskCache
    from cubefs.cache.source import ChunkSource
    from cubefs.image.fs import ImageFS

log = logging.getLogger(__name__)

AFTER = 2.0  # seconds without a new chunk read (and the trace's prefetch done) before the file is kept


class HotKeeper:
    def __init__(self, cache_dir: str, fs: ImageFS, source: ChunkSource, disk: DiskCache, trace: list[int],
                 disk_limit: int) -> None:
        """For a mount that prefetches its ``trace`` (if it has one): a mount that does not
        never reads the file, and gets no keeper."""
        self.cache_dir, self.fs, self.source, self.disk = cache_dir, fs, source, disk
        self.trace = trace  # the trace the mount started with (its prefetch is waited for)
        self.limit = disk_limit // SHARE
        self.done = False
        # Of a list of chunk indices, those the kernel reads from local copies (FUSE passthrough:
        # Passthrough.copied_chunks): left out of the file, which a remount has the kernel read whole
        self.leave_out: Callable[[list[int]], set[int]] | None = None

    def _settled(self) -> bool:
        fs = self.fs
        read = fs.trace is None or (bool(fs.trace) and time.monotonic() - fs.trace_last >= AFTER)
        return read and (not self.trace or bool(self.source.prefetch_stats["done"]))

    async def run(self) -> None:
        try:
            while not self._settled():
                await trio.sleep(AFTER / 2)
            chunks = self._collect()
        except Exception as err:  # an optimisation: never the serve's end
            self._failed(err)
            return
        await trio.to_thread.run_sync(self.keep, *chunks)

    def at_exit(self) -> None:
        """As the mount ends (its event loop gone): what a first start fetched goes to the
        disk cache first, then the file is kept.  Never raises: the mount's own cleanup runs
        after it."""
        if not self.done:
            try:
                self.source.flush()
                chunks = self._collect()
            except Exception as err:
                self._failed(err)
                return
            self.keep(*chunks)

    def _collect(self) -> tuple[list[bytes], dict[bytes, bytes]]:
        """The start-up's digests, and the plaintext of those the memory tier still holds:
        taken on the thread that owns the tier (it is not thread-safe); the rest is read and
        decoded by :meth:`keep`, in a thread."""
        digests = self._digests()
        return digests, {d: data for d in digests if (data := self.source.memory.get(d)) is not None}

    def _failed(self, err: BaseException) -> None:
        self.done = True
        log.warning("image %s: keeping its start-up chunks in a hot file failed: %s: %s; it goes on "
                    "without one", self.fs.label, type(err).__name__, err)

    def _digests(self) -> list[bytes]:
        self.done = True
        seen = set(self.trace)
        order = self.trace + [i for i in (self.fs.trace or []) if i not in seen]
        if self.leave_out is not None:
            copied = self.leave_out(order)
            order = [i for i in order if i not in copied]
        return [self.fs.image.chunk(i)[0] for i in order]

    def keep(self, digests: list[bytes], held: dict[bytes, bytes]) -> None:
        if not digests:
            return
        disk = self.disk

        def plain_of(wanted: list[bytes]) -> dict[bytes, bytes]:
            out = {d: held[d] for d in wanted if d in held}
            for d, chunk in disk.get_many([d for d in wanted if d not in out]).items():
                if chunk.codec == CODEC_DELTA:  # its base would have to be read too: left out
                    continue
                try:
                    out[d] = decode_cached(d, chunk.plain_len, chunk)
                except ChunkUnavailable:
                    pass
            return out

        hot = self.source.hot
        own = None
        t0 = time.monotonic()
        try:
            if hot is None:  # the mount never opened it (no prefetch ran): compared all the same
                hot = own = HotFile.open(self.cache_dir, self.fs.image.digest)
            wrote = keep_hot(self.cache_dir, self.fs.image.digest, digests, plain_of, hot, self.limit)
        except Exception as err:  # an optimisation: never the mount's end
            self._failed(err)
            return
        finally:
            if own is not None:
                own.close()
        if wrote:
            log.info("image %s: kept %d start-up chunks in a hot file (%d bytes) in %.3fs", self.fs.label,
                     len(digests), wrote, time.monotonic() - t0)
        elif hot is not None:
            touch(hot.path)
