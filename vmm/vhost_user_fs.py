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

Saving and restoring a VM (QEMU >= 9 with protocol feature DEVICE_STATE):
``GET_VRING_BASE`` stops a ring, and is answered only once every request
taken from it is answered in its used ring (a read waiting for the store, a
write waiting for its inode's lock): QEMU saves guest RAM after it, so a reply
written later would be lost and its guest process would wait forever.  Then
``SET_DEVICE_STATE_FD`` hands us a pipe: on the source we write what the
guest's FUSE session holds here (see :func:`encode_state`), on the
destination a new daemon reads it, and ``CHECK_DEVICE_STATE`` says whether
that worked.  QEMU migrates only when ``VHOST_F_LOG_ALL`` is offered; with it
comes the dirty log (:class:`vmm.guest_memory.DirtyLog`), in which the pages
we write while QEMU migrates a *running* VM are marked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Any

import trio

from cubefs.fuse import protocol as p
from cubefs.fuse.server import FuseServer
from cubefs.image.fs import StateError
from vmm.guest_memory import RingError, Span, gather, scatter
from vmm.vhost_user import (
    CHECK_DEVICE_STATE,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    GET_VRING_BASE,
    P_LOG_SHMFD,
    PF_MQ,
    PF_REPLY_ACK,
    SET_DEVICE_STATE_FD,
    SET_FEATURES,
    STATE,
    U64,
    SocketListener,
    VhostUserBackend,
    Virtqueue,
)

log = logging.getLogger(__name__)

FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES | F_LOG_ALL
P_DEVICE_STATE = 1 << 19
PROTOCOL_FEATURES = PF_MQ | P_LOG_SHMFD | PF_REPLY_ACK | P_DEVICE_STATE
NUM_QUEUES = 2  # hiprio + one request queue (Linux 6.1 uses one)
NOFD = 1 << 8  # SET_DEVICE_STATE_FD reply: no fd of ours, use yours
SAVE, LOAD = 0, 1  # transfer directions
STOPPED = 0  # the one transfer phase: the device is suspended
STATE_FORMAT = "cubefs-virtiofs-state"
STATE_VERSION = 1
MAX_STATE = 256 << 20  # a state bigger than this is refused unread (~3 M kernel references)
CHECK_WAIT = 60.0  # seconds CHECK_DEVICE_STATE waits for the transfer to end


class _Transfer:
    """One device-state transfer: its direction, and how it ended (None: well)."""

    def __init__(self, direction: int) -> None:
        self.direction = direction
        self.done = trio.Event()
        self.error: str | None = None

    @property
    def what(self) -> str:
        return "saving" if self.direction == SAVE else "loading"


def encode_state(state: dict[str, Any]) -> bytes:
    """The device state as it travels in QEMU's migration stream: JSON, because it is small
    (a few hundred bytes plus ~20 per kernel reference: 60 KB for 3,000 inodes the guest
    has looked up), a person can read it with ``jq`` when a restore fails, and a version
    and a format name make it self-describing; a restore reads it with ``json.loads``,
    which can build nothing but plain values (pickle from a file QEMU passes on would
    run code)."""
    return json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, **state},
                      separators=(",", ":")).encode()


