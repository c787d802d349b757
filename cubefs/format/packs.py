"""Packs, pack indexes and chunk maps (format v1, docs/format.md).

* A **pack** (``packs/<sha256 of the pack>``) is an 8-byte header followed by
  chunk frames back to back; a chunk is read with one ranged GET.
* A **pack index** (``indexes/<pack>``) lists the chunks in a pack; builders
  read all indexes to know which chunks a store already holds.
* A **chunk map** (``chunkmaps/<image>``) says, for each entry of an image's
  chunk table, in which pack and where; it is what a mount reads.

A chunk may be stored as a **delta** (codec 2): a zstd frame whose dictionary
is the plaintext of another chunk, its *base* (in practice the same file's
chunk in the previous version of the image).  Indexes and chunk maps that
hold a delta are version 2 and name its base; a base is never itself a delta,
so reading any chunk takes at most one other.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace

import msgpack
import zstandard

from cubefs.errors import CorruptDataError
from cubefs.format.image import Image, check_header, compress_blob, decompress_blob

PACK_HEADER = b"CUBEPK\x00\x01"
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_DELTA = 2

INDEX_MAGIC = "cubefs-packindex"
INDEX_VERSIONS = (1, 2)  # 2: has delta entries (``bases``)
INDEX_RECORD = struct.Struct("<32sQIIB")  # digest, offset, stored length, plaintext length, codec
INDEX_BASE = struct.Struct("<I32s")  # entry number, base digest

MAP_MAGIC = "cubefs-chunkmap"
MAP_VERSIONS = (1, 2)  # 2: has delta chunks (``bases``, ``deltas``)
MAP_RECORD = struct.Struct("<IQIB")  # pack number, offset, stored length, codec
MAP_BASE = struct.Struct("<32sIIQIB")  # digest, plaintext length, pack number, offset, stored length, codec
MAP_DELTA = struct.Struct("<II")  # chunk-table index, base (< n: chunk-table index, else n + bases index)


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
    # A delta's base.  In a decoded pack index only its digest is known (pack "",
    # see resolve_bases); everywhere else it is a full location.
    base: ChunkLocation | None = None


def encode_index(pack: str, size: int, entries: list[ChunkLocation]) -> bytes:
    bases = b"".join(INDEX_BASE.pack(i, e.base.digest) for i, e in enumerate(entries) if e.base is not None)
    doc: dict[str, object] = {
        "magic": INDEX_MAGIC,
        "version": 2 if bases else 1,
        "pack": pack,
        "size": size,
        "entries": b"".join(
            INDEX_RECORD.pack(e.digest, e.offset, e.stored_len, e.plain_len, e.codec) for e in entries
        ),
    }
    if bases:
        doc["bases"] = bases
    return compress_blob(msgpack.packb(doc, use_bin_type=True))


def decode_index(blob: bytes, key: str) -> list[ChunkLocation]:
    """The entries of a pack index; a delta's ``base`` names only its digest."""
    doc = msgpack.unpackb(decompress_blob(blob, key), raw=False)
    check_header(doc, INDEX_MAGIC, INDEX_VERSIONS, key)
    pack = doc["pack"]
    raw = doc["entries"]
    if len(raw) % INDEX_RECORD.size:
        raise CorruptDataError(f"{key}: truncated entry table")
    out = [ChunkLocation(d, pack, o, s, p, c) for d, o, s, p, c in INDEX_RECORD.iter_unpack(raw)]
    bases = doc.get("bases", b"")
    if len(bases) % INDEX_BASE.size:
        raise CorruptDataError(f"{key}: truncated base table")
    named = set()
    for i, base in INDEX_BASE.iter_unpack(bases):
        if i >= len(out) or out[i].codec != CODEC_DELTA:
            raise CorruptDataError(f"{key}: base record for entry {i}, which is not a delta")
        out[i] = replace(out[i], base=ChunkLocation(base, "", 0, 0, 0, CODEC_RAW))
        named.add(i)
    for i, e in enumerate(out):
        if e.codec == CODEC_DELTA and i not in named:
            raise CorruptDataError(f"{key}: delta entry {i} names no base")
    return out


def delta_dictionary(base: bytes) -> zstandard.ZstdCompressionDict:
    """The zstd dictionary a delta is compressed with: its base's plaintext, raw."""
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def resolve_bases(known: dict[bytes, ChunkLocation]) -> None:
    """Give the deltas of decoded pack indexes their bases' locations; a delta whose
    base the store does not hold (or holds only as a delta) is dropped from ``known``:
    it cannot be read, so a build stores that chunk again."""
    for digest, loc in list(known.items()):
        if loc.base is not None and not loc.base.pack:
            base = known.get(loc.base.digest)
            if base is None or base.codec == CODEC_DELTA:
                del known[digest]
            else:
                known[digest] = replace(loc, base=base)


