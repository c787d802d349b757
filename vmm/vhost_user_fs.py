"""A vhost-user-fs backend: QEMU's virtio-fs device, served by cubefs's FUSE server.

QEMU connects to our unix socket and speaks vhost-user (a 12-byte header,
a payload, file descriptors as SCM_RIGHTS): it hands us the guest's RAM as
file regions (vmm/guest_memory.py maps them, or reaches them in QEMU's own
address space when QEMU maps them privately, as a template's clone does), the
addresses of each virtqueue's rings, and an eventfd per queue to kick us and
one to call (interrupt) the guest.  Each request in a
request queue is a descriptor chain: the device-readable part is a FUSE
request exactly as /dev/fuse would give it, the writable part takes the
reply; :class:`cubefs.fuse.server.FuseServer` answers it, the one dispatcher
for both transports.  Queue 0 (hiprio) carries FORGETs, which get no reply.

Invariants: every guest address is checked against the memory table before
use (a bad one fails that request, never the backend); used entries are
written before the used index (x86 keeps stores in order; EVENT_IDX is not
offered, so no full fence is ever needed and every batch signals).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
from typing import Any

import trio

from cubefs.fuse import protocol as p
from cubefs.fuse.server import FuseServer
from vmm.guest_memory import GuestMemory, RingError, Span, gather, scatter

log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
DESC = struct.Struct("<QIHH")
VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER = 1, 2, 3, 4
SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD = 5, 6, 7
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18

FEATURES = (1 << 32) | (1 << 30)  # VIRTIO_F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = (1 << 0) | (1 << 3)  # MQ, REPLY_ACK
NUM_QUEUES = 2  # hiprio + one request queue (Linux 6.1 uses one)


class BadChain(RingError):
    """One request's descriptor chain is unusable; the queue itself is fine."""

    def __init__(self, head: int, why: str) -> None:
        super().__init__(why)
        self.head = head


