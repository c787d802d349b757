"""The device-independent half of a vhost-user back-end: one QEMU connection, its messages and queues.

QEMU connects to our unix socket and speaks vhost-user (a 12-byte header,
a payload, file descriptors as SCM_RIGHTS): guest RAM as file regions
(vmm/guest_memory.py), each virtqueue's ring addresses, an eventfd per queue
to kick us and one to call the guest.  A device subclass says what it
offers (features, protocol features, queues, config space) and answers each
descriptor chain (:meth:`VhostUserBackend.request`).

Devices: vmm/vhost_user_fs.py (virtio-fs, which answers requests later and
hands its state over) and vmm/vhost_user_blk.py (a block device).  Invariants:
every guest address is checked against the memory table before use (a bad one
fails that request, never the back-end); used entries are written before the
used index (x86 keeps stores in order; EVENT_IDX is not offered, so every
batch signals).  A device whose requests all complete before the next message
is read (the block device) finds every ring idle at ``GET_VRING_BASE``; one
with requests in flight (virtio-fs) waits for them there (:meth:`_handle`).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct

import trio

from vmm.guest_memory import DirtyLog, GuestMemory, RingError, Span

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
SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE = 42, 43
NAMES = {
    GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER", RESET_OWNER: "RESET_OWNER",
    SET_MEM_TABLE: "SET_MEM_TABLE", SET_LOG_BASE: "SET_LOG_BASE", SET_LOG_FD: "SET_LOG_FD",
    SET_VRING_NUM: "SET_VRING_NUM", SET_VRING_ADDR: "SET_VRING_ADDR", SET_VRING_BASE: "SET_VRING_BASE",
    GET_VRING_BASE: "GET_VRING_BASE", SET_VRING_KICK: "SET_VRING_KICK", SET_VRING_CALL: "SET_VRING_CALL",
    SET_VRING_ERR: "SET_VRING_ERR", GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
    SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES", GET_QUEUE_NUM: "GET_QUEUE_NUM",
    SET_VRING_ENABLE: "SET_VRING_ENABLE", SET_DEVICE_STATE_FD: "SET_DEVICE_STATE_FD",
    CHECK_DEVICE_STATE: "CHECK_DEVICE_STATE",
}

GET_CONFIG, SET_CONFIG = 24, 25
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
MAX_CONFIG = 256  # the spec's bound on a config space payload
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
# Migration (a VM checkpoint saves a running guest): QEMU refuses to migrate a vhost-user device
# without VHOST_F_LOG_ALL and protocol feature LOG_SHMFD; with them, the guest pages a back-end
# writes while QEMU copies RAM (data it answers with, the used ring) go in the dirty log.
F_LOG_ALL = 1 << 26
P_LOG_SHMFD = 1 << 1
VRING_F_LOG = 1  # SET_VRING_ADDR flags: log writes to this used ring at its log address
LOG = struct.Struct("<QQ")  # SET_LOG_BASE: mmap size, offset of the log in the fd
MAX_PAYLOAD = 4096  # no message we accept is longer; a longer one ends the connection


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
        self.inflight = 0  # requests taken from the ring and not yet answered in it
        self.settled: trio.Event | None = None  # set when inflight drops to 0
        self.log_used = False  # VHOST_VRING_F_LOG: mark used-ring writes in the dirty log
        self.log_addr = 0  # guest-physical address the used ring is logged at

    def pending(self) -> bool:
        assert self.avail is not None
        return self.avail.unpack(U16, 2)[0] != self.last_avail

    def pop(self, mem: GuestMemory) -> tuple[int, list[Span], list[Span], list[tuple[int, int]]]:
        assert self.avail is not None and self.desc is not None
        head = self.avail.unpack(U16, 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            raise RingError(f"queue {self.index}: head {head} out of range")
        try:
            return head, *self._chain(mem, head)
        except RingError as err:
            raise BadChain(head, str(err)) from None

    def _chain(self, mem: GuestMemory, head: int) -> tuple[list[Span], list[Span], list[tuple[int, int]]]:
        """The chain's readable and writable buffers, and the writable ones' guest-physical
        ranges (for the dirty log)."""
        assert self.desc is not None
        readable: list[Span] = []
        writable: list[Span] = []
        places: list[tuple[int, int]] = []
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
                places.append((addr, length))
            elif writable:
                raise RingError(f"queue {self.index}: a readable descriptor after a writable one")
            else:
                readable.append(buf)
            if not flags & F_NEXT:
                break
            i = nxt
            if i >= size:
                raise RingError(f"queue {self.index}: next {i} out of range")
        return readable, writable, places

    def push(self, head: int, written: int, dirty: DirtyLog | None = None) -> None:
        assert self.used is not None
        slot = 4 + 8 * (self.used_idx % self.num)
        self.used.pack(USED, slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used.pack(U16, 2, self.used_idx)  # after the entry: x86 keeps stores in order
        if dirty is not None and self.log_used:
            dirty.mark(self.log_addr + slot, USED.size)
            dirty.mark(self.log_addr + 2, U16.size)

    def notify(self) -> None:
        if self.call >= 0:
            try:
                os.write(self.call, U64.pack(1))
            except OSError as err:
                log.warning("queue %d: cannot signal the guest: %s", self.index, err)


class VhostUserBackend:
    """One QEMU connection.  Subclasses set ``features``, ``protocol_features`` and
    ``num_queues`` and implement :meth:`request`; a device with a config space overrides
    :meth:`config` (and :meth:`set_config` if the guest may write it)."""

    features = F_VERSION_1 | F_PROTOCOL_FEATURES
    protocol_features = PF_MQ | PF_REPLY_ACK
    num_queues = 1
    name = "vhost-user"

    def __init__(self) -> None:
        self.mem = GuestMemory()
        self.queues = [Virtqueue(i) for i in range(self.num_queues)]
        self.acked_features = 0
        self.acked_protocol = 0
        self.nursery: trio.Nursery | None = None
        self.requests = 0
        self.bad_requests = 0
        self.dirty: DirtyLog | None = None  # the log QEMU gave us (SET_LOG_BASE)

    # -- what a device provides -------------------------------------------------------
    def request(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span]) -> int:
        """Answer one descriptor chain; the number of bytes written into ``writable``."""
        raise NotImplementedError

    def config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """The guest wrote its config space: ignored unless the device says otherwise."""

    # -- the connection ---------------------------------------------------------------
    async def serve(self, conn: socket.socket) -> None:
        # QEMU's pid, to reach RAM it maps privately (a template's clone): vmm/guest_memory.py
        self.mem.pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        conn.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                while True:
                    msg = await self._recv(conn)
                    if msg is None:
                        break
                    request, flags, payload, fds = msg
                    log.debug("vhost-user: %s %s%s", NAMES.get(request, request), payload[:16].hex(),
                              f" +{len(fds)} fd" if fds else "")
                    try:
                        reply = await self._handle(request, payload, fds)
                    except (struct.error, IndexError, RingError, OSError, ValueError) as err:
                        # A malformed message from QEMU (never the guest): say so and stop serving.
                        log.error("%s: message %d cannot be used (%s); closing the connection", self.name,
                                  request, err)
                        break
                    if reply is None and flags & NEED_REPLY and self.acked_protocol & PF_REPLY_ACK:
                        reply = U64.pack(0)
                    if reply is not None:
                        conn.send(HEADER.pack(request, VERSION | REPLY, len(reply)) + reply)
                nursery.cancel_scope.cancel()
        finally:
            for q in self.queues:
                self._close_kick(q)
                if q.call >= 0:
                    os.close(q.call)
                    q.call = -1
                q.desc = q.avail = q.used = None  # views into guest RAM: released before it is unmapped
            try:
                self.mem.close()
            except BufferError:  # a view still held somewhere: the mapping goes with its last user
                log.warning("%s: guest memory still in use at disconnect", self.name)
            if self.dirty is not None:
                self.dirty.close()
                self.dirty = None

    async def _recv(self, conn: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
        while True:
            try:
                data, anc, _flags, _addr = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(8 * 4))
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
        if len(data) < HEADER.size:
            return None
        fds: list[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            log.error("%s: message %d claims %d bytes; closing the connection", self.name, request, size)
            for fd in fds:
                os.close(fd)
            return None
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

    async def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        """One message's reply (None: none, or REPLY_ACK's 0).  The loop is sequential, as QEMU
        is: a device whose answer must wait (for requests in flight) awaits here while those
        go on in the nursery."""
        return self._message(request, payload, fds)

    def _dirty(self) -> DirtyLog | None:
        """The dirty log to mark guest writes in, while QEMU wants them logged (it acked
        VHOST_F_LOG_ALL: it migrates a running VM)."""
        return self.dirty if self.acked_features & F_LOG_ALL else None

    def _set_log(self, payload: bytes, fds: list[int]) -> bytes:
        """SET_LOG_BASE with LOG_SHMFD: map the dirty log.  A reply is due (QEMU reads one
        whenever LOG_SHMFD is negotiated); its u64 is 0, as libvhost-user sends."""
        for fd in fds[1:]:
            os.close(fd)
        if not fds or len(payload) < LOG.size:
            log.error("%s: SET_LOG_BASE without a log fd and its size: dirty pages go unlogged", self.name)
            return U64.pack(1)
        size, offset = LOG.unpack_from(payload)
        if self.dirty is not None:
            self.dirty.close()
            self.dirty = None
        try:
            self.dirty = DirtyLog(fds[0], size, offset)
        except (OSError, ValueError) as err:
            log.error("%s: cannot map the dirty log (%d bytes at %d): %s", self.name, size, offset, err)
            return U64.pack(1)
        log.info("%s: dirty log of %d bytes (%d MiB of guest memory)", self.name, size, size * 8 * 4096 >> 20)
        return U64.pack(0)

    def _answer(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span],
                places: list[tuple[int, int]]) -> None:
        """Answer one descriptor chain: in the used ring now (a device that answers later
        overrides this)."""
        q.push(head, self.request(q, head, readable, writable), self._dirty())

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise IndexError(f"queue {index} does not exist (this device has {len(self.queues)})")
        return self.queues[index]

    def _message(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        if request == GET_FEATURES:
            return U64.pack(self.features)
        if request == SET_FEATURES:
            self.acked_features = U64.unpack_from(payload)[0]
            if not self.acked_features & F_PROTOCOL_FEATURES:  # no ring states: every ring is enabled
                for q in self.queues:
                    q.enabled = True
            return None
        if request == GET_PROTOCOL_FEATURES:
            return U64.pack(self.protocol_features)
        if request == SET_PROTOCOL_FEATURES:
            self.acked_protocol = U64.unpack_from(payload)[0]
            return None
        if request == GET_QUEUE_NUM:
            return U64.pack(len(self.queues))
        if request == GET_CONFIG:
            offset, size, flags = CONFIG_HEADER.unpack_from(payload)
            space = self.config()
            body = space[offset : offset + size] if offset <= len(space) else b""
            return CONFIG_HEADER.pack(offset, size, flags) + body + bytes(size - len(body))
        if request == SET_CONFIG:
            offset, size, _flags = CONFIG_HEADER.unpack_from(payload)
            self.set_config(offset, payload[CONFIG_HEADER.size : CONFIG_HEADER.size + min(size, MAX_CONFIG)])
            return None
        if request == SET_LOG_BASE:
            return self._set_log(payload, fds)
        if request in (SET_OWNER, RESET_OWNER, SET_LOG_FD):
            for fd in fds:
                os.close(fd)
            return None
        if request == SET_MEM_TABLE:
            n = struct.unpack_from("<I", payload)[0]
            regions = [REGION.unpack_from(payload, 8 + 32 * i) for i in range(n)]
            for q in self.queues:  # ring pointers must be translated again, and their views of the
                q.desc = q.avail = q.used = None  # old mappings released before those are unmapped
            self.mem.replace(regions, fds)
            return None
        if request in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE):
            index, num = STATE.unpack_from(payload)
            q = self._queue(index)
            if request == SET_VRING_NUM:
                if not 0 < num <= 32768 or num & (num - 1):
                    raise ValueError(f"queue size {num} is not a power of 2 up to 32768")
                q.num = num
            elif request == SET_VRING_BASE:
                q.last_avail = num
            elif request == SET_VRING_ENABLE:
                q.enabled = bool(num)
                if num:
                    self._drain(q)
            else:
                # The ring stops (QEMU pauses or saves the VM): nothing is in flight (see the module's
                # docstring); no kick fd until SET_VRING_KICK on resume.  Stopped is not disabled:
                # QEMU does not enable it again on resume.
                self._close_kick(q)
                return STATE.pack(index, q.last_avail)
            return None
        if request == SET_VRING_ADDR:
            index, flags, desc, used, avail, log_addr = ADDR.unpack_from(payload)
            q = self._queue(index)
            q.log_used, q.log_addr = bool(flags & VRING_F_LOG), log_addr
            q.desc = self.mem.uva(desc, 16 * q.num)
            q.used = self.mem.uva(used, 4 + 8 * q.num)
            q.avail = self.mem.uva(avail, 4 + 2 * q.num)
            q.used_idx = q.used.unpack(U16, 2)[0]
            return None
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            (value,) = U64.unpack_from(payload)
            fd = -1 if value & 0x100 or not fds else fds[0]
            for extra in fds[1:]:
                os.close(extra)
            try:
                q = self._queue(value & 0xFF)
            except IndexError:
                if fd >= 0:
                    os.close(fd)
                raise
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
        log.warning("%s: ignoring request %d", self.name, request)
        for fd in fds:
            os.close(fd)
        return None

    def _close_kick(self, q: Virtqueue) -> None:
        """Close a ring's kick fd, first waking the task that waits on it (the next kick fd
        may get the same number, and trio allows one waiter per fd)."""
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
        """Answer every request the guest has made available, then signal it once.  A chain
        that points outside guest memory or loops fails alone (used with length 0); only a
        ring that names no valid chain at all stops its queue."""
        if not q.enabled or q.avail is None or q.desc is None or q.used is None:
            return
        done = False
        try:
            while q.pending():
                try:
                    head, readable, writable, places = q.pop(self.mem)
                except BadChain as err:
                    log.error("%s: %s; that request fails", self.name, err)
                    self.bad_requests += 1
                    q.push(err.head, 0, self._dirty())
                    done = True
                    continue
                self.requests += 1
                self._answer(q, head, readable, writable, places)
                done = True
        except RingError as err:
            log.error("%s: %s; the queue stops", self.name, err)
            self.bad_requests += 1
            q.enabled = False
        if done:
            q.notify()


class SocketListener:
    """The unix socket a vhost-user device's QEMU connects to, for the daemon's transports
    (vmm/vhost_user_fs.py, vmm/vhost_user_blk.py): made private (only our user, whom QEMU runs
    as, may connect: a socket that anyone can connect to hands out the guest's disk or root),
    one connection accepted, and stopped from the daemon's loop (SIGTERM, ``cubefs umount``)
    whether or not QEMU came."""

    def __init__(self, socket_path: str, label: str) -> None:
        self.path = socket_path
        self.label = label
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None

    def mount(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(1)
        self.listener.setblocking(False)

    async def accept(self) -> socket.socket | None:
        """QEMU's connection, or None once stopped (unmounted before QEMU came)."""
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
                break
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.listener)
                except trio.ClosedResourceError:
                    log.info("%s: stopped before QEMU connected on %s", self.label, self.path)
                    return None
            except OSError:  # closed under us
                return None
        self.conn = conn
        return conn

    def stop(self) -> None:
        """Stop serving: the listener closes (waking an :meth:`accept` still waiting: a daemon
        unmounted before its VM connected never ended), and a connected VM loses its device."""
        if self.listener is not None:
            if self.listener.fileno() >= 0:
                try:
                    trio.lowlevel.notify_closing(self.listener)
                except RuntimeError:  # outside trio (close() after the loop ended): nobody waits
                    pass
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
