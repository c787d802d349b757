"""Image metadata v1: every inode, directory entry and file chunk list of a tree.

The encoding is specified in docs/format.md ("Image metadata").  It holds the
tree and nothing about where chunks are stored, so the digest names the tree
alone: the same tree built twice, or into two stores, has the same digest.
Where each chunk lives in a given store is in that store's chunk map
(:mod:`cubefs.format.packs`).

Decoding is lazy: inode records stay as the msgpack lists they arrive as and
are read by index, so mounting a 100k-inode image costs one ``unpackb``.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

from cubefs.errors import CorruptDataError, FormatVersionError

MAGIC = "cubefs-image"
VERSION = 1
ROOT_INO = 1

CHUNK_RECORD = struct.Struct("<32sI")  # sha256 digest, plaintext length
EXTENT_RECORD = struct.Struct("<QI")  # offset in file, index into the chunk table

# Field positions in an inode record (docs/format.md, "Inode record").
F_MODE, F_UID, F_GID, F_ATIME, F_MTIME, F_CTIME, F_SIZE, F_NLINK, F_RDEV, F_XATTRS, F_PAYLOAD = range(11)


@dataclass
class InodeSpec:
    """One inode as the builder describes it, before encoding."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    entries: list[tuple[bytes, int]] | None = None  # directories: (name, ino), sorted by name
    target: bytes | None = None  # symlinks
    extents: list[tuple[int, int]] | None = None  # regular files: (offset, chunk index), sorted


def encode_image(
    inodes: list[InodeSpec], chunks: list[tuple[bytes, int]], chunker: dict[str, Any]
) -> tuple[bytes, str]:
    """Encode an image; returns (plaintext metadata, hex digest).  ``inodes[0]`` is ino 1."""
    records = []
    for ino in inodes:
        if stat.S_ISDIR(ino.mode):
            payload: Any = [[name, child] for name, child in ino.entries or []]
        elif stat.S_ISLNK(ino.mode):
            payload = ino.target or b""
        elif stat.S_ISREG(ino.mode):
            payload = b"".join(EXTENT_RECORD.pack(off, idx) for off, idx in ino.extents or [])
        else:
            payload = None
        records.append(
            [
                ino.mode,
                ino.uid,
                ino.gid,
                ino.atime_ns,
                ino.mtime_ns,
                ino.ctime_ns,
                ino.size,
                ino.nlink,
                ino.rdev,
                [[k, v] for k, v in sorted(ino.xattrs)],
                payload,
            ]
        )
    doc = {
        "magic": MAGIC,
        "version": VERSION,
        "chunker": chunker,
        "chunks": b"".join(CHUNK_RECORD.pack(d, n) for d, n in chunks),
        "inodes": records,
    }
    raw = msgpack.packb(doc, use_bin_type=True)
    return raw, hashlib.sha256(raw).hexdigest()


def compress_blob(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=9).compress(raw)


def decompress_blob(blob: bytes, what: str, limit: int = 1 << 31) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as err:
        raise CorruptDataError(f"{what}: not a valid zstd frame ({err})") from None


def check_header(doc: Any, magic: str, supported: int | tuple[int, ...], what: str) -> int:
    """Readers refuse what they do not understand, naming what and which version;
    returns the version."""
    if not isinstance(doc, dict) or doc.get("magic") != magic:
        raise CorruptDataError(f"{what}: not a {magic} object")
    versions = supported if isinstance(supported, tuple) else (supported,)
    version = doc.get("version")
    if type(version) is not int or version not in versions:
        readable = " and ".join(str(v) for v in versions)
        raise FormatVersionError(
            f"{what}: format version {version!r} is not supported (this cubefs reads version {readable}); "
            "upgrade cubefs"
        )
    return version


class Image:
    """A decoded, read-only image; inode numbers start at 1 (the root)."""

    def __init__(self, raw: bytes, digest: str) -> None:
        what = f"image sha256:{digest[:12]}"
        if hashlib.sha256(raw).hexdigest() != digest:
            raise CorruptDataError(f"{what}: metadata does not match its digest")
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as err:
            raise CorruptDataError(f"{what}: metadata is not valid msgpack ({err})") from None
        check_header(doc, MAGIC, VERSION, what)
        self.digest = digest
        self.chunker: dict[str, Any] = doc["chunker"]
        self.inodes: list[list[Any]] = doc["inodes"]
        table: bytes = doc["chunks"]
        if len(table) % CHUNK_RECORD.size:
            raise CorruptDataError(f"{what}: chunk table length {len(table)} is not a multiple of 36")
        self._chunks = table
        self.nchunks = len(table) // CHUNK_RECORD.size
        self._dir_index: dict[int, dict[bytes, int]] = {}
        self._extents: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def from_blob(cls, blob: bytes, digest: str) -> Image:
        return cls(decompress_blob(blob, f"image sha256:{digest[:12]}"), digest)

    def __len__(self) -> int:
        return len(self.inodes)

    def record(self, ino: int) -> list[Any]:
        return self.inodes[ino - 1]

    def chunk(self, idx: int) -> tuple[bytes, int]:
        digest, ulen = CHUNK_RECORD.unpack_from(self._chunks, idx * CHUNK_RECORD.size)
        return digest, ulen

    def entries(self, ino: int) -> list[list[Any]]:
        return self.inodes[ino - 1][F_PAYLOAD]

    def lookup(self, parent: int, name: bytes) -> int | None:
        index = self._dir_index.get(parent)
        if index is None:
            index = {e[0]: e[1] for e in self.entries(parent)}
            self._dir_index[parent] = index
        return index.get(name)

    def extents(self, ino: int) -> tuple[list[int], list[int]]:
        """(sorted file offsets, chunk indices) of a regular file, decoded once."""
        ext = self._extents.get(ino)
        if ext is None:
            payload = self.inodes[ino - 1][F_PAYLOAD]
            offs: list[int] = []
            idxs: list[int] = []
            for off, idx in EXTENT_RECORD.iter_unpack(payload):
                offs.append(off)
                idxs.append(idx)
            ext = (offs, idxs)
            self._extents[ino] = ext
        return ext

    def chunks_for_range(self, ino: int, offset: int, size: int) -> list[tuple[int, int]]:
        """The (file offset, chunk index) extents that overlap [offset, offset+size)."""
        offs, idxs = self.extents(ino)
        out = []
        i = max(bisect_right(offs, offset) - 1, 0)
        end = offset + size
        while i < len(offs) and offs[i] < end:
            _d, ulen = self.chunk(idxs[i])
            if offs[i] + ulen > offset:
                out.append((offs[i], idxs[i]))
            i += 1
        return out

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b"") -> list[tuple[bytes, int]]:
        """Every (path, ino) below ``ino``, depth first; used by inspect and tests."""
        out = []
        stack = [(prefix, ino)]
        while stack:
            path, cur = stack.pop()
            out.append((path, cur))
            if stat.S_ISDIR(self.inodes[cur - 1][F_MODE]):
                for name, child in reversed(self.entries(cur)):
                    stack.append((path + b"/" + name, child))
        return out
