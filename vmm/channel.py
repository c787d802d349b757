"""The host side of the guest agent (vmm/guest/agent.py, docs/vm-agent.md), on asyncio.

One ``AgentChannel`` per VM multiplexes any number of concurrent operations over the
one virtio-serial connection (or a host-mode agent's unix socket): each operation is
a channel of frames.  Streams are credit-flow-controlled both ways: the guest sends a
stream's bytes only while the host has granted credit, and the host grants it back
only as its consumer takes them, so a consumer that stops reading stops the guest
reading that process's pipe (and nothing else); the host holds at most one window
(``proto.WINDOW``) per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from cubefs.errors import CubefsError
from vmm.guest import proto


class AgentError(CubefsError):
    """The agent could not be reached, or refused a request; ``code`` is a Connect error code."""

    code = "internal"


class NotFound(AgentError):
    code = "not_found"


class AlreadyExists(AgentError):
    code = "already_exists"


class PermissionDenied(AgentError):
    code = "permission_denied"


class InvalidArgument(AgentError):
    code = "invalid_argument"


class FailedPrecondition(AgentError):
    code = "failed_precondition"


class ResourceExhausted(AgentError):
    code = "resource_exhausted"


class Unavailable(AgentError):
    code = "unavailable"


class Internal(AgentError):
    code = "internal"


ERRORS: dict[str, type[AgentError]] = {c.code: c for c in (NotFound, AlreadyExists, PermissionDenied, InvalidArgument,
                                                            FailedPrecondition, ResourceExhausted, Unavailable,
                                                            Internal)}


class _Chan:
    """One operation's frames, as they arrive."""

    def __init__(self, owner: AgentChannel, cid: int, window: int) -> None:
        self.owner, self.id, self.window = owner, cid, window
        self.reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.items: deque[tuple[int, bytes]] = deque()
        self.wake = asyncio.Event()
        self.credit = 0        # what we may still send the guest
        self.consumed = 0      # what our consumer took and the guest has not been told yet
        self.queued = 0        # stream bytes received and not yet taken: never more than the window
        self.down: AgentError | None = None

    def push(self, kind: int, payload: bytes) -> None:
        if self.down is not None:
            return  # failed: what a guest sends past that is dropped
        if kind in (proto.DATA, proto.DATA2, proto.EVENT):
            self.queued += len(payload)
            if self.queued > self.window:  # a guest that ignores its credit would grow this without end
                self.items.clear()
                self.down = AgentError(f"{self.owner.label}: the agent sent {self.queued} bytes on stream "
                                       f"{self.id} past its window of {self.window}")
                self.wake.set()
                return
        self.items.append((kind, payload))
        self.wake.set()

    async def get(self) -> tuple[int, bytes]:
        while not self.items:
            if self.down is not None:
                raise self.down
            self.wake.clear()
            await self.wake.wait()
        kind, payload = self.items.popleft()
        if kind in (proto.DATA, proto.DATA2, proto.EVENT):
            self.queued -= len(payload)
            self.consumed += len(payload)
            if self.consumed >= self.window // 4:
                self.owner._send(proto.credit(self.id, self.consumed))
                self.consumed = 0
        return kind, payload

    async def send_data(self, data: bytes) -> None:
        """Send bytes under the guest's credit; fails if the guest ended the channel."""
        view = memoryview(data)
        while view:
            while self.credit <= 0:
                if self.down is not None:
                    raise self.down
                if any(k == proto.END for k, _ in self.items):
                    return  # it failed: the caller reads why from the END
                self.wake.clear()
                await self.wake.wait()
            n = min(self.credit, proto.CHUNK, len(view))
            self.credit -= n
            self.owner._send(proto.frame(self.id, proto.DATA, bytes(view[:n])))
            view = view[n:]
            await self.owner._drain()


class GuestProcess:
    """A process in the guest, and this host's view of its output (from when it attached)."""

    def __init__(self, owner: AgentChannel, chan: _Chan, doc: dict[str, Any]) -> None:
        self._owner, self._chan = owner, chan
        self.pid: int = int(doc["pid"])
        self.tag: str | None = doc.get("tag")
        self.pty: bool = bool(doc.get("pty"))

    async def events(self) -> AsyncIterator[tuple[Any, ...]]:
        """("stdout"|"stderr"|"pty", bytes)..., then exactly one ("end", exit_code, signal)."""
        out = "pty" if self.pty else "stdout"
        while True:
            kind, payload = await self._chan.get()
            if kind == proto.DATA:
                yield (out, payload)
            elif kind == proto.DATA2:
                yield ("stderr", payload)
            elif kind == proto.END:
                self._owner._forget(self._chan)
                doc = proto.split(payload)[0]
                if "error" in doc:
                    raise self._owner._error(doc["error"], f"process {self.pid}")
                yield ("end", int(doc["exit_code"]), doc.get("signal"))
                return

    async def detach(self) -> None:
        self._owner._close(self._chan)


