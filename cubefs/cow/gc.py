"""Keeping a volume directory bounded: flattening long layer chains, collecting garbage.

**Flatten.** Every snapshot adds a layer, and a lookup may walk them all, so a
volume snapshotted at every step of an agent would read slower and slower.
When the active layer sits on more than ``MAX_DEPTH`` frozen layers, they are
merged into one new frozen layer holding exactly what they show together,
and the active layer is re-parented onto it: the chain is two layers deep
again.  The old layers are untouched (snapshots still name them), so this
changes nothing anyone can see; it costs one pass over the merged layers'
records, off any request's path, and is skipped if a snapshot moved the
active layer, or anything repointed records (the index generation),
meanwhile (the next pass tries again).

**Collect.** A layer nothing reaches (no volume's chain, no snapshot's) is
deleted with its records.  A frozen layer no snapshot names and only one
layer sits on (what a ``snapshot rm`` leaves, or a flatten's merged layer)
is seen only through that child, so its block records the child hides
(the child has the block, truncated it, or deleted the inode) are dropped
(*prune*): data deleted after a snapshot comes back once the snapshot is
removed.  Then, over data files no process appends to (cow/compact.py): a
file no record points at is deleted, dead ranges of the others are punched
out, and those at least ``COMPACT_AT`` dead are compacted.  Every step is
made durable in the index before the bytes it declared dead are freed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgpack

from cubefs.cow.compact import Refs, Stale, allocated, compact_file, idle_files, punch_dead, scan
from cubefs.cow.index import BLOCK_SIZE, LAYER_INO, LAYER_INO_BLOCK, U64, Inode, VolumeIndex, prefixed

log = logging.getLogger(__name__)

MAX_DEPTH = 16
COMPACT_AT = 0.5  # dead fraction from which a data file is compacted


@dataclass
class GcStats:
    layers_deleted: int = 0
    records_deleted: int = 0
    files_deleted: int = 0
    bytes_freed: int = 0  # by deleting files no record points at
    dead_bytes_left: int = 0  # on disk beyond the live blocks (files being appended to, holes not punched)
    live_bytes: int = 0
    chains_flattened: int = 0
    blocks_pruned: int = 0
    bytes_punched: int = 0
    files_compacted: int = 0
    bytes_copied: int = 0
    compaction_errors: int = 0
    bytes_reclaimed: int = 0  # what the data files occupy less on disk than before
    files: dict[int, int] = field(default_factory=dict)  # live bytes per data file (not reported)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "files"}


def flatten(index: VolumeIndex, volume: str, max_depth: int = MAX_DEPTH) -> bool:
    """Merge the frozen layers under ``volume``'s active one if there are more than
    ``max_depth``; True if it did."""
    with index.read() as txn:
        vol = index.volume(txn, volume)
        chain = index.chain(txn, vol.layer)
        if len(chain) - 1 <= max_depth:
            return False
        gen = index.generation(txn)
        merged = _merge(index, txn, chain[1:])
    t0 = time.perf_counter()
    with index.write() as txn:
        now = index.volume(txn, volume)
        info = index.layer_info(txn, now.layer)
        if now.layer != vol.layer or info["parent"] != chain[1] or index.generation(txn) != gen:
            return False  # a snapshot, rollback or compaction changed what we read: next time
        index.bump_generation(txn)
        layer = index._next(txn, b"next_layer")
        index._set_layer(txn, layer, {"parent": 0, "frozen": True, "created_ns": time.time_ns(),
                                      "flattened": list(chain[1:])})
        inodes, dirents, blocks = merged
        for ino, raw in inodes.items():
            txn.put(LAYER_INO.pack(layer, ino), raw, db=index.db["inodes"])
        for key, child in dirents.items():
            txn.put(U64.pack(layer) + key, child, db=index.db["dirents"])
        for (ino, block), loc in blocks.items():
            txn.put(LAYER_INO_BLOCK.pack(layer, ino, block), loc, db=index.db["blocks"])
        info["parent"] = layer
        index._set_layer(txn, now.layer, info)
    log.info("volume %s: flattened %d layers into layer %d (%d inodes, %d entries, %d blocks) in %.1f ms",
             volume, len(chain) - 1, layer, len(inodes), len(dirents), len(blocks), (time.perf_counter() - t0) * 1e3)
    return True


def _merge(index: VolumeIndex, txn: lmdb.Transaction, layers: tuple[int, ...]) -> tuple[
        dict[int, bytes], dict[bytes, bytes], dict[tuple[int, int], bytes]]:
    """What ``layers`` (top first) show together, as one layer's records."""
    inodes: dict[int, bytes] = {}
    cuts: dict[int, int] = {}  # lowest cut seen so far, from the top: applies to the layers below
    dirents: dict[bytes, bytes] = {}
    blocks: dict[tuple[int, int], bytes] = {}
    for layer in layers:
        prefix = U64.pack(layer)
        for key, raw in prefixed(txn, index.db["blocks"], prefix):
            _layer, ino, block = LAYER_INO_BLOCK.unpack(key)
            if (ino, block) not in blocks and block < cuts.get(ino, 1 << 63):
                blocks[(ino, block)] = raw
        for key, child in prefixed(txn, index.db["dirents"], prefix):
            dirents.setdefault(key[8:], child)
        for key, raw in prefixed(txn, index.db["inodes"], prefix):
            ino = LAYER_INO.unpack(key)[1]
            cut = Inode.decode(raw).cut
            if ino not in inodes:
                inodes[ino] = raw
            if cut >= 0:
                cuts[ino] = min(cuts.get(ino, cut), cut)
    for ino, cut in cuts.items():  # the image's bytes are gone from the lowest cut on
        inode = Inode.decode(inodes[ino])
        inode.cut = cut
        inodes[ino] = inode.encode()
    return inodes, dirents, blocks


