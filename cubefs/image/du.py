"""``cubefs du``: what a store's images take, together and each, against layer-level dedup.

Stored bytes are counted per distinct chunk (a chunk in two images counts
once). What an image *adds* is the stored bytes of the chunks no other image
references: what removing it would free. The layer-level figure is what a
registry stores for the same images: each distinct source layer once (images
made by ``cubefs convert`` record their layers' digests and sizes); an image
built from a directory counts as one layer of its own stored size.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from cubefs.format.packs import ChunkMap, chunkmap_key
from cubefs.image.catalog import list_manifests
from cubefs.remote.base import Store


@dataclass
class ImageUsage:
    ref: str
    logical_bytes: int
    stored_bytes: int  # its chunks, each once
    unique_bytes: int = 0  # chunks no other image uses
    layers: list[list[Any]] = field(default_factory=list)


async def disk_usage(store: Store) -> dict[str, Any]:
    manifests = await list_manifests(store)
    chunks: dict[str, dict[tuple[str, int], int]] = {}
    sem = asyncio.Semaphore(16)

    async def one(digest: str) -> None:
        if digest in chunks:
            return
        chunks[digest] = {}
        async with sem:
            cmap = ChunkMap(await store.get(chunkmap_key(digest)), digest, None)
        for pack, off, slen in cmap.places():
            chunks[digest][(pack, off)] = slen

    await asyncio.gather(*(one(m.image) for m in manifests))
    users: dict[tuple[str, int], set[str]] = {}
    for digest, locs in chunks.items():
        for loc in locs:
            users.setdefault(loc, set()).add(digest)
    sizes = {loc: slen for locs in chunks.values() for loc, slen in locs.items()}
    images = []
    layer_sizes: dict[str, int] = {}
    for m in sorted(manifests, key=lambda m: m.ref):
        locs = chunks[m.image]
        u = ImageUsage(m.ref, int(m.stats.get("logical_bytes", 0)), sum(locs.values()),
                       sum(s for loc, s in locs.items() if users[loc] == {m.image}),
                       list(m.source.get("layers") or []))
        images.append(u)
        if u.layers:
            for digest, size in u.layers:
                layer_sizes[str(digest)] = int(size)
        else:
            layer_sizes[f"image:{m.image}"] = u.stored_bytes
    logical = sum(i.logical_bytes for i in images)
    stored = sum(sizes.values())
    layered = sum(layer_sizes.values())
    return {
        "images": [i.__dict__ for i in images],
        "logical_bytes": logical,
        "stored_bytes": stored,
        "layer_dedup_bytes": layered,
        "stored_over_layer_dedup": round(stored / layered, 4) if layered else None,
        "dedup_ratio": round(logical / stored, 3) if stored else None,
    }
