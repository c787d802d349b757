"""Block volumes: a VM's disk as one file of a volume, so it snapshots, rolls back and clones in O(1).

A block volume is an empty volume (no base image) whose root directory holds
one regular file, ``disk``, inode 2, whose size is the disk's capacity
(docs/format.md, "Block volumes").  Its bytes are the file's 64 KiB blocks in
the volume's layers, so nothing new is in the index: snapshot, rollback,
clone, ``volume gc`` and compaction work on it unchanged, a host-side
``cubefs mount --volume`` shows the disk as ``/disk``, and a snapshot is a
consistent disk as long as nothing was half-written into it (the VM paused,
or its filesystem frozen).  Why a file and not a table of its own: a second
block table would need its own walk, its own collector and its own
compaction; the file's blocks already have all three, and measured per
request the file's bookkeeping (one inode record copied up per write) is a
small part of serving one (docs/benchmarks.md, "Block disk").

The vhost-user-blk back-end that serves it to QEMU is ``vmm/vhost_user_blk.py``
(``cubefs mount --volume NAME SOCKET --transport vhost-user-blk``).
"""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

from cubefs.cow.index import ROOT_INO, BaseImage, Inode, Volume, VolumeIndex
from cubefs.errors import UsageError
from cubefs.image.fs import FsError

DISK_NAME = b"disk"
DISK_INO = 2
SECTOR = 512
MAX_SIZE = 1 << 50  # 1 PiB: past any disk a VM gets here; block numbers stay far inside u64
# The image a disk root's overlay has as its lower layer (docs/format.md, "Block volumes"): an
# xattr of the volume's root directory, so snapshots and clones carry it and no record changes.
LOWER_XATTR = b"trusted.cubefs.lower"


def create_block_volume(index: VolumeIndex, name: str, size: int) -> Volume:
    """A new block volume of ``size`` bytes (a multiple of 512), all zeros: one transaction,
    nothing written (a block never written reads as zeros)."""
    if size <= 0 or size % SECTOR or size > MAX_SIZE:
        raise UsageError(f"a block volume's size must be a positive multiple of 512 bytes up to 1 PiB, not {size}")
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    root = Inode(stat.S_IFDIR | 0o755, uid, gid, now, now, now, 0, 2)
    disk = Inode(stat.S_IFREG | 0o600, uid, gid, now, now, now, size, 1)
    return index.create_volume(name, None, root, DISK_INO + 1, files=((DISK_NAME, DISK_INO, disk),))


def disk_of(fs: Any) -> tuple[int, int]:
    """(inode, size in bytes) of the disk a :class:`cubefs.volume.fs.VolumeFS` (a volume, or
    one of its snapshots) shows; UsageError if it is not a block volume."""
    try:  # the shape create_block_volume gives, which nothing but the disk's bytes changes
        only_disk = fs.base is None and [n for n, _i, _o in fs.readdir(ROOT_INO, 0)] == [DISK_NAME]
        ino = fs.lookup_ino(ROOT_INO, DISK_NAME) if only_disk else 0
        attr = fs.getattr(ino) if ino else None
    except FsError:
        attr = None
    if attr is None or ino != DISK_INO or not stat.S_ISREG(attr.mode) or attr.size % SECTOR:
        raise UsageError(f"volume {fs.name} is not a block volume (make one with 'cubefs volume create NAME "
                         "--block SIZE')")
    return ino, attr.size


def export_disk(index: VolumeIndex, volume: str, snapshot: str | None, path: str, chunk: int = 4 << 20) -> int:
    """Write the disk's bytes to ``path`` (a new file, 0600), sparse where the disk reads as
    zeros; bytes written.  A volume being served changes under the reader: export a snapshot
    of it (a mounted volume is refused)."""
    from cubefs.cow.lock import holder_of
    from cubefs.volume.fs import VolumeFS

    if snapshot is None and (holder := holder_of(index, volume)) is not None:
        raise UsageError(f"volume {volume} is being served at {holder.get('mountpoint', '?')}: snapshot it and "
                         f"export the snapshot ({volume}@SNAPSHOT)")
    fs = VolumeFS(index, volume, None, f"export of {volume}", snapshot)
    try:
        ino, size = disk_of(fs)
    except BaseException:
        fs.close()
        raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        zeros = bytes(chunk)
        for off in range(0, size, chunk):
            data = b"".join(fs.read_now(ino, off, min(chunk, size - off)) or [])
            if data != zeros[: len(data)]:
                os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    finally:
        fs.close()
    os.close(fd)
    return size


