"""A minimal io_uring of our own, through ``ctypes`` syscalls: enough for FUSE over io_uring.

Why not a library: what FUSE needs is one opcode (``IORING_OP_URING_CMD`` with 128-byte
SQEs, whose tail carries ``struct fuse_uring_cmd_req``), a submit and a look at the
completion ring.  That is two syscalls (``io_uring_setup``, ``io_uring_enter``) and three
``mmap``s; PyPI's ``liburing`` (a Zig-built wrapper of the C library) would be a compiled
dependency for a few dozen lines, and the project ships no compiled extension of its own.

The rings are shared memory: a completion is seen by reading the CQ tail (no syscall), so
the serve loop can poll it after a request for a few microseconds before it sleeps on the
ring's descriptor (which polls readable while the CQ holds completions).  One thread owns
a ring: it alone submits and reaps (``SINGLE_ISSUER``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import mmap
import os
import struct
from typing import Any

from cubefs.fuse.protocol import error_reply

log = logging.getLogger(__name__)

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426

IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_URING_CMD = 46

SQE_SIZE = 128  # with IORING_SETUP_SQE128
CQE = struct.Struct("<QiI")  # user_data res flags
# sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features wq_fd resv[3]
# sq_off: head tail ring_mask ring_entries flags dropped array resv1 user_addr
# cq_off: head tail ring_mask ring_entries overflow cqes flags resv1 user_addr
PARAMS = struct.Struct("<IIIIIII12x IIIIIIIIQ IIIIIIIIQ")
# A whole 128-byte URING_CMD sqe: opcode flags ioprio fd cmd_op pad addr len uring_cmd_flags
# user_data, then at 48 the command, for FUSE a fuse_uring_cmd_req (flags commit_id qid).
# pack_into zero-fills the rest: one call writes an SQE.
SQE_CMD = struct.Struct("<BBHiIIQIIQ8xQQH6x56x")

assert PARAMS.size == 120 and SQE_CMD.size == SQE_SIZE


@functools.cache
def libc() -> ctypes.CDLL:
    """glibc's soname first: ``find_library`` runs ``ldconfig -p`` (~4 ms of every mount,
    measured); it is asked only where that name does not load (another libc)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@functools.cache
def _syscall() -> Any:
    """``syscall(2)`` with a fixed prototype (one for io_uring_enter's arguments): ctypes
    then converts plain ints itself, ~1 us a call cheaper than wrapping each in c_long."""
    proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                             ctypes.c_long, ctypes.c_void_p, ctypes.c_long, use_errno=True)
    return proto(("syscall", libc()))


