"""A small keep-alive HTTP/1.1 client on asyncio, for the S3 store and for peers.

Only what those need: one request at a time per connection, bodies by
``content-length`` or chunked (strictly: a body cut short is an error, never a
short success), a bounded pool per host.  A connection that saw any error is
closed, never reused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlparse

from cubefs.errors import StoreError


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one host, at most ``size`` at once."""

    def __init__(self, endpoint: str, size: int) -> None:
        u = urlparse(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise StoreError(f"invalid endpoint {endpoint!r}: use http://HOST:PORT or https://HOST")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = u.path.rstrip("/")
        self._idle: deque[_Conn] = deque()
        self._slots = asyncio.Semaphore(size)
        self._ssl = ssl.create_default_context() if self.tls else None

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Response:
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is not None and conn.reader.at_eof():
                conn.close()
                conn = None
            if conn is None:
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl)
                conn = _Conn(reader, writer)
            try:
                resp, keep = await self._exchange(conn, method, target, headers, body)
            except BaseException:
                conn.close()
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
            return resp

    async def _exchange(
        self, conn: _Conn, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[Response, bool]:
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"content-length: {len(body)}")
        conn.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await conn.writer.drain()
        status_line = await conn.reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before a response")
        parts = status_line.decode("latin-1").split(" ", 2)
        status = int(parts[1])
        resp_headers: dict[str, str] = {}
        while True:
            line = await conn.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers[k.strip().lower()] = v.strip()
        keep = resp_headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in resp_headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                line = await conn.reader.readline()
                if not line.endswith(b"\n"):  # EOF mid-body: a truncated response, never a short success
                    raise asyncio.IncompleteReadError(line, None)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await conn.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await conn.reader.readexactly(size))
                if await conn.reader.readexactly(2) != b"\r\n":
                    raise ValueError("malformed chunked encoding")
            data = b"".join(chunks)
        elif "content-length" in resp_headers:
            data = await conn.reader.readexactly(int(resp_headers["content-length"]))
        else:
            data = await conn.reader.read()
            keep = False
        return Response(status, resp_headers, data), keep

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
