"""``cubefs commit``: a volume's state (or a snapshot's) pushed to a store as a new image.

The state committed is a snapshot, so it is one point in time even while the
volume is being written: ``VOLUME`` alone takes one first (it stays, named
``commit-<time>``).  The snapshot is mounted read-only in a private
directory and built like any directory, with one difference that makes a
commit cost what changed rather than what the image holds: a file the volume
never touched (no block or truncation in any of the snapshot's layers, the
base image's size) is not read at all; its chunk list is the base image's,
whose chunks the store has.  Only chunks the store lacks are uploaded.

A VM's disk (a block volume with the image under its overlay recorded:
cubefs/volume/blk.py, ``set_lower``) is committed as that image with the
overlay's upper directory laid over it, read from the disk in user space
(cubefs/volume/diskread.py); the image's files the guest never touched are
not read either.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from cubefs.cow.index import BaseImage, VolumeIndex
from cubefs.dedup.builder import BuildResult, build
from cubefs.dedup.ingest import Ingest
from cubefs.dedup.sources import Tick, scan_directory
from cubefs.dedup.tree import Node
from cubefs.format.image import F_SIZE, Image
from cubefs.format.manifest import Manifest
from cubefs.format.packs import ChunkLocation
from cubefs.image.catalog import load_image
from cubefs.node.private_mount import private_mount
from cubefs.remote import store_session
from cubefs.volume.flush import flush_mounted


@dataclass
class CommitResult:
    build: BuildResult
    volume: str
    snapshot: str
    files_reused: int


def commit(index: VolumeIndex, volume: str, snapshot: str | None, ref: str, store_url: str | None,
           s3_endpoint: str | None, cache_dir: str, tick: Tick | None = None) -> CommitResult:
    with index.read() as txn:
        vol = index.volume(txn, volume)
        if snapshot is not None:
            index.get_snapshot(txn, volume, snapshot)
    if snapshot is None:
        flush_mounted(index, volume)  # see cubefs/volume/flush.py
        snapshot = index.snapshot(volume, time.strftime("commit-%Y%m%dT%H%M%S", time.gmtime())).name
    with index.read() as txn:
        chain = index.chain(txn, index.get_snapshot(txn, volume, snapshot).layer)
    from cubefs.volume.blk import lower_of

    lower = lower_of(index, volume, snapshot)  # checked to be a block volume's, before its store is read
    if lower is not None:
        return _commit_disk(index, volume, snapshot, lower, ref, store_url, s3_endpoint, cache_dir, tick)
    base = vol.base
    store_url = store_url or (base.store if base else None)
    s3_endpoint = s3_endpoint or (base.s3_endpoint if base else None)
    image = _base_image(base.store, base.s3_endpoint, base.ref, base.digest) if base else None
    reused = [0]

    def untouched(ino: int, size: int) -> bool:
        if image is None or ino > len(image) or size != image.record(ino)[F_SIZE]:
            return False
        with index.read() as txn:
            return bool(index.bytes_untouched(txn, chain, ino))

    def scan(src: str, ingest: Ingest, progress: Tick, known: dict[bytes, ChunkLocation]) -> Node:
        def reuse(_path: bytes, st: os.stat_result) -> list[tuple[int, bytes, int]] | None:
            if image is None or not untouched(st.st_ino, st.st_size):
                return None
            offs, idxs = image.extents(st.st_ino)
            chunks = [(off, *image.chunk(idx)) for off, idx in zip(offs, idxs)]
            if not all(digest in known for _off, digest, _n in chunks):
                return None  # another store than the base's: read and upload them
            reused[0] += 1
            return chunks

        return scan_directory(src, ingest, progress, reuse=reuse)

    with private_mount(f"commit of {volume}@{snapshot}", None, "--volume", f"{volume}@{snapshot}", "--volume-dir",
                       index.directory, "--cache-dir", cache_dir, "--no-server",
                       *(["--store", base.store] if base else []),
                       *(["--s3-endpoint", base.s3_endpoint] if base and base.s3_endpoint else [])) as mnt:
        result = build(mnt, ref, store_url, s3_endpoint, tick=tick, scan=scan)
    return CommitResult(result, volume, snapshot, reused[0])


def _commit_disk(index: VolumeIndex, volume: str, snapshot: str, lower: BaseImage, ref: str,
                 store_url: str | None, s3_endpoint: str | None, cache_dir: str, tick: Tick | None) -> CommitResult:
    """The image under the disk's overlay with the upper directory on the disk laid over it."""
    import contextlib

    from cubefs.volume.diskread import UPPER, disk_tree, merged_scan

    image = _base_image(lower.store, lower.s3_endpoint, lower.ref, lower.digest)
    counts: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        root, size = stack.enter_context(disk_tree(index, volume, snapshot, cache_dir))
        upper = os.path.join(root, os.fsdecode(UPPER))
        scan = merged_scan(upper if os.path.lexists(upper) else None, image, lower, size, cache_dir, stack, counts)
        result = build(root, ref, store_url or lower.store, s3_endpoint or lower.s3_endpoint, tick=tick,
                       scan=scan)
    return CommitResult(result, volume, snapshot, counts.get("reused", 0))


def _base_image(store_url: str, s3_endpoint: str | None, ref: str, digest: str) -> Image:
    name, _, tag = ref.rpartition(":")
    with store_session(store_url, s3_endpoint) as (loop, store):
        image, _chunkmap = loop.run(load_image(store, Manifest(name, tag, digest, "")))
    return image