def encode_chunkmap(image: str, locations: list[ChunkLocation]) -> bytes:
    packs: dict[str, int] = {}
    recs = []
    position = {loc.digest: i for i, loc in enumerate(locations)}
    extra: dict[bytes, int] = {}
    bases = []
    deltas = []
    for i, loc in enumerate(locations):
        n = packs.setdefault(loc.pack, len(packs))
        recs.append(MAP_RECORD.pack(n, loc.offset, loc.stored_len, loc.codec))
        if loc.base is None:
            continue
        b = loc.base
        if b.digest in position:
            deltas.append(MAP_DELTA.pack(i, position[b.digest]))
            continue
        if b.digest not in extra:
            extra[b.digest] = len(locations) + len(bases)
            bases.append(MAP_BASE.pack(b.digest, b.plain_len, packs.setdefault(b.pack, len(packs)), b.offset,
                                       b.stored_len, b.codec))
        deltas.append(MAP_DELTA.pack(i, extra[b.digest]))
    doc: dict[str, object] = {
        "magic": MAP_MAGIC,
        "version": 2 if deltas else 1,
        "image": image,
        "packs": list(packs),
        "locs": b"".join(recs),
    }
    if deltas:
        doc["bases"] = b"".join(bases)
        doc["deltas"] = b"".join(deltas)
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
        check_header(doc, MAP_MAGIC, MAP_VERSIONS, key)
        if doc.get("image") != image:
            raise CorruptDataError(f"{key}: belongs to image {doc.get('image')!r}")
        self.packs: list[str] = doc["packs"]
        self._locs: bytes = doc["locs"]
        if len(self._locs) % MAP_RECORD.size or (nchunks is not None and len(self._locs) != nchunks * MAP_RECORD.size):
            raise CorruptDataError(f"{key}: has {len(self._locs) // MAP_RECORD.size} entries, image has {nchunks}")
        self._by_pack: dict[int, tuple[list[int], list[int]]] | None = None
        self._pack_numbers: dict[str, int] | None = None
        self.bases: list[ChunkLocation] = []
        self._deltas: dict[int, int] = {}
        self._check_deltas(doc, key)

    def _check_deltas(self, doc: dict[str, object], key: str) -> None:
        """Every delta names one base, every base is stored whole: a reader needs at
        most one other chunk and never loops."""
        bases, deltas = doc.get("bases", b""), doc.get("deltas", b"")
        if not isinstance(bases, bytes) or not isinstance(deltas, bytes) or len(bases) % MAP_BASE.size \
                or len(deltas) % MAP_DELTA.size:
            raise CorruptDataError(f"{key}: malformed delta tables")
        n = len(self)
        for d, plain, pn, off, slen, codec in MAP_BASE.iter_unpack(bases):
            if pn >= len(self.packs) or codec == CODEC_DELTA:
                raise CorruptDataError(f"{key}: base chunk {d.hex()[:16]} is not stored whole in a listed pack")
            self.bases.append(ChunkLocation(d, self.packs[pn], off, slen, plain, codec))
        for idx, base in MAP_DELTA.iter_unpack(deltas):
            if idx >= n or base >= n + len(self.bases) or self._codec(idx) != CODEC_DELTA \
                    or (base < n and self._codec(base) == CODEC_DELTA):
                raise CorruptDataError(f"{key}: bad delta record for chunk {idx}")
            self._deltas[idx] = base
        # Every codec-2 record has a delta record (those were checked to be codec 2, one
        # per chunk): counted on the codec bytes alone, so a mount pays ~1 ms, not a loop.
        if self._locs[MAP_RECORD.size - 1 :: MAP_RECORD.size].count(CODEC_DELTA) != len(self._deltas):
            missing = next(i for i, (_n, _o, _s, c) in enumerate(MAP_RECORD.iter_unpack(self._locs))
                           if c == CODEC_DELTA and i not in self._deltas)
            raise CorruptDataError(f"{key}: delta chunk {missing} names no base")

    def _codec(self, idx: int) -> int:
        return MAP_RECORD.unpack_from(self._locs, idx * MAP_RECORD.size)[3]

    def base_of(self, idx: int) -> int | ChunkLocation | None:
        """A delta chunk's base: its chunk-table index, or its location when the image
        itself does not use it; None for a chunk stored whole."""
        base = self._deltas.get(idx)
        if base is None:
            return None
        return base if base < len(self) else self.bases[base - len(self)]

    def places(self) -> list[tuple[str, int, int]]:
        """(pack, offset, stored length) of every chunk a reader of the image may fetch,
        bases included: what garbage collection keeps and accounting counts."""
        out = [(self.packs[n], off, slen) for n, off, slen, _c in MAP_RECORD.iter_unpack(self._locs)]
        return out + [(b.pack, b.offset, b.stored_len) for b in self.bases]

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
        return sum(slen for _p, _o, slen in self.places())


def locate(image: Image, chunkmap: ChunkMap, idx: int) -> ChunkLocation:
    """Where chunk-table entry ``idx`` of ``image`` is, with its base if it is a delta."""
    digest, plain = image.chunk(idx)
    pack, off, slen, codec = chunkmap.get(idx)
    base = chunkmap.base_of(idx)
    if isinstance(base, int):
        base = locate(image, chunkmap, base)  # stored whole (ChunkMap checks): no deeper
    return ChunkLocation(digest, pack, off, slen, plain, codec, base)


def pack_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
