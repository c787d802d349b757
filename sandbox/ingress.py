"""How the proxy reaches a sandbox's ports, as its creator asked (E2B's ``network`` object at create).

``allowPublicTraffic`` (default true): false makes the proxy ask every request to the
sandbox's ports for its ``e2b-traffic-access-token`` (``sandbox.proxy``).

``maskRequestHost``: the Host header the sandbox's servers see, ``${PORT}`` replaced by the
port asked for (a dev server that checks its Host, or builds links from it, sees the name its
owner chose rather than ``PORT-ID.DOMAIN``).  Left out, the Host goes through as the client
sent it.

``httpsPorts``: ports whose server speaks TLS itself.  The proxy still terminates the client's
side and speaks TLS to the sandbox on that hop (E2B: "not TLS passthrough"), without verifying
the server's certificate: a self-signed one works, and the hop runs over the sandbox's own
agent channel, never a network.  The TLS runs in the proxy's process over that channel's byte
stream (``TlsStream``), so nothing in the guest changes.

These are fixed at create (E2B's update call carries only the egress fields) and kept in the
sandbox's record; a fork's children inherit them.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

from cubefs.errors import CubefsError, UsageError

PORT_VARIABLE = "${PORT}"
MAX_HOST = 253
ENVD_PORT = 49983  # the proxy serves envd itself: it cannot be an HTTPS port of the guest's


@dataclass
class Ingress:
    public: bool = True
    mask_host: str = ""
    https_ports: list[int] = field(default_factory=list)

    @classmethod
    def from_api(cls, network: Any) -> Ingress:
        """From a create's ``network`` object; UsageError (400) naming the bad field."""
        if not isinstance(network, dict):
            return cls()
        public = network.get("allowPublicTraffic", True)
        if public is None:
            public = True
        if not isinstance(public, bool):
            raise UsageError("network.allowPublicTraffic must be true or false")
        mask = network.get("maskRequestHost") or ""
        if not isinstance(mask, str) or len(mask) > MAX_HOST or not all(0x21 <= ord(c) < 0x7f for c in mask):
            raise UsageError(f"network.maskRequestHost must be a host name of at most {MAX_HOST} printable "
                             "ASCII characters (${PORT} is replaced by the port)")
        ports = network.get("httpsPorts") or []
        if not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                                  and 0 < p < 65536 for p in ports):
            raise UsageError("network.httpsPorts must be a list of port numbers")
        if ENVD_PORT in ports:
            raise UsageError(f"network.httpsPorts: the envd port ({ENVD_PORT}) cannot be listed")
        return cls(public, mask, sorted(set(ports)))

    def apply(self, record: Any) -> bool:
        """Set them on a sandbox's record; True if that changed it (the record is to be saved)."""
        new = (self.public, self.mask_host, self.https_ports)
        if (record.public_traffic, record.mask_request_host, record.https_ports) == new:
            return False
        record.public_traffic, record.mask_request_host, record.https_ports = new
        return True


def api_fields(record: Any) -> dict[str, Any]:
    """The ingress part of ``SandboxDetail.network``."""
    doc: dict[str, Any] = {"allowPublicTraffic": record.public_traffic}
    if record.mask_request_host:
        doc["maskRequestHost"] = record.mask_request_host
    if record.https_ports:
        doc["httpsPorts"] = list(record.https_ports)
    return doc


CLOSE_NOTIFY_WAIT = 1.0  # seconds a close waits to send TLS's close_notify (a guest may give no credit)


class TlsError(CubefsError):
    """The sandbox's server broke TLS (or never spoke it): a 502 for that request, nothing more."""


def masked_host(mask: str, port: int) -> str:
    return mask.replace(PORT_VARIABLE, str(port))


class TlsStream:
    """TLS over one of the agent channel's byte streams (its ``read``/``write``/``close``),
    with the same interface, so the relay speaks HTTPS to a guest port as it speaks HTTP."""

    def __init__(self, reader: Any, writer: Any, server_name: str | None) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # E2B: "the backend certificate is not verified"
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_name or None)
        except (ValueError, UnicodeError):  # a Host that is no name to send as SNI: none is sent
            self._tls = ctx.wrap_bio(self._in, self._out)
        self._reader, self._writer = reader, writer

    async def handshake(self) -> None:
        await self._until(self._tls.do_handshake)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` plaintext bytes; b"" at the end (a close without close_notify too:
        HTTP's own framing says whether the answer was whole)."""
        try:
            return await self._until(lambda: self._tls.read(n if n > 0 else 65536))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._until(lambda v=view: self._tls.write(v))
            view = view[sent:]

    async def close(self) -> None:
        """close_notify if it goes out at once, then the stream closed whatever happened: a
        guest server that stopped reading (its answer sent early) holds no relay open."""
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        try:
            await asyncio.wait_for(self._flush(), CLOSE_NOTIFY_WAIT)
        except (TimeoutError, CubefsError, OSError):
            pass
        finally:
            await self._writer.close()

    async def _until(self, step: Any) -> Any:
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._reader.read(65536)
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise
            except ssl.SSLError as err:  # a bad record, a failed handshake: the guest's doing
                raise TlsError(f"TLS with the sandbox's server failed: {err.reason or err}") from None
            await self._flush()
            return result

    async def _flush(self) -> None:
        if pending := self._out.read():
            await self._writer.write(pending)
