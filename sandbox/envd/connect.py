"""The Connect protocol with the JSON codec over HTTP/1.1, as envd speaks it and the stock E2B SDK
(connectrpc + its ``_ProtoJSONCodec``) expects it.

Three shapes of call, all ``POST /{package}.{Service}/{Method}``:

* unary: the request body is one bare JSON message (``application/json``); the answer is 200 with a
  JSON message, or the Connect error JSON ``{"code": "not_found", "message": ...}`` with the HTTP
  status of :data:`HTTP_STATUS`;
* server stream: the request body is one *envelope* (``flags:u8 | length:u32 BE | JSON``), the answer is
  200 ``application/connect+json`` with data envelopes (flags 0) and one end-of-stream envelope
  (flags 2, ``{}`` or ``{"error": {...}}``); errors after the headers can only travel in that trailer;
* client stream (``StreamInput``): the request is a sequence of envelopes; connectrpc reads the answer
  through its bidi-stream path, so it too is enveloped (one message, then the trailer), not a bare
  JSON body.

Every envelope is written and flushed on its own: the SDK blocks on the first (``start``) event before
``commands.run(background=True)`` returns, so an envelope held in a buffer is a hung client.

Proto3 JSON value rules (what :func:`msg` and the readers implement): lowerCamelCase names on the wire
(both spellings read), zero values omitted, int64 as decimal strings, bytes as base64, enums by name,
``Timestamp`` as RFC 3339 in UTC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

#: Connect error code name -> HTTP status (connect protocol spec; the SDK maps back by code name).
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

#: The largest request envelope accepted.  Requests are small JSON (stdin chunks are what the caller
#: hands the SDK in one piece); a bound keeps a hostile length field from reserving gigabytes.
MAX_MESSAGE = 64 << 20

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"


class ConnectError(Exception):
    """An error to answer with: a Connect code name and a message for the user."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            code = "unknown"
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def as_connect_error(exc: BaseException) -> ConnectError:
    """The Connect error for any exception a handler let escape.

    The agent's errors (``vmm.channel.AgentError``) carry ``code`` as a Connect code name, so they map
    1:1 by that attribute; OS errors map by errno so ENOSPC stays "resource_exhausted" (the SDK's
    NotEnoughSpace / RateLimit path) instead of collapsing into "internal"."""
    if isinstance(exc, ConnectError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in HTTP_STATUS:
        return ConnectError(code, str(exc) or code)
    if isinstance(exc, FileNotFoundError):
        return ConnectError("not_found", str(exc))
    if isinstance(exc, FileExistsError):
        return ConnectError("already_exists", str(exc))
    if isinstance(exc, PermissionError):
        return ConnectError("permission_denied", str(exc))
    if isinstance(exc, (NotADirectoryError, IsADirectoryError)):
        return ConnectError("failed_precondition", str(exc))
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return ConnectError("resource_exhausted", str(exc))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ConnectError("deadline_exceeded", str(exc) or "deadline exceeded")
    return ConnectError("internal", f"{type(exc).__name__}: {exc}")


# -- envelopes ---------------------------------------------------------------------------------------


def envelope(message: dict[str, Any], *, end: bool = False) -> bytes:
    """One envelope: flags, big-endian length, compact JSON."""
    return raw_envelope(json.dumps(message, separators=(",", ":")).encode(), end=end)


def raw_envelope(body: bytes, *, end: bool = False) -> bytes:
    """One envelope around JSON already encoded (see ``process.data_envelope``)."""
    return struct.pack(">BI", FLAG_END_STREAM if end else 0, len(body)) + body


def end_stream(error: ConnectError | None = None) -> bytes:
    """The end-of-stream envelope: ``{}`` on success, ``{"error": {...}}`` on failure."""
    return envelope({"error": error.to_json()} if error else {}, end=True)


def split_envelopes(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Every (flags, message) of a buffer holding whole envelopes; ConnectError on a torn one."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ConnectError("invalid_argument", "protocol error: truncated envelope header")
        flags, length = struct.unpack_from(">BI", data, pos)
        pos += 5
        if len(data) - pos < length:
            raise ConnectError("invalid_argument", "protocol error: truncated envelope")
        out.append((flags, _decode_envelope(flags, data[pos : pos + length])))
        pos += length
    return out


def _decode_envelope(flags: int, payload: bytes) -> dict[str, Any]:
    if flags & FLAG_COMPRESSED:
        raise ConnectError("internal", "protocol error: compressed message without negotiated compression")
    return parse_json(payload)


async def read_envelopes(reader: Any) -> AsyncIterator[dict[str, Any]]:
    """The messages of an enveloped request body (an ``aiohttp.StreamReader``), as they arrive:
    a client stream is consumed message by message, never buffered whole."""
    while True:
        try:
            header = await reader.readexactly(5)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ConnectError("invalid_argument", "protocol error: truncated envelope header") from None
            return
        flags, length = struct.unpack(">BI", header)
        if length > MAX_MESSAGE:
            raise ConnectError("resource_exhausted", f"message of {length} bytes is larger than {MAX_MESSAGE}")
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectError("invalid_argument", "protocol error: truncated envelope") from None
        if flags & FLAG_END_STREAM:
            return
        yield _decode_envelope(flags, payload)


def parse_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConnectError("invalid_argument", f"request is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", "request is not a JSON object")
    return value


# -- reading proto3 JSON -----------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def get(message: dict[str, Any] | None, name: str, default: Any = None) -> Any:
    """Field ``name`` (snake_case) of a proto3 JSON object, under either spelling."""
    if not message:
        return default
    for key in (_camel(name), name):
        if key in message and message[key] is not None:
            return message[key]
    return default


def get_obj(message: dict[str, Any] | None, name: str) -> dict[str, Any]:
    value = get(message, name, {})
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", f"{name} must be an object")
    return value


def get_str(message: dict[str, Any] | None, name: str, default: str = "") -> str:
    value = get(message, name, default)
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{name} must be a string")
    return value


def get_bool(message: dict[str, Any] | None, name: str) -> bool:
    value = get(message, name, False)
    if not isinstance(value, bool):
        raise ConnectError("invalid_argument", f"{name} must be a boolean")
    return value


def get_int(message: dict[str, Any] | None, name: str, default: int = 0) -> int:
    """An integer field: proto3 JSON accepts a number or a decimal string for any integer type."""
    value = get(message, name, default)
    if isinstance(value, bool):
        raise ConnectError("invalid_argument", f"{name} must be an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            pass
    if isinstance(value, int):
        return value
    raise ConnectError("invalid_argument", f"{name} must be an integer")


def get_bytes(message: dict[str, Any] | None, name: str) -> bytes:
    """A bytes field: standard or URL-safe base64, padded or not (proto3 JSON accepts all four)."""
    value = get(message, name, "")
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{name} must be a base64 string")
    value = value.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError("invalid_argument", f"{name} is not valid base64") from None


def get_enum(message: dict[str, Any] | None, name: str, values: dict[str, int]) -> int:
    """An enum field given by name (``"SIGNAL_SIGKILL"``) or by number."""
    value = get(message, name, 0)
    if isinstance(value, str):
        if value not in values:
            raise ConnectError("invalid_argument", f"unknown {name} {value!r}")
        return values[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConnectError("invalid_argument", f"{name} must be an enum name or number")


# -- writing proto3 JSON -----------------------------------------------------------------------------


def msg(**fields: Any) -> dict[str, Any]:
    """A proto3 JSON object: names camelCased, zero values (0, "", False, empty list/map, None) omitted.

    Nested objects are kept even when empty (``{"keepalive": {}}`` is a set oneof member, not a zero
    value).  Values are taken as already encoded (see :func:`int64`, :func:`b64`, :func:`timestamp`)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None or value is False or value == "" or value == [] or (type(value) is int and value == 0):
            continue
        out[_camel(name)] = value
    return out


def int64(value: int) -> str | None:
    """int64/uint64 travel as decimal strings in proto3 JSON; zero is omitted."""
    return str(value) if value else None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def timestamp(seconds: float) -> str:
    """A ``google.protobuf.Timestamp`` in RFC 3339, UTC, with the nanoseconds the float carries."""
    whole = int(seconds // 1)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    text = datetime.datetime.fromtimestamp(whole, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += f".{nanos:09d}".rstrip("0")
    return text + "Z"


# -- answering ---------------------------------------------------------------------------------------


def unary_response(message: dict[str, Any]) -> web.Response:
    return web.Response(
        body=json.dumps(message, separators=(",", ":")).encode(), content_type=UNARY_CONTENT_TYPE
    )


def error_response(error: ConnectError) -> web.Response:
    return web.Response(
        status=error.http_status,
        body=json.dumps(error.to_json()).encode(),
        content_type=UNARY_CONTENT_TYPE,
    )


def enveloped_response(message: dict[str, Any] | None, error: ConnectError | None = None) -> web.Response:
    """The whole answer of a client-stream call: its one message (unless it failed) and the trailer."""
    body = (envelope(message) if message is not None and error is None else b"") + end_stream(error)
    return web.Response(body=body, headers={"Content-Type": STREAM_CONTENT_TYPE})


async def read_unary(request: web.Request) -> dict[str, Any]:
    """The request message of a unary call (a bare JSON body)."""
    body = await request.content.read(MAX_MESSAGE + 1)
    if len(body) > MAX_MESSAGE:
        raise ConnectError("resource_exhausted", f"request larger than {MAX_MESSAGE} bytes")
    return parse_json(body)


async def read_stream_request(request: web.Request) -> dict[str, Any]:
    """The one request message of a server-stream call (one envelope)."""
    async for message in read_envelopes(request.content):
        return message
    raise ConnectError("invalid_argument", "protocol error: the stream request carries no message")


def keepalive_interval(request: web.Request, default: float = 50.0) -> float:
    """Seconds between keepalive envelopes: the client's ``Keepalive-Ping-Interval`` (the SDK sends
    50, so proxies with idle timeouts of a minute keep a silent command's stream open)."""
    try:
        value = float(request.headers.get("Keepalive-Ping-Interval", default))
    except ValueError:
        return default
    return min(max(value, 0.05), 3600.0)


def timeout_seconds(request: web.Request) -> float | None:
    """The call's deadline from ``Connect-Timeout-Ms`` (None when absent or malformed)."""
    value = request.headers.get("Connect-Timeout-Ms", "")
    if not value.isdigit() or len(value) > 10:
        return None
    return int(value) / 1000


class ServerStream:
    """The response side of a server stream: one envelope per :meth:`send`, written and drained at
    once; keepalives from a background task while the stream is silent; :meth:`finish` writes the
    trailer.  Writes are serialised so a keepalive never lands inside another envelope."""

    def __init__(self, request: web.Request, keepalive: dict[str, Any] | None = None) -> None:
        self._request = request
        self._response = web.StreamResponse(status=200, headers={"Content-Type": STREAM_CONTENT_TYPE})
        self._lock = asyncio.Lock()
        self._keepalive = keepalive
        self._keepalive_task: asyncio.Task[None] | None = None
        self._finished = False
        self.broken = asyncio.Event()

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def open(self) -> None:
        """Send the headers now (chunked), so the client sees the stream start before any event."""
        self._response.enable_chunked_encoding()
        await self._response.prepare(self._request)

    async def send(self, message: dict[str, Any]) -> None:
        """Write one data envelope; raises ConnectionResetError when the client has gone.  Keepalives
        start after the first: the SDK reads the first event as the stream's own (a process's
        ``start``) and fails on a keepalive there — which a guest slow to spawn (50 busy loops
        under TCG) made happen."""
        await self._write(envelope(message))
        if self._keepalive is not None and self._keepalive_task is None:
            interval = keepalive_interval(self._request)
            self._keepalive_task = asyncio.create_task(self._keepalives(interval))

    async def send_raw(self, data: bytes) -> None:
        """Write one envelope made by :func:`raw_envelope`."""
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            try:
                await self._response.write(data)
            except (ConnectionError, RuntimeError) as e:
                self.broken.set()
                raise ConnectionResetError(f"client went away: {e}") from None
            except asyncio.CancelledError:
                # Cancelled mid-envelope (a deadline while the client was slow to read): the wire may
                # hold half an envelope, so no trailer may follow; the client sees a cut stream.
                self.broken.set()
                raise

    async def _keepalives(self, interval: float) -> None:
        assert self._keepalive is not None
        with contextlib.suppress(ConnectionResetError):
            while True:
                await asyncio.sleep(interval)
                await self._write(envelope(self._keepalive))

    async def finish(self, error: ConnectError | None = None) -> web.StreamResponse:
        """Stop keepalives and write the end-of-stream envelope (if the client is still there)."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive_task
            self._keepalive_task = None
        if not self._finished and not self.broken.is_set():
            self._finished = True
            with contextlib.suppress(ConnectionResetError):
                await self._write(end_stream(error))
                await self._response.write_eof()
        return self._response
