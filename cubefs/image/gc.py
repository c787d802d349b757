"""Removing images and collecting what no image needs: ``cubefs rm``, ``cubefs gc``.

The hazard is a build running while we collect: it learned at its start which
chunks the store holds (from the pack indexes) and reuses them without
uploading, so a pack no manifest references *now* may be referenced by the
manifest that build writes in a minute.  So collection is two-phase, with
leases (docs/format.md, "Garbage collection"):

* every build holds a lease (``leases/<id>``: its start time) from before it
  reads the indexes until after its manifest is written;
* **phase 1** (a ``gc`` run): each pack no manifest's chunk map references has
  its index moved to ``gc/indexes/<pack>``, so builds starting from now on
  cannot reuse it; each unreferenced image's metadata is marked the same way.
  The moment is recorded in ``gc/state``;
* **phase 2** (a later ``gc`` run, once every lease older than that moment is
  gone, or older than ``stale_lease``: a crashed build): a marked pack still
  unreferenced is deleted with its moved index; one that a manifest now
  references (a build reused it) gets its index back. Same for images.

A run does phase 2 of the previous run's marks, then phase 1 of the current
garbage.  Packs some of whose chunks are live are kept whole; their dead
bytes are reported.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cubefs.errors import CorruptDataError, NotFoundError, ObjectNotFoundError
from cubefs.format.manifest import manifest_key, parse_ref
from cubefs.format.packs import ChunkMap, chunkmap_key, decode_index, image_key, index_key, pack_key
from cubefs.format.trace import trace_key
from cubefs.image.catalog import list_manifests
from cubefs.remote.base import Store

STATE_KEY = "gc/state"
STALE_LEASE = 24 * 3600.0


@dataclass
class GcReport:
    dry_run: bool = False
    images_live: int = 0
    packs_live: int = 0
    packs_marked: list[str] = field(default_factory=list)
    packs_deleted: int = 0
    packs_restored: int = 0
    images_marked: list[str] = field(default_factory=list)
    images_deleted: int = 0
    bytes_freed: int = 0
    bytes_marked: int = 0
    dead_bytes_in_live_packs: int = 0
    waiting_for_leases: int = 0
    images_kept_for_builds: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["packs_marked"] = len(self.packs_marked)
        d["images_marked"] = len(self.images_marked)
        return d


class Lease:
    """A build's claim that chunks it learned of at its start may still be referenced."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.key = f"leases/{uuid.uuid4().hex}"

    async def take(self) -> None:
        await self.store.put(self.key, json.dumps({"started": time.time()}).encode())

    async def release(self) -> None:
        try:
            await self.store.delete(self.key)
        except ObjectNotFoundError:
            pass


async def remove_image(store: Store, ref: str) -> str:
    name, tag = parse_ref(ref)
    key = manifest_key(name, tag)
    if not await store.exists(key):
        raise NotFoundError(f"image {name}:{tag} not found in store {store.url}")
    await store.delete(key)
    return f"{name}:{tag}"


async def _live(store: Store) -> tuple[set[str], dict[str, set[tuple[int, int]]]]:
    """Images the manifests name, the (offset, length) of every chunk they use per pack."""
    manifests = await list_manifests(store)
    images = {m.image for m in manifests}
    used: dict[str, set[tuple[int, int]]] = {}
    sem = asyncio.Semaphore(16)

    async def one(digest: str) -> None:
        async with sem:
            blob = await store.get(chunkmap_key(digest))
        cmap = ChunkMap(blob, digest, None)
        for pack, off, slen in cmap.places():
            used.setdefault(pack, set()).add((off, slen))

    await asyncio.gather(*(one(d) for d in images))
    return images, used


async def _leases(store: Store) -> list[float]:
    out = []
    for key in await store.list("leases/"):
        try:
            out.append(float(json.loads(await store.get(key))["started"]))
        except (ObjectNotFoundError, ValueError, KeyError, TypeError):
            continue
    return out


