"""The format codecs and the chunk source, exercised directly (no FUSE)."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import msgpack
import pytest
import trio
import zstandard
from conftest import write_pack

from cubefs.cache.disk import DiskCache
from cubefs.cache.source import ChunkSource, ChunkUnavailable, decode_chunk
from cubefs.cache.tiers import MemoryTier
from cubefs.errors import CorruptDataError, FormatVersionError, UsageError
from cubefs.format.image import Image, InodeSpec, encode_image
from cubefs.format.manifest import Manifest, manifest_key, parse_ref, ref_from_key
from cubefs.format.packs import (
    CODEC_DELTA,
    CODEC_RAW,
    CODEC_ZSTD,
    ChunkLocation,
    ChunkMap,
    decode_index,
    encode_chunkmap,
    encode_index,
    resolve_bases,
)
from cubefs.remote import make_store
from cubefs.remote.loop import LoopThread


def _tiny_image() -> tuple[bytes, str]:
    d = hashlib.sha256(b"x").digest()
    inodes = [
        InodeSpec(stat.S_IFDIR | 0o755, 0, 0, 1, 2, 3, entries=[(b"f", 2), (b"l", 3)], nlink=2),
        InodeSpec(stat.S_IFREG | 0o644, 5, 6, 7, 8, 9, size=1, extents=[(0, 0)], xattrs=[(b"user.a", b"1")]),
        InodeSpec(stat.S_IFLNK | 0o777, 0, 0, 1, 1, 1, target=b"/abs/target"),
    ]
    return encode_image(inodes, [(d, 1)], {"algorithm": "test"})


def test_image_round_trip_and_digest_is_stable() -> None:
    raw, digest = _tiny_image()
    raw2, digest2 = _tiny_image()
    assert (raw, digest) == (raw2, digest2)
    img = Image(raw, digest)
    assert img.lookup(1, b"f") == 2 and img.lookup(1, b"nope") is None
    assert img.chunks_for_range(2, 0, 1) == [(0, 0)]
    assert [p for p, _ in img.walk()] == [b"", b"/f", b"/l"]


def test_image_readers_reject_what_they_do_not_understand() -> None:
    raw, digest = _tiny_image()
    with pytest.raises(CorruptDataError, match="does not match its digest"):
        Image(raw, "0" * 64)
    doc = msgpack.unpackb(raw, raw=False)
    doc["version"] = 7
    raw7 = msgpack.packb(doc, use_bin_type=True)
    with pytest.raises(FormatVersionError, match="version 7"):
        Image(raw7, hashlib.sha256(raw7).hexdigest())
    doc["magic"] = "something-else"
    rawm = msgpack.packb(doc, use_bin_type=True)
    with pytest.raises(CorruptDataError, match="not a cubefs-image"):
        Image(rawm, hashlib.sha256(rawm).hexdigest())
    with pytest.raises(CorruptDataError, match="zstd"):
        Image.from_blob(b"not zstd", digest)


def test_pack_index_and_chunkmap_round_trip() -> None:
    locs = [ChunkLocation(hashlib.sha256(bytes([i])).digest(), "ab" * 32, 8 + i * 10, 10, 20, CODEC_ZSTD)
            for i in range(5)]
    assert decode_index(encode_index("ab" * 32, 58, locs), "indexes/x") == locs
    cmap = ChunkMap(encode_chunkmap("cd" * 32, locs), "cd" * 32, 5)
    assert cmap.get(3) == ("ab" * 32, 38, 10, CODEC_ZSTD)
    with pytest.raises(CorruptDataError, match="belongs to image"):
        ChunkMap(encode_chunkmap("cd" * 32, locs), "ef" * 32, 5)
    with pytest.raises(CorruptDataError, match="entries"):
        ChunkMap(encode_chunkmap("cd" * 32, locs), "cd" * 32, 6)


def test_deltas_in_indexes_and_chunkmaps_name_their_bases() -> None:
    whole = [ChunkLocation(hashlib.sha256(bytes([i])).digest(), "ab" * 32, 8 + i * 10, 10, 20, CODEC_ZSTD)
             for i in range(3)]
    outside = ChunkLocation(hashlib.sha256(b"old").digest(), "ef" * 32, 8, 30, 40, CODEC_RAW)
    d_in = ChunkLocation(hashlib.sha256(b"d1").digest(), "ab" * 32, 38, 5, 20, CODEC_DELTA, whole[0])
    d_out = ChunkLocation(hashlib.sha256(b"d2").digest(), "ab" * 32, 43, 5, 40, CODEC_DELTA, outside)
    entries = decode_index(encode_index("ab" * 32, 48, [*whole, d_in, d_out]), "indexes/x")
    assert [e.base.digest if e.base else None for e in entries] == [None] * 3 + [whole[0].digest, outside.digest]
    known = {e.digest: e for e in entries} | {outside.digest: outside}
    resolve_bases(known)
    assert known[d_in.digest] == d_in and known[d_out.digest] == d_out
    resolve_bases(lost := {e.digest: e for e in entries[3:]})  # bases nowhere in the store: unusable
    assert lost == {}

    image = "cd" * 32
    blob = encode_chunkmap(image, [*whole, d_in, d_out])
    assert msgpack.unpackb(zstandard.decompress(blob), raw=False)["version"] == 2
    assert msgpack.unpackb(zstandard.decompress(encode_chunkmap(image, whole)), raw=False)["version"] == 1
    cmap = ChunkMap(blob, image, 5)
    assert cmap.base_of(3) == 0 and cmap.base_of(4) == outside and cmap.base_of(1) is None
    assert sorted(cmap.places()) == sorted([(loc.pack, loc.offset, loc.stored_len)
                                            for loc in [*whole, d_in, d_out, outside]])

    def tampered(**change: object) -> bytes:
        doc = msgpack.unpackb(zstandard.decompress(blob), raw=False)
        doc.update(change)
        return zstandard.compress(msgpack.packb(doc, use_bin_type=True))

    with pytest.raises(CorruptDataError, match="names no base"):
        ChunkMap(tampered(deltas=b""), image, 5)
    with pytest.raises(CorruptDataError, match="bad delta record"):  # a delta as a base: chains
        ChunkMap(tampered(deltas=struct.pack("<IIII", 3, 4, 4, 5)), image, 5)
    with pytest.raises(FormatVersionError, match="version 3"):
        ChunkMap(tampered(version=3), image, 5)
    ref = ChunkLocation(d_in.digest, "ab" * 32, 38, 5, 20, CODEC_DELTA)
    with pytest.raises(ChunkUnavailable, match="base chunk is not loaded"):
        decode_chunk(ref, b"x" * 5)


def test_manifest_refs() -> None:
    assert parse_ref("debian:12") == ("debian", "12")
    assert parse_ref("library/debian") == ("library/debian", "latest")
    assert ref_from_key(manifest_key("a/b", "c")) == "a/b:c"
    for bad in ("Debian:12", "a//b", "../etc:x", "a:" + "t" * 200, ""):
        with pytest.raises(UsageError):
            parse_ref(bad)
    m = Manifest("a/b", "c", "0" * 64, "now")
    assert Manifest.decode(m.encode(), "a/b:c").image == "0" * 64


def test_decode_chunk_verifies_everything() -> None:
    data = os.urandom(1000) + b"z" * 5000
    digest = hashlib.sha256(data).digest()
    packed = zstandard.ZstdCompressor().compress(data)
    ref = ChunkLocation(digest, "p" * 64, 8, len(packed), len(data), CODEC_ZSTD)
    assert decode_chunk(ref, packed) == data
    with pytest.raises(ChunkUnavailable, match="truncated"):
        decode_chunk(ref, packed[:-1])
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(ChunkUnavailable):
        decode_chunk(ref, bytes(flipped))
    raw_ref = ChunkLocation(digest, "p" * 64, 8, len(data), len(data), CODEC_RAW)
    with pytest.raises(ChunkUnavailable, match="SHA-256"):
        decode_chunk(raw_ref, b"y" + data[1:])
    with pytest.raises(ChunkUnavailable, match="codec"):
        decode_chunk(ChunkLocation(digest, "p" * 64, 8, len(data), len(data), 9), data)


def test_single_flight_and_range_merging(tmp_path: Path) -> None:
    """50 readers of the same chunks cause one ranged GET; read-ahead merges into it,
    is kept as fetched until first used, and reaches the disk cache once used."""
    chunks = [os.urandom(50_000) for _ in range(8)]
    locs = write_pack(tmp_path / "store", chunks)
    loop = LoopThread()
    store = make_store(f"file://{tmp_path / 'store'}")
    source = ChunkSource(store, loop, MemoryTier(64 << 20), DiskCache(str(tmp_path / "cache"), 64 << 20))

    async def main() -> list[list[bytes]]:
        results: list[list[bytes]] = []

        async def reader() -> None:
            results.append(await source.get_many(locs[:4], locs[4:]))

        async with trio.open_nursery() as n:
            source.start(n)
            async with trio.open_nursery() as readers:
                for _ in range(50):
                    readers.start_soon(reader)
            assert source.memory.get(locs[7].digest) is None  # read-ahead is staged, not decoded
            assert source.from_memory(locs[4:]) == chunks[4:]  # and served without a GET
            await trio.sleep(0.5)  # disk writes run in the background
            n.cancel_scope.cancel()
        return results

    try:
        results = trio.run(main)
    finally:
        loop.close()
    assert all(r == chunks[:4] for r in results) and len(results) == 50
    assert source.store_stats.requests == 1  # one merged GET for all 8 chunks
    assert store.stats.gets == 1
    assert source.disk is not None
    assert source.disk.get_many([locs[5].digest])[locs[5].digest].data == chunks[5]  # stored raw (random bytes)


def test_sigv4_matches_the_aws_documentation_example() -> None:
    """The GET Object example of the S3 SigV4 documentation (range bytes=0-9)."""
    import datetime

    from cubefs.remote.s3 import EMPTY_SHA256, Credentials, sign_v4

    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    when = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
    headers = sign_v4("GET", "examplebucket.s3.amazonaws.com", "/test.txt", {}, {"range": "bytes=0-9"},
                      EMPTY_SHA256, creds, "us-east-1", now=when)
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_a_reader_giving_up_does_not_fail_others_waiting_on_the_same_chunk(tmp_path: Path) -> None:
    """Fault injection: a store that answers after 1.5 s.  Reader A gives up at 0.5 s;
    reader B, waiting on the same in-flight chunk with a longer deadline, gets it."""
    from cubefs.remote.base import RetryingStore

    chunk = os.urandom(10_000)
    locs = write_pack(tmp_path / "store", [chunk])
    slow = make_store(f"file://{tmp_path / 'store'}")

    class SlowStore(RetryingStore):
        async def get_range(self, key: str, start: int, length: int) -> bytes:
            import asyncio

            await asyncio.sleep(1.5)
            return await slow.get_range(key, start, length)

    loop = LoopThread()
    source = ChunkSource(SlowStore(slow.backend), loop, MemoryTier(1 << 20), None)
    results: dict[str, object] = {}

    async def reader(name: str, deadline: float) -> None:
        try:
            with trio.fail_after(deadline):
                results[name] = await source.get_many(locs)
        except trio.TooSlowError:
            results[name] = "timeout"

    async def main() -> None:
        async with trio.open_nursery() as n:
            source.start(n)
            n.start_soon(reader, "a", 0.5)
            await trio.sleep(0.2)
            n.start_soon(reader, "b", 10.0)

    try:
        trio.run(main)
    finally:
        loop.close()
    assert results == {"a": "timeout", "b": [chunk]}


def test_a_prefetch_reads_the_disk_cache_in_the_order_asked(tmp_path: Path) -> None:
    """A trace's prefetch from the disk cache reads its slices in the trace's order (a few
    lanes at once): the run's first reads want the trace's first chunks.  Slices queued as one
    task each ran in trio's order, which reverses a batch of new tasks half the time: numpy's
    start-up chunks were then read last to first (six prefetches here: all six in order)."""
    from cubefs.cache.disk import StoredChunk
    from cubefs.cache.source import DISK_SLICE

    chunks = [os.urandom(1000) for _ in range(DISK_SLICE * 12)]
    refs = [ChunkLocation(hashlib.sha256(c).digest(), "p" * 64, i * 1000, 1000, 1000, CODEC_RAW)
            for i, c in enumerate(chunks)]
    disk = DiskCache(str(tmp_path / "cache"), 64 << 20)
    disk.put_many([(r.digest, StoredChunk(CODEC_RAW, 1000, c)) for r, c in zip(refs, chunks)])
    position = {r.digest: i for i, r in enumerate(refs)}
    get_many = disk.get_many
    loop = LoopThread()
    try:
        for _ in range(6):
            source = ChunkSource(make_store(f"file://{tmp_path / 'store'}"), loop, MemoryTier(64 << 20), disk)
            read: list[int] = []

            def recording(digests: list[bytes], read: list[int] = read) -> dict[bytes, StoredChunk]:
                read.append(position[digests[0]] // DISK_SLICE)
                return get_many(digests)

            disk.get_many = recording  # type: ignore[method-assign]

            async def main(source: ChunkSource = source) -> None:
                async with trio.open_nursery() as n:
                    source.start(n)
                    await source.prefetch(refs)
                    n.cancel_scope.cancel()

            trio.run(main)
            del disk.get_many
            assert sorted(read) == list(range(12))
            # Slices start in order; DISK_LANES of them run at once in threads, which the OS may
            # run in another order, so a few neighbours swap: read last to first is 66 swaps.
            swaps = sum(1 for i in range(12) for j in range(i + 1, 12) if read[i] > read[j])
            assert swaps <= 12, read
            assert source.from_memory(refs) == chunks
    finally:
        loop.close()