def decode_state(blob: bytes) -> dict[str, Any]:
    """The state in ``blob``, or StateError saying why it is not one we can load."""
    try:
        doc = json.loads(blob)
    except (UnicodeDecodeError, ValueError):
        raise StateError(f"not a cubefs virtio-fs state ({len(blob)} bytes that are not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateError("not a cubefs virtio-fs state (no format name)")
    if doc.get("version") != STATE_VERSION:
        raise StateError(f"state version {doc.get('version')!r}; this daemon reads version {STATE_VERSION}")
    return doc


class VhostUserFs(VhostUserBackend):
    """One QEMU connection of a virtio-fs device: FUSE requests answered by the
    :class:`FuseServer` (later, in the nursery, when they wait for the store or a lock),
    the dirty log while QEMU migrates a running VM, and the device-state transfer."""

    features = FEATURES
    protocol_features = PROTOCOL_FEATURES
    num_queues = NUM_QUEUES
    name = "virtio-fs"

    def __init__(self, server: FuseServer) -> None:
        super().__init__()
        self.server = server
        self.transfer: _Transfer | None = None  # the device-state transfer under way or last ended

    async def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        # The two that wait: requests in flight and a transfer go on in the nursery meanwhile.
        if request == GET_VRING_BASE:
            return await self._stop_ring(self._queue(STATE.unpack_from(payload)[0]).index)
        if request == CHECK_DEVICE_STATE:
            return await self._check_state()
        return self._message(request, payload, fds)

    def _message(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        if request == SET_DEVICE_STATE_FD:
            return self._start_transfer(payload, fds)
        was = self.acked_features & F_LOG_ALL
        reply = super()._message(request, payload, fds)
        if request == SET_FEATURES and was != self.acked_features & F_LOG_ALL:
            log.info("virtio-fs: dirty logging %s", "on (QEMU migrates a running VM)" if not was else "off")
        return reply

    def _answer(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span],
                places: list[tuple[int, int]]) -> None:
        self._request(q, head, readable, writable, places)

    async def _stop_ring(self, index: int) -> bytes:
        """GET_VRING_BASE: the ring *stops* (QEMU pauses the VM, or saves it): no kick fd, so
        nothing drains it until SET_VRING_KICK starts it again on resume.  Stopped is not
        disabled: QEMU 7.2 sent no SET_VRING_ENABLE on resume, so a ring disabled here stayed
        dead after ``cont`` (QEMU 10 sends SET_VRING_ENABLE 0 before this and 1 at start).
        The answer waits for the requests in flight:
        QEMU saves guest RAM and the ring's index after it, and a request answered later
        would be a reply the saved guest never gets (a read waits for the store at most
        its --read-timeout, a write for the writes of its inode before it)."""
        q = self.queues[index]
        self._close_kick(q)
        if q.inflight:
            t0, waiting = time.monotonic(), q.inflight
            while q.inflight:
                q.settled = trio.Event()
                await q.settled.wait()
            log.info("virtio-fs: queue %d stopped once its %d requests in flight were answered (%.3f s)",
                     index, waiting, time.monotonic() - t0)
        return STATE.pack(index, q.last_avail)

    # -- device state -------------------------------------------------------------

    def _start_transfer(self, payload: bytes, fds: list[int]) -> bytes:
        """SET_DEVICE_STATE_FD: start writing our state to the fd (save) or reading it
        (load), in a task: QEMU reads or writes the other end only after this reply."""
        for fd in fds[1:]:
            os.close(fd)
        fd = fds[0] if fds else -1
        direction, phase = STATE.unpack_from(payload) if len(payload) >= STATE.size else (-1, -1)
        if fd < 0 or direction not in (SAVE, LOAD) or phase != STOPPED or self.nursery is None:
            log.error("virtio-fs: refusing a device-state transfer (direction %d, phase %d, %s)", direction, phase,
                      "an fd" if fd >= 0 else "no fd")
            if fd >= 0:
                os.close(fd)
            return U64.pack(1 | NOFD)
        self.transfer = _Transfer(direction)
        os.set_blocking(fd, False)
        if direction == SAVE:
            self.nursery.start_soon(self._save, fd, self.transfer, encode_state(self.server.export_state()))
        else:
            self.nursery.start_soon(self._load, fd, self.transfer)
        return U64.pack(NOFD)  # we use QEMU's pipe

    async def _save(self, fd: int, t: _Transfer, blob: bytes) -> None:
        try:
            view = memoryview(blob)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
            log.info("virtio-fs: device state saved (%d bytes)", len(blob))
        except OSError as err:
            t.error = f"writing it: {err}"
        finally:
            os.close(fd)  # the end of the state
            t.done.set()

    async def _load(self, fd: int, t: _Transfer) -> None:
        chunks: list[bytes] = []
        got = 0
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if not chunk:
                    break
                got += len(chunk)
                if got > MAX_STATE:
                    raise StateError(f"the state is over {MAX_STATE >> 20} MiB")
                chunks.append(chunk)
            blob = b"".join(chunks)
            refs = self.server.import_state(decode_state(blob))
            log.info("virtio-fs: device state loaded (%d bytes, %d kernel references): the guest's FUSE session "
                     "goes on without INIT", len(blob), refs)
        except StateError as err:
            t.error = str(err)
        except OSError as err:
            t.error = f"reading it: {err}"
        finally:
            os.close(fd)
            t.done.set()

    async def _check_state(self) -> bytes:
        """CHECK_DEVICE_STATE: 0 if the transfer went well, else 1 and one log line saying
        why (QEMU then fails the migration, and this daemon serves on)."""
        t, self.transfer = self.transfer, None
        if t is None:
            log.error("virtio-fs: device state check failed: no transfer was started")
            return U64.pack(1)
        with trio.move_on_after(CHECK_WAIT):
            await t.done.wait()
        if not t.done.is_set():
            t.error = f"the transfer did not end within {CHECK_WAIT:.0f} s"
        if t.error is not None:
            log.error("virtio-fs: %s the device state failed: %s", t.what, t.error)
            return U64.pack(1)
        return U64.pack(0)

    def _request(self, q: Virtqueue, head: int, readable: list[Span], writable: list[Span],
                 places: list[tuple[int, int]]) -> None:
        try:
            request = gather(readable)
        except RingError as err:
            log.error("virtio-fs: %s; that request fails", err)
            self.bad_requests += 1
            q.push(head, 0, self._dirty())
            return
        if len(request) < p.IN_HEADER.size:
            self.bad_requests += 1
            q.push(head, 0, self._dirty())
            return
        out: Any = self.server.handle(request)
        if out is None:  # FORGET: no reply
            q.push(head, 0, self._dirty())
            return
        if isinstance(out, bytes | list):
            q.push(head, self._reply(out, writable, places, request), self._dirty())
            return
        assert self.nursery is not None
        q.inflight += 1
        self.nursery.start_soon(self._later, q, head, out, writable, places, request)

    async def _later(self, q: Virtqueue, head: int, work: Any, writable: list[Span], places: list[tuple[int, int]],
                     request: bytes) -> None:
        try:
            out = await work
            q.push(head, self._reply(out, writable, places, request) if out is not None else 0, self._dirty())
            q.notify()
        finally:
            q.inflight -= 1
            if not q.inflight and q.settled is not None:
                q.settled.set()

    def _reply(self, out: bytes | list[bytes | memoryview], writable: list[Span], places: list[tuple[int, int]],
               request: bytes) -> int:
        parts = out if isinstance(out, list) else [out]
        try:
            written = scatter(parts, writable)
        except RingError:
            self.bad_requests += 1
            unique = p.IN_HEADER.unpack_from(request)[2]
            try:
                written = scatter([p.error_reply(unique, errno.EIO)], writable)
            except RingError:
                return 0  # not even room for an error: the used length says so
        dirty = self._dirty()
        if dirty is not None:
            left = written
            for addr, length in places:
                if left <= 0:
                    break
                dirty.mark(addr, min(length, left))
                left -= length
        return written


class VirtioFsTransport(SocketListener):
    """The daemon's Transport for a VM: a unix socket QEMU connects to, instead of /dev/fuse."""

    def __init__(self, fs: Any, socket_path: str) -> None:
        super().__init__(socket_path, "virtio-fs")
        self.server = FuseServer(fs)
        self.ops = self.server.ops

    @property
    def read_bytes(self) -> int:
        return self.server.read_bytes

    async def serve(self) -> None:
        conn = await self.accept()
        if conn is None:
            return
        log.info("virtio-fs: QEMU connected on %s", self.path)
        await VhostUserFs(self.server).serve(conn)
        conn.close()
        log.info("virtio-fs: QEMU went away")

    async def invalidate(self, inodes: set[int], names: set[tuple[int, bytes]]) -> int:
        """virtio-fs has no notifications for the host to send (Linux 6.1 has no
        notification queue): after a rollback the guest must mount its root again,
        which vmm/vm.py does around it.  Nothing is sent."""
        return 0

