"""Host channels that stream: a file read, a file write, an inotify watch, a TCP
connection.  Each sends only under the credit its host channel granted and grants
credit back only for what it has written, so every buffer stays bounded."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from vmm.guest import proto
from vmm.guest.fsops import ERRNO_CODES

if TYPE_CHECKING:
    from vmm.guest.agent import Agent


class Stream:
    def __init__(self, agent: Agent, chan: int, credit: int) -> None:
        self.agent, self.loop, self.chan, self.credit = agent, agent.loop, chan, credit
        self.closed = False

    def on_credit(self, n: int) -> None:
        self.credit += n

    def on_data(self, data: bytes) -> None:
        self.fail("invalid_argument", "this channel takes no data")

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        self.closed = True

    def fail(self, code: str, message: str) -> None:
        if not self.closed:
            self.on_close()
            self.agent.end(self.chan, {"error": {"code": code, "message": message}})


class FileRead(Stream):
    def __init__(self, agent: Agent, chan: int, credit: int, fd: int, path: str) -> None:
        super().__init__(agent, chan, credit)
        self.fd, self.path = fd, path
        self.loop.call_soon(self.pump)

    def pump(self) -> None:
        if self.closed or self.credit <= 0:
            return
        try:
            data = os.read(self.fd, min(self.credit, proto.CHUNK))
        except OSError as err:
            self.fail(ERRNO_CODES.get(err.errno or 0, "internal"), f"read {self.path}: {err.strerror}")
            return
        if not data:
            self.on_close()
            self.agent.end(self.chan, {})
            return
        self.credit -= len(data)
        self.agent.send(self.chan, proto.DATA, data)
        self.loop.call_soon(self.pump)

    def on_credit(self, n: int) -> None:
        blocked = self.credit <= 0
        self.credit += n
        if blocked and self.credit > 0:
            self.loop.call_soon(self.pump)

    def on_close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class FileWrite(Stream):
    """The host's bytes into a file.  The DATA frames of one wakeup are written with one
    ``writev`` after they are all parsed (``call_soon``), and credited back with one
    CREDIT: fewer syscalls and, on a virtio-fs root, fewer, larger FUSE writes (the
    agent waits out each one, receiving nothing meanwhile)."""

    def __init__(self, agent: Agent, chan: int, fd: int, path: str, user: str) -> None:
        super().__init__(agent, chan, 0)
        self.fd, self.path, self.user = fd, path, user
        self.pending: list[memoryview] = []  # at most the window the host was granted

    def on_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if not self.pending:
            self.loop.call_soon(self._write)
        self.pending.append(memoryview(data))

    def _write(self) -> None:
        if self.closed or not self.pending:
            return
        views, self.pending = self.pending, []
        total = sum(len(v) for v in views)
        try:
            while views:
                n = os.writev(self.fd, views[:1024])  # IOV_MAX
                while n:
                    if n >= len(views[0]):
                        n -= len(views.pop(0))
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except OSError as err:
            self.fail(ERRNO_CODES.get(err.errno or 0, "internal"), f"write {self.path}: {err.strerror}")
            return
        self.agent.send(self.chan, proto.CREDIT, struct.pack(">I", total))

    def on_eof(self) -> None:
        self._write()
        if self.closed:
            return
        self.on_close()

        def done(doc: dict[str, Any], _fds: list[int]) -> None:
            self.agent.end(self.chan, doc)

        self.agent.helper_call(self.user, {"op": "stat", "path": self.path}, done)

    def on_close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pending.clear()
            os.close(self.fd)


IN_ISDIR, IN_Q_OVERFLOW = 0x40000000, 0x4000
KINDS = ((0x100 | 0x80, "create"), (0x200 | 0x400, "remove"), (0x2, "write"), (0x40 | 0x800, "rename"),
         (0x4, "chmod"))
EVENT = struct.Struct("iIII")


class Watch(Stream):
    def __init__(self, agent: Agent, chan: int, credit: int, fd: int, path: str, wds: dict[int, str],
                 recursive: bool, user: str) -> None:
        super().__init__(agent, chan, credit)
        self.fd, self.path, self.wds, self.recursive, self.user = fd, path, wds, recursive, user
        self.loop.reader(fd, self.readable)

    def readable(self) -> None:
        if self.closed:
            return
        if self.credit <= 0:  # the kernel queues (and, past its limit, reports an overflow)
            self.loop.reader(self.fd, None)
            return
        try:
            buf = os.read(self.fd, 64 << 10)
        except BlockingIOError:
            return
        at = 0
        while at + EVENT.size <= len(buf):
            wd, mask, _cookie, n = EVENT.unpack_from(buf, at)
            name = buf[at + EVENT.size:at + EVENT.size + n].rstrip(b"\0").decode(errors="surrogateescape")
            at += EVENT.size + n
            if mask & IN_Q_OVERFLOW:
                self.fail("resource_exhausted", f"watch {self.path}: too many events unread (the kernel dropped some)")
                return
            base = self.wds.get(wd)
            if base is None:
                continue
            rel = os.path.join(base, name) if base else name
            if not rel:
                continue
            for bits, kind in KINDS:
                if mask & bits:
                    self.emit(rel, kind)
            if self.recursive and mask & IN_ISDIR and mask & (0x100 | 0x80):
                self._add(rel)

    def emit(self, name: str, kind: str) -> None:
        doc = proto.jframe(self.chan, proto.EVENT, {"name": name, "type": kind})
        self.credit -= len(doc) - proto.HEADER.size
        self.agent.send_raw(doc)

    def _add(self, rel: str) -> None:
        def added(doc: dict[str, Any], _fds: list[int]) -> None:
            if "wd" in doc:
                self.wds[int(doc["wd"])] = rel

        self.agent.helper_call(self.user, {"op": "add_watch", "path": os.path.join(self.path, rel)}, added,
                               fds=[self.fd])

    def on_credit(self, n: int) -> None:
        self.credit += n
        if not self.closed and self.credit > 0:
            self.loop.reader(self.fd, self.readable)

    def on_close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.forget(self.fd)
            os.close(self.fd)


class Tcp(Stream):
    """A byte stream to a TCP port in the guest, for the proxy."""

    def __init__(self, agent: Agent, chan: int, credit: int, host: str, port: int) -> None:
        super().__init__(agent, chan, credit)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.where = f"{host}:{port}"
        self.outbox: deque[memoryview] = deque()
        self.connected = False
        self.read_done = self.write_done = self.eof_pending = False
        err = self.sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.loop.writer(self.fd, self._connected)

    def _connected(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.loop.writer(self.fd, None)
        if err:
            self.on_close()
            self.agent.reply_error(self.chan, "unavailable", f"connect to {self.where} in the guest: "
                                                             f"{os.strerror(err)} (is anything listening?)")
            return
        self.connected = True
        self.agent.reply(self.chan, {"window": proto.WINDOW}, keep=True)
        self._interest()

    def _interest(self) -> None:
        if self.closed:
            return
        self.loop.reader(self.fd, self._readable if self.credit > 0 and not self.read_done else None)
        self.loop.writer(self.fd, self._writable if self.outbox else None)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(min(self.credit, proto.CHUNK))
        except BlockingIOError:
            return
        except OSError as err:
            self.fail("unavailable", f"{self.where}: {err.strerror}")
            return
        if not data:
            self.read_done = True
            self.agent.send(self.chan, proto.EOF)
            self._maybe_end()
        else:
            self.credit -= len(data)
            self.agent.send(self.chan, proto.DATA, data)
        self._interest()

    def _writable(self) -> None:
        while self.outbox:
            try:
                n = self.sock.send(self.outbox[0])
            except BlockingIOError:
                break
            except OSError as err:
                self.fail("unavailable", f"{self.where}: {err.strerror}")
                return
            self.agent.send(self.chan, proto.CREDIT, struct.pack(">I", n))
            if n == len(self.outbox[0]):
                self.outbox.popleft()
            else:
                self.outbox[0] = self.outbox[0][n:]
        if not self.outbox and self.eof_pending:
            self.eof_pending = False
            self.write_done = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_end()
        self._interest()

    def _maybe_end(self) -> None:
        if self.read_done and self.write_done and not self.closed:
            self.on_close()
            self.agent.end(self.chan, {})

    def on_data(self, data: bytes) -> None:
        if not self.closed:
            self.outbox.append(memoryview(data))
            self._interest()

    def on_eof(self) -> None:
        self.eof_pending = True
        self._writable()

    def on_credit(self, n: int) -> None:
        self.credit += n
        self._interest()

    def on_close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.forget(self.fd)
            self.sock.close()
