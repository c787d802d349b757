"""The node daemon's peer server: this node's chunks over HTTP, for the other nodes.

``cubefs serve --listen HOST:PORT`` runs it (beside the mount server) on the
node's disk cache.  Other nodes' mounts ask it for the chunks it owns
(:mod:`cubefs.cache.peers`); it answers from its disk cache, and fetches
what it lacks from the store through its own chunk source (single flight:
ten nodes asking for one chunk cause one GET) and keeps it, so the next
node finds it here.  It also answers ``GET /metrics`` (Prometheus text) and
``GET /stats`` (JSON).

The HTTP side is deliberately small: HTTP/1.1 with keep-alive, bodies by
``content-length`` only, bounded header and body sizes, a deadline per
request; a client that sends garbage gets a 400 and is disconnected, and
nothing it does reaches the server's nursery.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from collections import Counter
from typing import Any

import trio

from cubefs import control
from cubefs.cache.disk import DiskCache, StoredChunk
from cubefs.cache.peers import MAX_CHUNKS as MAX_CHUNKS_PER_REQUEST
from cubefs.cache.peers import PATH, REQUEST, PeerProtocolError, decode_request, encode_response
from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import MemoryTier
from cubefs.format.packs import CODEC_RAW
from cubefs.minihttp import BadRequest, parse_head, read_head
from cubefs.remote import RetryPolicy, store_session

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
REQUEST_DEADLINE = 60.0


COUNTERS = ("requests", "chunks_asked", "chunks_from_disk", "chunks_fetched", "chunks_unavailable", "bytes_sent",
            "bad_requests", "wrong_store")


class PeerServer:
    def __init__(self, source: ChunkSource, store_url: str) -> None:
        self.source = source
        self.store_url = store_url
        # Every counter from the start, at 0: a node no mount has asked yet still
        # exports them (a missing series reads as "no data", not "none").
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.started = time.time()

    def stats(self) -> dict[str, Any]:
        return {"store": self.store_url, "uptime_seconds": round(time.time() - self.started, 1),
                "peer_requests": dict(self.counts), "tiers": self.source.stats()}

    def metrics(self) -> str:
        """The cache counters as the mounts export them (``cubefs_cache_*``, labelled
        ``role="node"``), and the peer requests served."""
        labels = f'role="node",store="{self.store_url}"'
        lines = [f"cubefs_node_{name}_total{{{labels}}} {value}" for name, value in sorted(self.counts.items())]
        return "\n".join(lines + control.metric_lines({"tiers": self.source.stats()}, labels)) + "\n"

    async def chunks(self, body: bytes) -> list[tuple[bytes, StoredChunk | None]]:
        refs = decode_request(body)
        self.counts["chunks_asked"] += len(refs)
        found: dict[bytes, StoredChunk] = {}
        disk = self.source.disk
        if disk is not None:
            found = await trio.to_thread.run_sync(disk.get_many, [r.digest for r in refs])
            self.counts["chunks_from_disk"] += len(found)
        missing = [r for r in refs if r.digest not in found]
        if missing:
            # Plaintext from memory or the store (fetched, verified, cached on disk);
            # sent raw this once, from the disk cache in its stored form next time.
            for ref, data in zip(missing, await self.source.get_each(missing)):
                if data is not None:
                    found[ref.digest] = StoredChunk(CODEC_RAW, len(data), data)
                    self.counts["chunks_fetched"] += 1
                else:
                    self.counts["chunks_unavailable"] += 1
        out = [(r.digest, found.get(r.digest)) for r in refs]
        self.counts["bytes_sent"] += sum(len(c.data) for _d, c in out if c is not None)
        return out

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                with trio.fail_after(REQUEST_DEADLINE):
                    head, buf = await read_head(stream, buf, MAX_HEAD)
                    if head is None:
                        return
                    method, target, headers = parse_head(head)
                    length = int(headers.get("content-length", "0"))
                    if length < 0 or length > MAX_CHUNKS_PER_REQUEST * REQUEST.size:
                        raise BadRequest(f"body of {length} bytes is too large")
                    while len(buf) < length:
                        data = await stream.receive_some(1 << 20)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                    status, ctype, payload = await self._route(method, target, headers, body)
                    close = headers.get("connection", "").lower() == "close"
                    head_lines = [f"HTTP/1.1 {status}", f"content-type: {ctype}", f"content-length: {len(payload)}"]
                    if close:
                        head_lines.append("connection: close")
                    resp = ("\r\n".join(head_lines) + "\r\n\r\n").encode() + payload
                    await stream.send_all(resp)
                    if close:
                        return
        except (PeerProtocolError, ValueError, UnicodeDecodeError) as err:  # ValueError: a BadRequest, a bad length
            self.counts["bad_requests"] += 1
            log.warning("peer server: bad request: %s", err)
            try:
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        except Exception:
            log.exception("peer server: request failed")
        finally:
            await stream.aclose()

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[str, str, bytes]:
        if method == "POST" and target == PATH:
            self.counts["requests"] += 1
            if headers.get("x-cubefs-store", "") != self.store_url:
                self.counts["wrong_store"] += 1
                return "409 Conflict", "text/plain", f"this node serves {self.store_url}\n".encode()
            return "200 OK", "application/octet-stream", encode_response(await self.chunks(body))
        if method == "GET" and target == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", self.metrics().encode()
        if method == "GET" and target == "/stats":
            return "200 OK", "application/json", json.dumps(self.stats()).encode()
        return "404 Not Found", "text/plain", b"not found\n"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_node(listener: socket.socket, cache_dir: str, cache_size: int, memory: int, store_url: str | None,
             s3_endpoint: str | None) -> int:
    """Serve this node's chunks to peers on ``listener`` (bound, listening) until SIGTERM/SIGINT."""
    host, port = listener.getsockname()[:2]
    policy = RetryPolicy(attempts=4, timeout=10.0, max_backoff=1.0)
    with store_session(store_url, s3_endpoint, policy=policy) as (loop, store):
        disk = DiskCache(cache_dir, cache_size)
        source = ChunkSource(store, loop, MemoryTier(memory), disk, label="node")
        server = PeerServer(source, store.url)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                source.start(nursery)
                token = trio.lowlevel.current_trio_token()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_a: token.run_sync_soon(nursery.cancel_scope.cancel))
                log.info("peer server on %s:%d for %s (cache %s)", host, port, store.url, cache_dir)
                tcp = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
                await trio.serve_listeners(server.handle, [tcp])

        try:
            trio.run(main)
        finally:
            source.flush()
            disk.close()
    return 0
