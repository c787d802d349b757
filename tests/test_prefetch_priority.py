"""A read never waits behind speculation: a chunk it needs that sits in a background range
still queued for a place is fetched at once, as a read (ChunkSource._promote)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import trio
import zstandard
from conftest import write_pack

from cubefs.cache.disk import DiskCache
from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import MemoryTier
from cubefs.format.packs import CODEC_DELTA, delta_dictionary
from cubefs.remote import make_store
from cubefs.remote.base import RetryingStore
from cubefs.remote.loop import LoopThread

DELAY = 0.4  # seconds each GET takes (fault injection: a slow store)


def test_a_read_is_not_queued_behind_background_ranges(tmp_path: Path) -> None:
    chunks = [os.urandom(50_000) for _ in range(8)]
    source, locs, gets, loop = _slow_source(tmp_path, chunks, background_requests=1)
    waited: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            source.start(n)
            for i in (0, 2, 4, 6):  # four speculative ranges, one at a time: the last starts at ~1.2 s
                source.fetch_in_background([locs[i]])
            await trio.sleep(0.05)
            t0 = time.monotonic()
            assert await source.get_many([locs[6]]) == [chunks[6]]
            waited.append(time.monotonic() - t0)
            await trio.sleep(4 * DELAY)  # the queued ranges run (and the promoted one is dropped)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        loop.close()
    assert waited[0] < 2 * DELAY, f"the read waited {waited[0]:.2f} s behind speculation"
    assert len(gets) == 4 and sorted(gets).count(locs[6].offset) == 1, gets  # fetched once, as the read
    assert source.memory.get(locs[6].digest) == chunks[6]


def _slow_source(tmp_path: Path, chunks: list[bytes], disk: bool = False,
                 **kw: int) -> tuple[ChunkSource, list, list[int], LoopThread]:  # type: ignore[type-arg]
    locs = write_pack(tmp_path / "store", chunks)
    plain = make_store(f"file://{tmp_path / 'store'}")
    gets: list[int] = []

    class SlowStore(RetryingStore):
        async def get_range(self, key: str, start: int, length: int) -> bytes:
            gets.append(start)
            await asyncio.sleep(DELAY)
            return await plain.get_range(key, start, length)

    loop = LoopThread()
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30) if disk else None
    return ChunkSource(SlowStore(plain.backend), loop, MemoryTier(64 << 20), cache, **kw), locs, gets, loop


def test_a_reader_that_joins_a_background_flight_before_it_queues_is_promoted(tmp_path: Path) -> None:
    """The flight carries its reader: a read of a chunk whose background range is still in the
    disk cache's thread hop (not yet queued for a place) is fetched as a read when the range
    gets there, not behind the speculation queued before it (review, session 12)."""
    chunks = [os.urandom(50_000) for _ in range(8)]
    source, locs, gets, loop = _slow_source(tmp_path, chunks, disk=True, background_requests=1)
    waited: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            source.start(n)
            for i in (0, 2, 4, 6):  # four ranges, one place: the last would start at ~1.2 s
                source.fetch_in_background([locs[i]])
            while locs[6].digest not in source._flights:  # made; they look in the disk cache (a thread)
                await trio.sleep(0)
            t0 = time.monotonic()
            assert await source.get_many([locs[6]]) == [chunks[6]]
            waited.append(time.monotonic() - t0)
            await trio.sleep(4 * DELAY)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        loop.close()
        assert source.disk is not None
        source.disk.close()
    assert waited[0] < 2 * DELAY, f"the read waited {waited[0]:.2f} s behind speculation"
    assert sorted(gets).count(locs[6].offset) == 1, gets  # fetched once


def test_speculative_deltas_wait_for_background_places(tmp_path: Path) -> None:
    """A delta chunk in a background range (a hot pack's rest, pack neighbours) and its base are
    fetched under the background allowance, not as reads: with one read place, a read asked
    for meanwhile is not queued behind them."""
    base = os.urandom(60_000)
    delta_plain = base[:30_000] + os.urandom(200) + base[30_000:]
    other = os.urandom(50_000)
    delta = zstandard.ZstdCompressor(dict_data=delta_dictionary(base)).compress(delta_plain)
    source, raw, gets, loop = _slow_source(tmp_path, [base, delta, other], max_requests=1, background_requests=4)
    base_loc, dloc, other_loc = raw
    dloc = replace(dloc, digest=hashlib.sha256(delta_plain).digest(), plain_len=len(delta_plain),
                   codec=CODEC_DELTA, base=base_loc)
    waited: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            source.start(n)
            source.fetch_in_background([dloc])
            await trio.sleep(0.05)
            t0 = time.monotonic()
            assert await source.get_many([other_loc]) == [other]
            waited.append(time.monotonic() - t0)
            await trio.sleep(3 * DELAY)
            assert await source.get_many([dloc]) == [delta_plain]  # arrived, decoded against its base
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        loop.close()
    assert waited[0] < 1.5 * DELAY, f"the read waited {waited[0]:.2f} s behind speculative deltas"
    assert len(gets) == 3, gets  # base, delta, the read: each once


def test_what_a_read_did_not_ask_of_the_store_is_not_counted_as_asked(tmp_path: Path) -> None:
    """Hot packs are bounded by the bytes asked of the store and peers (ChunkSource.asked_bytes).
    A read whose chunks the disk cache holds drops its pack neighbours (this node read this
    before): they were counted as asked and stayed so, and a failed GET stayed counted too, so
    on a warm remount the count only grew, and hot packs went off for the mount (review R3)."""
    from cubefs.cache.disk import StoredChunk
    from cubefs.format.packs import CODEC_RAW

    chunks = [os.urandom(50_000) for _ in range(4)]
    source, locs, gets, loop = _slow_source(tmp_path, chunks, disk=True)
    assert source.disk is not None
    source.disk.put_many([(locs[0].digest, StoredChunk(CODEC_RAW, len(chunks[0]), chunks[0]))])

    async def main() -> None:
        async with trio.open_nursery() as n:
            source.start(n)
            # the read's chunk on disk, two neighbours behind it that are not: dropped
            assert await source.get_many([locs[0]], background=[locs[1], locs[2]]) == [chunks[0]]
            assert source.asked_bytes == 0 and gets == []
            plain_get = source.store.get_range

            async def failing(key: str, start: int, length: int) -> bytes:
                raise OSError("the store is down")

            source.store.get_range = failing  # type: ignore[method-assign]
            with contextlib.suppress(Exception):
                await source.get_many([locs[3]])
            assert source.asked_bytes == 0  # nothing came: nothing counted
            source.store.get_range = plain_get  # type: ignore[method-assign]
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        loop.close()
        source.disk.close()