class Ring:
    """One io_uring instance with 128-byte SQEs: queue URING_CMDs, submit, reap completions."""

    def __init__(self, entries: int, cq_entries: int | None = None) -> None:
        params = bytearray(PARAMS.size)
        flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER
        if cq_entries:
            flags |= IORING_SETUP_CQSIZE
            struct.pack_into("<II", params, 4, cq_entries, flags)
        else:
            struct.pack_into("<I", params, 8, flags)
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = libc().syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries), buf)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        fields = PARAMS.unpack(bytes(params))
        sq_entries, cq_n, _flags, _cpu, _idle, features, _wq = fields[:7]
        sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array, _r1, _ua = fields[7:16]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, _cq_flags, _r2, _ua2 = fields[16:25]
        try:
            sq_size = sq_array + sq_entries * 4
            cq_size = cqes + cq_n * CQE.size
            if features & IORING_FEAT_SINGLE_MMAP:
                size = max(sq_size, cq_size)
                self._sq_map = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=IORING_OFF_SQ_RING)
                self._cq_map = self._sq_map
            else:
                self._sq_map = mmap.mmap(fd, sq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=IORING_OFF_SQ_RING)
                self._cq_map = mmap.mmap(fd, cq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=IORING_OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, sq_entries * SQE_SIZE, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   offset=IORING_OFF_SQES)
        except OSError:
            os.close(fd)
            raise
        self.sq_entries = sq_entries
        self._sq_head = ctypes.c_uint32.from_buffer(self._sq_map, sq_head)
        self._sq_tail = ctypes.c_uint32.from_buffer(self._sq_map, sq_tail)
        self._sq_mask = ctypes.c_uint32.from_buffer(self._sq_map, sq_mask).value
        self._cq_head = ctypes.c_uint32.from_buffer(self._cq_map, cq_head)
        self._cq_tail = ctypes.c_uint32.from_buffer(self._cq_map, cq_tail)
        self._cq_mask = ctypes.c_uint32.from_buffer(self._cq_map, cq_mask).value
        self._cqes = cqes
        # The SQ array maps slot i to SQE i once and for all: SQEs are filled in ring order.
        array = (ctypes.c_uint32 * sq_entries).from_buffer(self._sq_map, sq_array)
        for i in range(sq_entries):
            array[i] = i
        self._tail = self._sq_tail.value  # our private tail (32 bits, wrapping): published by submit()
        self.pending = 0  # SQEs queued and not yet submitted

    def queue_cmd(self, fd: int, cmd_op: int, user_data: int, flags: int, commit_id: int, qid: int,
                  addr: int = 0, length: int = 0) -> None:
        """Queue an ``IORING_OP_URING_CMD`` on ``fd`` whose command is a ``fuse_uring_cmd_req``
        (``flags``, ``commit_id``, ``qid``).  Submits first if the SQ is full."""
        if (self._tail - self._sq_head.value) & 0xFFFFFFFF >= self.sq_entries:
            self.submit()
        SQE_CMD.pack_into(self._sqes, (self._tail & self._sq_mask) * SQE_SIZE, IORING_OP_URING_CMD, 0, 0, fd,
                          cmd_op, 0, addr, length, 0, user_data, flags, commit_id, qid)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self.pending += 1

    def submit(self) -> int:
        """Hand the queued SQEs to the kernel: one ``io_uring_enter``.  Every SQE between the
        kernel's head and our tail is asked for, not only the ones queued since the last
        call: one the kernel left (it stops at an SQE that fails) goes with the next, never
        stays behind.  Returns the number the kernel took."""
        if not self.pending:
            return 0
        self._sq_tail.value = self._tail  # a store the kernel reads with acquire
        self.pending = 0
        n = (self._tail - self._sq_head.value) & 0xFFFFFFFF
        enter = _syscall()
        while True:
            rc = enter(SYS_IO_URING_ENTER, self.fd, n, 0, 0, None, 0)
            if rc >= 0:
                if rc < n:
                    self.pending = n - rc  # left in the SQ: asked for again at the next submit
                return int(rc)
            err = ctypes.get_errno()
            if err == 4:  # EINTR: what was submitted stays submitted
                self.pending = (self._tail - self._sq_head.value) & 0xFFFFFFFF
                return n - self.pending
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def ready(self) -> int:
        """Completions waiting in the CQ (a memory read, no syscall)."""
        return (self._cq_tail.value - self._cq_head.value) & 0xFFFFFFFF

    def reap(self) -> list[tuple[int, int]]:
        """Every completion waiting: (user_data, res), oldest first."""
        head = self._cq_head.value
        tail = self._cq_tail.value
        out = []
        while head != tail:
            user_data, res, _flags = CQE.unpack_from(self._cq_map, self._cqes + (head & self._cq_mask) * CQE.size)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        return out

    def close(self) -> None:
        if self.fd < 0:
            return
        # ctypes views pin the maps' buffers: drop them before the maps go
        del self._sq_head, self._sq_tail, self._cq_head, self._cq_tail
        for m in {id(self._sq_map): self._sq_map, id(self._cq_map): self._cq_map}.values():
            m.close()
        self._sqes.close()
        os.close(self.fd)
        self.fd = -1


class Buffers:
    """Anonymous memory the kernel reads and writes through user pointers (ring entries)."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        del self._anchor
        self.map.close()


# -- FUSE over io_uring (Linux 6.14+, include/uapi/linux/fuse.h) ---------------------------

FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
HEADER_SIZE = 288  # fuse_uring_req_header: in_out[128] op_in[128] ring_ent_in_out (32 bytes)
OP_IN = 128
ENT_IN_OUT = 256  # flags commit_id payload_sz padding reserved
STAGE = 4096  # per entry: the header, then room to lay a request out contiguously before its payload
REQ_HEAD = struct.Struct("<I4xQ")  # fuse_in_header: len, unique
PAYLOAD_SZ = struct.Struct("<I")
IN_HEADER_SIZE = 40
OUT_HEADER_SIZE = 16


def possible_cpus() -> int:
    """The kernel makes one queue per possible CPU (``num_possible_cpus``) and waits for
    an entry on every one of them before it sends anything through the ring."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        n = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n
    except (OSError, ValueError):
        return os.cpu_count() or 1


