"""Reading what a store holds: manifests, and an image with its chunk map."""

from __future__ import annotations

import asyncio
import logging

from cubefs.errors import CorruptDataError, FormatVersionError, NotFoundError, ObjectNotFoundError
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

    (image, chunkmap), blob = await asyncio.gather(load_image(store, manifest), trace_blob())
    trace: list[int] = []
    if blob is not None:
        try:
            trace = decode_trace(blob, manifest.image, image.nchunks)
        except (CorruptDataError, FormatVersionError) as err:
            log.warning("image %s: ignoring its trace: %s", manifest.ref, err)
    return image, chunkmap, trace
