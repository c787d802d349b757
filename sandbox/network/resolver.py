"""The node's DNS resolver for its sandboxes: every guest's DNS goes to it, and it decides
per sandbox which names resolve and which addresses that opens at the gateway.

Where it listens: in every sandbox's namespace, on ``gateway.GATEWAY_IP``:53 (UDP and TCP),
with sockets made by a thread that entered the namespace and then served here, in the
node's namespace, by one selector thread and a few workers.  The namespace DNATs DNS from
the tap to *any* address to that socket (``gateway.namespace_rules``), so whatever the
guest's resolv.conf names (the image's own, say the build host's resolver) is answered here,
and a query sent straight to 8.8.8.8 or to the upstream is too.  Which sandbox asked is which
socket the query came on: the guest cannot claim another's, and nothing outside the
sandbox's namespace can reach the sockets at all (the address is on the tap only, and the
namespace passes only port 53 from the tap to itself).

What it answers (``policy.Policy.name_verdict``): an allowed name is resolved upstream and
its A records go into the sandbox's allow set *before* the answer is sent, each for its TTL
but at least ``FLOOR`` seconds and at most ``TTL_MAX`` (programs keep addresses past the TTL;
an element that expired under an open connection does not matter, established traffic
passes first); a refused name gets REFUSED (not NXDOMAIN: the name exists, this sandbox may
not have it, and a refusal is not cached as a non-existence by whatever resolves in the
guest, so a later PUT that allows it works at once).  The policy's *exact* denied names are
looked up by the service itself (when the policy is set, and again before their addresses
time out) and their addresses put in the deny set; a name a wildcard denies is refused but
never looked up: the guest chooses it (``<data>.evil.com``), and sending it upstream would
carry the data out.  AAAA questions get an empty answer (the sandboxes have no IPv6 egress).
Answers are cached by their TTL (negative ones by their SOA's, up to ``NEGATIVE_MAX``),
shared by all sandboxes, keyed on the normalised question; the sets are per sandbox.

What a hostile guest cannot do (the security review of issue 17, ``tests/sandbox_dns_cases.py``):
pin the workers (each sandbox's queries wait in its own queue, ``SLOT_PENDING`` at most, and
take at most ``SLOT_RUNNING`` of the ``WORKERS`` at once, in turn with the others:
``fairqueue``); hold sockets (``TCP_PER_SLOT`` TCP connections each, read by the selector
thread without blocking, closed ``TCP_DEADLINE`` seconds after they opened, however busy);
poison the shared cache (a question with a label holding a dot or a byte no host name has,
compression, or past 255 bytes is FORMERR; the upstream gets a query built here, RD set and
nothing of the guest's: no EDNS, DO or CD bits); keep an address it was allowed after a PUT
removed its name (the policy is swapped first and the slot's generation moves on: an answer
judged under the old one is judged again).  Every drop is counted by its reason
(``cubefs_sandbox_dns_dropped_total{reason}``), the kernel's too: a guest that sends faster
than the selector thread reads fills its socket's buffer, and what the kernel dropped there
(``SO_MEMINFO``) is ``socket_buffer`` (a full test run's flood of 2,000 queries: 454 dropped
here as ``slot_busy``, the rest by the kernel).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cubefs.errors import UsageError
from sandbox.network import dnswire as dw
from sandbox.network.fairqueue import FairQueue
from sandbox.network.gateway import GATEWAY_IP
from sandbox.network.policy import Policy

log = logging.getLogger("cubefs.sandbox.network")

FLOOR = 60  # seconds an allowed (or denied) address stays in a set at least
TTL_MAX = 86_400  # no answer is cached, nor an address kept in a set, longer than a day
NEGATIVE_MAX = 300
CACHE_MAX = 10_000
UPSTREAM_TIMEOUT = 2.0
WORKERS = 16
SLOT_PENDING = 32  # a sandbox's queries queued or running; past it its UDP queries are dropped
SLOT_RUNNING = 4  # of the workers one sandbox's queries take at once
MAX_PENDING = 1000  # every sandbox's queries queued or running (a flood costs no memory)
TCP_PER_SLOT = 4  # a sandbox's open TCP connections to the resolver; another is closed at once
TCP_DEADLINE = 10.0  # seconds a TCP connection lives, however busy (a slow one holds nothing longer)
TCP_BUFFER = 2 * (2 + 65535)  # unread bytes one TCP connection may hold
BACKGROUND = -1  # the fair queue's owner for the deny-set lookups (the service's own, not a guest's)
BACKGROUND_MAX = 2000  # deny-set lookups waiting (deduplicated: one per sandbox and name)
DENY_REFRESH = 15  # seconds before a denied name's addresses time out that they are looked up again
VERDICTS = ("allowed", "passed", "refused", "failed")
DROPS = ("slot_busy", "node_busy", "tcp_limit", "tcp_deadline", "tcp_oversize", "formerr", "background",
         "socket_buffer")
SO_MEMINFO = 55  # linux/asm-generic/socket.h: a socket's memory counters, the kernel's drops among them
SK_MEMINFO_DROPS = 8

Lookup = Callable[[int], "tuple[str, Policy | None] | None"]  # slot -> (sandbox id, policy)
Admit = Callable[[int, int, dict[str, int]], None]  # slot, 0 allow / 1 deny, {address: seconds}


def upstreams_from(spec: list[str] | None, resolv_conf: Path = Path("/etc/resolv.conf")) -> list[tuple[str, int]]:
    """``IP[:PORT]`` entries (``--dns-upstream``), else resolv.conf's nameservers."""
    out = []
    for entry in spec or []:
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        try:
            out.append((str(ipaddress.ip_address(host.strip("[]") or entry)), int(port or 53)))
        except ValueError:
            raise UsageError(f"--dns-upstream {entry!r}: give IP or IP:PORT") from None
    if spec:
        return out
    try:
        for line in resolv_conf.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    out.append((str(ipaddress.ip_address(words[1].split("%")[0])), 53))
    except OSError:
        pass
    return out


