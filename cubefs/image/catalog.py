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
    hash of the store URL and the key: two stores never share an entry.  A
    manifest's copy is used only when the store is unreachable (the store's answer
    always wins and refreshes the copy: a tag moved while the store was down is seen
    once it is back); an image's metadata, chunk map and trace, named by its digest,
    are taken from here first (:class:`CachingReader`'s ``local_first``).
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

    def drop(self, store_url: str, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._path(store_url, key))

    def get(self, store_url: str, key: str, quiet: bool = False) -> bytes | None:
        path = self._path(store_url, key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        digest, blob = raw[:32], raw[32:]
        if len(digest) < 32 or hashlib.sha256(blob).digest() != digest:
            if not quiet:
                log.warning("metadata cache: %s of %s is damaged; dropped", key, store_url)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return blob


class CachingReader:
    """The ``get`` of a store, kept in a :class:`MetadataCache` and answered from it when
    the store is unreachable (``offline`` says whether that happened).

    ``local_first``: keys answered from the kept copy without asking the store at all
    (``local`` counts them).  Only what cannot change under its key belongs there: an
    image's metadata and chunk map are named by the image's digest (the metadata is
    checked against it, the map names its image and matches its chunk count), and a
    trace only orders prefetching (a mount refreshes it after it is live)."""

    def __init__(self, store: Store, cache: MetadataCache, local_first: frozenset[str] = frozenset()) -> None:
        self.store = store
        self.cache = cache
        self.url = store.url
        self.offline = False
        self.local_first = local_first
        self.local: list[str] = []

    async def get(self, key: str) -> bytes:
        if key in self.local_first:
            kept = self.cache.get(self.url, key)
            if kept is not None:
                self.local.append(key)
                return kept
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
        if self.cache.get(self.url, key, quiet=True) != blob:  # unchanged: no write, no rename
            self.cache.put(self.url, key, blob)
        return blob


def kept_keys(digest: str) -> frozenset[str]:
    """The objects of image ``digest`` a mount takes from the node's kept copies first."""
    return frozenset({image_key(digest), chunkmap_key(digest), trace_key(digest)})


async def load_cached(store: Store, cache_dir: str, ref: str | Manifest, local: list[str] | None = None) -> tuple[
        Manifest, Image, ChunkMap, list[int], bool]:
    """Manifest (unless given), image, chunk map and trace for a mount, through a
    :class:`CachingReader`; the last item says whether the store was unreachable and
    the cached copies were used.

    The manifest is always asked of the store (a tag moved is seen at the next mount);
    what it names by digest comes from the node's copies when it has them: a remount of
    an image on the node makes one store request before it is live, not four
    (:func:`refresh_trace` then brings the trace up to date in the background).  The
    keys taken from the copies are appended to ``local``."""
    cache = MetadataCache(cache_dir)
    reader = CachingReader(store, cache)
    manifest = ref if isinstance(ref, Manifest) else await load_manifest(reader, ref)  # type: ignore[arg-type]
    reader.local_first = kept_keys(manifest.image)
    try:
        image, chunkmap, trace = await load_for_mount(reader, manifest)  # type: ignore[arg-type]
    except CorruptDataError as err:
        if not reader.local:
            raise
        # A kept copy that passed its checksum but not the image's own checks (a copy of
        # another version's format, say): dropped, and the store asked as before.
        log.warning("image %s: the kept metadata is unusable (%s); asking the store", manifest.ref, err)
        for key in reader.local:
            cache.drop(store.url, key)
        reader = CachingReader(store, cache)
        image, chunkmap, trace = await load_for_mount(reader, manifest)  # type: ignore[arg-type]
    if local is not None:
        local.extend(reader.local)
    return manifest, image, chunkmap, trace, reader.offline


class KeepingTraces:
    """A store whose trace reads and writes also update the node's copy (a mount's trace
    publisher goes through one), so that the next mount here starts from what was
    published without asking the store for it.  Everything else goes to ``store``."""

    def __init__(self, store: Store, cache_dir: str) -> None:
        self.store = store
        self.cache = MetadataCache(cache_dir)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def _keep(self, key: str, blob: bytes) -> None:
        if key.startswith("traces/") and self.cache.get(self.store.url, key, quiet=True) != blob:
            self.cache.put(self.store.url, key, blob)

    async def get(self, key: str) -> bytes:
        blob = await self.store.get(key)
        self._keep(key, blob)
        return blob

    async def put(self, key: str, data: bytes) -> None:
        await self.store.put(key, data)
        self._keep(key, data)


async def refresh_trace(store: Store, cache_dir: str, digest: str) -> None:
    """Bring the node's copy of image ``digest``'s trace up to date (a mount took the kept
    one): for the next mount, whose prefetch it orders.  Any failure is ignored."""
    key = trace_key(digest)
    try:
        blob = await store.get(key)
    except ObjectNotFoundError:
        MetadataCache(cache_dir).drop(store.url, key)
        return
    except StoreError as err:
        log.debug("trace %s not refreshed: %s", key, err)
        return
    cache = MetadataCache(cache_dir)
    if cache.get(store.url, key, quiet=True) != blob:
        cache.put(store.url, key, blob)
