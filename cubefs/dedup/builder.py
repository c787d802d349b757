"""``cubefs build``: a directory or tarball in, an image and its manifest out.

Upload order makes a build crash-safe without any locking: packs, then their
indexes, then the chunk map and image metadata, and the manifest last.  A
reader that finds a manifest therefore finds everything it points to; a build
that dies leaves only unreferenced packs behind, which a later build reuses
(they are in the indexes) and ``gc`` removes.

New chunks may be stored as deltas against the previous version of the image
(``delta``: by default the image the tag names now, else the newest tag of
the same name), so that a node moving from one version to the next fetches
little more than what changed (cubefs/dedup/delta.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from cubefs.dedup.delta import DeltaBases
from cubefs.dedup.ingest import ZSTD_LEVEL, Ingest, chunker_params
from cubefs.dedup.sources import Tick, is_tarball, scan_directory, scan_tarball
from cubefs.dedup.tree import Node, number_tree
from cubefs.errors import CorruptDataError, CubefsError, ObjectNotFoundError
from cubefs.format.image import compress_blob, encode_image
from cubefs.format.manifest import Manifest, manifest_key, parse_ref
from cubefs.format.packs import (
    ChunkLocation,
    ChunkMap,
    chunkmap_key,
    decode_index,
    encode_chunkmap,
    image_key,
    resolve_bases,
)
from cubefs.image.catalog import list_manifests, load_image, load_manifest
from cubefs.image.gc import Lease
from cubefs.image.verify import check_records
from cubefs.remote import store_session
from cubefs.remote.base import Store
from cubefs.remote.loop import LoopThread

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    ref: str
    image: str
    store: str
    files: int
    inodes: int
    logical_bytes: int
    chunk_refs: int
    unique_chunks: int
    new_chunks: int
    delta_chunks: int
    delta_base: str
    new_stored_bytes: int
    stored_bytes: int
    bytes_uploaded: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.logical_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = asdict(self)
        d["mb_per_s"] = round(self.mb_per_s, 1)
        return d


async def load_known_chunks(store: Store) -> dict[bytes, ChunkLocation]:
    """Every chunk the store already holds, from its pack indexes."""
    keys = await store.list("indexes/")
    sem = asyncio.Semaphore(32)
    known: dict[bytes, ChunkLocation] = {}

    async def one(key: str) -> None:
        async with sem:
            try:
                blob = await store.get(key)
                for loc in decode_index(blob, key):
                    known.setdefault(loc.digest, loc)
            except (CorruptDataError, ObjectNotFoundError) as err:
                log.warning("ignoring unreadable pack index: %s", err)

    await asyncio.gather(*(one(k) for k in keys))
    resolve_bases(known)
    return known


async def delta_source(store: Store, loop: LoopThread, name: str, tag: str, delta: str) -> DeltaBases | None:
    """The previous version to store new chunks against: ``delta`` is a NAME:TAG,
    ``none``, or ``auto`` (the image NAME:TAG names now, else the newest NAME:*)."""
    if delta == "none":
        return None
    if delta == "auto":
        same = await list_manifests(store, name)
        if not same:
            return None
        prev = next((m for m in same if m.tag == tag), None) or max(same, key=lambda m: m.created)
    else:
        prev = await load_manifest(store, delta)
    try:
        image, cmap = await load_image(store, prev)
    except CubefsError as err:
        if delta != "auto":
            raise
        log.warning("storing without deltas: the previous version %s is unreadable: %s", prev.ref, err)
        return None
    log.info("new chunks may be stored as deltas against %s (sha256:%s)", prev.ref, prev.image[:16])
    return DeltaBases(store, loop, image, cmap, prev.ref)


async def _check_readable(store: Store, ref: str, digest: str, chunkmap: bytes,
                          locations: list[ChunkLocation]) -> None:
    """Refuse to write an image a reader could not read back: the chunk map must
    decode as a mount decodes it, and every chunk (and delta base) must be where the
    store's pack indexes say, whole where it must be (cubefs/image/verify.py, the records
    check).  Raised before the chunk map, the metadata and the tag are written, so
    a refused build leaves only packs behind, which the next build reuses or gc
    removes."""
    try:
        ChunkMap(chunkmap, digest, len(locations))
        problems = await check_records(store, locations)
    except CorruptDataError as err:
        raise CorruptDataError(f"build of {ref} not tagged: its chunk map does not decode: {err}") from None
    if problems:
        first = problems[0]
        raise CorruptDataError(f"build of {ref} not tagged: {len(problems)} chunks cannot be read back; first: "
                               f"chunk {first.chunk}: {first.what}")


async def _put_if_changed(store: Store, key: str, data: bytes) -> int:
    try:
        if await store.get(key) == data:
            return 0
    except ObjectNotFoundError:
        pass
    await store.put(key, data)
    return len(data)


def build(
    src: str,
    ref: str,
    store_url: str | None = None,
    s3_endpoint: str | None = None,
    tick: Tick | None = None,
    workers: int = 0,
    level: int = ZSTD_LEVEL,
    scan: Callable[[str, Ingest, Tick, dict[bytes, ChunkLocation]], Node] | None = None,
    config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    delta: str = "auto",
) -> BuildResult:
    """Build ``src`` (a directory or a tarball; or whatever ``scan`` makes of it, given
    the chunks the store has) into the image ``ref``; ``delta``: see delta_source."""
    name, tag = parse_ref(ref)
    t0 = time.monotonic()
    with store_session(store_url, s3_endpoint, create=True) as (loop, store):
        # Held from before we learn which chunks exist until our manifest names the ones
        # we reuse: garbage collection leaves them alone meanwhile (cubefs/image/gc.py).
        lease = Lease(store)
        loop.run(lease.take())
        try:
            bases = loop.run(delta_source(store, loop, name, tag, delta))
            return _build(loop, store, src, name, tag, t0, tick, workers, level, scan, config, source, bases)
        finally:
            loop.run(lease.release())


def _build(loop: LoopThread, store: Store, src: str, name: str, tag: str, t0: float, tick: Tick | None,
           workers: int, level: int, scan: Any, config: dict[str, Any] | None,
           source: dict[str, Any] | None, bases: DeltaBases | None) -> BuildResult:
    known = loop.run(load_known_chunks(store))
    if bases is not None:
        bases.known = known  # a delta's base must be indexed, whole (delta.py)
    ingest = Ingest(store, loop, known, workers=workers, level=level, delta=bases)
    try:
        progress = tick or (lambda _f, _b: None)
        if scan is not None:
            root = scan(src, ingest, progress, known)
        else:
            root = (scan_tarball if is_tarball(src) else scan_directory)(src, ingest, progress)
        ingest.finish()
    except BaseException:
        ingest.abort()
        raise
    tree = number_tree(root)
    raw, digest = encode_image(tree.inodes, tree.chunks, chunker_params())
    locations = [known[d] for d, _ in tree.chunks]
    chunkmap = encode_chunkmap(digest, locations)
    loop.run(_check_readable(store, f"{name}:{tag}", digest, chunkmap, locations))
    uploaded = ingest.stats.bytes_uploaded
    uploaded += loop.run(_put_if_changed(store, chunkmap_key(digest), chunkmap))
    if not loop.run(store.exists(image_key(digest))):
        blob = compress_blob(raw)
        loop.run(store.put(image_key(digest), blob))
        uploaded += len(blob)
    stored = sum(loc.stored_len for loc in locations)
    have = {loc.digest for loc in locations}
    stored += sum(b.stored_len for b in {loc.base for loc in locations if loc.base is not None} if b.digest not in have)
    result = BuildResult(
        ref=f"{name}:{tag}",
        image=digest,
        store=store.url,
        files=tree.files,
        inodes=len(tree.inodes),
        logical_bytes=tree.logical_bytes,
        chunk_refs=ingest.stats.chunk_refs,
        unique_chunks=len(tree.chunks),
        new_chunks=ingest.stats.new_chunks,
        delta_chunks=bases.used if bases is not None else 0,
        delta_base=bases.label if bases is not None else "",
        new_stored_bytes=ingest.stats.new_stored_bytes,
        stored_bytes=stored,
        bytes_uploaded=0,
        seconds=0.0,
    )
    key = manifest_key(name, tag)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        old = Manifest.decode(loop.run(store.get(key)), result.ref)
        if old.image == digest and old.config == (config or {}):
            created = old.created
    except (ObjectNotFoundError, CorruptDataError):
        pass
    stats = {k: result.as_dict()[k] for k in ("files", "inodes", "logical_bytes", "unique_chunks", "stored_bytes")}
    manifest = Manifest(name, tag, digest, created, stats, config or {}, source or {})
    uploaded += loop.run(_put_if_changed(store, key, manifest.encode()))
    result.bytes_uploaded = uploaded
    result.seconds = time.monotonic() - t0
    return result