def set_lower(index: VolumeIndex, volume: str, base: BaseImage) -> None:
    """Record ``base`` as the image under the overlay whose upper layer is on this disk
    (what ``cubefs commit`` and a host-side mount merge the disk with).  Written by whoever
    makes the disk for an image (a VM's ``--disk``, a disk sandbox template), never by a guest:
    the guest sees only the disk's bytes."""
    value = json.dumps({"ref": base.ref, "digest": base.digest, "store": base.store,
                        "s3_endpoint": base.s3_endpoint}, sort_keys=True).encode()
    with index.write() as txn:
        vol = index.volume(txn, volume)
        root = _root_inode(index, txn, vol.layer)
        if root is None:
            raise UsageError(f"volume {volume} has no root directory record: not a block volume")
        root = root.copy()
        root.xattrs[LOWER_XATTR] = value
        index.put_inode(txn, vol.layer, ROOT_INO, root)


def lower_of(index: VolumeIndex, volume: str, snapshot: str | None) -> BaseImage | None:
    """The image recorded under a disk root (set_lower), as of ``snapshot``; None if none is.

    The record names a store that ``cubefs commit`` then reads with the host's credentials, so
    it is trusted only on a block volume (whose root nobody but the host writes: a guest sees
    the disk's bytes); a mount of a volume refuses ``trusted.cubefs.*`` to its users
    (cubefs/volume/fs.py, HOST_XATTRS), and a record on any other volume is refused here."""
    from cubefs.volume.fs import VolumeFS

    with index.read() as txn:
        vol = index.volume(txn, volume)
        layer = index.get_snapshot(txn, volume, snapshot).layer if snapshot else vol.layer
        root = _root_inode(index, txn, layer)
    raw = root.xattrs.get(LOWER_XATTR) if root is not None else None
    if raw is None:
        return None
    fs = VolumeFS(index, volume, None, f"the disk of {volume}", snapshot)
    try:
        if vol.base is not None:
            raise UsageError("has a base image")
        disk_of(fs)
    except UsageError:
        raise UsageError(f"volume {volume} records a disk's lower image ({LOWER_XATTR.decode()}) but is not a "
                         "block volume: the record is not the host's; refused") from None
    finally:
        fs.close()
    try:
        d = json.loads(raw)
        return BaseImage(str(d["ref"]), str(d["digest"]), str(d["store"]), d.get("s3_endpoint"))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"volume {volume}: its record of the disk's lower image is damaged "
                         f"({LOWER_XATTR.decode()})") from None


def _root_inode(index: VolumeIndex, txn: Any, layer: int) -> Inode | None:
    for at in index.chain(txn, layer):
        if (root := index.get_inode(txn, at, ROOT_INO)) is not None:
            return root
    return None


def resolve_image(ref: str, store_url: str | None, s3_endpoint: str | None) -> BaseImage:
    """The image ``ref`` names now in the store, pinned by digest: a tag moved later does not
    change what a disk's overlay was made over."""
    from cubefs.image.catalog import load_manifest
    from cubefs.remote import store_session

    with store_session(store_url, s3_endpoint) as (loop, store):
        manifest = loop.run(load_manifest(store, ref))
        url = store.url
    return BaseImage(manifest.ref, manifest.image, url, s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"))


def import_disk(index: VolumeIndex, volume: str, path: str, chunk: int = 4 << 20) -> Volume:
    """A new block volume ``volume`` holding the bytes of the file ``path`` (its size a multiple
    of 512), holes left unwritten (they read as zeros): the opposite of export_disk.  Written in
    this process with the volume's lock held, so no daemon serves it half-written."""
    from cubefs.cow.lock import VolumeLock
    from cubefs.dedup.ingest import data_regions
    from cubefs.errors import CubefsError
    from cubefs.volume.fs import VolumeFS

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        vol = create_block_volume(index, volume, size)
        lock = VolumeLock.take(index, volume, f"importing {path}")
        fs = VolumeFS(index, volume, None, f"import into {volume}")
        try:
            for off, end in data_regions(fd, size):
                for at in range(off, end, chunk):
                    data = os.pread(fd, min(chunk, end - at), at)
                    if data.count(0) != len(data) and fs.write_now(DISK_INO, at, data) != len(data):
                        raise CubefsError(f"writing {path} into volume {volume} failed at byte {at}")
            fs.fsync(DISK_INO)
        finally:
            fs.close()
            lock.release()
    finally:
        os.close(fd)
    return vol


def refuse_host_view(volume_dir: str, spec: str) -> None:
    """A host-side mount of a VM's disk (a block volume with its overlay's image recorded)
    would show only the raw ``disk`` file, which is not what its user means: say why and what
    to do instead.  Other volumes, and names that do not exist (the mount's own error), pass."""
    from cubefs.errors import NotFoundError

    volume, _, snap = spec.partition("@")
    if not os.path.exists(os.path.join(volume_dir, "index.lmdb")):
        return
    index = VolumeIndex(volume_dir)
    try:
        lower = lower_of(index, volume, snap or None)
    except NotFoundError:
        return
    finally:
        index.close()
    if lower is not None:
        raise UsageError(f"volume {volume} is a VM's disk (an ext4 under an overlay over {lower.ref}), which the "
                         f"host does not mount: 'cubefs commit {spec} --tag NAME:TAG' and mount that image to see "
                         "its files, or add --raw to see the disk as the file /disk")
