"""A read never waits behind speculation: a chunk it needs that sits in a background range
still queued for a place is fetched at once, as a read (ChunkSource._promote)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import trio
from conftest import write_pack

from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import MemoryTier
from cubefs.remote import make_store
from cubefs.remote.base import RetryingStore
from cubefs.remote.loop import LoopThread

DELAY = 0.4  # seconds each GET takes (fault injection: a slow store)


def test_a_read_is_not_queued_behind_background_ranges(tmp_path: Path) -> None:
    chunks = [os.urandom(50_000) for _ in range(8)]
    locs = write_pack(tmp_path / "store", chunks)
    plain = make_store(f"file://{tmp_path / 'store'}")
    gets: list[int] = []

    class SlowStore(RetryingStore):
        async def get_range(self, key: str, start: int, length: int) -> bytes:
            gets.append(start)
            await asyncio.sleep(DELAY)
            return await plain.get_range(key, start, length)

    loop = LoopThread()
    source = ChunkSource(SlowStore(plain.backend), loop, MemoryTier(64 << 20), None, background_requests=1)
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
