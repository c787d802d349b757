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
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
from aiohttp import web

from cubefs.errors import CubefsError

CHUNK = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}


class UpstreamError(CubefsError):
    """The server in the sandbox broke the HTTP exchange."""


async def relay(request: web.Request, channel: Any, port: int) -> web.StreamResponse:
    if request.headers.get("Upgrade"):
        raise web.HTTPNotImplemented(reason="protocol upgrades (WebSocket) through the sandbox proxy are not "
                                            "supported yet")
    try:
        reader, writer = await channel.open_tcp(port)
    except CubefsError as err:
        if getattr(err, "code", "") == "unavailable" or "refused" in str(err).lower():
            raise ConnectionRefusedError(str(err)) from None
        raise
    conn = h11.Connection(h11.CLIENT)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    if request.body_exists and request.content_length is None:
        headers.append(("Transfer-Encoding", "chunked"))
    headers.append(("Connection", "close"))
    sender: asyncio.Task[None] | None = None
    try:
        await writer.write(conn.send(h11.Request(method=request.method, target=request.rel_url.raw_path_qs,
                                                 headers=headers)))

        async def send_body() -> None:
            async for chunk in request.content.iter_chunked(CHUNK):
                await writer.write(conn.send(h11.Data(data=chunk)))
            await writer.write(conn.send(h11.EndOfMessage()))

        sender = asyncio.create_task(send_body())
        head = await _next(conn, reader)
        while isinstance(head, h11.InformationalResponse):  # 100 Continue: the real answer follows
            head = await _next(conn, reader)
        if not isinstance(head, h11.Response):
            raise UpstreamError(f"port {port}: no HTTP response from the sandbox")
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
    except h11.ProtocolError as err:
        raise UpstreamError(f"port {port}: the sandbox's server broke HTTP: {err}") from None
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        with contextlib.suppress(Exception):
            await writer.close()


async def _next(conn: h11.Connection, reader: Any) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(CHUNK))
