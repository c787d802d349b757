"""One HTTP request passed on to a node, both bodies streamed, nothing buffered whole.

Fronts forward the E2B API and the sandbox proxy to the node that runs the
sandbox.  Bodies stream in both directions as they come (envd's Connect
streams — ``commands.run`` output, file uploads — are long-lived chunked
bodies), compressed bodies pass through as they are, and hop-by-hop headers
(RFC 9110 section 7.6.1) stop here.  One pooled client session per front
keeps connections to nodes open between requests.
"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


class NodeUnreachable(Exception):
    """The node did not take the request (refused, reset, timed out before answering)."""


def session(limit_per_host: int = 64) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host),
                                 auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, connect=3.0))


async def forward(request: web.Request, base: str, http: aiohttp.ClientSession,
                  headers: dict[str, str] | None = None, keep_host: bool = False,
                  body: bytes | None = None) -> web.StreamResponse:
    """``request`` sent to ``base`` (``http://host:port``) with the same method, path and query;
    the node's answer streamed back.  ``keep_host``: the node routes by the Host header (the
    sandbox proxy's ``PORT-ID.DOMAIN``).  NodeUnreachable when the node never answered."""
    out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    if keep_host and request.host:
        out["Host"] = request.host
    out.update(headers or {})
    data = body if body is not None else (request.content if request.body_exists else None)
    try:
        upstream = await http.request(request.method, base + request.path_qs, headers=out, data=data,
                                      allow_redirects=False)
    except (TimeoutError, aiohttp.ClientConnectionError) as err:
        raise NodeUnreachable(str(err) or type(err).__name__) from None
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return response  # the node went away mid-body: the client sees a cut stream, as it would
        await response.write_eof()
        return response


async def fetch_json(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                     timeout: float = 10.0) -> tuple[int, object]:
    """A small JSON call to a node (fan-outs: list, templates, snapshots)."""
    try:
        async with http.request(method, url, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as res:
            raw = await res.read()
    except (TimeoutError, aiohttp.ClientError) as err:
        raise NodeUnreachable(str(err) or type(err).__name__) from None
    try:
        return res.status, json.loads(raw) if raw else None
    except ValueError:
        return res.status, None