def collect(index: VolumeIndex, max_depth: int = MAX_DEPTH, compact_at: float = COMPACT_AT,
            rate: float = 0.0) -> GcStats:
    """One collection; safe while volumes are mounted.  ``rate``: at most so many bytes
    copied per second (0: no bound)."""
    stats = GcStats()
    data_dir = os.path.join(index.directory, "data")
    before = _du(data_dir)
    for vol in index.volumes():
        stats.chains_flattened += flatten(index, vol.name, max_depth)
    with index.write() as txn:
        live = _reachable(index, txn)
        dead = [U64.unpack(k)[0] for k in txn.cursor(db=index.db["layers"]).iternext(values=False)
                if U64.unpack(k)[0] not in live]
        for layer in dead:
            prefix = U64.pack(layer)
            for db in ("inodes", "dirents", "blocks"):
                for key, _v in list(prefixed(txn, index.db[db], prefix)):
                    txn.delete(key, db=index.db[db])
                    stats.records_deleted += 1
            txn.delete(prefix, db=index.db["layers"])
        stats.layers_deleted = len(dead)
        stats.blocks_pruned = prune(index, txn, live)
        if dead or stats.blocks_pruned:
            index.bump_generation(txn)
    bs = max({v.block_size for v in index.volumes()} or {BLOCK_SIZE})
    with index.write() as txn:
        # Under the write lock no file starts being appended to, and no record changes:
        # the view that says a file or block is dead is made durable before anything goes.
        index.sync()
        idle = idle_files(index)
        used, refs = scan(index, txn, set(idle))
        gen = index.generation(txn)
        for fid, fd in list(idle.items()):
            if used.get(fid):
                continue
            stats.bytes_freed += allocated(fd)
            os.unlink(index.data_path(fid))
            os.close(idle.pop(fid))
            stats.files_deleted += 1
    try:
        _reclaim(index, stats, idle, refs, bs, gen, compact_at, _pacer(rate))
    finally:
        for fd in idle.values():
            os.close(fd)
    stats.live_bytes = sum(used.values()) * bs
    stats.bytes_reclaimed = max(0, before - _du(data_dir))
    stats.dead_bytes_left = max(0, _du(data_dir) - stats.live_bytes)
    stats.files = {fid: n * bs for fid, n in used.items()}
    return stats


