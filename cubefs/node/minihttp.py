"""The request side of the two tiny HTTP servers a daemon runs: the control socket
(:mod:`cubefs.node.control`) and the peer server (:mod:`cubefs.node.peer_server`).

Only what they need: a request head read up to a size limit, its request line
and headers parsed strictly.  Anything else is a :class:`BadRequest`, which
each server answers or drops; nothing a client sends gets further.
"""

from __future__ import annotations

from typing import Protocol


class BadRequest(ValueError):
    """A request that is not the HTTP/1.x these servers speak."""


class _Receiver(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


async def read_head(stream: _Receiver, buf: bytes, limit: int) -> tuple[bytes | None, bytes]:
    """(the head before the blank line, the bytes after it); head None if the
    client closed first.  ``buf`` holds bytes already received (keep-alive)."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > limit:
            raise BadRequest("request head too large")
        data = await stream.receive_some(65536)
        if not data:
            return None, b""
        buf += bytes(data)
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, headers with lower-case names)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP request line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line {line[:80]!r}")
        headers[k.strip().lower()] = v.strip()
    return parts[0], parts[1], headers
