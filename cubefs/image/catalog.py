"""Reading what a store holds: manifests, and an image with its chunk map.

A mount keeps what it read of these in its cache directory
(:class:`MetadataCache`), so that a node whose store is down can still mount an
image it mounted before and serve every chunk its disk cache holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os

from cubefs.errors import (
    CorruptDataError,
    FormatVersionError,
    NotFoundError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from cubefs.format.image import Image
from cubefs.format.manifest import Manifest, manifest_key, parse_ref, ref_from_key
from cubefs.format.packs import ChunkMap, chunkmap_key, image_key
from cubefs.format.trace import decode_trace, trace_key
from cubefs.remote.base import Store

log = logging.getLogger(__name__)


async def load_manifest(store: Store, ref: str) -> Manifest:
    name, tag = parse_ref(ref)
    try:
        data = await store.get(manifest_key(name, tag))
    except ObjectNotFoundError:
        raise NotFoundError(f"image {name}:{tag} not found in store {store.url}") from None
    return Manifest.decode(data, f"{name}:{tag}")


async def list_manifests(store: Store, name: str | None = None) -> list[Manifest]:
    """Every manifest in the store, or only the tags of ``name``."""
    keys = await store.list("manifests/" if name is None else manifest_key(name, ""))
    blobs = await asyncio.gather(*(store.get(k) for k in keys))
    return [Manifest.decode(b, ref_from_key(k)) for k, b in zip(keys, blobs)]


async def load_image(store: Store, manifest: Manifest) -> tuple[Image, ChunkMap]:
    """Fetch the image metadata and its chunk map together (two GETs in flight)."""
    digest = manifest.image
    try:
        blob, cmap = await asyncio.gather(store.get(image_key(digest)), store.get(chunkmap_key(digest)))
    except ObjectNotFoundError as err:
        raise NotFoundError(f"image {manifest.ref}: {err}") from None
    image = Image.from_blob(blob, digest)
    return image, ChunkMap(cmap, digest, image.nchunks)


async def load_for_mount(store: Store, manifest: Manifest) -> tuple[Image, ChunkMap, list[int]]:
    """Image, chunk map and start-up trace (empty if none was pushed): three GETs in
    flight together, so a trace costs a mount no extra round trip.  A trace that
    cannot be used is logged and ignored: it only ever makes a start faster."""

    async def trace_blob() -> bytes | None:
        try:
            return await store.get(trace_key(manifest.image))
        except ObjectNotFoundError:
            return None
        except StoreError as err:  # a trace only makes a start faster: never a failed mount
            log.warning("image %s: ignoring its trace: %s", manifest.ref, err)
            return None

    (image, chunkmap), blob = await asyncio.gather(load_image(store, manifest), trace_blob())
    trace: list[int] = []
    if blob is not None:
        try:
            trace = decode_trace(blob, manifest.image, image.nchunks)
        except (CorruptDataError, FormatVersionError) as err:
            log.warning("image %s: ignoring its trace: %s", manifest.ref, err)
    return image, chunkmap, trace


class MetadataCache:
    """Manifests, image metadata, chunk maps and traces a mount fetched, one file each
    in ``CACHE_DIR/metadata/`` (0600 in 0700: they describe every file of the image).

    A file is the SHA-256 of its content, then the content, so a torn or damaged
    file is found when read back (and dropped, and the store asked).  Named by a
    hash of the store URL and the key: two stores never share an entry.  Used only
    when the store is unreachable; the store's answer always wins and refreshes
    the copy (a tag moved while the store was down is seen once it is back).
    """

    def __init__(self, cache_dir: str) -> None:
        self.directory = os.path.join(cache_dir, "metadata")

    def _path(self, store_url: str, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(f"{store_url}\0{key}".encode()).hexdigest())

    def put(self, store_url: str, key: str, blob: bytes) -> None:
        path = self._path(store_url, key)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(blob).digest() + blob)
            os.rename(tmp, path)
        except OSError as err:  # a full or read-only disk: the mount goes on without the copy
            log.warning("cannot keep %s in the metadata cache %s: %s", key, self.directory, err)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def get(self, store_url: str, key: str) -> bytes | None:
        path = self._path(store_url, key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        digest, blob = raw[:32], raw[32:]
        if len(digest) < 32 or hashlib.sha256(blob).digest() != digest:
            log.warning("metadata cache: %s of %s is damaged; dropped", key, store_url)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return blob


class CachingReader:
    """The ``get`` of a store, kept in a :class:`MetadataCache` and answered from it when
    the store is unreachable (``offline`` says whether that happened)."""

    def __init__(self, store: Store, cache: MetadataCache) -> None:
        self.store = store
        self.cache = cache
        self.url = store.url
        self.offline = False

    async def get(self, key: str) -> bytes:
        try:
            blob = await self.store.get(key)
        except StoreUnavailableError:
            cached = self.cache.get(self.url, key)
            if cached is None:
                if key.startswith("traces/"):
                    # A trace only ever makes a start faster: none kept is none pushed.
                    raise ObjectNotFoundError(self.url, key) from None
                raise
            self.offline = True
            return cached
        self.cache.put(self.url, key, blob)
        return blob


async def load_cached(store: Store, cache_dir: str, ref: str | Manifest) -> tuple[
        Manifest, Image, ChunkMap, list[int], bool]:
    """Manifest (unless given), image, chunk map and trace for a mount, through a
    :class:`CachingReader`; the last item says whether the store was unreachable and
    the cached copies were used."""
    reader = CachingReader(store, MetadataCache(cache_dir))
    manifest = ref if isinstance(ref, Manifest) else await load_manifest(reader, ref)  # type: ignore[arg-type]
    image, chunkmap, trace = await load_for_mount(reader, manifest)  # type: ignore[arg-type]
    return manifest, image, chunkmap, trace, reader.offline