class Virtqueue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.last_avail = 0
        self.used_idx = 0
        self.desc: Span | None = None
        self.avail: Span | None = None
        self.used: Span | None = None
        self.kick = -1
        self.call = -1
        self.enabled = False

    def pending(self) -> bool:
        assert self.avail is not None
        return self.avail.unpack(U16, 2)[0] != self.last_avail

    def pop(self, mem: GuestMemory) -> tuple[int, list[Span], list[Span]]:
        assert self.avail is not None and self.desc is not None
        head = self.avail.unpack(U16, 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            raise RingError(f"queue {self.index}: head {head} out of range")
        try:
            return head, *self._chain(mem, head)
        except RingError as err:
            raise BadChain(head, str(err)) from None

    def _chain(self, mem: GuestMemory, head: int) -> tuple[list[Span], list[Span]]:
        assert self.desc is not None
        readable: list[Span] = []
        writable: list[Span] = []
        table, size = self.desc, self.num
        i, seen = head, 0
        while True:
            seen += 1
            if seen > size:
                raise RingError(f"queue {self.index}: descriptor loop")
            addr, length, flags, nxt = table.unpack(DESC, 16 * i)
            if flags & F_INDIRECT:
                if length % 16 or not length:
                    raise RingError(f"queue {self.index}: bad indirect table")
                table, size, i, seen = mem.gpa(addr, length), length // 16, 0, 0
                continue
            buf = mem.gpa(addr, length)
            if flags & F_WRITE:
                writable.append(buf)
            elif writable:
                raise RingError(f"queue {self.index}: a readable descriptor after a writable one")
            else:
                readable.append(buf)
            if not flags & F_NEXT:
                break
            i = nxt
            if i >= size:
                raise RingError(f"queue {self.index}: next {i} out of range")
        return readable, writable

    def push(self, head: int, written: int) -> None:
        assert self.used is not None
        self.used.pack(USED, 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used.pack(U16, 2, self.used_idx)  # after the entry: x86 keeps stores in order

    def notify(self) -> None:
        if self.call >= 0:
            try:
                os.write(self.call, U64.pack(1))
            except OSError as err:
                log.warning("queue %d: cannot signal the guest: %s", self.index, err)


class VhostUserFs:
    """One QEMU connection: the vhost-user messages, and the queues they describe."""

    def __init__(self, server: FuseServer) -> None:
        self.server = server
        self.mem = GuestMemory()
        self.queues = [Virtqueue(i) for i in range(NUM_QUEUES)]
        self.features = 0
        self.protocol_features = 0
        self.nursery: trio.Nursery | None = None
        self.requests = 0
        self.bad_requests = 0

    async def serve(self, conn: socket.socket) -> None:
        # QEMU's pid, to reach RAM it maps privately (a template's clone): vmm/guest_memory.py
        self.mem.pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        conn.setblocking(False)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                msg = await self._recv(conn)
                if msg is None:
                    break
                request, flags, payload, fds = msg
                reply = self._message(request, payload, fds)
                if reply is None and flags & NEED_REPLY and self.protocol_features & (1 << 3):
                    reply = U64.pack(0)
                if reply is not None:
                    conn.send(HEADER.pack(request, VERSION | REPLY, len(reply)) + reply)
            nursery.cancel_scope.cancel()
        self.mem.close()

    async def _recv(self, conn: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
        while True:
            try:
                data, anc, _flags, _addr = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(8 * 4))
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
        if not data:
            return None
        fds: list[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        request, flags, size = HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            try:
                chunk = conn.recv(size - len(payload))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            if not chunk:
                return None
            payload += chunk
        return request, flags, payload, fds

    def _message(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        if request == GET_FEATURES:
            return U64.pack(FEATURES)
        if request == SET_FEATURES:
            self.features = U64.unpack_from(payload)[0]
            if not self.features & (1 << 30):  # no ring states: every ring is enabled
                for q in self.queues:
                    q.enabled = True
            return None
        if request == GET_PROTOCOL_FEATURES:
            return U64.pack(PROTOCOL_FEATURES)
        if request == SET_PROTOCOL_FEATURES:
            self.protocol_features = U64.unpack_from(payload)[0]
            return None
        if request == GET_QUEUE_NUM:
            return U64.pack(NUM_QUEUES)
        if request in (SET_OWNER, RESET_OWNER, SET_LOG_BASE, SET_LOG_FD):
            for fd in fds:
                os.close(fd)
            return None
        if request == SET_MEM_TABLE:
            n = struct.unpack_from("<I", payload)[0]
            regions = [REGION.unpack_from(payload, 8 + 32 * i) for i in range(n)]
            self.mem.replace(regions, fds)
            for q in self.queues:  # ring pointers must be translated again
                q.desc = q.avail = q.used = None
            return None
        index, num = STATE.unpack_from(payload) if len(payload) >= 8 else (0, 0)
        if request == SET_VRING_NUM:
            self.queues[index].num = num
            return None
        if request == SET_VRING_BASE:
            self.queues[index].last_avail = num
            return None
        if request == SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = ADDR.unpack_from(payload)
            q = self.queues[index]
            q.desc = self.mem.uva(desc, 16 * q.num)
            q.used = self.mem.uva(used, 4 + 8 * q.num)
            q.avail = self.mem.uva(avail, 4 + 2 * q.num)
            q.used_idx = q.used.unpack(U16, 2)[0]
            return None
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            (value,) = U64.unpack_from(payload)
            q = self.queues[value & 0xFF]
            fd = -1 if value & 0x100 or not fds else fds[0]
            if request == SET_VRING_KICK:
                self._close_kick(q)
                q.kick = fd
                if fd >= 0 and self.nursery is not None:
                    self.nursery.start_soon(self._kicks, q, fd)
            elif request == SET_VRING_CALL:
                if q.call >= 0:
                    os.close(q.call)
                q.call = fd
            elif fd >= 0:
                os.close(fd)
            return None
        if request == SET_VRING_ENABLE:
            self.queues[index].enabled = bool(num)
            if num:
                self._drain(self.queues[index])
            return None
        if request == GET_VRING_BASE:
            # The ring *stops* (QEMU pauses the VM, or migrates it): no kick fd, so nothing drains it
            # until SET_VRING_KICK starts it again on resume.  Stopped is not disabled: QEMU does not
            # send SET_VRING_ENABLE again on resume, so a ring disabled here stayed dead after `cont`.
            q = self.queues[index]
            self._close_kick(q)
            return STATE.pack(index, q.last_avail)
        log.warning("vhost-user: ignoring request %d", request)
        for fd in fds:
            os.close(fd)
        return None

    def _close_kick(self, q: Virtqueue) -> None:
        """Close a ring's kick fd, first waking the task that waits on it: the next kick fd QEMU
        sends (on resume) may get the same number, and trio allows one waiter per fd."""
        if q.kick >= 0:
            fd, q.kick = q.kick, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def _kicks(self, q: Virtqueue, fd: int) -> None:
        while q.kick == fd:
            try:
                await trio.lowlevel.wait_readable(fd)
                os.read(fd, 8)
            except (OSError, trio.ClosedResourceError):
                return
            self._drain(q)

    def _drain(self, q: Virtqueue) -> None:
        """Answer every request the guest has made available.  A chain that points
        outside guest memory or loops fails alone (used with length 0, which the
        guest's driver sees as an error); only a ring that names no valid chain at
        all stops its queue."""
        if not q.enabled or q.avail is None or q.desc is None or q.used is None:
            return
        done = False
        while q.pending():
            try:
                head, readable, writable = q.pop(self.mem)
            except BadChain as err:
                log.error("virtio-fs: %s; that request fails", err)
                self.bad_requests += 1
                q.push(err.head, 0)
                done = True
                continue
            except RingError as err:
                log.error("virtio-fs: %s; the queue stops", err)
                self.bad_requests += 1
                q.enabled = False
                break
            self._request(q, head, readable, writable)
            done = True
        if done:
            q.notify()

    def _request(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span]) -> None:
        self.requests += 1
        try:
            request = gather(readable)
        except RingError as err:
            log.error("virtio-fs: %s; that request fails", err)
            self.bad_requests += 1
            q.push(head, 0)
            return
        if len(request) < p.IN_HEADER.size:
            self.bad_requests += 1
            q.push(head, 0)
            return
        out: Any = self.server.handle(request)
        if out is None:  # FORGET: no reply
            q.push(head, 0)
            return
        if isinstance(out, bytes | list):
            q.push(head, self._reply(out, writable, request))
            return
        assert self.nursery is not None
        self.nursery.start_soon(self._later, q, head, out, writable, request)

    async def _later(self, q: Virtqueue, head: int, work: Any, writable: list[Span], request: bytes) -> None:
        out = await work
        q.push(head, self._reply(out, writable, request) if out is not None else 0)
        q.notify()

    def _reply(self, out: bytes | list[bytes | memoryview], writable: list[Span], request: bytes) -> int:
        parts = out if isinstance(out, list) else [out]
        try:
            return scatter(parts, writable)
        except RingError:
            self.bad_requests += 1
            unique = p.IN_HEADER.unpack_from(request)[2]
            try:
                return scatter([p.error_reply(unique, errno.EIO)], writable)
            except RingError:
                return 0  # not even room for an error: the used length says so


class VirtioFsTransport:
    """The daemon's Transport for a VM: a unix socket QEMU connects to, instead of /dev/fuse."""

    def __init__(self, fs: Any, socket_path: str) -> None:
        self.server = FuseServer(fs)
        self.ops = self.server.ops
        self.path = socket_path
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None

    @property
    def read_bytes(self) -> int:
        return self.server.read_bytes

    def mount(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.setblocking(False)

    async def serve(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.listener)
        log.info("virtio-fs: QEMU connected on %s", self.path)
        self.conn = conn
        await VhostUserFs(self.server).serve(conn)
        conn.close()
        log.info("virtio-fs: QEMU went away")

    async def invalidate(self, inodes: set[int], names: set[tuple[int, bytes]]) -> int:
        """virtio-fs has no notifications for the host to send (Linux 6.1 has no
        notification queue): after a rollback the guest must mount its root again,
        which vmm/vm.py does around it.  Nothing is sent."""
        return 0

    def stop(self) -> None:
        """Stop serving: the listener closes, and a connected VM loses its root."""
        if self.listener is not None:
            self.listener.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
