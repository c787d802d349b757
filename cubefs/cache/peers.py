"""The peer tier: other nodes' caches, asked before the object store.

Each chunk has one *owner* among the peers, chosen by rendezvous hashing
(the peer with the highest xxh64 of its address and the chunk's place: its
pack and which 512 KiB of the pack it is in), so every node asks the same peer
for the same chunk and the nodes together keep one copy of each hot chunk;
adding or removing a peer moves only that peer's share.  Hashing places, not
digests, keeps neighbouring chunks with one owner, so the owner still reads
them in one merged range (a chunk has exactly one place in a store).  The
owner answers from its disk cache or, on a miss, fetches the chunk from the
store itself and keeps it, so a cluster reads each chunk from the store
about once.

A peer is never trusted: every chunk it returns is decoded and its SHA-256
checked like the store's; a chunk that fails is counted as a lie and read
from the store.  A peer that refuses a connection, errs or does not answer
within ``timeout`` is counted, skipped for ``down_for`` seconds, and its
chunks read from the store, so a dead or slow peer costs a read at most
``timeout``.

Wire protocol (docs/format.md, "Peer protocol"): ``POST /v1/chunks`` with the
store's URL in ``x-cubefs-store`` and a body of request records; the answer
is one response record per request, in order, each followed by its bytes.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass, field

import xxhash

from cubefs.cache.disk import StoredChunk
from cubefs.cache.tiers import TierStats
from cubefs.format.packs import ChunkLocation
from cubefs.remote.http import HttpPool

log = logging.getLogger(__name__)

PATH = "/v1/chunks"
REQUEST = struct.Struct("<32s32sQIIB")  # digest, pack (binary), offset, stored_len, plain_len, codec
RESPONSE = struct.Struct("<32sBBII")  # digest, status, codec, plain_len, data length; then the data
OK, MISSING = 0, 1
MAX_CHUNKS = 4096  # per request
REGION = 512 * 1024  # bytes of a pack that share an owner


class PeerProtocolError(Exception):
    """A peer's answer that does not follow the protocol."""


def encode_request(refs: list[ChunkLocation]) -> bytes:
    return b"".join(
        REQUEST.pack(r.digest, bytes.fromhex(r.pack), r.offset, r.stored_len, r.plain_len, r.codec) for r in refs
    )


def decode_request(body: bytes) -> list[ChunkLocation]:
    if len(body) % REQUEST.size or len(body) // REQUEST.size > MAX_CHUNKS:
        raise PeerProtocolError(f"a request body of {len(body)} bytes is not a whole number of records")
    return [ChunkLocation(d, p.hex(), off, slen, plen, codec) for d, p, off, slen, plen, codec in
            REQUEST.iter_unpack(body)]


def encode_response(items: list[tuple[bytes, StoredChunk | None]]) -> bytes:
    parts = []
    for digest, chunk in items:
        if chunk is None:
            parts.append(RESPONSE.pack(digest, MISSING, 0, 0, 0))
        else:
            parts.append(RESPONSE.pack(digest, OK, chunk.codec, chunk.plain_len, len(chunk.data)))
            parts.append(chunk.data)
    return b"".join(parts)


def decode_response(body: bytes, refs: list[ChunkLocation]) -> dict[bytes, StoredChunk]:
    """The chunks a peer sent, by digest; raises PeerProtocolError on anything malformed."""
    out: dict[bytes, StoredChunk] = {}
    pos = 0
    for ref in refs:
        if pos + RESPONSE.size > len(body):
            raise PeerProtocolError("response cut short")
        digest, status, codec, plain_len, n = RESPONSE.unpack_from(body, pos)
        pos += RESPONSE.size
        if digest != ref.digest:
            raise PeerProtocolError("response records out of order")
        if status == OK:
            if pos + n > len(body):
                raise PeerProtocolError("response cut short")
            out[digest] = StoredChunk(codec, plain_len, body[pos : pos + n])
            pos += n
        elif status != MISSING:
            raise PeerProtocolError(f"unknown status {status}")
    if pos != len(body):
        raise PeerProtocolError("trailing bytes after the last record")
    return out


@dataclass(eq=False)  # hashed by identity: one object per peer
class Peer:
    address: str  # host:port
    pool: HttpPool
    stats: TierStats = field(default_factory=TierStats)
    lies: int = 0  # chunks that failed verification
    timeouts: int = 0
    down_until: float = 0.0

    def as_dict(self) -> dict[str, float]:
        d = self.stats.as_dict()
        d.update(lies=self.lies, timeouts=self.timeouts, down=int(self.down_until > time.monotonic()))
        return d


class PeerSet:
    """The peers of a mount; requests run on the store's asyncio loop thread."""

    def __init__(self, addresses: list[str], store_url: str, timeout: float = 3.0, down_for: float = 10.0) -> None:
        self.store_url = store_url
        self.timeout = timeout
        self.down_for = down_for
        self.peers = [Peer(a, HttpPool(f"http://{a}", 8)) for a in dict.fromkeys(addresses)]
        self._seeds = [a.encode() for a in dict.fromkeys(addresses)]

    def owner(self, ref: ChunkLocation) -> Peer:
        place = f"{ref.pack}/{ref.offset // REGION}".encode()
        best = max(range(len(self.peers)), key=lambda i: xxhash.xxh64_intdigest(self._seeds[i] + place))
        return self.peers[best]

    def alive(self, peer: Peer) -> bool:
        return peer.down_until <= time.monotonic()

    def mark_down(self, peer: Peer, why: str) -> None:
        if self.alive(peer):
            log.warning("peer %s: %s; reading its chunks from the store for %.0fs", peer.address, why, self.down_for)
        peer.down_until = time.monotonic() + self.down_for

    async def fetch(self, peer: Peer, refs: list[ChunkLocation]) -> dict[bytes, StoredChunk]:
        """Ask ``peer`` for ``refs`` (asyncio side).  Raises on any failure."""
        import asyncio

        headers = {"host": peer.pool.host_header, "x-cubefs-store": self.store_url,
                   "content-type": "application/octet-stream"}
        resp = await asyncio.wait_for(peer.pool.request("POST", PATH, headers, encode_request(refs)), self.timeout)
        if resp.status != 200:
            raise PeerProtocolError(f"HTTP {resp.status}: {resp.body[:200].decode(errors='replace').strip()}")
        return decode_response(resp.body, refs)

    def stats(self) -> dict[str, dict[str, float]]:
        return {p.address: p.as_dict() for p in self.peers}

    def totals(self) -> dict[str, float]:
        """The counters of all peers added up: the peer tier's line in the stats."""
        total: dict[str, float] = {}
        for p in self.peers:
            for k, v in p.as_dict().items():
                if k != "down":
                    total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for p in self.peers:
            p.pool.close()
