"""One HTTP/1.1 request relayed to a port inside a sandbox, over a stream the guest agent opens.

Each request gets a stream of its own (``Connection: close`` toward the guest),
so no connection state is shared between requests, sandboxes or clients.
Bodies are streamed both ways and never held whole: the request body is sent
while the response is already being read (a server may answer before it has
read everything, and streaming servers such as the code interpreter's
``/execute`` answer line by line).  h11 does the HTTP framing toward the
guest (content length, chunked, close-delimited); aiohttp does it toward the
client.  A client that goes away cancels the handler, which closes the
guest-side stream, which the guest's server sees as a disconnect.

**Upgrades** to WebSocket (the one protocol aiohttp's server, its C parser,
hands over as raw bytes) keep ``Connection: Upgrade`` toward the guest.
If the guest's server answers ``101 Switching Protocols`` the 101 goes to the
client and from then on the connection is two byte pumps, client -> guest
stream and guest stream -> client: frames are never parsed or re-framed (ping,
pong, close codes and extensions are the two ends' business).  Backpressure
holds both ways: the client's socket stops being read while more than
``UP_BUFFER`` bytes wait for the guest's credit, and the guest's stream is not
read (so its credit is not returned) while the client's socket is paused for
writing.  Either end closing, or the sandbox going away, closes the other.
While the client's socket is paused for reading, asyncio would not see the
client go (nothing reads it): every ``GONE_POLL`` seconds the relay asks the
kernel for the connection's TCP state, and a client that reset or closed ends
it (one whose unsent bytes still wait ends when its kernel gives up on them).
Any other ``Upgrade`` is dropped as hop-by-hop and the request relayed as plain
HTTP (the server answers it as if no upgrade was asked, as RFC 9110 lets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from typing import Any

import h11
from aiohttp import web

from cubefs.errors import CubefsError
from sandbox.ingress import TlsStream

CHUNK = 64 * 1024
UP_BUFFER = 256 * 1024  # client bytes held for the guest before the client's socket is paused
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}
# what aiohttp's server switches to raw bytes for: its C parser (the one in use) only
# "websocket" (its Python parser "tcp" too: relaying that here would mis-read pipelined bytes)
UPGRADABLE = {"websocket"}
GONE_POLL = 5.0  # seconds between checks of a paused client's socket
TCP_GONE = {7, 8, 9}  # TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK (include/net/tcp_states.h)


class UpstreamError(CubefsError):
    """The server in the sandbox broke the HTTP exchange."""


def is_upgrade(request: web.Request) -> bool:
    """An upgrade aiohttp hands over as raw bytes: ``Connection: upgrade`` and a known ``Upgrade``."""
    tokens = {t.strip().lower() for t in request.headers.getall("Connection", []) for t in t.split(",")}
    return "upgrade" in tokens and request.headers.get("Upgrade", "").strip().lower() in UPGRADABLE


async def open_stream(channel: Any, port: int) -> tuple[Any, Any]:
    try:
        return await channel.open_tcp(port)
    except CubefsError as err:
        if getattr(err, "code", "") == "unavailable" or "refused" in str(err).lower():
            raise ConnectionRefusedError(str(err)) from None
        raise


async def relay(request: web.Request, channel: Any, port: int, host: str | None = None,
                tls: bool = False) -> web.StreamResponse:
    """The request to ``port`` in the guest; ``host`` replaces its Host header, ``tls`` speaks
    HTTPS on the hop (``sandbox.ingress``)."""
    upgrade = is_upgrade(request)
    reader, writer = await open_stream(channel, port)
    if tls:
        reader = writer = TlsStream(reader, writer, (host or request.host).rsplit(":", 1)[0])
        try:
            await reader.handshake()
        except (ssl.SSLError, CubefsError):
            with contextlib.suppress(Exception):
                await writer.close()
            raise
    conn = h11.Connection(h11.CLIENT)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    if host is not None:
        headers = [(k, host if k.lower() == "host" else v) for k, v in headers]
    if request.body_exists and request.content_length is None:
        headers.append(("Transfer-Encoding", "chunked"))
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", request.headers["Upgrade"])]
    else:
        headers.append(("Connection", "close"))
    sender: asyncio.Task[None] | None = None
    switched = False
    try:
        await writer.write(conn.send(h11.Request(method=request.method, target=request.rel_url.raw_path_qs,
                                                 headers=headers)))

        async def send_body() -> None:
            async for chunk in request.content.iter_chunked(CHUNK):
                await writer.write(conn.send(h11.Data(data=chunk)))
            await writer.write(conn.send(h11.EndOfMessage()))

        sender = asyncio.create_task(send_body())
        head = await _next(conn, reader)
        while isinstance(head, h11.InformationalResponse) and head.status_code != 101:
            head = await _next(conn, reader)  # 100 Continue: the real answer follows
        if isinstance(head, h11.InformationalResponse):  # 101: from here on, bytes
            await sender
            switched = True
            return await _switched(request, head, conn.trailing_data[0], reader, writer)
        if not isinstance(head, h11.Response):
            raise UpstreamError(f"port {port}: no HTTP response from the sandbox")
        return await _respond(request, conn, head, reader)
    except h11.ProtocolError as err:
        raise UpstreamError(f"port {port}: the sandbox's server broke HTTP: {err}") from None
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        if not switched:
            with contextlib.suppress(Exception):
                await writer.close()


async def _respond(request: web.Request, conn: h11.Connection, head: h11.Response, reader: Any) -> web.StreamResponse:
    resp = web.StreamResponse(status=head.status_code, reason=head.reason.decode(errors="replace") or None)
    length = None
    for name, value in head.headers:
        key = name.decode().lower()
        if key == "content-length":
            length = int(value)
        elif key not in HOP_BY_HOP:
            resp.headers.add(name.decode(), value.decode(errors="replace"))
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    while True:
        event = await _next(conn, reader)
        if isinstance(event, h11.Data):
            await resp.write(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    await resp.write_eof()
    return resp


async def _next(conn: h11.Connection, reader: Any) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.PAUSED:  # a protocol switch h11 will not read past: nothing more comes as HTTP
            raise UpstreamError("the sandbox's server switched protocols where no switch was relayed")
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(CHUNK))


def _peer_closed(sock: Any) -> bool:
    """Whether the client's TCP connection was closed by the client (CLOSE_WAIT or past it)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in TCP_GONE


