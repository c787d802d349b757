"""Keeping a volume directory bounded: flattening long layer chains, collecting garbage.

**Flatten.** Every snapshot adds a layer, and a lookup may walk them all, so a
volume snapshotted at every step of an agent would read slower and slower.
When the active layer sits on more than ``MAX_DEPTH`` frozen layers, they are
merged into one new frozen layer holding exactly what they show together,
and the active layer is re-parented onto it: the chain is two layers deep
again.  The old layers are untouched (snapshots still name them), so this
changes nothing anyone can see; it costs one pass over the merged layers'
records, off any request's path, and is skipped if a snapshot moved the
active layer meanwhile (the next pass tries again).

**Collect.** A layer nothing reaches (no volume's chain, no snapshot's) is
deleted with its records.  A data file none of whose blocks any remaining
record points at is deleted, unless a process still appends to it (writers
hold a shared ``flock`` on their current file).  Bytes of dead blocks inside
files that are still partly live are counted, not yet reclaimed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass

import lmdb
import msgpack

from cubefs.cow.index import LAYER_INO, LAYER_INO_BLOCK, U64, Inode, VolumeIndex, prefixed

log = logging.getLogger(__name__)

MAX_DEPTH = 16


@dataclass
class GcStats:
    layers_deleted: int = 0
    records_deleted: int = 0
    files_deleted: int = 0
    bytes_freed: int = 0
    dead_bytes_left: int = 0  # in files still partly live
    live_bytes: int = 0
    chains_flattened: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def flatten(index: VolumeIndex, volume: str, max_depth: int = MAX_DEPTH) -> bool:
    """Merge the frozen layers under ``volume``'s active one if there are more than
    ``max_depth``; True if it did."""
    with index.read() as txn:
        vol = index.volume(txn, volume)
        chain = index.chain(txn, vol.layer)
        if len(chain) - 1 <= max_depth:
            return False
        merged = _merge(index, txn, chain[1:])
    t0 = time.perf_counter()
    with index.write() as txn:
        now = index.volume(txn, volume)
        info = index.layer_info(txn, now.layer)
        if now.layer != vol.layer or info["parent"] != chain[1]:
            return False  # a snapshot or rollback moved the head: next time
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


def collect(index: VolumeIndex, max_depth: int = MAX_DEPTH) -> GcStats:
    stats = GcStats()
    for vol in index.volumes():
        stats.chains_flattened += flatten(index, vol.name, max_depth)
    with index.write() as txn:
        live: set[int] = set()
        for _k, raw in txn.cursor(db=index.db["volumes"]):
            live.update(index.chain(txn, msgpack.unpackb(raw)["layer"]))
        for _k, raw in txn.cursor(db=index.db["snapshots"]):
            live.update(index.chain(txn, msgpack.unpackb(raw)["layer"]))
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
        used: dict[int, int] = {}
        for key, raw in txn.cursor(db=index.db["blocks"]):
            if raw and U64.unpack(key[:8])[0] in live:
                file_id = int.from_bytes(raw[:4], "little")
                used[file_id] = used.get(file_id, 0) + 1
        block_size = {v.block_size for v in index.volumes()} or {65536}
        bs = max(block_size)
        data_dir = os.path.join(index.directory, "data")
        # Delete while holding the write transaction: no writer can point a new record
        # at a file between our count and the unlink.
        for name in sorted(os.listdir(data_dir)):
            path = os.path.join(data_dir, name)
            try:
                file_id = int(name.split(".")[0], 16)
                size = os.path.getsize(path)
            except (ValueError, OSError):
                continue
            if file_id in used:
                stats.live_bytes += used[file_id] * bs
                stats.dead_bytes_left += max(0, size - used[file_id] * bs)
            elif _unused(path):
                os.unlink(path)
                stats.files_deleted += 1
                stats.bytes_freed += size
    return stats


def _unused(path: str) -> bool:
    """True if no process appends to the file (writers hold a shared lock on it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
