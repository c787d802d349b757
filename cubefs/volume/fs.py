"""Read-write filesystem operations on a volume: layers of changes over a lazy image.

The same operation set as :class:`cubefs.image.fs.ImageFS` (which serves the
base image's bytes) plus the writing ones, so the one FUSE server in
:mod:`cubefs.fuse.server` serves both.  Operations take inode numbers and
raise :class:`FsError`.

Concurrency invariants (one trio thread runs every operation):

* Every operation that changes something is one LMDB write transaction, and
  no transaction is ever held across an ``await`` (LMDB allows one write
  transaction per thread; a second would wait on the first forever).  So a
  snapshot taken by another process always falls between two operations.
* A write that must first read a block it does not own (a partial write of a
  block of the image or of a frozen layer) fetches it *before* its
  transaction, then re-checks ownership inside it: a snapshot in between
  only turns "owned" into "not owned", whose old bytes are then local.
* Writes, truncations and fallocate of one inode are serialized by a
  per-inode lock, so a read-modify-write never loses a concurrent write.
* The caches here (resolved inodes, directory listings, which files have no
  blocks in any layer) hold only what this process changed itself; a
  snapshot never changes what a volume shows; a rollback clears them.
  No block location is cached: a collector (cow/compact.py, in this
  daemon's background or ``cubefs volume gc``) may move blocks between two
  operations, and only ever inside a write transaction for blocks of the
  active layer, which this daemon overwrites in place only inside one.  A
  read that finds the data file gone (moved after its lookup) looks again.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb
import trio

from cubefs.cow.datafiles import BlockMoved, DataFiles
from cubefs.cow.gc import COMPACT_AT, collect, flatten
from cubefs.cow.index import Inode, VolumeIndex
from cubefs.format.image import (
    F_ATIME,
    F_CTIME,
    F_GID,
    F_MODE,
    F_MTIME,
    F_NLINK,
    F_PAYLOAD,
    F_RDEV,
    F_SIZE,
    F_UID,
    F_XATTRS,
)
from cubefs.image.fs import Attr, Buffer, FsError, ImageFS, StateError

log = logging.getLogger(__name__)

NAME_MAX = 255
# A directory entry's offset (readdir): its listing's generation above bit 32, its place below;
# the generation wraps at 31 bits (the kernel's offsets are signed 64-bit).
PLACE_MASK = (1 << 32) - 1
GENERATION_MASK = (1 << 31) - 1
GONE_LISTINGS = 64  # listings changed since they were made, kept for listings in progress
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
# setattr "valid" bits (linux/fuse.h FATTR_*)
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
SET_ATIME_NOW, SET_MTIME_NOW, SET_CTIME = 128, 256, 1024
SET_KILL_SUIDGID = 2048  # FATTR_KILL_SUIDGID: a truncation by a caller without CAP_FSETID
SET_FIELDS = SET_MODE | SET_UID | SET_GID | SET_ATIME | SET_MTIME | SET_ATIME_NOW | SET_MTIME_NOW | SET_CTIME
CAPABILITY = b"security.capability"
# The host's own records on an inode (cubefs/volume/blk.py: the image under a VM disk's overlay), which
# `cubefs commit` trusts: no user of a mount or guest may set, remove or see them.
HOST_XATTRS = b"trusted.cubefs."
MOVED_RETRIES = 3
COMPACT_RATE = 32 << 20  # bytes/s a mount's background compaction copies at most
ROLL_DEAD_MIN = 16 << 20  # a data file being appended to is let go for compaction from this size
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux's clock id 5 (named in Python 3.13+)
INO_RUN = 64  # inode numbers reserved in the volume's record at a time (see VolumeFS._new_ino)


def tick_ns() -> int:
    """Now by the kernel's tick clock (CLOCK_REALTIME_COARSE), which a new inode's times are
    stamped with, as ext4 stamps them.  Why: on a ``--writeback-cache`` mount the kernel
    keeps a regular file's mtime and ctime itself, and a ``write(2)`` compares them with
    its own ``current_time`` (the tick clock, at the tick's granularity, 4 ms here); a file
    stamped with the fine clock always differs, so the kernel marks the inode dirty and
    sends one more SETATTR of its times before tar's ``futimens``/``fchown``/``fchmod``
    (``write_inode_now`` -> ``fuse_flush_times``).  Stamped on the tick, a file written in
    the tick it was made in sends none: an untar of python3.11 5,902 -> ~4,540 SETATTRs
    (benchmarks.md, "Session 12").  The kernel's clock is sometimes a little ahead of the
    tick (Linux 6.13+'s multigrain floor, moved by fine-grained stamps on ext4 or tmpfs
    inodes someone just looked at): then the SETATTR comes, as before.  Only on such
    a mount: elsewhere the kernel never stamps a volume's files (``S_NOCMTIME``), and a
    stamp up to a tick early would only make a new empty file look older than one written
    just before it (what ext4 without multigrain stamps did too)."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def compact_interval() -> float:
    """Seconds between background collections (CUBEFS_COMPACT_INTERVAL, for tests)."""
    return float(os.environ.get("CUBEFS_COMPACT_INTERVAL", "60"))


class VolumeFS:
    """A mounted volume (one writer: the daemon that holds the volume's lock), or, with
    ``snapshot``, one of its snapshots, read-only (its layers never change)."""

    def __init__(self, index: VolumeIndex, volume: str, base: ImageFS | None, label: str,
                 snapshot: str | None = None) -> None:
        self.index = index
        self.name = volume
        self.writable = snapshot is None
        self._top = 0
        if snapshot is not None:
            with index.read() as txn:
                self._top = index.get_snapshot(txn, volume, snapshot).layer
        self.base = base
        self.label = label
        self.image_inodes = len(base.image) if base is not None else 0
        with index.read() as txn:
            vol = index.volume(txn, volume)
        self.block_size = vol.block_size
        self.files = DataFiles(index, self.block_size)
        self.read_errors = 0
        self.compaction = dict.fromkeys(("passes", "files_compacted", "bytes_copied", "bytes_punched",
                                         "bytes_reclaimed", "files_deleted", "blocks_pruned", "rolls", "errors"), 0)
        self.trace = None  # traces are an image mount's business
        # The kernel caches writes and sends them later (cubefs mount --writeback-cache): asked for at
        # INIT (cubefs/fuse/server.py); a rollback then cannot reset an open file's size (design.md).
        self.writeback_cache = False
        self._inodes: dict[int, Inode] = {}
        self._listings: dict[int, tuple[int, list[tuple[bytes, int]]]] = {}  # (generation, listing)
        self._gone_listings: OrderedDict[tuple[int, int], list[tuple[bytes, int]]] = OrderedDict()
        self._generation = 0  # of listings: see readdir
        self._plain: dict[int, bool] = {}  # no layer has blocks or a cut for this inode: reads go to the image
        self._locks: dict[int, trio.Lock] = {}
        self._lookups: dict[int, int] = {}  # kernel references (lookups minus forgets)
        self._unpurged: set[int] = set()  # unlinked, forgotten, blocks not yet dropped (see retry_purges)
        self._ino_run: tuple[Any, int] | None = None  # (volume record as written, next number of its run)
        self.dentries = Dentries()  # names the kernel may cache, to invalidate on rollback
        # Unlinked-but-open inodes a previous daemon left are purged when a session begins
        # (session_began, import_refs), not here: a daemon started to take over a saved
        # session (a VM restored with its root attached) must keep what that session holds,
        # and one that resumes a /dev/fuse session after a crash cannot know what it holds.

    def session_began(self) -> None:
        """FUSE INIT: a new session, in which the kernel holds nothing yet; so an inode with
        no name is reachable by nobody, and its blocks go."""
        self._lookups.clear()
        self.dentries.clear()
        self._unpurged.clear()  # every unlinked inode is an orphan now, purged here
        if self.writable:
            self._purge_orphans(set())

    def session_ended(self) -> None:
        """FUSE DESTROY: the kernel holds no references any more (a VM's guest unmounted
        its root and may mount it again), so what only it kept alive goes now."""
        self.session_began()

    def export_refs(self) -> dict[str, Any]:
        """What the kernel holds of this volume, for a daemon that takes the session over
        (FuseServer.export_state): its references per inode (so an unlinked file a guest
        process keeps open survives the move, and is dropped after its last FORGET there),
        and the names it may cache (for a rollback's invalidations).  Names are base64:
        they are bytes, not always UTF-8."""
        return {"kind": "volume", "base": self.base.image.digest if self.base is not None else None,
                "lookups": sorted([ino, n] for ino, n in self._lookups.items()),
                "dentries": sorted([parent, base64.b64encode(name).decode()] for parent, name in self.dentries)}

    def import_refs(self, refs: dict[str, Any]) -> int:
        """Take over the references ``refs`` (from :meth:`export_refs` in the daemon that
        saved the session, over this volume or a clone of its snapshot at that instant):
        checked whole first (StateError, nothing changed), then applied; orphans the state
        does not reference are purged as at INIT."""
        if refs.get("kind") != "volume":
            raise StateError(f"the saved state is an {refs.get('kind')}'s; this daemon serves a volume")
        base = self.base.image.digest if self.base is not None else None
        if refs.get("base") != base:
            raise StateError(f"the saved state is for a volume over image {str(refs.get('base'))[:12]}; "
                             f"{self.label} is over {str(base)[:12]}")
        try:
            lookups = {int(ino): int(n) for ino, n in refs["lookups"]}
            dentries = {(int(parent), base64.b64decode(name, validate=True)) for parent, name in refs["dentries"]}
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise StateError("malformed kernel references in the saved state") from None
        if any(n <= 0 for n in lookups.values()):
            raise StateError("malformed kernel references in the saved state (a count below 1)")
        with self.index.read() as txn:
            chain = self._chain(txn)
            for ino in sorted(lookups):
                try:
                    self._inode(txn, ino, chain)
                except FsError:
                    raise StateError(f"the saved state references inode {ino}, which {self.label} does not have "
                                     "(a state saved with another volume, or after this snapshot?)") from None
        self._lookups = lookups
        self.dentries = Dentries(dentries)
        if self.writable:
            self._purge_orphans(set(lookups))
        return len(lookups)

    def _purge_orphans(self, keep: set[int]) -> None:
        """Inodes unlinked while open, that the session beginning does not hold (``keep``):
        nobody can reach them now (no name, no kernel reference), so their blocks go."""
        with self.index.read() as txn:
            layer = self.index.volume(txn, self.name).layer
            orphans = [ino for ino, inode in self.index.inodes_of(txn, layer)
                       if inode.nlink == 0 and inode.mode and ino not in keep]
        for ino in orphans:
            self._purge(ino)
        if orphans:
            log.info("%s: dropped %d unlinked inodes no session holds", self.label, len(orphans))

    # -- resolution ---------------------------------------------------------------

    def _chain(self, txn: lmdb.Transaction) -> tuple[int, ...]:
        return self.index.chain(txn, self._top or self.index.volume(txn, self.name).layer)

    def _image_inode(self, ino: int) -> Inode | None:
        if self.base is None or ino > self.image_inodes or ino < 1:
            return None
        r = self.base.image.record(ino)
        target = r[F_PAYLOAD] if stat.S_ISLNK(r[F_MODE]) else b""
        return Inode(r[F_MODE], r[F_UID], r[F_GID], r[F_ATIME], r[F_MTIME], r[F_CTIME], r[F_SIZE], r[F_NLINK],
                     r[F_RDEV], {k: v for k, v in r[F_XATTRS]}, target)

    def _inode(self, txn: lmdb.Transaction, ino: int, chain: tuple[int, ...] | None = None) -> Inode:
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        found = None
        for layer in chain or self._chain(txn):
            found = self.index.get_inode(txn, layer, ino)
            if found is not None:
                break
        else:
            found = self._image_inode(ino)
        if found is None or found.mode == 0:
            raise FsError(errno.ENOENT)
        self._inodes[ino] = found
        return found

    def _put(self, txn: lmdb.Transaction, layer: int, ino: int, inode: Inode) -> None:
        self.index.put_inode(txn, layer, ino, inode)
        self._inodes[ino] = inode

    def _dir(self, txn: lmdb.Transaction, ino: int) -> Inode:
        inode = self._inode(txn, ino)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        return inode

    def _child(self, txn: lmdb.Transaction, chain: tuple[int, ...], parent: int, name: bytes) -> int | None:
        for layer in chain:
            child = self.index.get_dirent(txn, layer, parent, name)
            if child is not None:
                return child or None
        if self.base is not None and parent <= self.image_inodes:
            return self.base.image.lookup(parent, name)
        return None

    def _listing(self, txn: lmdb.Transaction, ino: int) -> tuple[int, list[tuple[bytes, int]]]:
        """``ino``'s entries sorted by name, and the generation of that listing (see readdir)."""
        cached = self._listings.get(ino)
        if cached is not None:
            return cached
        entries: dict[bytes, int] = {}
        if self.base is not None and ino <= self.image_inodes:
            entries = {bytes(name): child for name, child in self.base.image.entries(ino)}
        for layer in reversed(self._chain(txn)):
            for name, child in self.index.dirents(txn, layer, ino):
                if child:
                    entries[name] = child
                else:
                    entries.pop(name, None)
        self._generation = (self._generation + 1) & GENERATION_MASK
        listing = self._listings[ino] = (self._generation, sorted(entries.items()))
        return listing

    def _changed(self, ino: int) -> None:
        """``ino``'s entries changed: its listing is made again at the next READDIR, the old one
        kept a while so that a listing in progress resumes after the last name it returned."""
        gone = self._listings.pop(ino, None)
        if gone is not None:
            self._gone_listings[(ino, gone[0])] = gone[1]
            while len(self._gone_listings) > GONE_LISTINGS:
                self._gone_listings.popitem(last=False)

    # -- reading ----------------------------------------------------------------------

    def _known(self, ino: int) -> Inode:
        """The inode, from the cache without a transaction when it is there (the cache
        holds what this process read or wrote, and a rollback clears it: see the module
        docstring); a read transaction costs ~2 us, and GETATTR, GETXATTR and SETATTR's
        reply ask for inodes just written."""
        i = self._inodes.get(ino)
        if i is None:
            with self.index.read() as txn:
                i = self._inode(txn, ino)
        return i

    def getattr(self, ino: int) -> Attr:
        return _attr_of(ino, self._known(ino))

    def lookup_ino(self, parent: int, name: bytes) -> int:
        child = self.find(parent, name)
        if not child:
            raise FsError(errno.ENOENT)
        return child

    def find(self, parent: int, name: bytes) -> int:
        """:meth:`lookup_ino` answering 0 for a name that is not there, without an
        exception: most of an untar's LOOKUPs are of names it is about to create."""
        with self.index.read() as txn:
            self._dir(txn, parent)
            self.dentries.add((parent, name))
            if name == b".":
                return parent
            return self._child(txn, self._chain(txn), parent, name) or 0

    def remember(self, ino: int) -> None:
        """The kernel got a reference to ``ino`` (an entry reply)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def known_inodes(self) -> dict[int, int]:
        return self._lookups

    def held(self) -> dict[str, int]:
        """What this process keeps for the kernel's sake (``cubefs stats``: it must follow what
        the kernel holds, not grow with everything the mount ever saw)."""
        return {"kernel_inodes": len(self._lookups), "cached_inodes": len(self._inodes),
                "cached_names": len(self.dentries), "cached_listings": len(self._listings)}

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` references to ``ino``.  At its last, what this process keeps
        of the inode for the kernel's sake goes too: its cached record and listing, and the
        names under it the kernel may have cached (it caches none under a directory it no
        longer holds) -- else they grew for the life of the mount (an untar of 2,000 files
        left 2,000 records and every name it looked up)."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self.dentries.forget_parent(ino)
        self._changed(ino)
        inode = self._inodes.pop(ino, None)
        self._plain.pop(ino, None)
        if inode is not None and inode.nlink == 0 and inode.mode:
            try:
                self._purge(ino)
            except Exception:
                self._unpurged.add(ino)  # a full disk: retried by retry_purges, else at the next session
                raise

    def _purge_or_later(self, ino: int) -> None:
        """After a removal that is done (committed): its blocks now, or, if the disk is too
        full for even that transaction, later -- the removal itself succeeded."""
        try:
            self._purge(ino)
        except (lmdb.Error, OSError) as err:
            log.warning("%s: the blocks of removed inode %d stay until the disk has room: %s", self.label, ino, err)
            self._unpurged.add(ino)

    def retry_purges(self) -> int:
        """Drop the blocks of unlinked inodes whose last FORGET could not (the disk was
        full); returns how many are left."""
        for ino in sorted(self._unpurged):
            if not self._lookups.get(ino):  # looked up again meanwhile: its next FORGET purges it
                try:
                    self._purge(ino)
                except (lmdb.Error, OSError) as err:
                    log.debug("%s: inode %d still not purged: %s", self.label, ino, err)
                    break
            self._unpurged.discard(ino)
        return len(self._unpurged)

    def _purge(self, ino: int) -> None:
        """An unlinked inode nobody holds any more: drop its blocks in the active layer."""
        with self.index.write() as txn:
            layer = self.index.volume(txn, self.name).layer
            inode = self._inode(txn, ino).copy()
            self.index.drop_blocks(txn, layer, ino, 0)
            inode.mode = 0  # a tombstone: the inode is gone in this layer and above
            inode.size = 0
            inode.xattrs = {}
            self._put(txn, layer, ino, inode)
        self._inodes.pop(ino, None)
        self._plain.pop(ino, None)

    def opendir(self, ino: int) -> None:
        with self.index.read() as txn:
            self._dir(txn, ino)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, int, int]]:
        """Entries from offset ``start``.  An entry's offset is its listing's generation and its
        place in it (``generation << 32 | place + 1``): the kernel asks a page at a time and
        passes back the offset of the last entry it took, and a listing made again since
        (entries added, removed, renamed) resumes after that entry's *name*, so every entry
        there throughout is returned exactly once, as POSIX asks (places alone skipped
        entries under busybox's ``rm -r``, which unlinks as it reads: tests/test_volume_readdir.py)."""
        with self.index.read() as txn:
            self._dir(txn, ino)
            generation, listing = self._listing(txn, ino)
        place = start & PLACE_MASK
        if start and start >> 32 != generation:
            then = self._gone_listings.get((ino, start >> 32))
            if then is not None and 0 < place <= len(then):
                place = bisect.bisect_right(listing, then[place - 1][0], key=lambda e: e[0])
        return ((listing[i][0], listing[i][1], generation << 32 | i + 1) for i in range(place, len(listing)))

    def readlink(self, ino: int) -> bytes:
        with self.index.read() as txn:
            i = self._inode(txn, ino)
        if not stat.S_ISLNK(i.mode):
            raise FsError(errno.EINVAL)
        return i.target

    def open(self, ino: int, flags: int) -> None:
        with self.index.read() as txn:
            i = self._inode(txn, ino)
        if stat.S_ISDIR(i.mode) and flags & (os.O_WRONLY | os.O_RDWR):
            raise FsError(errno.EISDIR)

    def listxattr(self, ino: int) -> list[bytes]:
        with self.index.read() as txn:
            return sorted(k for k in self._inode(txn, ino).xattrs if not k.startswith(HOST_XATTRS))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """:meth:`getxattr` answering None for a name that is not there, without an
        exception: the kernel asks every written file twice for ``security.capability``."""
        value = self._known(ino).xattrs.get(name)
        return None if name.startswith(HOST_XATTRS) else value

    def statfs(self) -> dict[str, int]:
        st = os.statvfs(self.index.directory)
        return {"bsize": st.f_frsize, "blocks": st.f_blocks, "bfree": st.f_bavail, "files": st.f_files,
                "ffree": st.f_favail, "namemax": NAME_MAX}

    def lseek(self, ino: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE without hole tracking: all of a file is data (allowed by POSIX)."""
        with self.index.read() as txn:
            size = self._inode(txn, ino).size
        if offset < 0 or offset >= size:
            raise FsError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            return offset
        if whence == os.SEEK_HOLE:
            return size
        raise FsError(errno.EINVAL)

    def _is_plain(self, txn: lmdb.Transaction, chain: tuple[int, ...], ino: int) -> bool:
        plain = self._plain.get(ino)
        if plain is None:
            plain = ino <= self.image_inodes and self.index.bytes_untouched(txn, chain, ino)
            self._plain[ino] = plain
        return plain

    def _block_source(self, txn: lmdb.Transaction, chain: tuple[int, ...], ino: int, block: int) -> Any:
        """Where block ``block`` of ``ino`` is: (file, offset), "zero", or "image"."""
        for layer in chain:
            loc = self.index.get_block(txn, layer, ino, block)
            if loc is not None:
                return loc if loc[0] else "zero"
            i = self.index.get_inode(txn, layer, ino)
            if i is not None and 0 <= i.cut <= block:
                return "zero"
        return "image" if ino <= self.image_inodes else "zero"

    def _plan(self, ino: int, offset: int, size: int) -> tuple[int, list[tuple[Any, int, int]]]:
        """(size clipped to EOF, [(source, offset, length)]) with adjacent image ranges merged."""
        with self.index.read() as txn:
            chain = self._chain(txn)
            inode = self._inode(txn, ino, chain)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EINVAL)
            if offset >= inode.size or size <= 0:
                return 0, []
            size = min(size, inode.size - offset)
            if self._is_plain(txn, chain, ino):
                return size, [("image", offset, size)]
            bs = self.block_size
            plan: list[tuple[Any, int, int]] = []
            pos, end = offset, offset + size
            while pos < end:
                block = pos // bs
                hi = min(end, (block + 1) * bs)
                src = self._block_source(txn, chain, ino, block)
                if plan and src == "image" and plan[-1][0] == "image":
                    plan[-1] = ("image", plan[-1][1], plan[-1][2] + hi - pos)
                else:
                    plan.append((src, pos, hi - pos))
                pos = hi
        return size, plan

    def _local(self, src: Any, pos: int, length: int) -> Buffer:
        if src == "zero":
            return bytes(length)
        return self.files.read(src, pos % self.block_size, length)

    def read_now(self, ino: int, offset: int, size: int) -> list[Buffer] | None:
        for _ in range(MOVED_RETRIES):
            try:
                return self._read_now(ino, offset, size)
            except BlockMoved:
                continue  # the compactor moved a block after we looked it up: look again
        return self._read_now(ino, offset, size)

    def _read_now(self, ino: int, offset: int, size: int) -> list[Buffer] | None:
        _size, plan = self._plan(ino, offset, size)
        fetched: dict[int, list[Buffer]] = {}
        for i, (src, pos, length) in enumerate(plan):
            if src == "image":
                assert self.base is not None
                got = self.base.read_now(ino, pos, length)
                if got is None:
                    return None
                fetched[i] = got
        return self._assemble(plan, fetched)

    async def read(self, ino: int, offset: int, size: int) -> list[Buffer]:
        for _ in range(MOVED_RETRIES):
            try:
                return await self._read(ino, offset, size)
            except BlockMoved:
                continue
        return await self._read(ino, offset, size)

    async def _read(self, ino: int, offset: int, size: int) -> list[Buffer]:
        _size, plan = self._plan(ino, offset, size)
        fetched: dict[int, list[Buffer]] = {}
        for i, (src, pos, length) in enumerate(plan):
            if src == "image":
                assert self.base is not None
                fetched[i] = await self.base.read(ino, pos, length)
        return self._assemble(plan, fetched)

    def _assemble(self, plan: list[tuple[Any, int, int]], fetched: dict[int, list[Buffer]]) -> list[Buffer]:
        """The read's buffers in order: the image's parts as fetched, the rest local."""
        out: list[Buffer] = []
        for i, (src, pos, length) in enumerate(plan):
            if src == "image":
                out.extend(_padded(fetched[i], length))
            else:
                out.append(self._local(src, pos, length))
        return out

    # -- creating and removing names ------------------------------------------------------

    def _begin(self) -> tuple[lmdb.Transaction, Any, tuple[int, ...]]:
        txn = self.index.write()
        vol = self.index.volume(txn, self.name)
        return txn, vol, self.index.chain(txn, vol.layer)

    def _new_entry(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                   target: bytes = b"") -> int:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        txn, vol, chain = self._begin()
        with txn:
            pdir = self._dir(txn, parent)
            if self._child(txn, chain, parent, name) is not None:
                raise FsError(errno.EEXIST)
            now = time.time_ns()
            if pdir.mode & stat.S_ISGID:  # BSD group semantics, and directories inherit the bit
                gid = pdir.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = self._new_ino(txn, vol)
            is_dir = stat.S_ISDIR(mode)
            # The new inode's times: the kernel's clock where the kernel keeps them (a regular file
            # on a writeback mount: see tick_ns); a directory, symlink or node keeps the fine clock,
            # as does every time the daemon keeps (the kernel never stamps those: S_NOCMTIME).
            born = tick_ns() if self.writeback_cache and stat.S_ISREG(mode) else now
            inode = Inode(mode, uid, gid, born, born, born, len(target) if target else 0, 2 if is_dir else 1, rdev,
                          target=target)
            self._put(txn, vol.layer, ino, inode)
            self.index.put_dirent(txn, vol.layer, parent, name, ino)
            pdir = pdir.copy()
            pdir.mtime_ns = pdir.ctime_ns = now
            if is_dir:
                pdir.nlink += 1
            self._put(txn, vol.layer, parent, pdir)
        self._changed(parent)
        self._plain[ino] = False
        self.dentries.add((parent, name))
        return ino

    def _new_ino(self, txn: lmdb.Transaction, vol: Any) -> int:
        """The next inode number, from a run of ``INO_RUN`` reserved in the volume's record:
        writing the record on every create put a third database in the create's commit
        (with the other cuts beside it, a create 38.0 -> 31.4 us in process, volume_ops.py;
        benchmarks.md, "Requests by operation").  The run is the record's as this
        process wrote it: when anything else rewrites the record (a snapshot, a rollback,
        which keep ``next_ino`` at least as high) or this transaction's write of it is lost
        (aborted), :meth:`VolumeIndex.volume` returns another object and the next create
        reserves anew from what is stored.  What a daemon that dies leaves of its run is
        skipped: inode numbers need not be dense, only never reused."""
        run = self._ino_run
        if run is not None and run[0] is vol and run[1] < vol.next_ino:
            self._ino_run = (vol, run[1] + 1)
            return run[1]
        ino = vol.next_ino
        vol = vol.with_next_ino(ino + INO_RUN)
        self.index.put_volume(txn, vol)
        self._ino_run = (vol, ino + 1)
        return ino

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> int:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL)
        return self._new_entry(parent, name, mode, uid, gid, rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        return self._new_entry(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> int:
        return self._new_entry(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        return self._new_entry(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    def link(self, ino: int, parent: int, name: bytes) -> int:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        txn, vol, chain = self._begin()
        with txn:
            inode = self._inode(txn, ino, chain)
            if stat.S_ISDIR(inode.mode):
                raise FsError(errno.EPERM)
            pdir = self._dir(txn, parent)
            if self._child(txn, chain, parent, name) is not None:
                raise FsError(errno.EEXIST)
            now = time.time_ns()
            inode = inode.copy()
            inode.nlink += 1
            inode.ctime_ns = now
            self._put(txn, vol.layer, ino, inode)
            self.index.put_dirent(txn, vol.layer, parent, name, ino)
            pdir = pdir.copy()
            pdir.mtime_ns = pdir.ctime_ns = now
            self._put(txn, vol.layer, parent, pdir)
        self._changed(parent)
        self.dentries.add((parent, name))
        return ino

    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=True)

    def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        txn, vol, chain = self._begin()
        with txn:
            pdir = self._dir(txn, parent)
            child = self._child(txn, chain, parent, name)
            if child is None:
                raise FsError(errno.ENOENT)
            inode = self._inode(txn, child, chain)
            is_dir = stat.S_ISDIR(inode.mode)
            if want_dir and not is_dir:
                raise FsError(errno.ENOTDIR)
            if not want_dir and is_dir:
                raise FsError(errno.EISDIR)
            if is_dir and self._listing(txn, child)[1]:
                raise FsError(errno.ENOTEMPTY)
            now = time.time_ns()
            self.index.put_dirent(txn, vol.layer, parent, name, 0)
            inode = inode.copy()
            inode.nlink = 0 if is_dir else inode.nlink - 1
            inode.ctime_ns = now
            self._put(txn, vol.layer, child, inode)
            pdir = pdir.copy()
            pdir.mtime_ns = pdir.ctime_ns = now
            if is_dir:
                pdir.nlink -= 1
            self._put(txn, vol.layer, parent, pdir)
        self._changed(parent)
        if inode.nlink == 0 and not self._lookups.get(child):
            self._purge_or_later(child)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        if len(newname) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        txn, vol, chain = self._begin()
        layer = vol.layer
        victim = None
        with txn:
            src_dir = self._dir(txn, parent)
            dst_dir = self._dir(txn, newparent)
            src = self._child(txn, chain, parent, name)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = self._child(txn, chain, newparent, newname)
            s = self._inode(txn, src, chain)
            now = time.time_ns()
            dirs = {parent: src_dir.copy(), newparent: dst_dir.copy()} if parent != newparent else {
                parent: src_dir.copy()}
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT)
                d = self._inode(txn, dst, chain)
                self.index.put_dirent(txn, layer, parent, name, dst)
                self.index.put_dirent(txn, layer, newparent, newname, src)
                if parent != newparent and stat.S_ISDIR(s.mode) != stat.S_ISDIR(d.mode):
                    moved = 1 if stat.S_ISDIR(s.mode) else -1
                    dirs[parent].nlink -= moved
                    dirs[newparent].nlink += moved
                for ino, i in ((src, s), (dst, d)):
                    i = i.copy()
                    i.ctime_ns = now
                    self._put(txn, layer, ino, i)
            else:
                if dst == src:
                    return  # two names of one inode: POSIX says do nothing
                if dst is not None:
                    if flags & RENAME_NOREPLACE:
                        raise FsError(errno.EEXIST)
                    d = self._inode(txn, dst, chain)
                    if stat.S_ISDIR(s.mode) and not stat.S_ISDIR(d.mode):
                        raise FsError(errno.ENOTDIR)
                    if not stat.S_ISDIR(s.mode) and stat.S_ISDIR(d.mode):
                        raise FsError(errno.EISDIR)
                    if stat.S_ISDIR(d.mode):
                        if self._listing(txn, dst)[1]:
                            raise FsError(errno.ENOTEMPTY)
                        dirs[newparent].nlink -= 1
                    d = d.copy()
                    d.nlink = 0 if stat.S_ISDIR(d.mode) else d.nlink - 1
                    d.ctime_ns = now
                    self._put(txn, layer, dst, d)
                    victim = (dst, d)
                self.index.put_dirent(txn, layer, newparent, newname, src)
                self.index.put_dirent(txn, layer, parent, name, 0)
                if stat.S_ISDIR(s.mode) and parent != newparent:
                    dirs[parent].nlink -= 1
                    dirs[newparent].nlink += 1
                s = s.copy()
                s.ctime_ns = now
                self._put(txn, layer, src, s)
            for ino, i in dirs.items():
                i.mtime_ns = i.ctime_ns = now
                self._put(txn, layer, ino, i)
        self._changed(parent)
        self._changed(newparent)
        self.dentries.add((newparent, newname))
        if victim is not None and victim[1].nlink == 0 and not self._lookups.get(victim[0]):
            self._purge_or_later(victim[0])

    # -- attributes -------------------------------------------------------------------------

    def _change(self, ino: int, fn: Any, ctime_ns: int | None = None) -> Inode:
        """Apply ``fn`` to a copy of the inode and record it in the active layer, its ctime
        now (or ``ctime_ns``, the kernel's: see :meth:`_set_fields`)."""
        txn = self.index.write()
        with txn:
            layer = self.index.volume(txn, self.name).layer
            inode = self._inode(txn, ino).copy()  # the chain is looked up only if not cached
            fn(inode)
            inode.ctime_ns = time.time_ns() if ctime_ns is None else ctime_ns
            self._put(txn, layer, ino, inode)
        return inode

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        if name.startswith(HOST_XATTRS):
            raise FsError(errno.EPERM)

        def change(i: Inode) -> None:
            if flags & XATTR_CREATE and name in i.xattrs:
                raise FsError(errno.EEXIST)
            if flags & XATTR_REPLACE and name not in i.xattrs:
                raise FsError(errno.ENODATA)
            i.xattrs[name] = value

        self._change(ino, change)

    def removexattr(self, ino: int, name: bytes) -> None:
        if name.startswith(HOST_XATTRS):
            raise FsError(errno.EPERM)

        def change(i: Inode) -> None:
            if i.xattrs.pop(name, None) is None:
                raise FsError(errno.ENODATA)

        self._change(ino, change)

    def setattr_now(self, ino: int, valid: int, a: dict[str, int]) -> Attr | None:
        """The change made without waiting, or None: a size change must wait for the
        inode's lock or fetch a block of the image (use :meth:`setattr`)."""
        if valid & SET_SIZE:
            if self._busy(ino):
                return None
            try:
                self._resize(ino, a["size"], {})
            except _NeedImage:
                return None
        return self._set_fields(ino, valid, a)

    async def setattr(self, ino: int, valid: int, a: dict[str, int]) -> Attr:
        if valid & SET_SIZE:
            async with self._lock(ino):
                await self._retrying(ino, lambda old: self._resize(ino, a["size"], old))
        return self._set_fields(ino, valid, a)

    def _set_fields(self, ino: int, valid: int, a: dict[str, int]) -> Attr:
        """The attributes ``valid`` names, set as ``a`` gives them.  A ctime given
        (``FATTR_CTIME``: only a ``--writeback-cache`` kernel sends one, for a regular file,
        whose mtime and ctime it keeps itself) is kept as given: the kernel shows its own, and
        the record must show the same once the kernel has let the inode go."""
        now = time.time_ns()
        ctime = a.get("ctime_ns") if valid & SET_CTIME else None

        def change(i: Inode) -> None:
            old_gid = i.gid
            if valid & SET_MODE:
                i.mode = stat.S_IFMT(i.mode) | (a["mode"] & 0o7777)
            if valid & SET_UID:
                i.uid = a["uid"]
            if valid & SET_GID:
                i.gid = a["gid"]
            if valid & SET_ATIME_NOW:
                i.atime_ns = now
            elif valid & SET_ATIME:
                i.atime_ns = a["atime_ns"]
            if valid & SET_MTIME_NOW:
                i.mtime_ns = now
            elif valid & SET_MTIME:
                i.mtime_ns = a["mtime_ns"]
            if stat.S_ISDIR(i.mode):
                return
            caller_uid, caller_gid = a.get("caller_uid", 0), a.get("caller_gid", 0)
            if valid & (SET_UID | SET_GID):  # chown: as the VFS does, whoever the caller is
                _drop_privileges(i, True, outsider=caller_uid != 0 and caller_gid != old_gid)
            elif valid & SET_SIZE:
                kill = bool(valid & SET_KILL_SUIDGID)
                _drop_privileges(i, kill, outsider=kill and caller_gid != i.gid)

        if valid & SET_FIELDS:
            return _attr_of(ino, self._change(ino, change, ctime))
        # a truncation (done): a second transaction only if it takes a privilege
        if valid & SET_SIZE and _has_privileges(self._known(ino), bool(valid & SET_KILL_SUIDGID)):
            return _attr_of(ino, self._change(ino, change, ctime))
        return self.getattr(ino)

    # -- data ----------------------------------------------------------------------------------
    #
    # Every data change is one synchronous transaction (``_write``, ``_resize``) given
    # the image blocks it needs, ``old``; when it finds it needs one it lacks it raises
    # _NeedImage before changing anything, and the caller fetches that block (without
    # a transaction) and tries again.  Most writes need none and complete at once.

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def _busy(self, ino: int) -> bool:
        """Whether a write or resize of ``ino`` that had to wait holds its lock.  Only those
        make a lock: the ones done at once (nearly all) leave none behind, one for every
        file ever written."""
        lock = self._locks.get(ino)
        return lock is not None and lock.locked()

    async def _retrying(self, ino: int, change: Any) -> Any:
        old: dict[int, bytes] = {}
        while True:
            try:
                return change(old)
            except _NeedImage as need:
                assert self.base is not None
                bs = self.block_size
                old[need.block] = b"".join(_padded(await self.base.read(ino, need.block * bs, bs), bs))

    def write_now(self, ino: int, offset: int, data: bytes | memoryview, killer: int | None = None,
                  stamp: bool = True) -> int | None:
        """The write done without waiting, or None (see :meth:`setattr_now`).  ``killer``:
        the group of a writer without CAP_FSETID, whose write takes set-id bits away (see
        :func:`_drop_privileges`); None for one with it.  ``stamp`` False: the file's mtime
        and ctime stay as they are, because the kernel keeps them and sends its own (pages
        of a ``--writeback-cache`` mount's page cache: FuseServer._write)."""
        if self._busy(ino):
            return None
        try:
            return self._write(ino, offset, data, {}, killer, stamp)
        except _NeedImage:
            return None

    async def write(self, ino: int, offset: int, data: bytes | memoryview, killer: int | None = None,
                    stamp: bool = True) -> int:
        async with self._lock(ino):
            return int(await self._retrying(ino, lambda old: self._write(ino, offset, data, old, killer, stamp)))

    def _write(self, ino: int, offset: int, data: bytes | memoryview, old: dict[int, bytes],
               killer: int | None = None, stamp: bool = True) -> int:
        if not data:
            return 0
        txn, vol, chain = self._begin()
        with txn:
            inode = self._inode(txn, ino, chain)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.EINVAL)
            bs = self.block_size
            if (offset > inode.size and inode.size % bs) or ino <= self.image_inodes:
                pieces = [*self._tail_zeros(inode.size, offset), (offset, data)]
                if ino <= self.image_inodes:  # only the image's own inodes have image blocks to fetch
                    self._check_old(txn, vol.layer, chain, ino, pieces, old)
                for off, piece in pieces:
                    self._put_range(txn, vol.layer, chain, ino, off, piece, old, inode.size)
            else:  # the common case (no gap to zero, no image block): one range
                loc = self.index.get_block(txn, vol.layer, ino, offset // bs) \
                    if offset // bs == (offset + len(data) - 1) // bs else None
                if loc is not None and loc[0]:  # within one block the active layer owns: in place
                    self.files.overwrite(loc, offset % bs, data)
                else:
                    self._put_range(txn, vol.layer, chain, ino, offset, data, old, inode.size)
            inode = inode.copy()
            inode.size = max(inode.size, offset + len(data))
            if stamp:
                inode.mtime_ns = inode.ctime_ns = time.time_ns()
            _drop_privileges(inode, killer is not None, outsider=killer is not None and killer != inode.gid)
            self._put(txn, vol.layer, ino, inode)
        self._plain[ino] = False
        return len(data)

    def _tail_zeros(self, size: int, upto: int) -> list[tuple[int, bytes]]:
        """Zeros for [size, end of its block) before a file grows past ``size`` to ``upto``:
        the block may hold bytes a truncation cut off, which must read as zeros now."""
        end = min(upto, (size // self.block_size + 1) * self.block_size)
        return [(size, bytes(end - size))] if end > size and size % self.block_size else []

    def _partial_blocks(self, offset: int, length: int) -> list[int]:
        bs = self.block_size
        end = offset + length
        return [b for b in {offset // bs, (end - 1) // bs}
                if max(offset, b * bs) > b * bs or min(end, (b + 1) * bs) < (b + 1) * bs]

    def _check_old(self, txn: lmdb.Transaction, layer: int, chain: tuple[int, ...], ino: int,
                   pieces: list[tuple[int, bytes | memoryview]], old: dict[int, bytes]) -> None:
        """Raise _NeedImage for the first image block a partial write needs and ``old`` lacks."""
        for off, piece in pieces:
            for b in self._partial_blocks(off, len(piece)):
                if b in old:
                    continue
                loc = self.index.get_block(txn, layer, ino, b)
                if (loc is None or not loc[0]) and self._block_source(txn, chain, ino, b) == "image":
                    raise _NeedImage(b)

    def _put_range(self, txn: lmdb.Transaction, layer: int, chain: tuple[int, ...], ino: int, offset: int,
                   data: bytes | memoryview, old: dict[int, bytes], size: int = -1) -> None:
        """Write ``data`` at ``offset``: in place into blocks the active layer owns, as new
        blocks (copied from the old ones where only partly written) into the others.  A
        block that begins at or past ``size`` (the file's size before this write, if given)
        holds nothing that can be read: it is fresh, and its old source is not looked up
        (a layer's block and inode records, one decoded: ~2 us of a new file's WRITE)."""
        bs = self.block_size
        view = memoryview(data)
        end = offset + len(data)
        partial = self._partial_blocks(offset, len(data))
        new: list[tuple[int, Any]] = []  # blocks to append, written together
        for b in range(offset // bs, (end - 1) // bs + 1):
            lo, hi = max(offset, b * bs), min(end, (b + 1) * bs)
            piece = view[lo - offset : hi - offset]
            loc = self.index.get_block(txn, layer, ino, b)
            if loc is not None and loc[0]:
                self.files.overwrite(loc, lo - b * bs, piece)
                continue
            block: Any = piece
            if b in partial:
                base = old.get(b)
                src = None if base is not None else "zero" if 0 <= size <= b * bs else \
                    self._block_source(txn, chain, ino, b)
                if src == "zero":
                    # A fresh block: zeros before the piece, and nothing after it -- the data file
                    # keeps the rest of the block as a hole, which reads as zeros (a new small
                    # file wrote 64 KiB: 17 us a block, measured; this, 5).  Only the last block
                    # of a range ends early, so only the last one appended is ever short.
                    block = bytes(lo - b * bs) + piece if lo > b * bs else piece
                else:
                    if base is None:
                        base = bytes(self._local(src, 0, bs)) if src != "image" else bytes(bs)
                    block = bytearray(base)
                    block[lo - b * bs : hi - b * bs] = piece
            new.append((b, block))
        if new:
            for (b, _), loc in zip(new, self.files.append(txn, [blk for _, blk in new])):
                self.index.put_block(txn, layer, ino, b, loc)

    def _resize(self, ino: int, size: int, old: dict[int, bytes]) -> None:
        bs = self.block_size
        txn, vol, chain = self._begin()
        with txn:
            inode = self._inode(txn, ino, chain)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EINVAL)
            inode = inode.copy()
            if size > inode.size:
                pieces: list[tuple[int, bytes | memoryview]] = list(self._tail_zeros(inode.size, size))
                self._check_old(txn, vol.layer, chain, ino, pieces, old)
                for off, piece in pieces:
                    self._put_range(txn, vol.layer, chain, ino, off, piece, old)
            elif size < inode.size:
                gone = -(-size // bs)  # first block wholly past the new end
                self.index.drop_blocks(txn, vol.layer, ino, gone)
                inode.cut = gone if inode.cut < 0 else min(inode.cut, gone)
            if size != inode.size:  # as ext4: truncate(2) to the size a file has changes no time
                inode.mtime_ns = inode.ctime_ns = time.time_ns()
            inode.size = size
            self._put(txn, vol.layer, ino, inode)
        self._plain[ino] = False

    async def fallocate(self, ino: int, offset: int, length: int, mode: int) -> None:
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        async with self._lock(ino):
            with self.index.read() as txn:
                inode = self._inode(txn, ino)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.ENODEV if stat.S_ISDIR(inode.mode) else errno.EINVAL)
            if mode == 0:  # reserve: nothing to reserve in a copy-on-write store; the size grows
                if offset + length > inode.size:
                    await self._retrying(ino, lambda old: self._resize(ino, offset + length, old))
                return
            if mode == FALLOC_FL_KEEP_SIZE:
                return
            if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                end = min(offset + length, inode.size)
                if end > offset:
                    zeros = bytes(end - offset)
                    await self._retrying(ino, lambda old: self._punch(ino, offset, zeros, old))
                return
        raise FsError(errno.EOPNOTSUPP)

    def _punch(self, ino: int, offset: int, zeros: bytes, old: dict[int, bytes]) -> None:
        txn, vol, chain = self._begin()
        with txn:
            self._check_old(txn, vol.layer, chain, ino, [(offset, zeros)], old)
            self._put_range(txn, vol.layer, chain, ino, offset, zeros, old)
            inode = self._inode(txn, ino, chain).copy()
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
            self._put(txn, vol.layer, ino, inode)
        self._plain[ino] = False

    def fsync(self, ino: int) -> None:
        """Durable against power loss, not only a crash: the blocks, then the index."""
        self.files.take_dirty()
        self.files.sync(self.files.written())
        self.index.sync()

    async def sync_every(self, seconds: float) -> None:
        """Flush written blocks, then the index, every ``seconds`` (in a worker thread):
        what a power cut can lose is bounded as on ext4 (its commit interval is 5 s),
        while a crash of the daemon loses nothing committed at any moment.  And keep
        the layer chain short (cow/gc.py: flatten), so reads stay as fast after
        thousands of snapshots."""
        last = time.monotonic()
        while True:
            await trio.sleep(seconds)
            if self._unpurged:
                self.retry_purges()
            dirty = self.files.take_dirty()
            if dirty:
                await trio.to_thread.run_sync(self._sync, dirty)
            await trio.to_thread.run_sync(flatten, self.index, self.name)
            if time.monotonic() - last >= compact_interval():
                await self._compact()
                last = time.monotonic()
            self.files.prune()  # here: no worker thread uses a descriptor now

    async def _compact(self) -> None:
        """A background collection (cow/gc.py), its copying bounded to ``COMPACT_RATE``
        bytes/s; then, if the file this daemon appends to is big and mostly dead, it is
        let go so that the next pass compacts it."""
        try:
            st = await trio.to_thread.run_sync(lambda: collect(self.index, rate=COMPACT_RATE))
        except Exception as err:  # never take the mount down: the next pass tries again
            self.compaction["errors"] += 1
            log.warning("%s: background collection failed: %s", self.label, err)
            return
        c = self.compaction
        c["passes"] += 1
        for key in ("files_compacted", "bytes_copied", "bytes_punched", "bytes_reclaimed", "files_deleted",
                    "blocks_pruned"):
            c[key] += getattr(st, key)
        c["errors"] += st.compaction_errors
        current = self.files.current
        if current:
            try:
                size = os.stat(self.index.data_path(current)).st_size
            except FileNotFoundError:
                size = 0
            if size >= ROLL_DEAD_MIN and st.files.get(current, 0) <= size * (1 - COMPACT_AT):
                self.files.roll()
                c["rolls"] += 1
        if st.bytes_reclaimed:
            log.info("%s: background collection reclaimed %d bytes (%d files compacted)", self.label,
                     st.bytes_reclaimed, st.files_compacted)

    def roll(self) -> dict[str, int]:
        """Let go of the data file being appended to (``cubefs volume gc`` asks it first)."""
        return {"released": self.files.roll()}

    def _sync(self, dirty: list[int]) -> None:
        self.files.sync(dirty)
        self.index.sync()

    # -- snapshots ------------------------------------------------------------------------------

    def rolled_back(self) -> None:
        """The index now shows another state: forget every cached view of the old one."""
        self._inodes.clear()
        for ino in list(self._listings):
            self._changed(ino)
        self._plain.clear()

    def close(self) -> None:
        self.files.close()


class Dentries:
    """The (parent, name) pairs the kernel may have cached (looked up, created, renamed to),
    kept by parent so that those under a directory go when the kernel forgets it."""

    def __init__(self, pairs: Iterable[tuple[int, bytes]] = ()) -> None:
        self._by_parent: dict[int, set[bytes]] = {}
        for pair in pairs:
            self.add(pair)

    def add(self, pair: tuple[int, bytes]) -> None:
        parent, name = pair
        names = self._by_parent.get(parent)
        if names is None:
            names = self._by_parent[parent] = set()
        names.add(name)

    def __contains__(self, pair: object) -> bool:
        parent, name = pair  # type: ignore[misc]
        return name in self._by_parent.get(parent, ())

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for parent, names in list(self._by_parent.items()):
            for name in list(names):
                yield parent, name

    def __len__(self) -> int:
        return sum(map(len, self._by_parent.values()))

    def forget_parent(self, parent: int) -> None:
        self._by_parent.pop(parent, None)

    def clear(self) -> None:
        self._by_parent.clear()


def _attr_of(ino: int, i: Inode) -> Attr:
    return Attr(ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, (i.size + 511) // 512, i.atime_ns, i.mtime_ns,
                i.ctime_ns)


def _has_privileges(i: Inode, setid: bool) -> bool:
    return CAPABILITY in i.xattrs or (setid and bool(i.mode & (stat.S_ISUID | stat.S_ISGID)))


def _drop_privileges(i: Inode, setid: bool, outsider: bool) -> None:
    """What a write, a truncation or a chown of a file takes away, as on ext4 (Linux 6.x;
    tests/test_volume_fast.py compares): its file capabilities always, and with ``setid``
    (a chown; a write or truncation by a caller without CAP_FSETID) its set-user-ID bit,
    and its set-group-ID bit if group-executable or if the caller is an ``outsider``
    (neither in the file's group nor privileged).  FUSE tells us the caller's primary
    group only, so a member through a supplementary group counts as an outsider here.
    The kernel leaves this to us because INIT asked for HANDLE_KILLPRIV_V2: it then stops
    asking for ``security.capability`` before every write (7,874 GETXATTRs of 30,028
    requests when untarring /usr/lib/python3.11; see cubefs/fuse/server.py)."""
    i.xattrs.pop(CAPABILITY, None)
    if setid:
        i.mode &= ~stat.S_ISUID
        if i.mode & stat.S_IXGRP or outsider:
            i.mode &= ~stat.S_ISGID


class _NeedImage(Exception):
    """A partial write needs this block of the image, which must be fetched first."""

    def __init__(self, block: int) -> None:
        super().__init__(block)
        self.block = block


def _padded(parts: list[Buffer], length: int) -> list[Buffer]:
    """An image read clipped at the image file's end, padded with zeros to ``length``
    (a volume file can be longer than the image's version of it)."""
    got = sum(len(p) for p in parts)
    return parts if got >= length else [*parts, bytes(length - got)]