def _reclaim(index: VolumeIndex, stats: GcStats, idle: dict[int, int], refs: dict[int, Refs], bs: int, gen: int,
             compact_at: float, pace: Callable[[int], None]) -> None:
    """Punch the dead ranges of the idle partly-live files, then compact the deadest first."""
    for fid, fd in idle.items():
        stats.bytes_punched += punch_dead(fd, refs[fid], bs)
    victims = sorted((len(refs[f]), f) for f in idle
                     if len(refs[f]) * bs <= (1 - compact_at) * os.fstat(idle[f]).st_size)
    for _n, fid in victims:
        try:
            copied, gen = compact_file(index, fid, idle[fid], refs[fid], bs, gen, pace)
        except Stale:
            log.info("compaction of data file %08x deferred: the index changed meanwhile", fid)
            return
        except OSError as err:
            stats.compaction_errors += 1
            log.warning("compaction of data file %08x stopped: %s", fid, err.strerror or err)
            return
        stats.files_compacted += 1
        stats.bytes_copied += copied


def _pacer(rate: float) -> Callable[[int], None]:
    """Sleeps so that the bytes reported stay under ``rate`` per second."""
    start = time.monotonic()
    done = 0

    def pace(n: int) -> None:
        nonlocal done
        done += n
        if rate > 0:
            ahead = done / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)

    return pace


def _du(data_dir: str) -> int:
    total = 0
    for name in os.listdir(data_dir):
        try:
            total += os.lstat(os.path.join(data_dir, name)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def _reachable(index: VolumeIndex, txn: lmdb.Transaction) -> set[int]:
    live: set[int] = set()
    for db in ("volumes", "snapshots"):
        for _k, raw in txn.cursor(db=index.db[db]):
            live.update(_chain(index, txn, msgpack.unpackb(raw)["layer"]))
    return live


def _chain(index: VolumeIndex, txn: lmdb.Transaction, top: int) -> list[int]:
    """Walked afresh, not from the cache: a prune or flatten may have re-parented a middle layer."""
    out = []
    while top:
        out.append(top)
        top = index.layer_info(txn, top)["parent"]
    return out


def prune(index: VolumeIndex, txn: lmdb.Transaction, live: set[int] | None = None) -> int:
    """Drop the block records of frozen, unnamed layers that their only child hides; how many."""
    live = _reachable(index, txn) if live is None else live
    named = {msgpack.unpackb(raw)["layer"] for db in ("volumes", "snapshots")
             for _k, raw in txn.cursor(db=index.db[db])}
    children: dict[int, list[int]] = {}
    for layer in live:
        children.setdefault(index.layer_info(txn, layer)["parent"], []).append(layer)
    dropped = 0
    for layer in sorted(live - named):
        kids = children.get(layer, [])
        if len(kids) != 1 or not index.layer_info(txn, layer).get("frozen"):
            continue
        child = kids[0]
        inodes: dict[int, Inode | None] = {}
        for key, _raw in list(prefixed(txn, index.db["blocks"], U64.pack(layer))):
            _layer, ino, block = LAYER_INO_BLOCK.unpack(key)
            if ino not in inodes:
                inodes[ino] = index.get_inode(txn, child, ino)
            above = inodes[ino]
            if (index.get_block(txn, child, ino, block) is not None
                    or (above is not None and (above.mode == 0 or 0 <= above.cut <= block))):
                txn.delete(key, db=index.db["blocks"])
                dropped += 1
    return dropped