class FuseRing:
    """The ring entries of one FUSE connection: ``per_queue`` entries for each CPU's queue,
    each a header buffer and a ``payload``-byte buffer the kernel copies requests into and
    answers out of.  Entry ``i`` serves queue ``i // per_queue``; a completion's user_data
    is the entry's number."""

    def __init__(self, fuse_fd: int, queues: int, per_queue: int, payload: int) -> None:
        self.fuse_fd = fuse_fd
        self.queues = queues
        self.per_queue = per_queue
        self.count = queues * per_queue
        self.payload = payload
        self.stride = STAGE + payload
        size = 1
        while size < self.count:
            size *= 2
        self.ring = Ring(size, cq_entries=size * 2)
        try:
            self.mem = Buffers(self.count * self.stride)
        except OSError:
            self.ring.close()
            raise
        self.view = self.mem.view
        # Each entry's iovec pair: the header, then the payload.
        self._iov = (ctypes.c_uint64 * (4 * self.count))()
        for i in range(self.count):
            base = self.mem.address + i * self.stride
            self._iov[4 * i : 4 * i + 4] = [base, HEADER_SIZE, base + STAGE, payload]
        self._iov_addr = ctypes.addressof(self._iov)
        self.uniques = [0] * self.count  # the request each entry holds (its commit id)

    def register(self) -> None:
        """Offer every entry to the kernel (after INIT is answered: the kernel refuses with
        EAGAIN before).  Completions come when a request fills an entry."""
        for i in range(self.count):
            self.ring.queue_cmd(self.fuse_fd, FUSE_IO_URING_CMD_REGISTER, i, 0, 0, i // self.per_queue,
                                self._iov_addr + 32 * i, 2)
        self.ring.submit()

    def request(self, i: int) -> memoryview:
        """Entry ``i``'s request as one message (``fuse_in_header``, the operation's header,
        the rest), laid out in place in front of its payload: only the headers are copied."""
        base = i * self.stride
        v = self.view
        length, unique = REQ_HEAD.unpack_from(v, base)
        self.uniques[i] = unique  # first: a malformed request is answered (EIO) by its unique
        (payload_sz,) = PAYLOAD_SZ.unpack_from(v, base + ENT_IN_OUT + 16)
        op = length - IN_HEADER_SIZE - payload_sz
        if not 0 <= op <= OP_IN or payload_sz > self.payload:
            raise ValueError(f"a malformed ring request: length {length}, payload {payload_sz}")
        start = base + STAGE - IN_HEADER_SIZE - op
        v[start : start + IN_HEADER_SIZE] = v[base : base + IN_HEADER_SIZE]
        v[start + IN_HEADER_SIZE : base + STAGE] = v[base + OP_IN : base + OP_IN + op]
        return v[start : base + STAGE + payload_sz]

    def commit(self, i: int, reply: bytes | list[bytes | memoryview]) -> None:
        """Queue entry ``i``'s answer (a reply as /dev/fuse takes it: the 16-byte
        ``fuse_out_header``, then the result) and the fetch of its next request."""
        base = i * self.stride
        v = self.view
        pos = base + STAGE
        if isinstance(reply, list):
            head = reply[0]
            v[base : base + OUT_HEADER_SIZE] = head[:OUT_HEADER_SIZE]
            rest: list[bytes | memoryview] = [head[OUT_HEADER_SIZE:], *reply[1:]] if len(head) > OUT_HEADER_SIZE \
                else list(reply[1:])
        else:
            v[base : base + OUT_HEADER_SIZE] = reply[:OUT_HEADER_SIZE]
            rest = [memoryview(reply)[OUT_HEADER_SIZE:]]
        if sum(len(part) for part in rest) > self.payload:  # it would run into the next entry
            log.error("a FUSE reply of %d bytes does not fit its ring entry (%d): answered EIO",
                      sum(len(part) for part in rest), self.payload)
            v[base : base + OUT_HEADER_SIZE] = error_reply(self.uniques[i], errno.EIO)
            rest = []
        for part in rest:
            n = len(part)
            v[pos : pos + n] = part
            pos += n
        PAYLOAD_SZ.pack_into(v, base + ENT_IN_OUT + 16, pos - base - STAGE)
        self.ring.queue_cmd(self.fuse_fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, i, 0, self.uniques[i],
                            i // self.per_queue)

    def close(self) -> None:
        self.ring.close()
        self.mem.close()
