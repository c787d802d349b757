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

Who may ask, and for what (issue 12: one unauthenticated 113-byte request
read ``/etc/shadow`` out of the cache by its SHA-256; one 324 KiB request of
made-up digests made a node read 111 MiB from the store):

* Every request is authenticated with the cluster secret
  (:class:`cubefs.cache.peers.RequestAuth`); a request that is not gets a bare
  401 or 403 and the connection closed, every answer carries a MAC bound to
  the request's nonce.  ``/metrics`` also takes a read-only bearer token.
* A chunk is served only if a pack index of this node's store lists it at
  exactly the place, lengths and codec the request names (indexes are fetched
  on first use and kept, :class:`PackIndexes`), so the cache answers for the
  images of its store and nothing else, and made-up digests cost no store read.
* One request names at most ``MAX_CHUNKS`` chunks in at most
  ``MAX_PACKS_PER_REQUEST`` packs not yet known, and makes the node fetch at
  most ``MAX_FETCH_BYTES`` stored bytes from the store; what is over is
  answered "missing" (the client reads it from the store itself).
* No answer names this node's configuration: a wrong store is a bare 409.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import time
from collections import Counter
from typing import Any

import trio

from cubefs.cache.disk import DiskCache, StoredChunk
from cubefs.cache.peers import (
    H_MAC,
    H_NONCE,
    PATH,
    REQUEST,
    PeerProtocolError,
    RequestAuth,
    decode_request,
    encode_response,
    metrics_token,
    response_mac,
)
from cubefs.cache.peers import MAX_CHUNKS as MAX_CHUNKS_PER_REQUEST
from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import MemoryTier
from cubefs.errors import CubefsError, ObjectNotFoundError
from cubefs.format.packs import CODEC_DELTA, CODEC_RAW, ChunkLocation, decode_index, index_key
from cubefs.node import control
from cubefs.node.minihttp import BadRequest, parse_head, read_head
from cubefs.remote import RetryPolicy, store_session

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
REQUEST_DEADLINE = 60.0
MAX_FETCH_BYTES = 16 * 1024 * 1024  # stored bytes one request may make this node read from the store
MAX_PACKS_PER_REQUEST = 64  # pack indexes one request may make this node fetch
KNOWN_PACKS = 4096  # pack indexes kept (~128 entries, ~10 KiB each)
NO_INDEX_SECONDS = 30.0  # a pack without an index is asked again after this (a build may be uploading it)


COUNTERS = ("requests", "chunks_asked", "chunks_from_disk", "chunks_fetched", "chunks_unavailable", "bytes_sent",
            "bad_requests", "wrong_store", "refused_unauthenticated", "refused_bad_mac", "refused_stale",
            "refused_replayed", "chunks_not_indexed", "chunks_over_budget", "index_reads")


class PackIndexes:
    """The pack indexes of the node's store, fetched when a request first names a
    pack and kept (LRU); a pack without one is remembered for NO_INDEX_SECONDS."""

    def __init__(self, source: ChunkSource, counts: Counter[str], size: int = KNOWN_PACKS) -> None:
        self.source = source
        self.counts = counts
        self.size = size
        self._packs: dict[str, dict[int, ChunkLocation] | float] = {}  # by offset; float: no index until then

    def _cached(self, pack: str) -> dict[int, ChunkLocation] | bool | None:
        """The entries, None if there is no index, False if not known."""
        got = self._packs.get(pack)
        if got is None:
            return False
        if isinstance(got, float):
            if got < time.monotonic():
                del self._packs[pack]
                return False
            return None
        self._packs[pack] = self._packs.pop(pack)  # most recently used last
        return got

    async def _fetch(self, pack: str) -> None:
        key = index_key(pack)
        self.counts["index_reads"] += 1
        try:
            blob = await self.source.loop.trio_run(self.source.store.get(key))
            entries = await trio.to_thread.run_sync(decode_index, blob, key)
            self._packs[pack] = {e.offset: e for e in entries}
        except ObjectNotFoundError:
            self._packs[pack] = time.monotonic() + NO_INDEX_SECONDS
        except CubefsError as err:
            log.warning("peer server: pack index %s unusable: %s", key, err)
            self._packs[pack] = time.monotonic() + NO_INDEX_SECONDS
        while len(self._packs) > self.size:
            del self._packs[next(iter(self._packs))]

    async def valid(self, refs: list[ChunkLocation]) -> list[bool]:
        """For each ref: does a pack index of the store list it exactly so (stored
        whole: deltas are never served, their readers need the base anyway)?"""
        unknown = list(dict.fromkeys(r.pack for r in refs if self._cached(r.pack) is False))
        async with trio.open_nursery() as n:
            for pack in unknown[:MAX_PACKS_PER_REQUEST]:
                n.start_soon(self._fetch, pack)
        out = []
        for r in refs:
            entries = self._cached(r.pack)
            e = entries.get(r.offset) if entries else None
            out.append(e is not None and e.codec != CODEC_DELTA and r.codec == e.codec and
                       (e.digest, e.stored_len, e.plain_len) == (r.digest, r.stored_len, r.plain_len))
        return out