async def _move(store: Store, src: str, dst: str) -> None:
    await store.put(dst, await store.get(src))
    await store.delete(src)


async def collect(store: Store, dry_run: bool = False, stale_lease: float = STALE_LEASE) -> GcReport:
    report = GcReport(dry_run=dry_run)
    images, used = await _live(store)
    report.images_live = len(images)
    report.packs_live = len(used)
    now = time.time()
    try:
        batches = json.loads(await store.get(STATE_KEY))["batches"]
    except ObjectNotFoundError:
        batches = []
    # Phase 2: each earlier run's marks, once no build that could have reused them runs.
    # Batches keep their own time, so builds that started later never hold back older marks.
    leases = await _leases(store)
    kept = []
    for batch in batches:
        blocking = [t for t in leases if t <= batch["marked_at"] and now - t < stale_lease]
        if blocking:
            report.waiting_for_leases = max(report.waiting_for_leases, len(blocking))
            kept.append(batch)
        else:
            await _sweep(store, batch, images, used, report, dry_run)
    state = {"packs": [p for b in kept for p in b["packs"]], "images": [d for b in kept for d in b["images"]]}
    # Phase 1: what is garbage now (and not already marked).  Moving an index (an
    # image's metadata) out of sight is what stops new builds from reusing it.
    marked = set(state["packs"])
    for key in await store.list("indexes/"):
        pack = key.split("/", 1)[1]
        if pack in used or pack in marked:
            continue
        try:
            entries = decode_index(await store.get(key), key)
        except (CorruptDataError, ObjectNotFoundError):
            entries = []
        report.packs_marked.append(pack)
        report.bytes_marked += sum(e.stored_len for e in entries)
        if not dry_run:
            await _move(store, key, f"gc/{key}")
    for key in await store.list("images/"):
        digest = key.split("/", 1)[1]
        if digest not in images and digest not in state["images"]:
            report.images_marked.append(digest)
    for pack, spans in used.items():
        try:
            entries = decode_index(await store.get(index_key(pack)), index_key(pack))
        except (CorruptDataError, ObjectNotFoundError):
            continue
        report.dead_bytes_in_live_packs += sum(e.stored_len for e in entries if (e.offset, e.stored_len) not in spans)
    if not dry_run and (len(kept) != len(batches) or report.packs_marked or report.images_marked):
        if report.packs_marked or report.images_marked:
            kept.append({"marked_at": now, "packs": report.packs_marked, "images": report.images_marked})
        await store.put(STATE_KEY, json.dumps({"batches": kept}).encode())
    return report


async def _sweep(store: Store, batch: dict[str, Any], images: set[str], used: dict[str, Any], report: GcReport,
                 dry_run: bool) -> None:
    for pack in batch["packs"]:
        moved = f"gc/{index_key(pack)}"
        if pack in used:  # a build that was running reused it: it lives
            report.packs_restored += 1
            if not dry_run:
                await _move(store, moved, index_key(pack))
            continue
        try:
            size = sum(e.stored_len for e in decode_index(await store.get(moved), moved))
        except (CorruptDataError, ObjectNotFoundError):
            size = 0
        report.packs_deleted += 1
        report.bytes_freed += size
        if not dry_run:
            for key in (pack_key(pack), moved):
                await _delete(store, key)
    # Image metadata is not hidden in phase 1 (a build that already uploaded its image and
    # not yet its manifest would be left pointing at nothing), so it goes only while no
    # build at all runs: one starting now finds it present or uploads it again.
    if await store.list("leases/"):
        report.images_kept_for_builds = len([d for d in batch["images"] if d not in images])
        return
    for digest in batch["images"]:
        if digest in images:
            continue
        report.images_deleted += 1
        if not dry_run:
            for key in (image_key(digest), chunkmap_key(digest), trace_key(digest)):
                await _delete(store, key)


async def _delete(store: Store, key: str) -> None:
    try:
        await store.delete(key)
    except ObjectNotFoundError:
        pass
