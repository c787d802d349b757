"""The copy-on-write index: volumes, layers, snapshots, and each layer's records, in LMDB.

Layout and invariants are specified in docs/format.md ("Volume index v1").
In short: a volume is a chain of layers over a base image.  Only the top
layer, the volume's *active* one, is ever written; every other layer is
frozen and never changes again.  So:

* a **snapshot** freezes the active layer and puts a new empty one on top:
  one transaction of three small records, whatever the volume's size or how
  much was written (O(1));
* a **rollback** puts a new empty active layer on top of the snapshot's;
* a **clone** makes new volumes whose active layers sit on the snapshot's.

A layer holds only what changed in it: inode records (whole, copied up on
first change), directory entries (a child inode, or 0 for a whiteout that
hides a lower entry) and block records (where a file block's bytes are in the
local data files).  A read walks the chain from the top; docs/format.md says
how a truncation (``cut``) stops the walk for blocks beyond it.

Every filesystem operation is one LMDB write transaction, committed without
``fsync`` (``MDB_NOSYNC``): a process killed at any moment leaves the index
as of its last completed operation, because the kernel keeps what was
written; ``sync()`` makes it durable against power loss too (``fsync``).
Several processes may share an index (LMDB locks writers): the CLI takes
snapshots and clones while a daemon writes the volume.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import lmdb
import msgpack

from cubefs.errors import CorruptDataError, CubefsError, FormatVersionError, NotFoundError, UsageError

VERSION = 1
BLOCK_SIZE = 64 * 1024
ROOT_INO = 1
MAP_SIZE = 1 << 40  # address space only; the file grows as needed

U64 = struct.Struct(">Q")
LAYER_INO = struct.Struct(">QQ")
LAYER_INO_BLOCK = struct.Struct(">QQQ")
BLOCK_LOC = struct.Struct("<IQ")  # data file id, offset in it

_LOCAL = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's msgpack packer: ``msgpack.packb`` makes a new one per call, 0.8 us
    against 0.3 for ``pack`` on a kept one, and every changing FUSE request encodes one
    to three inode records (the daemon's one thread; a packer is not for two at once)."""
    packer = getattr(_LOCAL, "packer", None)
    if packer is None:
        packer = _LOCAL.packer = msgpack.Packer(use_bin_type=True)
    return packer


_DBS = ("meta", "volumes", "layers", "snapshots", "inodes", "dirents", "blocks")


class VolumeError(CubefsError):
    pass


