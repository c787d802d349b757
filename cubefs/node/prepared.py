"""What a spare daemon (:mod:`cubefs.node.spare`) made ahead of its request, as the mount
takes it over: its own module so that the mount (:mod:`cubefs.node.mount`) can take it
without importing the spare's side, which imports the mount."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cubefs.cache.disk import DiskCache
    from cubefs.format.image import Image
    from cubefs.format.manifest import Manifest
    from cubefs.format.packs import ChunkMap
    from cubefs.remote import RetryingStore
    from cubefs.remote.loop import LoopThread

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a spare made before its request: store session, disk cache, the image's metadata."""

    loop: LoopThread
    store: RetryingStore
    disk: DiskCache | None
    kept: tuple[Manifest, Image, ChunkMap] | None
    lowered: Any = None  # the priority to restore once a request comes (spare._lower_priority)
    warm: Iterator[None] | None = None  # the warm-up's steps, taken while no request came (spare.warm_up)

    def take_disk(self) -> DiskCache | None:
        disk, self.disk = self.disk, None
        return disk

    async def load(self, cache_dir: str, wanted: str | Manifest, local: list[str]) -> tuple[
            Manifest, Image, ChunkMap, list[int], bool]:
        """As :func:`cubefs.image.catalog.load_cached`, with the kept image used when the
        manifest still names it (the store is asked for the manifest first, every time)."""
        from cubefs.format.packs import chunkmap_key, image_key
        from cubefs.image.catalog import CachingReader, MetadataCache, kept_keys, load_cached, load_manifest
        from cubefs.remote.base import StoreStats

        kept, self.kept = self.kept, None  # a spare serves one mount
        self.store.stats = StoreStats()  # what the mount asks of the store, not what preparing it did
        reader = CachingReader(self.store, MetadataCache(cache_dir))
        early = None
        if kept is not None:
            # The kept image's trace (the node's copy: a cold file read after the node's caches
            # were dropped) read while the store is asked for the manifest, not after it; used
            # only if the manifest still names that image.
            reader.local_first = kept_keys(kept[0].image)
            early = asyncio.ensure_future(_trace(reader, kept[0], kept[1].nchunks))
        try:
            manifest = wanted if not isinstance(wanted, str) else await load_manifest(reader, wanted)  # type: ignore[arg-type]
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if kept is None or kept[0].image != manifest.image:
            if early is not None:
                early.cancel()
            if kept is not None:
                log.info("image %s: the tag now names sha256:%s, not the kept sha256:%s; loading it",
                         manifest.ref, manifest.image[:12], kept[0].image[:12])
            got = await load_cached(self.store, cache_dir, manifest, local)
            return (*got[:4], got[4] or reader.offline)
        _m, image, chunkmap = kept
        assert early is not None
        trace = await early
        local.extend([image_key(image.digest), chunkmap_key(image.digest), *reader.local])
        return manifest, image, chunkmap, trace, reader.offline


async def _trace(reader: Any, manifest: Manifest, nchunks: int) -> list[int]:
    """The image's trace as :func:`cubefs.image.catalog.load_for_mount` takes it: a trace
    that cannot be had or used is none (it only ever orders prefetching)."""
    from cubefs.errors import CorruptDataError, FormatVersionError, ObjectNotFoundError, StoreError
    from cubefs.format.trace import decode_trace, trace_key

    try:
        blob = await reader.get(trace_key(manifest.image))
        return decode_trace(blob, manifest.image, nchunks)
    except ObjectNotFoundError:
        return []
    except (StoreError, CorruptDataError, FormatVersionError) as err:
        log.warning("image %s: ignoring its trace: %s", manifest.ref, err)
        return []