class PeerServer:
    def __init__(self, source: ChunkSource, store_url: str, secret: bytes) -> None:
        self.source = source
        self.store_url = store_url
        self.auth = RequestAuth(secret)
        self.token = metrics_token(secret)
        # Every counter from the start, at 0: a node no mount has asked yet still
        # exports them (a missing series reads as "no data", not "none").
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.indexes = PackIndexes(source, self.counts)
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
        asked = decode_request(body)
        self.counts["chunks_asked"] += len(asked)
        ok = await self.indexes.valid(asked)
        refs = [r for r, good in zip(asked, ok) if good]
        self.counts["chunks_not_indexed"] += len(asked) - len(refs)
        found: dict[bytes, StoredChunk] = {}
        disk = self.source.disk
        if disk is not None and refs:
            found = await trio.to_thread.run_sync(disk.get_many, [r.digest for r in refs])
            self.counts["chunks_from_disk"] += len(found)
        missing = []
        budget = MAX_FETCH_BYTES
        for r in refs:
            if r.digest in found or self.source.has(r.digest):
                missing.append(r)  # memory, or already on its way: costs no new read
                continue
            if r.stored_len > budget:
                self.counts["chunks_over_budget"] += 1
                continue
            budget -= r.stored_len
            missing.append(r)
        missing = [r for r in missing if r.digest not in found]
        if missing:
            # Plaintext from memory or the store (fetched, verified, cached on disk);
            # sent raw this once, from the disk cache in its stored form next time.
            for ref, data in zip(missing, await self.source.get_each(missing)):
                if data is not None:
                    found[ref.digest] = StoredChunk(CODEC_RAW, len(data), data)
                    self.counts["chunks_fetched"] += 1
                else:
                    self.counts["chunks_unavailable"] += 1
        out = [(r.digest, found.get(r.digest)) for r in asked]
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
                    refused = self._refuse(method, target, headers, body)
                    if refused:  # bare: no body, nothing about why, and hang up
                        await stream.send_all(f"HTTP/1.1 {refused}\r\ncontent-length: 0\r\n"
                                              "connection: close\r\n\r\n".encode())
                        return
                    status, ctype, payload = await self._route(method, target, headers, body)
                    close = headers.get("connection", "").lower() == "close"
                    head_lines = [f"HTTP/1.1 {status}", f"content-type: {ctype}", f"content-length: {len(payload)}"]
                    if H_NONCE in headers:  # a signed request gets a signed answer
                        mac = response_mac(self.auth.secret, headers[H_NONCE], int(status.split()[0]), payload)
                        head_lines.append(f"{H_MAC}: {mac}")
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

    def _refuse(self, method: str, target: str, headers: dict[str, str], body: bytes) -> str | None:
        """The status line for a request that is not let in, or None."""
        if method == "GET" and target == "/metrics" and hmac.compare_digest(
                headers.get("authorization", ""), f"Bearer {self.token}"):
            return None
        why = self.auth.check(method, target, headers, body)
        if why is None:
            return None
        self.counts[f"refused_{why}"] += 1
        return "401 Unauthorized" if why == "unauthenticated" else "403 Forbidden"

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[str, str, bytes]:
        if method == "POST" and target == PATH:
            self.counts["requests"] += 1
            if headers.get("x-cubefs-store", "") != self.store_url:
                self.counts["wrong_store"] += 1
                return "409 Conflict", "text/plain", b""
            return "200 OK", "application/octet-stream", encode_response(await self.chunks(body))
        if method == "GET" and target == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", self.metrics().encode()
        if method == "GET" and target == "/stats":
            return "200 OK", "application/json", json.dumps(self.stats()).encode()
        return "404 Not Found", "text/plain", b""


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, :PORT or PORT; no host means loopback (a node serves other nodes
    only when told which address to: README's example names it)."""
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_node(listener: socket.socket, cache_dir: str, cache_size: int, memory: int, store_url: str | None,
             s3_endpoint: str | None, secret: bytes) -> int:
    """Serve this node's chunks to peers on ``listener`` (bound, listening) until SIGTERM/SIGINT."""
    host, port = listener.getsockname()[:2]
    policy = RetryPolicy(attempts=4, timeout=10.0, max_backoff=1.0)
    with store_session(store_url, s3_endpoint, policy=policy) as (loop, store):
        disk = DiskCache(cache_dir, cache_size)
        source = ChunkSource(store, loop, MemoryTier(memory), disk, label="node")
        server = PeerServer(source, store.url, secret)

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