@dataclass(slots=True)
class Inode:
    """One inode as a layer records it (or as the base image has it)."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlinks
    cut: int = -1  # block index from which lower layers' blocks (and the image's) are gone; -1: none

    def encode(self) -> bytes:
        return _packer().pack([self.mode, self.uid, self.gid, self.atime_ns, self.mtime_ns, self.ctime_ns,
                              self.size, self.nlink, self.rdev, sorted(self.xattrs.items()), self.target,
                              self.cut])

    @classmethod
    def decode(cls, raw: bytes) -> Inode:
        f = msgpack.unpackb(raw, raw=True, use_list=True)
        if not isinstance(f, list) or len(f) < 12:
            raise CorruptDataError("volume index: an inode record is malformed")
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], {k: v for k, v in f[9]}, f[10], f[11])

    def copy(self) -> Inode:
        return Inode(self.mode, self.uid, self.gid, self.atime_ns, self.mtime_ns, self.ctime_ns, self.size,
                     self.nlink, self.rdev, dict(self.xattrs), self.target, self.cut)


@dataclass
class BaseImage:
    """What a volume was created from: an image in a store (or nothing: an empty volume)."""

    ref: str
    digest: str
    store: str
    s3_endpoint: str | None = None


@dataclass
class Volume:
    name: str
    layer: int  # the active layer
    next_ino: int
    base: BaseImage | None
    created_ns: int
    block_size: int = BLOCK_SIZE

    def with_next_ino(self, next_ino: int) -> Volume:
        """This record with another ``next_ino`` (every create: ``dataclasses.replace`` cost
        ~3 us of it, a constructor call next to the fields does not)."""
        return Volume(self.name, self.layer, next_ino, self.base, self.created_ns, self.block_size)

    def encode(self) -> bytes:
        base = None if self.base is None else [self.base.ref, self.base.digest, self.base.store,
                                               self.base.s3_endpoint]
        return msgpack.packb({"v": VERSION, "layer": self.layer, "next_ino": self.next_ino, "base": base,
                              "created_ns": self.created_ns, "block_size": self.block_size})

    @classmethod
    def decode(cls, name: str, raw: bytes) -> Volume:
        d = msgpack.unpackb(raw)
        if not isinstance(d, dict) or d.get("v") != VERSION:
            raise FormatVersionError(f"volume {name}: record version {d.get('v') if isinstance(d, dict) else '?'} "
                                     f"is not {VERSION}; this cubefs cannot use it")
        b = d["base"]
        base = None if b is None else BaseImage(b[0], b[1], b[2], b[3])
        return cls(name, d["layer"], d["next_ino"], base, d["created_ns"], d["block_size"])


@dataclass
class Snapshot:
    volume: str
    name: str
    layer: int
    next_ino: int
    created_ns: int


def prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) records of ``db`` whose keys start with ``prefix``, in key order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for k, v in cur:
        if not k.startswith(prefix):
            return
        yield bytes(k), bytes(v)


def _volume_name(name: str) -> str:
    if not name or len(name) > 200 or "\0" in name or "/" in name or "@" in name or name.startswith("."):
        raise UsageError(f"invalid volume or snapshot name {name!r}: no '/', '@', NUL or leading '.'")
    return name


def make_private(directory: str) -> None:
    """Directories 0700 and files 0600 under the volume directory, whatever the umask and
    whichever version made them: they hold file contents and names.  Only what is wrong is
    changed (one ``stat`` per file: 2 ms for 1,000 data files)."""
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name, want in [(dirpath, 0o700)] + [(os.path.join(dirpath, f), 0o600) for f in filenames]:
            try:
                st = os.lstat(name)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o7777 != want:
                    os.chmod(name, want)
            except FileNotFoundError:
                pass  # a collector deleted it meanwhile


class VolumeIndex:
    """The LMDB environment of one volume directory, shared by every process that uses it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(os.path.join(directory, "data"), mode=0o700, exist_ok=True)
        try:
            self.env = lmdb.open(os.path.join(directory, "index.lmdb"), map_size=MAP_SIZE, max_dbs=len(_DBS),
                                 sync=False, metasync=False, readahead=False, max_readers=1024, mode=0o600)
        except lmdb.Error as err:
            raise VolumeError(f"cannot open the volume index in {directory}: {err}") from None
        self.db = {name: self.env.open_db(name.encode()) for name in _DBS}
        with self.env.begin(write=True) as txn:
            v = txn.get(b"version", db=self.db["meta"])
            if v is None:
                txn.put(b"version", str(VERSION).encode(), db=self.db["meta"])
            elif v != str(VERSION).encode():
                raise FormatVersionError(f"volume index {directory} has version {v.decode(errors='replace')}, "
                                         f"this cubefs reads version {VERSION}")
        self._chains: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # top -> (its record, chain)
        self._volumes: dict[str, tuple[bytes, Volume]] = {}
        make_private(directory)

    def close(self) -> None:
        self.env.close()

    def sync(self) -> None:
        """Make every committed transaction durable (power loss included)."""
        self.env.sync(True)

    def sync_all(self) -> None:
        """Make everything in the volume directory durable, whoever wrote it: the
        data files (a mounted volume's daemon's included), then the index."""
        import ctypes

        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs {self.directory}")
        finally:
            os.close(fd)
        self.env.sync(True)

    def read(self) -> lmdb.Transaction:
        return self.env.begin()

    def write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    # -- volumes, layers, snapshots -----------------------------------------------

    def _next(self, txn: lmdb.Transaction, counter: bytes) -> int:
        raw = txn.get(counter, db=self.db["meta"])
        n = U64.unpack(raw)[0] if raw else 1
        txn.put(counter, U64.pack(n + 1), db=self.db["meta"])
        return n

    def _new_layer(self, txn: lmdb.Transaction, parent: int) -> int:
        layer = self._next(txn, b"next_layer")
        txn.put(U64.pack(layer), msgpack.packb({"parent": parent, "frozen": False, "created_ns": time.time_ns()}),
                db=self.db["layers"])
        return layer

    def layer_info(self, txn: lmdb.Transaction, layer: int) -> dict[str, Any]:
        raw = txn.get(U64.pack(layer), db=self.db["layers"])
        if raw is None:
            raise CorruptDataError(f"volume index: layer {layer} is missing")
        return dict(msgpack.unpackb(raw))

    def _set_layer(self, txn: lmdb.Transaction, layer: int, info: dict[str, Any]) -> None:
        txn.put(U64.pack(layer), msgpack.packb(info), db=self.db["layers"])

    def chain(self, txn: lmdb.Transaction, top: int) -> tuple[int, ...]:
        """The layers from ``top`` down to the bottom one.  Below the top every layer is
        frozen and keeps its parent, so a chain is cached by its top layer, checked
        against the top's record (its parent, which a flatten changes: see cow/gc.py).
        Every write of a volume asks, so the record is compared as it is stored, and
        decoded only when it changed (1.5 us of a write's ~18, measured)."""
        raw = txn.get(U64.pack(top), db=self.db["layers"])
        cached = self._chains.get(top)
        if cached is not None and cached[0] == raw:
            return cached[1]
        out = []
        layer = top
        while layer:
            out.append(layer)
            layer = self.layer_info(txn, layer)["parent"]  # a top with no record raises here
        chain = tuple(out)
        self._chains[top] = (bytes(raw), chain)
        return chain

    def volume(self, txn: lmdb.Transaction, name: str) -> Volume:
        """The volume's record as of ``txn``.  Decoded once per version (every operation
        reads it): the answer is shared, so change a ``replace``d copy, never it."""
        raw = txn.get(name.encode(), db=self.db["volumes"])
        if raw is None:
            raise NotFoundError(f"volume {name} not found in {self.directory}")
        memo = self._volumes.get(name)
        if memo is not None and memo[0] == raw:
            return memo[1]
        vol = Volume.decode(name, raw)
        self._volumes[name] = (bytes(raw), vol)
        return vol

    def put_volume(self, txn: lmdb.Transaction, vol: Volume) -> None:
        raw = vol.encode()
        txn.put(vol.name.encode(), raw, db=self.db["volumes"])
        # Remembered as decoded: every create changes the record (next_ino), and the next
        # operation's volume() would decode it again.  If this transaction aborts, the stored
        # record differs from this one, and volume() decodes that.
        self._volumes[vol.name] = (raw, vol)

    def volumes(self) -> list[Volume]:
        with self.read() as txn:
            return [Volume.decode(k.decode(), v) for k, v in txn.cursor(db=self.db["volumes"])]

    def create_volume(self, name: str, base: BaseImage | None, root: Inode | None, first_ino: int,
                      files: tuple[tuple[bytes, int, Inode], ...] = ()) -> Volume:
        """A new volume over ``base``; ``root`` is recorded as inode 1 when there is no image,
        with ``files`` (name, ino, inode) in it: a block volume's ``disk`` (cubefs/volume/blk.py)
        exists from the transaction that made the volume."""
        _volume_name(name)
        with self.write() as txn:
            if txn.get(name.encode(), db=self.db["volumes"]) is not None:
                raise UsageError(f"volume {name} already exists")
            layer = self._new_layer(txn, 0)
            vol = Volume(name, layer, first_ino, base, time.time_ns())
            if root is not None:
                txn.put(LAYER_INO.pack(layer, ROOT_INO), root.encode(), db=self.db["inodes"])
            for fname, ino, inode in files:
                self.put_dirent(txn, layer, ROOT_INO, fname, ino)
                self.put_inode(txn, layer, ino, inode)
            self.put_volume(txn, vol)
        return vol

    def _snapshot_key(self, volume: str, snap: str) -> bytes:
        return f"{volume}\0{snap}".encode()

    def snapshot(self, name: str, snap: str | None = None) -> Snapshot:
        """Freeze the active layer as snapshot ``snap`` and start a new one: O(1)."""
        with self.write() as txn:
            vol = self.volume(txn, name)
            if snap is None:
                snap = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
            _volume_name(snap)
            key = self._snapshot_key(name, snap)
            if txn.get(key, db=self.db["snapshots"]) is not None:
                raise UsageError(f"volume {name} already has a snapshot {snap}")
            frozen = vol.layer
            info = self.layer_info(txn, frozen)
            info["frozen"] = True
            self._set_layer(txn, frozen, info)
            vol = replace(vol, layer=self._new_layer(txn, frozen))
            self.put_volume(txn, vol)
            s = Snapshot(name, snap, frozen, vol.next_ino, time.time_ns())
            txn.put(key, msgpack.packb({"layer": s.layer, "next_ino": s.next_ino, "created_ns": s.created_ns}),
                    db=self.db["snapshots"])
        return s

    def get_snapshot(self, txn: lmdb.Transaction, volume: str, snap: str) -> Snapshot:
        raw = txn.get(self._snapshot_key(volume, snap), db=self.db["snapshots"])
        if raw is None:
            raise NotFoundError(f"volume {volume} has no snapshot {snap}")
        d = msgpack.unpackb(raw)
        return Snapshot(volume, snap, d["layer"], d["next_ino"], d["created_ns"])

    def snapshots(self, volume: str) -> list[Snapshot]:
        prefix = f"{volume}\0".encode()
        with self.read() as txn:
            self.volume(txn, volume)
            out = [self.get_snapshot(txn, volume, k[len(prefix):].decode())
                   for k, _v in prefixed(txn, self.db["snapshots"], prefix)]
        return sorted(out, key=lambda s: s.created_ns)

    def rollback(self, name: str, snap: str) -> tuple[int, set[int], set[tuple[int, bytes]]]:
        """Make the volume show snapshot ``snap``: a new empty active layer on the snapshot's.
        Inode numbers keep counting up, so none the kernel still caches is reused.

        Returns the new layer and what differs between the two states: the inodes
        and the (directory, name) entries that either side changed since their
        common layer, which is all a mount must make the kernel forget."""
        with self.write() as txn:
            vol = self.volume(txn, name)
            s = self.get_snapshot(txn, name, snap)
            before = self.chain(txn, vol.layer)
            vol = replace(vol, layer=self._new_layer(txn, s.layer), next_ino=max(vol.next_ino, s.next_ino))
            self.put_volume(txn, vol)
            after = self.chain(txn, vol.layer)
            common = set(before) & set(after)
            inodes: set[int] = set()
            names: set[tuple[int, bytes]] = set()
            for layer in (x for x in before + after if x not in common):
                inodes.update(self._layer_keys(txn, "inodes", layer, lambda k: LAYER_INO.unpack(k)[1]))
                names.update(self._layer_keys(txn, "dirents", layer, lambda k: (U64.unpack(k[8:16])[0], k[16:])))
        return vol.layer, inodes, names

    def _layer_keys(self, txn: lmdb.Transaction, db: str, layer: int, decode: Any) -> Iterator[Any]:
        for k, _v in prefixed(txn, self.db[db], U64.pack(layer)):
            yield decode(k)

    def clone(self, name: str, snap: str, names: list[str]) -> list[Volume]:
        """New volumes ``names``, each an empty active layer on snapshot ``snap``: one transaction."""
        for n in names:
            _volume_name(n)
        out = []
        with self.write() as txn:
            vol = self.volume(txn, name)
            s = self.get_snapshot(txn, name, snap)
            for n in names:
                if txn.get(n.encode(), db=self.db["volumes"]) is not None:
                    raise UsageError(f"volume {n} already exists")
                new = Volume(n, self._new_layer(txn, s.layer), s.next_ino, vol.base, time.time_ns(),
                             vol.block_size)
                self.put_volume(txn, new)
                out.append(new)
        return out

    def remove_snapshot(self, volume: str, snap: str) -> None:
        with self.write() as txn:
            self.get_snapshot(txn, volume, snap)
            txn.delete(self._snapshot_key(volume, snap), db=self.db["snapshots"])

    def remove_volume(self, name: str) -> None:
        with self.write() as txn:
            self.volume(txn, name)
            txn.delete(name.encode(), db=self.db["volumes"])
            for s in self._snapshot_keys(txn, name):
                txn.delete(s, db=self.db["snapshots"])

    def _snapshot_keys(self, txn: lmdb.Transaction, volume: str) -> list[bytes]:
        return [k for k, _v in prefixed(txn, self.db["snapshots"], f"{volume}\0".encode())]

    # -- records of a layer -----------------------------------------------------------

    def get_inode(self, txn: lmdb.Transaction, layer: int, ino: int) -> Inode | None:
        raw = txn.get(LAYER_INO.pack(layer, ino), db=self.db["inodes"])
        return None if raw is None else Inode.decode(raw)

    def inodes_of(self, txn: lmdb.Transaction, layer: int) -> Iterator[tuple[int, Inode]]:
        for k, v in prefixed(txn, self.db["inodes"], U64.pack(layer)):
            yield LAYER_INO.unpack(k)[1], Inode.decode(v)

    def put_inode(self, txn: lmdb.Transaction, layer: int, ino: int, inode: Inode) -> None:
        txn.put(LAYER_INO.pack(layer, ino), inode.encode(), db=self.db["inodes"])

    def get_dirent(self, txn: lmdb.Transaction, layer: int, parent: int, name: bytes) -> int | None:
        raw = txn.get(LAYER_INO.pack(layer, parent) + name, db=self.db["dirents"])
        return None if raw is None else U64.unpack(raw)[0]

    def put_dirent(self, txn: lmdb.Transaction, layer: int, parent: int, name: bytes, child: int) -> None:
        """``child`` 0 is a whiteout: the name is gone, whatever lower layers say."""
        txn.put(LAYER_INO.pack(layer, parent) + name, U64.pack(child), db=self.db["dirents"])

    def dirents(self, txn: lmdb.Transaction, layer: int, parent: int) -> Iterator[tuple[bytes, int]]:
        prefix = LAYER_INO.pack(layer, parent)
        for k, v in prefixed(txn, self.db["dirents"], prefix):
            yield k[len(prefix):], U64.unpack(v)[0]

    def get_block(self, txn: lmdb.Transaction, layer: int, ino: int, block: int) -> tuple[int, int] | None:
        """(file, offset) of a block, (0, 0) for a block of zeros, None if the layer lacks it."""
        raw = txn.get(LAYER_INO_BLOCK.pack(layer, ino, block), db=self.db["blocks"])
        if raw is None:
            return None
        return BLOCK_LOC.unpack(raw) if raw else (0, 0)

    def put_block(self, txn: lmdb.Transaction, layer: int, ino: int, block: int, loc: tuple[int, int]) -> None:
        txn.put(LAYER_INO_BLOCK.pack(layer, ino, block), BLOCK_LOC.pack(*loc) if loc[0] else b"",
                db=self.db["blocks"])

    def has_blocks(self, txn: lmdb.Transaction, layer: int, ino: int) -> bool:
        prefix = LAYER_INO.pack(layer, ino)
        cur = txn.cursor(db=self.db["blocks"])
        return bool(cur.set_range(prefix)) and cur.key()[:16] == prefix

    def bytes_untouched(self, txn: lmdb.Transaction, chain: tuple[int, ...], ino: int) -> bool:
        """No layer of ``chain`` holds a block of ``ino`` or cut it: its bytes are the base image's."""
        return not any(self.has_blocks(txn, layer, ino)
                       or ((i := self.get_inode(txn, layer, ino)) is not None and i.cut >= 0) for layer in chain)

    def drop_blocks(self, txn: lmdb.Transaction, layer: int, ino: int, first: int) -> None:
        """Delete the layer's block records of ``ino`` from block ``first`` on."""
        start = LAYER_INO_BLOCK.pack(layer, ino, first)
        prefix = start[:16]
        cur = txn.cursor(db=self.db["blocks"])
        if not cur.set_range(start):
            return
        while cur.key()[:16] == prefix:
            if not cur.delete():
                break

    def next_data_file(self, txn: lmdb.Transaction) -> int:
        return self._next(txn, b"next_file")

    def generation(self, txn: lmdb.Transaction) -> int:
        """Bumped by every transaction that makes a record point at bytes another record
        already points at, or repoints records (flatten, prune, compaction): a pass that
        computed records in an older view must not commit them (cow/gc.py)."""
        raw = txn.get(b"generation", db=self.db["meta"])
        return U64.unpack(raw)[0] if raw else 0

    def bump_generation(self, txn: lmdb.Transaction) -> int:
        n = self.generation(txn) + 1
        txn.put(b"generation", U64.pack(n), db=self.db["meta"])
        return n

    def data_path(self, file_id: int) -> str:
        return os.path.join(self.directory, "data", f"{file_id:08x}.blk")
