"""A vhost-user-blk back-end: QEMU's virtio-blk device, served from a block volume's copy-on-write blocks.

The disk is the ``disk`` file of a block volume (cubefs/volume/blk.py), read and
written through :class:`cubefs.volume.fs.VolumeFS`, so each write is one LMDB
transaction over blocks in the volume's data files and a snapshot of the
volume is a snapshot of the disk, in O(1).  Why a block device at all: the
guest's own filesystem keeps its metadata in guest memory and sends few,
large block writes, where virtio-fs sends one FUSE request per file
operation (docs/benchmarks.md, "Block disk").

Requests (virtio spec 1.2, 5.2.6): IN, OUT, FLUSH, GET_ID, DISCARD and
WRITE_ZEROES.  Each is answered before the next is read, in the order the guest
made them available; so the ring is idle whenever QEMU stops it, and a FLUSH
covers every write completed before it.

* **FLUSH** is durable when acknowledged: the data files are ``fdatasync``ed,
  then the index (``VolumeFS.fsync``).  Without a FLUSH a write survives a
  kill -9 of this back-end (the kernel keeps what was written and committed)
  but not a power cut of the host.  ``VIRTIO_BLK_F_CONFIG_WCE`` is not
  offered, so the guest keeps its cache in write-back mode and flushes.
* **DISCARD / WRITE_ZEROES** turn whole 64 KiB blocks into "zeros" records
  (the index's empty block record: no data written, the old bytes become
  garbage for the collector) and write zeros into the partial ends.
* **Bad requests fail alone**: a chain outside guest memory or looping gets a
  used length of 0; out-of-range sectors, a size not a multiple of 512, data
  over ``MAX_REQUEST``, too many or malformed discard segments get
  ``VIRTIO_BLK_S_IOERR``; an unknown type or flag ``VIRTIO_BLK_S_UNSUPP``.  A
  full host disk (ENOSPC from a data file or from LMDB) is an IOERR for that
  request; the transaction it was in is aborted, so nothing committed before
  changes.  The back-end lives through all of them.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections import Counter
from typing import Any

import lmdb

from cubefs.errors import UsageError
from cubefs.image.fs import FsError
from cubefs.volume.blk import disk_of
from vmm.guest_memory import RingError, Span, gather, scatter
from vmm.vhost_user import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    P_LOG_SHMFD,
    PF_CONFIG,
    PF_MQ,
    PF_REPLY_ACK,
    SocketListener,
    VhostUserBackend,
    Virtqueue,
)

log = logging.getLogger(__name__)

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE = 1 << 1, 1 << 2, 1 << 5, 1 << 6
F_FLUSH, F_TOPOLOGY, F_MQ = 1 << 9, 1 << 10, 1 << 12
F_DISCARD, F_WRITE_ZEROES, F_INDIRECT_DESC = 1 << 13, 1 << 14, 1 << 28
WZ_UNMAP = 1

REQ_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")  # discard / write-zeroes: sector, sectors, flags
# struct virtio_blk_config: capacity, size_max, seg_max, geometry (c, h, s), blk_size, topology
# (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, 3 unused
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60

SIZE_MAX = 64 << 10  # bytes per segment
SEG_MAX = 128  # segments per request (with indirect descriptors: one ring slot each)
MAX_REQUEST = SIZE_MAX * SEG_MAX  # 8 MiB: larger data fails alone
MAX_DISCARD_SECTORS = (256 << 20) // SECTOR  # per segment: 4,096 index records at most
MAX_DISCARD_SEG = 8
ID_BYTES = 20
NUM_QUEUES = 4  # offered; Linux uses one per vCPU up to this, each served in turn by this one thread


class VhostUserBlk(VhostUserBackend):
    """One QEMU connection serving one disk."""

    name = "vhost-user-blk"
    protocol_features = PF_MQ | PF_REPLY_ACK | PF_CONFIG | P_LOG_SHMFD
    num_queues = NUM_QUEUES

    def __init__(self, fs: Any, ino: int, size: int, serial: str, ops: Counter[str]) -> None:
        super().__init__()
        self.fs = fs
        self.ino = ino
        self.size = size
        self.serial = serial.encode()[:ID_BYTES]
        self.read_only = not fs.writable
        self.ops = ops
        self.read_bytes = 0
        self.written_bytes = 0
        self._last_error = 0.0
        self.features = (F_VERSION_1 | F_PROTOCOL_FEATURES | F_INDIRECT_DESC | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE
                         | F_TOPOLOGY | F_FLUSH | F_MQ | F_LOG_ALL
                         | (F_RO if self.read_only else F_DISCARD | F_WRITE_ZEROES))

    # -- migration: the dirty log ---------------------------------------------------------
    def _answer(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span],
                places: list[tuple[int, int]]) -> None:
        written = self.request(q, head, readable, writable)
        dirty = self._dirty()
        if dirty is not None:  # the guest pages written: read data and the status byte
            left = written
            for addr, length in places:
                if left <= 0:
                    break
                dirty.mark(addr, min(length, left))
                left -= length
        q.push(head, written, dirty)

    def config(self) -> bytes:
        bs = self.fs.block_size // SECTOR
        return CONFIG.pack(self.size // SECTOR, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR,
                           3, 0, 8, bs,  # 4 KiB physical sectors, 64 KiB (a CoW block) optimal I/O
                           1, 0, NUM_QUEUES,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, bs,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    # -- one request ----------------------------------------------------------------------
    def request(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span]) -> int:
        room = sum(len(sp) for sp in writable)
        if room < 1:  # nowhere to put a status: the used length of 0 says it failed
            self._bad("a request without a writable status byte")
            return 0
        try:
            out = gather(readable)
        except RingError as err:
            self._bad(str(err))
            return self._status(writable, S_IOERR)
        if len(out) < REQ_HEADER.size:
            self._bad(f"a request of {len(out)} bytes has no header")
            return self._status(writable, S_IOERR)
        kind, _ioprio, sector = REQ_HEADER.unpack_from(out)
        try:
            if kind == T_IN:
                return self._read(sector, writable, room - 1)
            if kind == T_OUT:
                return self._status(writable, self._write(sector, memoryview(out)[REQ_HEADER.size:]))
            if kind == T_FLUSH:
                self.ops["flush"] += 1
                self.fs.fsync(self.ino)
                return self._status(writable, S_OK)
            if kind == T_GET_ID:
                self.ops["get_id"] += 1
                ident = self.serial[: room - 1]
                return scatter([ident, bytes(room - 1 - len(ident)), bytes([S_OK])], writable)
            if kind in (T_DISCARD, T_WRITE_ZEROES):
                return self._status(writable, self._zeroes(kind, memoryview(out)[REQ_HEADER.size:]))
        except (OSError, lmdb.Error, FsError) as err:
            return self._status(writable, self._failed(kind, sector, err))
        except RingError as err:
            self._bad(str(err))
            return self._status(writable, S_IOERR)
        except Exception as err:  # the unexpected: that request fails, with a traceback; the disk goes on
            log.error("%s: request type %d at sector %d failed", self.name, kind, sector, exc_info=err)
            self.ops["errors"] += 1
            return self._status(writable, S_IOERR)
        self.ops["unsupported"] += 1
        return self._status(writable, S_UNSUPP)

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and nbytes <= MAX_REQUEST and sector * SECTOR + nbytes <= self.size

    def _read(self, sector: int, writable: list[Span], nbytes: int) -> int:
        if not self._range_ok(sector, nbytes):
            self._bad(f"read of {nbytes} bytes at sector {sector} (disk: {self.size} bytes)")
            return self._status(writable, S_IOERR)
        self.ops["read"] += 1
        parts = self.fs.read_now(self.ino, sector * SECTOR, nbytes) if nbytes else []
        self.read_bytes += nbytes
        return scatter([*parts, bytes([S_OK])], writable)

    def _write(self, sector: int, data: memoryview) -> int:
        if self.read_only:
            self._bad("write to a read-only disk")
            return S_IOERR
        if not self._range_ok(sector, len(data)):
            self._bad(f"write of {len(data)} bytes at sector {sector} (disk: {self.size} bytes)")
            return S_IOERR
        self.ops["write"] += 1
        if data:
            self.fs.write_now(self.ino, sector * SECTOR, data)
            self.written_bytes += len(data)
        return S_OK

    def _zeroes(self, kind: int, payload: memoryview) -> int:
        what = "discard" if kind == T_DISCARD else "write_zeroes"
        if self.read_only:
            self._bad(f"{what} on a read-only disk")
            return S_IOERR
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > MAX_DISCARD_SEG:
            self._bad(f"{what} with {len(payload)} bytes of segments")
            return S_IOERR
        segments = [SEGMENT.unpack_from(payload, i) for i in range(0, len(payload), SEGMENT.size)]
        for sector, count, flags in segments:
            if flags & ~WZ_UNMAP or (kind == T_DISCARD and flags):
                self.ops["unsupported"] += 1
                return S_UNSUPP
            if count > MAX_DISCARD_SECTORS or sector * SECTOR + count * SECTOR > self.size:
                self._bad(f"{what} of {count} sectors at {sector} (disk: {self.size} bytes)")
                return S_IOERR
        self.ops[what] += 1
        for sector, count, _flags in segments:
            self._zero(sector * SECTOR, count * SECTOR)
        return S_OK

    def _zero(self, offset: int, length: int) -> None:
        """Zeros over [offset, offset+length): whole blocks become "zeros" records in the active
        layer (one transaction), the partial ends are written with zeros."""
        bs = self.fs.block_size
        first, last = -(-offset // bs), (offset + length) // bs  # whole blocks [first, last)
        if first >= last:
            self.fs.write_now(self.ino, offset, bytes(length))
            return
        if offset < first * bs:
            self.fs.write_now(self.ino, offset, bytes(first * bs - offset))
        if offset + length > last * bs:
            self.fs.write_now(self.ino, last * bs, bytes(offset + length - last * bs))
        index = self.fs.index
        with index.write() as txn:
            layer = index.volume(txn, self.fs.name).layer
            for b in range(first, last):
                index.put_block(txn, layer, self.ino, b, (0, 0))

    # -- answers ----------------------------------------------------------------------------
    def _status(self, writable: list[Span], status: int) -> int:
        """Put ``status`` in the chain's last writable byte; the used length (1: only it)."""
        last = writable[-1]
        last.write(len(last) - 1, bytes([status]))
        return 1

    def _bad(self, why: str) -> None:
        self.bad_requests += 1
        self.ops["bad"] += 1
        self._log(logging.WARNING, "%s: %s; that request fails", self.name, why)

    def _failed(self, kind: int, sector: int, err: BaseException) -> int:
        self.ops["errors"] += 1
        code = getattr(err, "errno", None)
        if isinstance(err, lmdb.Error) and "MDB_MAP_FULL" not in str(err) and code is None:
            code = errno.ENOSPC if "No space" in str(err) else None
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or isinstance(err, lmdb.MapFullError):
            self._log(logging.ERROR, "%s: request type %d at sector %d: %s; the guest gets an I/O error", self.name,
                      kind, sector, os.strerror(code) if code else err)
        else:
            log.error("%s: request type %d at sector %d failed; the guest gets an I/O error", self.name, kind, sector,
                      exc_info=err)
        return S_IOERR

    def _log(self, level: int, fmt: str, *args: Any) -> None:
        """At most one line a second: a guest can send a flood of bad requests."""
        now = time.monotonic()
        if now - self._last_error >= 1.0:
            self._last_error = now
            log.log(level, fmt, *args)