class _Inbound:
    """What aiohttp's server protocol feeds after the 101 (its ``set_parser`` hook): the
    client's raw bytes, queued for the guest, the socket paused while too many wait."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._queue: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._paused = False
        self._wake = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if data:
            self._queue.append(bytes(data))
            self._size += len(data)
            self._wake.set()
            if self._size >= UP_BUFFER and not self._paused:
                self._paused = True
                self._protocol.pause_reading()
        return False, b""

    @property
    def paused(self) -> bool:
        return self._paused

    def feed_eof(self) -> None:
        self._eof = True
        self._wake.set()

    async def read(self) -> bytes:
        """The next bytes from the client; b"" once it is gone."""
        while not self._queue:
            if self._eof:
                return b""
            self._wake.clear()
            await self._wake.wait()
        data = self._queue.popleft()
        self._size -= len(data)
        if self._paused and self._size < UP_BUFFER // 2:
            self._paused = False
            with contextlib.suppress(Exception):  # the connection may be gone already
                self._protocol.resume_reading()
        return data


async def _switched(request: web.Request, head: h11.InformationalResponse, tail: bytes, reader: Any,
                    writer: Any) -> web.StreamResponse:
    """The guest's 101 to the client, then bytes both ways until either end closes."""
    resp = web.StreamResponse(status=101, reason=head.reason.decode(errors="replace") or None)
    for name, value in head.headers:
        if name.decode().lower() not in ("content-length", "transfer-encoding"):
            resp.headers.add(name.decode(), value.decode(errors="replace"))
    protocol, transport = request.protocol, request.transport
    try:
        out = await resp.prepare(request)
        assert out is not None and protocol is not None and transport is not None
        inbound = _Inbound(protocol)
        protocol.set_parser(inbound)  # type: ignore[arg-type]  # gets what followed the request head, too
        protocol.keep_alive(False)

        async def down() -> None:  # guest -> client
            if tail:
                transport.write(tail)
            while data := await reader.read(CHUNK):
                transport.write(data)
                await out.drain()

        async def up() -> None:  # client -> guest
            while data := await inbound.read():
                await writer.write(data)

        async def client_gone() -> None:
            """While the client's socket is paused (its bytes wait for the guest's credit), asyncio
            reads nothing from it and would not see it close: ask the kernel every few seconds."""
            sock = transport.get_extra_info("socket")
            while sock is not None:
                await asyncio.sleep(GONE_POLL)
                if inbound.paused and _peer_closed(sock):
                    return

        pumps = [asyncio.create_task(down()), asyncio.create_task(up()), asyncio.create_task(client_gone())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(BaseException):  # ends of the stream: what the pumps are for
                    await task
    finally:
        with contextlib.suppress(Exception):
            await writer.close()
        if transport is not None:
            transport.close()  # after what was written is flushed
    return resp
