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

Every request and every answer is authenticated with the cluster's shared
secret (a file, mode 0600, the same on every node: ``--peer-secret``,
``$CUBEFS_PEER_SECRET_FILE``, default ``~/.config/cubefs/peer-secret``, which
``cubefs serve --listen`` creates): HMAC-SHA256 over the method, path, store
URL, a timestamp, a random nonce and the body; the answer's MAC covers its
status and body and the request's nonce, so an answer cannot be replayed for
another request.  A server refuses a request whose MAC is wrong, whose
timestamp is more than ``MAX_SKEW`` seconds off its clock, or whose nonce it
has seen within that window (issue 12: an unauthenticated local user read
``/etc/shadow``'s plaintext out of a node's cache by naming its SHA-256).  The
MAC says "a member of the cluster", not "an honest one": a chunk's bytes are
still checked against its SHA-256, as below.

A peer is never trusted: every chunk it returns is decoded and its SHA-256
checked like the store's; a chunk that fails is counted as a lie and read
from the store.  A peer that refuses a connection, errs or does not answer
within ``timeout`` is counted, skipped for ``down_for`` seconds, and its
chunks read from the store, so a dead or slow peer costs a read at most
``timeout``.

The members may change while a mount runs: :meth:`PeerSet.replace` swaps them
in place (the members that stay keep their connections and counters, so
rendezvous hashing keeps their chunks with them), and a mount given a *peers
file* (``--peers-file``: one ``HOST:PORT`` a line, ``#`` comments; a cluster's
node service writes it from etcd's membership) re-reads it when its mtime
changes, looked at no more than once a second on the read path (a stat: ~2 µs).
A missing file is no peers; a file with a malformed line is refused whole
(logged) and the members stay as they were.  The counters of a removed peer are
dropped from the per-peer stats but kept in the tier's totals, which therefore
never go backwards.

Wire protocol (docs/format.md, "Peer protocol"): ``POST /v1/chunks`` with the
store's URL in ``x-cubefs-store``, ``x-cubefs-time``/``-nonce``/``-mac`` and a
body of request records (at most ``MAX_CHUNKS``: a client splits); the answer
is one response record per request, in order, each followed by its bytes, with
its own ``x-cubefs-mac``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

from cubefs.cache.disk import StoredChunk
from cubefs.cache.tiers import TierStats
from cubefs.errors import BadInputError, NotFoundError, UsageError
from cubefs.format.packs import ChunkLocation
from cubefs.remote.http import HttpPool

log = logging.getLogger(__name__)

PATH = "/v1/chunks"
REQUEST = struct.Struct("<32s32sQIIB")  # digest, pack (binary), offset, stored_len, plain_len, codec
RESPONSE = struct.Struct("<32sBBII")  # digest, status, codec, plain_len, data length; then the data
OK, MISSING = 0, 1
MAX_CHUNKS = 1024  # per request (a mount's read with its read-ahead asks for ~100)
REGION = 512 * 1024  # bytes of a pack that share an owner

SECRET_ENV = "CUBEFS_PEER_SECRET_FILE"
MIN_SECRET = 32  # bytes
MAX_SKEW = 60.0  # seconds a request's timestamp may be off the server's clock
MAX_NONCES = 1 << 20  # nonces remembered (authenticated requests only); ~100 MB at worst
_DOMAIN = b"cubefs-peer-1"
H_TIME, H_NONCE, H_MAC = "x-cubefs-time", "x-cubefs-nonce", "x-cubefs-mac"


def default_secret_path() -> str:
    env = os.environ.get(SECRET_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cubefs", "peer-secret")


def load_secret(path: str | None = None, create: bool = False) -> bytes:
    """The cluster secret from ``path`` (default: :func:`default_secret_path`); with
    ``create``, a new random one is written (0600, in a 0700 directory) if the file
    does not exist.  A secret others can read is refused, as ssh refuses such keys."""
    path = os.path.abspath(path or default_secret_path())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise NotFoundError(f"no peer secret at {path}: 'cubefs serve --listen' creates one; give every node "
                                "the same file (mode 0600) with --peer-secret or $" + SECRET_ENV) from None
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another node daemon made it first
            return load_secret(path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return load_secret(path)
    except OSError as err:
        raise UsageError(f"cannot read the peer secret {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"peer secret {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"peer secret {path} is open to others (mode {stat.S_IMODE(st.st_mode):04o}): "
                             f"chmod 600 {path}")
        secret = f.read(4096).strip()
    if len(secret) < MIN_SECRET:
        raise BadInputError(f"peer secret {path} is too short: {len(secret)} bytes, want at least {MIN_SECRET}")
    return secret


def _mac(secret: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 of length-prefixed parts (no two messages share an encoding)."""
    h = hmac.new(secret, _DOMAIN, hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def request_mac(secret: bytes, method: str, path: str, store: str, when: str, nonce: str, body: bytes) -> str:
    return _mac(secret, b"request", method.encode(), path.encode(), store.encode(), when.encode(), nonce.encode(),
                body)


def response_mac(secret: bytes, nonce: str, status: int, body: bytes) -> str:
    return _mac(secret, b"response", nonce.encode(), str(status).encode(), body)


def metrics_token(secret: bytes) -> str:
    """A bearer token that reads ``/metrics`` only (for a Prometheus scraper, which
    cannot sign requests and must not hold the secret)."""
    return _mac(secret, b"metrics")


def sign_request(secret: bytes, method: str, path: str, store: str, body: bytes) -> dict[str, str]:
    """The authentication headers of one request."""
    when, nonce = str(int(time.time())), secrets.token_hex(16)
    return {H_TIME: when, H_NONCE: nonce, H_MAC: request_mac(secret, method, path, store, when, nonce, body)}


def check_response(secret: bytes, nonce: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """Raise PeerProtocolError unless the answer carries the MAC for this request."""
    mac = headers.get(H_MAC, "")
    if not hmac.compare_digest(mac, response_mac(secret, nonce, status, body)):
        if status in (401, 403) and not mac:
            raise PeerProtocolError(f"refused our request (HTTP {status}): do all nodes have the same peer secret "
                                    "and a clock within a minute?")
        raise PeerProtocolError(f"answer with a wrong MAC (HTTP {status})")


class RequestAuth:
    """The server side: is a request from a member of the cluster, fresh, and new?"""

    def __init__(self, secret: bytes, max_skew: float = MAX_SKEW, max_nonces: int = MAX_NONCES) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self.max_nonces = max_nonces
        self._nonces: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes) -> str | None:
        """None if the request may be served, else why not: ``unauthenticated``
        (no or malformed credentials), ``bad_mac``, ``stale`` or ``replayed``."""
        when, nonce, mac = headers.get(H_TIME, ""), headers.get(H_NONCE, ""), headers.get(H_MAC, "")
        if not (when.isdigit() and len(when) <= 12 and len(nonce) == 32 and len(mac) == 64):
            return "unauthenticated"
        want = request_mac(self.secret, method, path, headers.get("x-cubefs-store", ""), when, nonce, body)
        if not hmac.compare_digest(mac, want):
            return "bad_mac"
        now = time.time()
        if abs(now - int(when)) > self.max_skew:
            return "stale"
        while self._nonces and next(iter(self._nonces.values())) < now:
            self._nonces.popitem(last=False)
        if nonce in self._nonces or len(self._nonces) >= self.max_nonces:
            return "replayed"
        # Forgotten once its timestamp is stale anyway; insertion order is expiry order
        # up to the skew, which only keeps a few entries a little longer.
        self._nonces[nonce] = max(int(when) + self.max_skew, now) + 1
        return None


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


def parse_peers(text: str, where: str = "peers") -> list[str]:
    """The ``HOST:PORT`` lines of a peers file (``#`` starts a comment); BadInputError
    names the first malformed line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or any(c.isspace() for c in item) or not port.isdigit() \
                or not 0 < int(port) < 65536:
            raise BadInputError(f"{where} line {n}: {item[:80]!r} is not HOST:PORT")
        out.append(item)
    return out


class PeersFile:
    """A peers file, read again when it changes (its mtime, size or inode)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._seen: object = object()  # what the file looked like when last read

    def changed(self) -> list[str] | None:
        """The members if the file changed since the last call (``[]``: it is gone), else None."""
        try:
            st = os.stat(self.path)
            seen: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        except OSError as err:
            seen = err.strerror
        if seen == self._seen:
            return None
        self._seen = seen
        if seen is None:
            return []
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return parse_peers(f.read(1 << 20), self.path)
        except FileNotFoundError:
            self._seen = None
            return []
        except (OSError, BadInputError) as err:
            log.error("peers file %s: %s; the peers stay as they were", self.path,
                      err.strerror if isinstance(err, OSError) else err)
            return None


class PeerSet:
    """The peers of a mount; requests run on the store's asyncio loop thread, ownership is
    asked on the filesystem's thread.  The members change with :meth:`replace` or, given
    ``peers_file``, with the file (``addresses`` is then ignored)."""

    def __init__(self, addresses: list[str], store_url: str, timeout: float = 3.0, down_for: float = 10.0,
                 secret: bytes | None = None, peers_file: str | None = None, check_every: float = 1.0) -> None:
        """``secret``: the cluster secret (default: read from :func:`default_secret_path`)."""
        self.secret = secret if secret is not None else load_secret()
        self.store_url = store_url
        self.timeout = timeout
        self.down_for = down_for
        # Swapped as one tuple: a reader on another thread sees old or new members, never a mix.
        self._members: tuple[list[Peer], list[bytes]] = ([], [])
        self._retired: dict[str, float] = {}  # counters of peers no longer members
        self._to_close: list[HttpPool] = []  # removed peers' connections, closed on the loop's thread
        self._lock = threading.Lock()  # replace() against replace()
        self._check_lock = threading.Lock()  # one thread looks at the file at a time; the others go on
        self.file = PeersFile(peers_file) if peers_file else None
        self.check_every = check_every
        self._next_check = 0.0
        if self.file is not None:
            self.refresh()
        else:
            self.replace(addresses)

    @property
    def peers(self) -> list[Peer]:
        return self._members[0]

    def replace(self, addresses: list[str]) -> None:
        """Make ``addresses`` the members; the ones that stay keep their ``Peer`` (its
        connections, counters, and so the chunks they own)."""
        addresses = list(dict.fromkeys(addresses))
        with self._lock:
            old = {p.address: p for p in self.peers}
            peers = [old.pop(a) if a in old else Peer(a, HttpPool(f"http://{a}", 8)) for a in addresses]
            for gone in old.values():
                for k, v in gone.as_dict().items():
                    if k != "down":
                        self._retired[k] = self._retired.get(k, 0) + v
                self._to_close.append(gone.pool)
            self._members = (peers, [a.encode() for a in addresses])

    def refresh(self) -> None:
        """Follow the peers file, if any (at most once per ``check_every`` seconds)."""
        now = time.monotonic()
        if self.file is None or now < self._next_check or not self._check_lock.acquire(blocking=False):
            return
        try:
            self._next_check = now + self.check_every
            members = self.file.changed()
        finally:
            self._check_lock.release()
        if members is not None and members != [p.address for p in self.peers]:
            log.info("peers file %s: peers now %s", self.file.path, ", ".join(members) or "none")
            self.replace(members)

    def owner(self, ref: ChunkLocation) -> Peer | None:
        """The member that owns ``ref``'s place, or None when there are no members."""
        self.refresh()
        peers, seeds = self._members
        if not peers:
            return None
        place = f"{ref.pack}/{ref.offset // REGION}".encode()
        best = max(range(len(peers)), key=lambda i: xxhash.xxh64_intdigest(seeds[i] + place))
        return peers[best]

    def alive(self, peer: Peer) -> bool:
        return peer.down_until <= time.monotonic()

    def mark_down(self, peer: Peer, why: str) -> None:
        if self.alive(peer):
            log.warning("peer %s: %s; reading its chunks from the store for %.0fs", peer.address, why, self.down_for)
        peer.down_until = time.monotonic() + self.down_for

    async def fetch(self, peer: Peer, refs: list[ChunkLocation]) -> dict[bytes, StoredChunk]:
        """Ask ``peer`` for ``refs`` (asyncio side).  Raises on any failure."""
        import asyncio

        while self._to_close:  # a removed peer's idle connections (this is the thread that owns them)
            self._to_close.pop().close()
        batches = [refs[i : i + MAX_CHUNKS] for i in range(0, len(refs), MAX_CHUNKS)]
        out: dict[bytes, StoredChunk] = {}
        for got in await asyncio.wait_for(asyncio.gather(*(self._ask(peer, b) for b in batches)), self.timeout):
            out.update(got)
        return out

    async def _ask(self, peer: Peer, refs: list[ChunkLocation]) -> dict[bytes, StoredChunk]:
        body = encode_request(refs)
        auth = sign_request(self.secret, "POST", PATH, self.store_url, body)
        headers = {"host": peer.pool.host_header, "x-cubefs-store": self.store_url,
                   "content-type": "application/octet-stream", **auth}
        resp = await peer.pool.request("POST", PATH, headers, body)
        check_response(self.secret, auth[H_NONCE], resp.status, resp.headers, resp.body)
        if resp.status != 200:
            raise PeerProtocolError(f"HTTP {resp.status}")
        return decode_response(resp.body, refs)

    def stats(self) -> dict[str, dict[str, float]]:
        """The current members' counters."""
        self.refresh()
        return {p.address: p.as_dict() for p in self.peers}

    def totals(self) -> dict[str, float]:
        """The counters of all peers added up, removed ones included: the peer tier's line in the stats."""
        total: dict[str, float] = {k: 0 for k in TierStats().as_dict()} | {"lies": 0, "timeouts": 0}
        for k, v in self._retired.items():
            total[k] = total.get(k, 0) + v
        for p in self.peers:
            for k, v in p.as_dict().items():
                if k != "down":
                    total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for pool in [p.pool for p in self.peers] + self._to_close:
            pool.close()
        self._to_close = []