class VhostUserBlkTransport(SocketListener):
    """The mount daemon's transport for a block volume: a unix socket QEMU's vhost-user-blk device
    connects to (``cubefs mount --volume NAME SOCKET --transport vhost-user-blk``); the daemon ends
    with the VM, as the virtio-fs one does."""

    def __init__(self, fs: Any, socket_path: str) -> None:
        if not hasattr(fs, "index"):
            raise UsageError("the vhost-user-blk transport serves block volumes ('--volume NAME'), not images")
        super().__init__(socket_path, "vhost-user-blk")
        self.fs = fs
        self.ino, self.size = disk_of(fs)
        self.ops: Counter[str] = Counter()
        self.device: VhostUserBlk | None = None

    @property
    def read_bytes(self) -> int:
        return self.device.read_bytes if self.device is not None else 0

    async def serve(self) -> None:
        conn = await self.accept()
        if conn is None:
            return
        log.info("vhost-user-blk: QEMU connected on %s (%d bytes)", self.path, self.size)
        self.device = VhostUserBlk(self.fs, self.ino, self.size, self.fs.name, self.ops)
        try:
            await self.device.serve(conn)
        finally:
            conn.close()
            if self.fs.writable:
                try:
                    self.fs.fsync(self.ino)  # what the guest wrote is durable once its VM is gone
                except (OSError, lmdb.Error) as err:
                    log.error("vhost-user-blk: the last flush failed: %s", err)
        log.info("vhost-user-blk: QEMU went away (%d requests, %d bad)", self.device.requests,
                 self.device.bad_requests)

    async def invalidate(self, inodes: set[int], names: set[tuple[int, bytes]]) -> int:
        """A block device has nothing the host can invalidate: a guest whose disk is rolled back
        under it keeps stale pages.  Roll a served disk back only with its VM's memory (a paused
        VM restored from a snapshot taken with it)."""
        if self.conn is not None:
            log.warning("vhost-user-blk: %s rolled back under a running guest, whose caches now disagree with "
                        "its disk", self.path)
        return 0

