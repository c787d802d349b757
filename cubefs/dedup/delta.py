"""Delta chunks: a new chunk stored as a zstd frame against a chunk of the previous
version of the image (docs/format.md, "Chunks", codec 2).

Content-defined chunking shares every chunk an update leaves alone, but a
chunk that changed at all is stored whole.  An update usually changes files
a little (a version string, a few functions, a recompiled module), so the
same file's chunk in the previous version is a near copy: as a raw zstd
dictionary it makes the new chunk a few hundred bytes.  A node that runs
version N holds N's chunks already, so moving to N+1 fetches the deltas only.

The base is looked for by path: the same path in the previous version, else
the same path with every run of digits treated alike (``numpy-1.26.3.dist-info``
↔ ``numpy-1.26.4.dist-info``, ``libfoo.so.1.2`` ↔ ``libfoo.so.1.3``); within the
file, the chunk at the same offset.  A delta is kept only if it is clearly
smaller than the chunk compressed alone, since reading it on a node without
the base costs one more chunk.

A base must be a chunk the store's pack indexes hold *whole* (``known``, the
build's view of the indexes), never the new chunk itself: the previous
version's chunk map may name a chunk whose index entry was lost (a damaged or
hand-edited index), and that chunk, cut again by this build, is then *new*;
taking it as its own base made an image whose chunk map says "delta of
itself", which no reader can decode (issue 12).  Without a usable base the
chunk is stored whole.
"""

from __future__ import annotations

import logging
import re
import stat
import threading
from bisect import bisect_right

import zstandard
from cachetools import LRUCache

from cubefs.cache.source import decode_chunk
from cubefs.errors import CubefsError
from cubefs.format.image import F_MODE, Image
from cubefs.format.packs import CODEC_DELTA, ChunkLocation, ChunkMap, delta_dictionary, locate, pack_key
from cubefs.remote.base import Store
from cubefs.remote.loop import LoopThread

log = logging.getLogger(__name__)

DELTA_LEVEL = 9  # deltas are few and small: compress them hard (measured in docs/benchmarks.md)
MIN_STORED = 256  # a chunk that compresses below this alone is not worth a base fetch
KEEP_RATIO = 0.75  # a delta must save a quarter of the chunk's stored bytes
BASE_CACHE_BYTES = 64 * 1024 * 1024
_DIGITS = re.compile(rb"[0-9]+")


def _loose(path: bytes) -> bytes:
    return _DIGITS.sub(b"#", path)


class DeltaBases:
    """The previous version of an image, as a source of bases for new chunks.
    Used from the ingest's worker threads: lookups are read-only, the plaintext
    cache is locked, fetches run on the store's loop."""

    def __init__(self, store: Store, loop: LoopThread, image: Image, chunkmap: ChunkMap, label: str,
                 known: dict[bytes, ChunkLocation] | None = None) -> None:
        self.store = store
        # The chunks the store's pack indexes hold (the build's ``known``, which only
        # grows); a base must be one of them, stored whole.  None: not checked.
        self.known = known
        self.loop = loop
        self.image = image
        self.chunkmap = chunkmap
        self.label = label
        self._files: dict[bytes, int] = {}
        self._loose: dict[bytes, int] = {}
        for path, ino in image.walk():
            if stat.S_ISREG(image.record(ino)[F_MODE]) and image.extents(ino)[0]:
                self._files[path] = ino
                self._loose.setdefault(_loose(path), ino)
        self._plain: LRUCache[bytes, bytes] = LRUCache(maxsize=BASE_CACHE_BYTES, getsizeof=len)
        self._lock = threading.Lock()
        self.used = 0

    def base_for(self, path: bytes, offset: int) -> ChunkLocation | None:
        """The previous version's chunk for ``path`` at ``offset``, stored whole, where
        the store's pack indexes say it is; None if they do not hold it whole."""
        ino = self._files.get(path) or self._loose.get(_loose(path))
        if ino is None:
            return None
        offs, idxs = self.image.extents(ino)
        loc = locate(self.image, self.chunkmap, idxs[max(bisect_right(offs, offset) - 1, 0)])
        loc = loc.base or loc  # a delta's own base is the next best thing
        if self.known is None:
            return loc
        indexed = self.known.get(loc.digest)
        if indexed is None or indexed.codec == CODEC_DELTA:
            return None
        return indexed

    def plaintext(self, base: ChunkLocation) -> bytes | None:
        """The base's verified plaintext; None (logged) if the store cannot give it."""
        with self._lock:
            data = self._plain.get(base.digest)
        if data is not None:
            return data
        try:
            stored = self.loop.run(self.store.get_range(pack_key(base.pack), base.offset, base.stored_len))
            data = decode_chunk(base, stored)
        except CubefsError as err:
            log.warning("image %s: base chunk %s unavailable, storing without a delta: %s", self.label,
                        base.digest.hex()[:16], err)
            return None
        with self._lock:
            self._plain[base.digest] = data
        return data

    def encode(self, data: bytes | memoryview, alone: int, path: bytes,
               offset: int) -> tuple[bytes, ChunkLocation] | None:
        """(delta, base) for a new chunk of ``path`` at ``offset`` that compresses to
        ``alone`` bytes by itself, or None when no base makes it clearly smaller
        (or the only base is the chunk itself)."""
        if alone < MIN_STORED:
            return None
        base = self.base_for(path, offset)
        if base is None:
            return None
        plain = self.plaintext(base)
        if plain is None or (len(plain) == len(data) and plain == data):
            return None
        delta = zstandard.ZstdCompressor(level=DELTA_LEVEL, dict_data=delta_dictionary(plain)).compress(data)
        if len(delta) > alone * KEEP_RATIO:
            return None
        with self._lock:
            self.used += 1
        return delta, base