class Watcher:
    def __init__(self, owner: AgentChannel, chan: _Chan, path: str) -> None:
        self._owner, self._chan, self.path = owner, chan, path

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """{name (relative to the watched directory), type}: create, write, remove, rename, chmod."""
        while True:
            kind, payload = await self._chan.get()
            if kind == proto.EVENT:
                yield proto.split(payload)[0]
            elif kind == proto.END:
                self._owner._forget(self._chan)
                doc = proto.split(payload)[0]
                if "error" in doc:
                    raise self._owner._error(doc["error"], f"watch {self.path}")
                return

    async def close(self) -> None:
        self._owner._close(self._chan)


class TcpReader:
    def __init__(self, owner: AgentChannel, chan: _Chan) -> None:
        self._owner, self._chan = owner, chan
        self._buf = b""
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (any amount if n < 0); b"" at end of stream."""
        while not self._buf and not self._eof:
            kind, payload = await self._chan.get()
            if kind == proto.DATA:
                self._buf = payload
            elif kind == proto.EOF:
                self._eof = True
            elif kind == proto.END:
                self._eof = True
                self._owner._forget(self._chan)
                doc = proto.split(payload)[0]
                if "error" in doc:
                    raise self._owner._error(doc["error"], "tcp")
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


class TcpWriter:
    def __init__(self, owner: AgentChannel, chan: _Chan) -> None:
        self._owner, self._chan = owner, chan

    async def write(self, data: bytes) -> None:
        await self._chan.send_data(data)

    def write_eof(self) -> None:
        self._owner._send(proto.frame(self._chan.id, proto.EOF))

    async def close(self) -> None:
        self._owner._close(self._chan)


class AgentChannel:
    def __init__(self, label: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.label = label
        self._reader, self._writer = reader, writer
        self._chans: dict[int, _Chan] = {}
        self._next = 1
        self._down: AgentError | None = None
        self._task: asyncio.Task[None] | None = None
        self.info: dict[str, Any] = {}

    # -- connection ------------------------------------------------------------------------
    @classmethod
    async def connect(cls, path: str, label: str, timeout: float = 30.0) -> AgentChannel:
        """Connect and start a fresh session (the guest keeps its processes, drops the old
        session's streams); waits up to ``timeout`` s for a guest that is still booting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
                break
            except OSError as err:
                if loop.time() > deadline:
                    raise Unavailable(f"{label}: cannot connect to the agent at {path}: {err.strerror}") from None
                await asyncio.sleep(0.02)
        self = cls(label, reader, writer)
        try:
            rest = await self._hello(deadline)
        except BaseException:
            writer.close()
            raise
        self._task = asyncio.create_task(self._run(rest))
        return self

    async def _hello(self, deadline: float) -> bytes:
        """Send HELLO (again each second: the guest may not read its port yet) until the
        guest echoes our nonce; skip whatever came before (a previous host's answers)."""
        loop = asyncio.get_running_loop()
        nonce = os.urandom(16)
        want = proto.MAGIC + nonce
        buf = bytearray()
        while True:
            self._writer.write(proto.frame(0, proto.HELLO, want))
            resend = loop.time() + 1.0
            while loop.time() < resend:
                left = min(resend, deadline) - loop.time()
                if left <= 0:
                    raise Unavailable(f"{self.label}: the guest agent did not answer") from None
                try:
                    data = await asyncio.wait_for(self._reader.read(1 << 20), left)
                except TimeoutError:
                    continue
                except OSError as err:
                    raise Unavailable(f"{self.label}: the agent's channel failed: {err}") from None
                if not data:
                    raise Unavailable(f"{self.label}: the agent's channel closed (QEMU exited?)")
                buf += data
                at = buf.find(want)
                if at >= proto.HEADER.size:
                    _c, _k, n = proto.HEADER.unpack_from(buf, at - proto.HEADER.size)
                    end = at - proto.HEADER.size + proto.HEADER.size + n
                    while len(buf) < end:
                        more = await self._reader.read(1 << 20)
                        if not more:
                            raise Unavailable(f"{self.label}: the agent's channel closed")
                        buf += more
                    with contextlib.suppress(ValueError):
                        self.info = json.loads(bytes(buf[at + len(want):end]) or b"{}")
                    return bytes(buf[end:])
                del buf[:max(0, len(buf) - len(want) - proto.HEADER.size)]

    async def _run(self, rest: bytes) -> None:
        parser = proto.Parser()
        frames = parser.feed(rest)
        why = "the agent's channel closed (the VM is gone?)"
        try:
            while True:
                for cid, kind, payload in frames:
                    self._dispatch(cid, kind, payload)
                data = await self._reader.read(1 << 20)
                if not data:
                    break
                frames = parser.feed(data)
        except (OSError, asyncio.IncompleteReadError) as err:
            why = f"the agent's channel failed: {err}"
        except asyncio.CancelledError:
            why = "the channel was closed"
        self._fail_all(Unavailable(f"{self.label}: {why}"))

    def _dispatch(self, cid: int, kind: int, payload: bytes) -> None:
        chan = self._chans.get(cid)
        if chan is None:
            return  # a channel we gave up on, or a HELLO echo
        if kind == proto.REPLY:
            if not chan.reply.done():
                chan.reply.set_result(proto.split(payload)[0])
        elif kind == proto.CREDIT:
            chan.credit += struct.unpack(">I", payload)[0]
            chan.wake.set()
        elif kind in (proto.DATA, proto.DATA2, proto.EVENT, proto.EOF):
            chan.push(kind, payload)
        elif kind == proto.END:
            chan.push(kind, payload)
            if not chan.reply.done():
                chan.reply.set_result(proto.split(payload)[0])

    def _fail_all(self, err: AgentError) -> None:
        self._down = err
        for chan in self._chans.values():
            chan.down = err
            chan.wake.set()
            if not chan.reply.done():
                chan.reply.set_exception(err)
                chan.reply.exception()  # retrieved: nobody may be waiting

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self._down is None:
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as err:
            raise Unavailable(f"{self.label}: the agent's channel failed: {err}") from None

    def _error(self, doc: dict[str, Any], what: str) -> AgentError:
        cls = ERRORS.get(str(doc.get("code")), Internal)
        return cls(f"{self.label}: {what}: {doc.get('message', 'failed')}")

    def _forget(self, chan: _Chan) -> None:
        self._chans.pop(chan.id, None)

    def _close(self, chan: _Chan) -> None:
        if self._chans.pop(chan.id, None) is not None:
            self._send(proto.frame(chan.id, proto.CLOSE))

    async def _open(self, op: str, tail: bytes = b"", window: int = proto.WINDOW, **args: Any) -> tuple[_Chan, dict]:
        """Send a request; its channel and reply (errors raised as AgentError)."""
        if self._down is not None:
            raise self._down
        cid = self._next
        self._next = self._next + 1 if self._next < 0xFFFFFFF0 else 1
        chan = self._chans[cid] = _Chan(self, cid, window)
        self._send(proto.jframe(cid, proto.REQ, {"op": op, "window": window, **args}, tail))
        try:
            await self._drain()
            doc = await chan.reply
        except BaseException:
            self._close(chan)
            raise
        if "error" in doc:
            self._forget(chan)
            raise self._error(doc["error"], op)
        chan.credit = int(doc.get("window", 0))
        return chan, doc

    async def _call(self, op: str, tail: bytes = b"", **args: Any) -> dict[str, Any]:
        chan, doc = await self._open(op, tail, **args)
        self._forget(chan)
        return doc

    # -- the root and identity -----------------------------------------------------------------
    async def ping(self) -> None:
        await self._call("ping")

    async def mount(self, read_only: bool, disk: bool = False) -> None:
        """The root: virtio-fs, or with ``disk`` an overlay of it under an ext4 upper on /dev/vda."""
        await self._call("mount", read_only=read_only, **({"disk": True} if disk else {}))

    async def umount(self) -> None:
        await self._call("umount")

    async def freshen(self, hostname: str, machine_id: str) -> None:
        """After a restore: randomness of its own, a hostname and a machine-id (clones of one
        template must not share them)."""
        await self._call("freshen", os.urandom(64), hostname=hostname, machine_id=machine_id, now=time.time())

    async def set_defaults(self, user: str = "user", env: dict[str, str] | None = None,
                           workdir: str | None = None) -> None:
        await self._call("set_defaults", user=user, env=env or {}, workdir=workdir)

    async def poweroff(self) -> None:
        with contextlib.suppress(Unavailable):
            await self._call("poweroff")

    # -- processes --------------------------------------------------------------------------------
    async def spawn(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                    user: str | None = None, pty: tuple[int, int] | None = None, stdin: bool = False,
                    tag: str | None = None) -> GuestProcess:
        chan, doc = await self._open("spawn", argv=list(argv), env=env or {}, cwd=cwd, user=user,
                                     pty=list(pty) if pty else None, stdin=stdin, tag=tag)
        return GuestProcess(self, chan, doc)

    async def attach(self, pid: int | None = None, tag: str | None = None) -> GuestProcess:
        chan, doc = await self._open("attach", pid=pid, tag=tag)
        return GuestProcess(self, chan, doc)

    async def processes(self) -> list[dict[str, Any]]:
        return list((await self._call("processes"))["processes"])

    async def send_input(self, pid: int, data: bytes) -> None:
        """To the process's PTY if it has one, else its stdin; returns once the guest wrote it
        (so a process that does not read holds the caller, not the agent's memory)."""
        view = memoryview(data)
        while True:
            await self._call("input", bytes(view[:proto.CHUNK]), pid=pid)
            view = view[proto.CHUNK:]
            if not view:
                return

    async def close_stdin(self, pid: int) -> None:
        await self._call("close_stdin", pid=pid)

    async def signal(self, pid: int, signo: int, group: bool = False) -> None:
        await self._call("signal", pid=pid, signo=signo, group=group)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        await self._call("resize", pid=pid, cols=cols, rows=rows)

    # -- files -------------------------------------------------------------------------------------
    async def stat(self, path: str, user: str | None = None) -> dict[str, Any]:
        return dict((await self._call("stat", path=path, user=user))["entry"])

    async def list_dir(self, path: str, depth: int = 1, user: str | None = None) -> list[dict[str, Any]]:
        return list((await self._call("list", path=path, depth=depth, user=user))["entries"])

    async def make_dir(self, path: str, user: str | None = None) -> tuple[dict[str, Any], bool]:
        doc = await self._call("mkdir", path=path, user=user)
        return dict(doc["entry"]), bool(doc["created"])

    async def move(self, src: str, dst: str, user: str | None = None) -> dict[str, Any]:
        return dict((await self._call("move", src=src, dst=dst, user=user))["entry"])

    async def remove(self, path: str, user: str | None = None) -> None:
        await self._call("remove", path=path, user=user)

    async def read_file(self, path: str, user: str | None = None) -> AsyncIterator[bytes]:
        """The file's bytes, streamed (any size; the host holds at most one window)."""
        chan, _doc = await self._open("read", path=path, user=user)
        try:
            while True:
                kind, payload = await chan.get()
                if kind == proto.DATA:
                    yield payload
                elif kind == proto.END:
                    self._forget(chan)
                    doc = proto.split(payload)[0]
                    if "error" in doc:
                        raise self._error(doc["error"], "read")
                    return
        finally:
            self._close(chan)

    async def write_file(self, path: str, chunks: AsyncIterable[bytes], user: str | None = None,
                         mode: int = 0o644) -> dict[str, Any]:
        """Write (create or truncate) a file, its parents made, owned by the user; its stat()."""
        chan, _doc = await self._open("write", path=path, user=user, mode=mode)
        try:
            async for chunk in chunks:
                if any(k == proto.END for k, _ in chan.items):
                    break
                await chan.send_data(chunk)
            self._send(proto.frame(chan.id, proto.EOF))
            while True:
                kind, payload = await chan.get()
                if kind == proto.END:
                    self._forget(chan)
                    doc = proto.split(payload)[0]
                    if "error" in doc:
                        raise self._error(doc["error"], "write")
                    return dict(doc["entry"])
        finally:
            self._close(chan)

    async def watch(self, path: str, recursive: bool = False, user: str | None = None) -> Watcher:
        chan, doc = await self._open("watch", path=path, recursive=recursive, user=user)
        return Watcher(self, chan, str(doc.get("path", path)))

    async def open_tcp(self, port: int, host: str = "127.0.0.1") -> tuple[TcpReader, TcpWriter]:
        """A byte stream to a TCP port in the guest; Unavailable when nothing listens."""
        chan, _doc = await self._open("tcp", port=port, host=host)
        return TcpReader(self, chan), TcpWriter(self, chan)