def listen_here() -> tuple[socket.socket, socket.socket]:
    """The resolver's UDP and TCP sockets in the calling thread's namespace (on the tap's
    address, so only the guest's DNS reaches them)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind((GATEWAY_IP, 53))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((GATEWAY_IP, 53))
        tcp.listen(16)
        for s in (udp, tcp):
            s.setblocking(False)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


@dataclass
class _Cached:
    msg: bytes
    stored: float
    expires: float
    ttl_offsets: list[int]
    addresses: list[str]
    ttl: int


@dataclass(eq=False)
class _Conn:
    """A guest's TCP connection to the resolver, read and written by the selector thread only."""

    sock: socket.socket
    slot: int
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    busy: bool = False  # a query of it is with a worker (answered one at a time, in order)
    done: bool = False  # close once ``out`` is sent
    closed: bool = False


class Resolver:
    """One per service: the sandboxes' sockets, the cache, the upstream, the counts."""

    def __init__(self, upstreams: list[tuple[str, int]], lookup: Lookup, admit: Admit, workers: int = WORKERS) -> None:
        self.upstreams = upstreams
        self.lookup = lookup
        self.admit_hook = admit
        self.cache: dict[bytes, _Cached] = {}
        self.counts: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self._buffer_drops_gone = 0  # the kernel's drops on sockets since closed
        self.cache_hits = 0
        self.kept: dict[tuple[int, int], dict[str, float]] = {}  # (slot, set) -> address -> expiry we set
        self.socks: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.gen: Counter[int] = Counter()  # slot -> its policy's generation (``changing``)
        self.pending = 0
        self._lock = threading.Lock()
        self._admit_lock = threading.Lock()  # a set's elements vs a policy change (``changing``)
        self._conns: dict[int, set[_Conn]] = {}
        self._dirty: list[_Conn] = []  # conns a worker answered (or ``remove`` ended): the selector's to see
        self._background: set[tuple[int, str]] = set()
        self._deny_due: dict[tuple[int, str], float] = {}  # (slot, exact denied name) -> when to look it up
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._work = FairQueue(workers, SLOT_PENDING, SLOT_RUNNING, name="dns")
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dns", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    # -- sockets ----------------------------------------------------------------------
    def add(self, slot: int, socks: tuple[socket.socket, socket.socket]) -> None:
        self.remove(slot)
        with self._lock:
            self.socks[slot] = socks
        self._sel.register(socks[0], selectors.EVENT_READ, (slot, "udp"))
        self._sel.register(socks[1], selectors.EVENT_READ, (slot, "tcp"))

    def remove(self, slot: int) -> None:
        with self._lock:
            socks = self.socks.pop(slot, None)
            if socks:  # in the same hold: metrics() sees its drops either on it or among the gone ones
                self._buffer_drops_gone += _kernel_drops(socks[0])
            self.gen[slot] += 1  # a query of it still with a worker adds nothing
            self.kept.pop((slot, 0), None)
            self.kept.pop((slot, 1), None)
            for key in [k for k in self._deny_due if k[0] == slot]:
                del self._deny_due[key]
            for conn in self._conns.get(slot, ()):
                conn.done, conn.out = True, bytearray()
                self._dirty.append(conn)
        self._wake()
        for s in socks or ():
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    @contextlib.contextmanager
    def changing(self, slot: int) -> Iterator[None]:
        """While the slot's policy is swapped and its sets emptied: a query judged under the
        old policy adds nothing after (its generation is stale when it comes to add)."""
        with self._admit_lock:
            with self._lock:
                self.gen[slot] += 1
                self.kept.pop((slot, 0), None)
                self.kept.pop((slot, 1), None)
            yield

    def forget(self, slot: int) -> None:
        """The slot's sets were emptied (its policy's names changed)."""
        with self._lock:
            self.kept.pop((slot, 0), None)
            self.kept.pop((slot, 1), None)

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(5)
        self._work.close()
        for slot in list(self.socks):
            self.remove(slot)
        for conns in self._conns.values():
            for conn in conns:
                conn.sock.close()
        self._conns.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _submit(self, slot: int, job: Callable[[], None]) -> bool:
        """A guest's query to the workers; False (counted) when its sandbox, or the node, has
        too many waiting."""
        with self._lock:
            if self.pending >= MAX_PENDING:
                self.drops["node_busy"] += 1
                return False
            self.pending += 1

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self.pending -= 1

        if self._work.submit(slot, run):
            return True
        with self._lock:
            self.pending -= 1
            self.drops["slot_busy"] += 1
        return False

    # -- the selector thread ------------------------------------------------------------
    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop:
            try:
                events = self._sel.select(0.5)
            except (OSError, ValueError):
                return
            for key, ev in events:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                try:
                    if isinstance(key.data, _Conn):
                        self._conn_event(key.data, ev)
                    elif key.data[1] == "udp":
                        self._udp_ready(key.data[0], key.fileobj)  # type: ignore[arg-type]
                    else:
                        self._accept(key.data[0], key.fileobj)  # type: ignore[arg-type]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as err:  # a socket closed under us (its sandbox went)
                    if not self._stop:
                        log.debug("dns: %s", err)
            with self._lock:
                dirty, self._dirty = self._dirty, []
            for conn in dirty:
                self._conn_next(conn)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.5
                self._tick(now)

    def _udp_ready(self, slot: int, sock: socket.socket) -> None:
        for _ in range(64):  # then the other sockets have their turn
            data, peer = sock.recvfrom(4096)
            self._submit(slot, lambda d=data, p=peer: self._udp(slot, sock, d, p))

    def _udp(self, slot: int, sock: socket.socket, data: bytes, peer: tuple[str, int]) -> None:
        out = self._answer_logged(slot, data, udp=True)
        if out is not None:
            with contextlib.suppress(OSError):
                sock.sendto(out, peer)

    def _accept(self, slot: int, listener: socket.socket) -> None:
        sock, _peer = listener.accept()
        with self._lock:
            conns = self._conns.setdefault(slot, set())
            if len(conns) >= TCP_PER_SLOT or slot not in self.socks:
                self.drops["tcp_limit"] += 1
                sock.close()
                return
            conn = _Conn(sock, slot, time.monotonic() + TCP_DEADLINE)
            conns.add(conn)
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _conn_event(self, conn: _Conn, ev: int) -> None:
        if ev & selectors.EVENT_WRITE and conn.out:
            # A worker appends the next answer to conn.out under the lock, meanwhile: send a copy
            # (a send of the bytearray itself holds an export of it, and the append would fail
            # with BufferError, as it once did under load), then drop what went, under the lock.
            with self._lock:
                pending = bytes(conn.out)
            try:
                sent = conn.sock.send(pending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return self._close(conn)
            with self._lock:
                del conn.out[:sent]
        if ev & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self._close(conn)
            if data == b"":
                conn.done = True
                if not conn.busy:
                    return self._close(conn)
            elif data:
                conn.inbuf += data
                if len(conn.inbuf) > TCP_BUFFER:
                    with self._lock:
                        self.drops["tcp_oversize"] += 1
                    return self._close(conn)
        self._conn_next(conn)

    def _conn_next(self, conn: _Conn) -> None:
        """Hand the connection's next whole query to a worker; watch for writing while an
        answer waits; close it when it is done."""
        if conn.closed:
            return
        if conn.done and not conn.busy and not conn.out:
            return self._close(conn)
        if not conn.busy and not conn.done and len(conn.inbuf) >= 2:
            n = struct.unpack_from("!H", conn.inbuf)[0]
            if len(conn.inbuf) >= 2 + n:
                data = bytes(conn.inbuf[2:2 + n])
                del conn.inbuf[:2 + n]
                conn.busy = True
                if not self._submit(conn.slot, lambda: self._tcp(conn, data)):
                    return self._close(conn)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(conn.sock, events, conn)

    def _tcp(self, conn: _Conn, data: bytes) -> None:
        out = self._answer_logged(conn.slot, data, udp=False)
        with self._lock:
            if out is None:
                conn.done = True
            else:
                conn.out += struct.pack("!H", len(out)) + out
            conn.busy = False
            self._dirty.append(conn)
        self._wake()

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        with self._lock:
            conns = self._conns.get(conn.slot)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._conns[conn.slot]

    def _tick(self, now: float) -> None:
        """TCP connections past their deadline closed; denied names due looked up again."""
        with self._lock:
            late = [c for conns in self._conns.values() for c in conns if c.deadline <= now]
            due = [k for k, t in self._deny_due.items() if t <= now]
            for k in due:
                self._deny_due[k] = now + FLOOR  # until the lookup sets it from the TTL
        for conn in late:
            with self._lock:
                self.drops["tcp_deadline"] += 1
            self._close(conn)
        for slot, name in due:
            self._deny_lookup(slot, name)

    # -- answers ----------------------------------------------------------------------
    def _answer_logged(self, slot: int, data: bytes, udp: bool) -> bytes | None:
        try:
            return self.answer(slot, data, udp)
        except Exception as err:  # a bug must not go unseen in a worker
            log.warning("dns: slot %d: %s", slot, err)
            return None

    def answer(self, slot: int, data: bytes, udp: bool) -> bytes | None:
        """The reply to query ``data`` from slot ``slot``'s guest (None: not a query to answer)."""
        try:
            q = dw.parse_query(data)
        except dw.FormError as err:
            with self._lock:
                self.drops["formerr"] += 1
            return dw.formerr(err, data)
        except dw.DnsError:
            return None
        for _attempt in range(3):  # judged again if its policy changed while it was asked
            with self._lock:
                gen = self.gen[slot]
            found = self.lookup(slot)
            sid, policy = found if found is not None else ("-", None)
            verdict = policy.name_verdict(q.name) if policy is not None else "refused"
            addresses: list[str] = []
            if verdict == "refused":
                out = dw.reply(q, dw.REFUSED)
                if policy is not None and q.name in policy.names()[1]:  # the policy's own name, never the guest's
                    self._deny_lookup(slot, q.name)
            elif q.qtype == dw.AAAA:
                out = dw.reply(q, dw.NOERROR)  # no IPv6 egress: nothing to try before the A records
            else:
                msg, ttl_offsets, addresses, age, ttl = self._resolve(q)
                if msg is None:
                    verdict, out = "failed", dw.reply(q, dw.SERVFAIL)
                else:
                    out = dw.for_client(msg, q, ttl_offsets, age)
                    if verdict == "allowed" and addresses:
                        try:
                            if not self._admit(slot, gen, 0, addresses, max(0, ttl - age)):
                                continue
                        except Exception as err:  # the guest must not get an address its sandbox cannot reach
                            log.warning("sandbox %s: dns %s: the allow set refused %s: %s", sid, q.name, addresses,
                                        err)
                            verdict, out = "failed", dw.reply(q, dw.SERVFAIL)
            break
        else:
            verdict, out = "failed", dw.reply(q, dw.SERVFAIL)
        if udp and len(out) > q.udp_size:
            out = dw.truncated(out, q)
        with self._lock:
            self.counts[verdict] += 1
        log.info("sandbox %s: dns %s %s -> %s %s", sid, q.name or ".", _qtype(q.qtype),
                 ",".join(addresses) or "-", verdict)
        return out

    def _admit(self, slot: int, gen: int, which: int, addresses: list[str], ttl: int) -> bool:
        """Put ``addresses`` in the slot's set unless they are there for long enough already
        (a cached answer asked again does not cost an nft transaction); False (nothing put)
        if the slot's policy changed since generation ``gen``."""
        keep = min(max(ttl, FLOOR), TTL_MAX)
        now = time.monotonic()
        with self._admit_lock:
            with self._lock:
                if self.gen[slot] != gen:
                    return False
                kept = self.kept.setdefault((slot, which), {})
                todo = {a: keep for a in dict.fromkeys(addresses) if kept.get(a, 0) < now + keep - 10}
            if todo:
                self.admit_hook(slot, which, todo)
        with self._lock:
            kept = self.kept.setdefault((slot, which), {})
            for a in todo:
                kept[a] = now + keep
            if len(kept) > 4 * CACHE_MAX:
                kept.clear()  # only a saving; the kernel's set is the truth
        return True

    def deny_names(self, slot: int, names: list[str]) -> None:
        """The policy's exact denied names, looked up now and again before their addresses
        time out, so those addresses are refused before the guest ever asks.  Only these:
        a wildcard's names are the guest's to choose (``<secret>.evil.com``) and looking them
        up would carry its data out; they are refused when asked, their addresses not listed."""
        exact = {n for n in names if not n.startswith("*.")}
        now = time.monotonic()
        with self._lock:
            for key in [k for k in self._deny_due if k[0] == slot and k[1] not in exact]:
                del self._deny_due[key]
            for name in exact:
                self._deny_due[(slot, name)] = now
        self._wake()

    def _deny_lookup(self, slot: int, name: str) -> None:
        """Look ``name`` (a policy's exact denied name) up in the background, once at a time
        per sandbox and name, at most ``BACKGROUND_MAX`` waiting."""
        with self._lock:
            if (slot, name) in self._background:
                return
            if len(self._background) >= BACKGROUND_MAX:
                self.drops["background"] += 1
                return
            self._background.add((slot, name))
            gen = self.gen[slot]

        def job() -> None:
            try:
                self._deny_addresses(slot, gen, name)
            finally:
                with self._lock:
                    self._background.discard((slot, name))

        if not self._work.submit(BACKGROUND, job):
            with self._lock:
                self._background.discard((slot, name))
                self.drops["background"] += 1

    def _deny_addresses(self, slot: int, gen: int, name: str) -> None:
        q = dw.Query(0, dw.RD, name, dw.A, dw.CLASS_IN, dw.question(name, dw.A), dw.MAX_UDP)
        msg, _offs, addresses, age, ttl = self._resolve(q)
        left = max(0, ttl - age)
        with self._lock:
            if (slot, name) in self._deny_due:
                self._deny_due[(slot, name)] = time.monotonic() + max(FLOOR, min(left, TTL_MAX)) - DENY_REFRESH
        if msg is not None and addresses:
            try:
                self._admit(slot, gen, 1, addresses, left)
            except Exception as err:
                log.warning("dns %s: the deny set refused %s: %s", name, addresses, err)

    def _resolve(self, q: dw.Query) -> tuple[bytes | None, list[int], list[str], int, int]:
        """(answer, its TTL offsets, its A addresses, its age in the cache, its TTL)."""
        key = q.key
        now = time.monotonic()
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None and hit.expires > now:
                self.cache_hits += 1
                return hit.msg, hit.ttl_offsets, hit.addresses, int(now - hit.stored), hit.ttl
        msg = self._upstream(key)
        if msg is None:
            return None, [], [], 0, 0
        try:
            r = dw.parse_response(msg)
        except dw.DnsError:
            return None, [], [], 0, 0
        if r.rcode == dw.NOERROR and r.min_answer_ttl is not None:
            ttl = min(r.min_answer_ttl, TTL_MAX)
        elif r.rcode in (dw.NOERROR, dw.NXDOMAIN):
            ttl = min(r.negative_ttl or 0, NEGATIVE_MAX)
        else:
            ttl = 0
        msg = dw.capped(msg, r.ttl_offsets, TTL_MAX)
        if ttl > 0 and not r.truncated:
            with self._lock:
                if len(self.cache) >= CACHE_MAX:
                    for k in [k for k, v in self.cache.items() if v.expires <= now] or [next(iter(self.cache))]:
                        del self.cache[k]
                self.cache[key] = _Cached(msg, now, now + ttl, r.ttl_offsets, r.addresses, ttl)
        return msg, r.ttl_offsets, r.addresses, 0, ttl

    def _upstream(self, question: bytes) -> bytes | None:
        """Our own query for ``question`` (RD, nothing of the guest's message) sent to each
        upstream in turn (a fresh socket and id each: a forged answer must guess both), over
        TCP when the UDP answer came truncated."""
        for host, port in self.upstreams:
            qid = secrets.randbits(16)
            query = dw.query(qid, question)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.settimeout(UPSTREAM_TIMEOUT)
                    s.connect((host, port))
                    s.send(query)
                    deadline = time.monotonic() + UPSTREAM_TIMEOUT
                    while True:
                        s.settimeout(max(0.01, deadline - time.monotonic()))
                        msg = s.recv(65535)
                        if _matches(msg, qid, question):
                            break
                if dw.HEADER.unpack_from(msg)[1] & dw.TC:
                    with socket.create_connection((host, port), UPSTREAM_TIMEOUT) as t:
                        t.sendall(struct.pack("!H", len(query)) + query)
                        head = _recv_exact(t, 2)
                        full = _recv_exact(t, struct.unpack("!H", head)[0]) if head else None
                        if full is not None and _matches(full, qid, question):
                            msg = full
                return msg
            except OSError as err:
                log.warning("dns: upstream %s:%d: %s", host, port, err or "timed out")
        return None

    def metrics(self) -> list[str]:
        with self._lock:
            counts, drops = dict(self.counts), dict(self.drops)
            tcp = sum(len(c) for c in self._conns.values())
            pending, background = self.pending, len(self._background)
            udp = [socks[0] for socks in self.socks.values()]
            drops["socket_buffer"] = self._buffer_drops_gone
        drops["socket_buffer"] += sum(_kernel_drops(s) for s in udp)
        lines = ["# TYPE cubefs_sandbox_dns_queries_total counter"]
        lines += [f'cubefs_sandbox_dns_queries_total{{verdict="{v}"}} {counts.get(v, 0)}' for v in VERDICTS]
        lines += ["# TYPE cubefs_sandbox_dns_cache_hits_total counter",
                  f"cubefs_sandbox_dns_cache_hits_total {self.cache_hits}",
                  "# TYPE cubefs_sandbox_dns_dropped_total counter"]
        lines += [f'cubefs_sandbox_dns_dropped_total{{reason="{r}"}} {drops.get(r, 0)}' for r in DROPS]
        lines += ["# TYPE cubefs_sandbox_dns_cache_entries gauge",
                  f"cubefs_sandbox_dns_cache_entries {len(self.cache)}",
                  "# TYPE cubefs_sandbox_dns_pending gauge", f"cubefs_sandbox_dns_pending {pending}",
                  "# TYPE cubefs_sandbox_dns_background_pending gauge",
                  f"cubefs_sandbox_dns_background_pending {background}",
                  "# TYPE cubefs_sandbox_dns_tcp_connections gauge", f"cubefs_sandbox_dns_tcp_connections {tcp}"]
        return lines


def _kernel_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped on this socket (its buffer was full); 0 once it is closed."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    except OSError:
        return 0
    return struct.unpack_from("I", info, 4 * SK_MEMINFO_DROPS)[0]


def _matches(msg: bytes, qid: int, question: bytes) -> bool:
    """An answer to our query: our id, a response, the same question."""
    if len(msg) < dw.HEADER.size + len(question):
        return False
    rid, flags, *_ = dw.HEADER.unpack_from(msg)
    echoed = msg[dw.HEADER.size:dw.HEADER.size + len(question)]
    return rid == qid and bool(flags & dw.QR) and echoed.lower() == question.lower()


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def _qtype(t: int) -> str:
    return {dw.A: "A", dw.AAAA: "AAAA", dw.CNAME: "CNAME", dw.NS: "NS", dw.SOA: "SOA", 15: "MX", 16: "TXT",
            12: "PTR", 33: "SRV", 65: "HTTPS", 255: "ANY"}.get(t, str(t))
