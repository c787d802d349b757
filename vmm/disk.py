"""A VM's disk: a block volume with an empty ext4 on it, cloned in O(1) from one made per size.

The guest's root on a disk is an overlay (vmm/guest/system.py): the image over
virtio-fs as its lower layer, read-only, and an ext4 on ``/dev/vda`` holding the
upper and work directories, so the image still loads lazily from the node's
cache while what the guest writes goes to a block device whose metadata the
guest keeps in its own memory (docs/design.md, "A VM's disk").

**Formatted once per size, cloned per VM.**  ``mkfs.ext4`` runs on the host,
into a sparse file (lazy inode tables and journal: a 1 GiB disk is ~3 MiB of
non-zero bytes, written in well under a second), whose non-zero extents are
written into a block volume ``cubefs-ext4-SIZE`` in this process (the volume's
lock held, so no daemon can serve it meanwhile), snapshotted as ``empty``.  A
VM's disk is then a clone of that snapshot: one index transaction, whatever
the size, where mkfs in each guest would cost seconds of TCG time and write the
same megabytes into every VM's volume.  The guest mounts it with
``noinit_itable``: the tables mkfs left out read as zeros, so there is nothing
to zero in the background.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from cubefs.errors import CubefsError, NotFoundError, UsageError

if TYPE_CHECKING:
    from cubefs.cow.index import BaseImage, VolumeIndex

SNAPSHOT = "empty"
MIN_SIZE = 64 << 20  # ext4 with a journal and room for an overlay's work: below this, a guest fills it at once


def template_name(size: int) -> str:
    return f"cubefs-ext4-{size}"


def check_size(size: int) -> int:
    if size < MIN_SIZE or size % 4096:
        raise UsageError(f"--disk must be at least 64M and a multiple of 4 KiB, not {size} bytes")
    return size


def clone_formatted(index: VolumeIndex, name: str, size: int, lower: BaseImage | None = None) -> None:
    """A new block volume ``name`` of ``size`` bytes holding an empty ext4: a clone of the
    formatted volume for that size, made first if this node has none yet.  ``lower``: the
    image the guest's overlay will have under the disk, recorded on the volume (and so on
    its snapshots and clones) for ``cubefs commit`` to merge the disk with."""
    from cubefs.volume.blk import set_lower

    check_size(size)
    tpl = template_name(size)
    with _lock(index):
        if not _has_snapshot(index, tpl):
            _format(index, tpl, size)
    index.clone(tpl, SNAPSHOT, [name])
    if lower is not None:
        set_lower(index, name, lower)


def _has_snapshot(index: VolumeIndex, volume: str) -> bool:
    with index.read() as txn:
        try:
            index.get_snapshot(txn, volume, SNAPSHOT)
            return True
        except NotFoundError:
            return False


@contextmanager
def _lock(index: VolumeIndex) -> Iterator[None]:
    """Two VMs starting at once format the size once."""
    os.makedirs(os.path.join(index.directory, "locks"), exist_ok=True)
    path = os.path.join(index.directory, "locks", "cubefs-ext4.formatting")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _format(index: VolumeIndex, volume: str, size: int) -> None:
    from cubefs.volume.blk import import_disk

    if shutil.which("mkfs.ext4") is None:
        raise CubefsError("mkfs.ext4 is not installed on the host (Debian: apt-get install e2fsprogs): a VM's disk "
                          "is formatted there once per size")
    with tempfile.TemporaryDirectory(prefix="cubefs-ext4-", dir=index.directory) as tmp:
        img = os.path.join(tmp, "disk.img")
        with open(img, "wb") as f:
            f.truncate(size)
        res = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "cubefs-disk", "-m", "0",
                              "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", img],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise CubefsError(f"mkfs.ext4 of a {size}-byte disk failed: {res.stderr.strip()}")
        with index.read() as txn:
            try:
                index.volume(txn, volume)
                exists = True
            except NotFoundError:
                exists = False
        if exists:  # a format that died before its snapshot: start it again
            index.remove_volume(volume)
        import_disk(index, volume, img)
    index.snapshot(volume, SNAPSHOT)
    index.sync()

