"""Packs, pack indexes and chunk maps (format v1, docs/format.md).

* A **pack** (``packs/<sha256 of the pack>``) is an 8-byte header followed by
  chunk frames back to back; a chunk is read with one ranged GET.
* A **pack index** (``indexes/<pack>``) lists the chunks in a pack; builders
  read all indexes to know which chunks a store already holds.
* A **chunk map** (``chunkmaps/<image>``) says, for each entry of an image's
  chunk table, in which pack and where; it is what a mount reads.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import msgpack

from cubefs.errors import CorruptDataError
from cubefs.format.image import check_header, compress_blob, decompress_blob

PACK_HEADER = b"CUBEPK\x00\x01"
CODEC_RAW = 0
CODEC_ZSTD = 1

INDEX_MAGIC = "cubefs-packindex"
INDEX_VERSION = 1
INDEX_RECORD = struct.Struct("<32sQIIB")  # digest, offset, stored length, plaintext length, codec

MAP_MAGIC = "cubefs-chunkmap"
MAP_VERSION = 1
MAP_RECORD = struct.Struct("<IQIB")  # pack number, offset, stored length, codec


def pack_key(pack: str) -> str:
    return f"packs/{pack[:2]}/{pack}"


def index_key(pack: str) -> str:
    return f"indexes/{pack}"


def image_key(digest: str) -> str:
    return f"images/{digest}"


def chunkmap_key(digest: str) -> str:
    return f"chunkmaps/{digest}"


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where one chunk's stored bytes are: enough to fetch and verify it."""

    digest: bytes
    pack: str
    offset: int
    stored_len: int
    plain_len: int
    codec: int


def encode_index(pack: str, size: int, entries: list[ChunkLocation]) -> bytes:
    doc = {
        "magic": INDEX_MAGIC,
        "version": INDEX_VERSION,
        "pack": pack,
        "size": size,
        "entries": b"".join(
            INDEX_RECORD.pack(e.digest, e.offset, e.stored_len, e.plain_len, e.codec) for e in entries
        ),
    }
    return compress_blob(msgpack.packb(doc, use_bin_type=True))


def decode_index(blob: bytes, key: str) -> list[ChunkLocation]:
    doc = msgpack.unpackb(decompress_blob(blob, key), raw=False)
    check_header(doc, INDEX_MAGIC, INDEX_VERSION, key)
    pack = doc["pack"]
    raw = doc["entries"]
    if len(raw) % INDEX_RECORD.size:
        raise CorruptDataError(f"{key}: truncated entry table")
    return [ChunkLocation(d, pack, o, s, p, c) for d, o, s, p, c in INDEX_RECORD.iter_unpack(raw)]


def encode_chunkmap(image: str, locations: list[ChunkLocation]) -> bytes:
    packs: dict[str, int] = {}
    recs = []
    for loc in locations:
        n = packs.setdefault(loc.pack, len(packs))
        recs.append(MAP_RECORD.pack(n, loc.offset, loc.stored_len, loc.codec))
    doc = {
        "magic": MAP_MAGIC,
        "version": MAP_VERSION,
        "image": image,
        "packs": list(packs),
        "locs": b"".join(recs),
    }
    return compress_blob(msgpack.packb(doc, use_bin_type=True))


class ChunkMap:
    """Decoded chunk map: chunk-table index → (pack, offset, stored length, codec)."""

    def __init__(self, blob: bytes, image: str, nchunks: int | None) -> None:
        """``nchunks``: the image's chunk-table size, which the map must match (None:
        unchecked, for readers that only want every location, like the collector)."""
        key = chunkmap_key(image)
        try:
            doc = msgpack.unpackb(decompress_blob(blob, key), raw=False)
        except (ValueError, msgpack.UnpackException) as err:
            raise CorruptDataError(f"{key}: not valid msgpack ({err})") from None
        check_header(doc, MAP_MAGIC, MAP_VERSION, key)
        if doc.get("image") != image:
            raise CorruptDataError(f"{key}: belongs to image {doc.get('image')!r}")
        self.packs: list[str] = doc["packs"]
        self._locs: bytes = doc["locs"]
        if len(self._locs) % MAP_RECORD.size or (nchunks is not None and len(self._locs) != nchunks * MAP_RECORD.size):
            raise CorruptDataError(f"{key}: has {len(self._locs) // MAP_RECORD.size} entries, image has {nchunks}")
        self._by_pack: dict[int, tuple[list[int], list[int]]] | None = None
        self._pack_numbers: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._locs) // MAP_RECORD.size

    def get(self, idx: int) -> tuple[str, int, int, int]:
        n, off, slen, codec = MAP_RECORD.unpack_from(self._locs, idx * MAP_RECORD.size)
        return self.packs[n], off, slen, codec

    def by_pack(self) -> dict[int, tuple[list[int], list[int]]]:
        """Per pack number: the image's chunks in pack order, as (offsets, chunk indices).

        Built once, on first use: what lies next to a chunk in its pack is what
        the builder wrote next to it, usually the neighbouring files of a directory."""
        if self._by_pack is None:
            rows = sorted((n, off, i) for i, (n, off, _s, _c) in enumerate(MAP_RECORD.iter_unpack(self._locs)))
            out: dict[int, tuple[list[int], list[int]]] = {}
            for n, off, i in rows:
                offs, idxs = out.setdefault(n, ([], []))
                offs.append(off)
                idxs.append(i)
            self._by_pack = out
        return self._by_pack

    def pack_number(self, pack: str) -> int:
        if self._pack_numbers is None:
            self._pack_numbers = {p: n for n, p in enumerate(self.packs)}
        return self._pack_numbers[pack]

    def stored_bytes(self) -> int:
        return sum(slen for _n, _o, slen, _c in MAP_RECORD.iter_unpack(self._locs))


def pack_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
