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
but at least ``FLOOR`` seconds (programs keep addresses past the TTL; an element that
expired under an open connection does not matter, established traffic passes first); a
refused name gets REFUSED (not NXDOMAIN: the name exists, this sandbox may not have it, and
a refusal is not cached as a non-existence by whatever resolves in the guest, so a later
PUT that allows it works at once); a name matched by a denyOut entry is also resolved in the
background and its addresses put in the deny set, so it cannot be reached by its address
either when the default lets traffic out.  AAAA questions get an empty answer (the
sandboxes have no IPv6 egress: a client goes to its A records at once instead of trying v6
addresses first).  Answers are cached by their TTL (negative ones by their SOA's, up to
``NEGATIVE_MAX``), shared by all sandboxes; the sets are per sandbox.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cubefs.errors import UsageError
from sandbox.network import dnswire as dw
from sandbox.network.gateway import GATEWAY_IP
from sandbox.network.policy import Policy

log = logging.getLogger("cubefs.sandbox.network")

FLOOR = 60  # seconds an allowed (or denied) address stays in a set at least
NEGATIVE_MAX = 300
CACHE_MAX = 10_000
UPSTREAM_TIMEOUT = 2.0
TCP_IDLE = 10.0
MAX_PENDING = 1000  # queries queued for the workers past which UDP ones are dropped (a flood costs no memory)
VERDICTS = ("allowed", "passed", "refused", "failed")

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


class Resolver:
    """One per service: the sandboxes' sockets, the cache, the upstream, the counts."""

    def __init__(self, upstreams: list[tuple[str, int]], lookup: Lookup, admit: Admit, workers: int = 16) -> None:
        self.upstreams = upstreams
        self.lookup = lookup
        self.admit_hook = admit
        self.cache: dict[tuple[str, int, int], _Cached] = {}
        self.counts: Counter[str] = Counter()
        self.cache_hits = 0
        self.kept: dict[tuple[int, int], dict[str, float]] = {}  # (slot, set) -> address -> expiry we set
        self.socks: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dns")
        self._stop = False
        self.pending = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="dns", daemon=True)
        self._thread.start()

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
            self.kept.pop((slot, 0), None)
            self.kept.pop((slot, 1), None)
        for s in socks or ():
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def forget(self, slot: int) -> None:
        """The slot's sets were emptied (its policy's names changed)."""
        with self._lock:
            self.kept.pop((slot, 0), None)
            self.kept.pop((slot, 1), None)

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for slot in list(self.socks):
            self.remove(slot)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ev in self._sel.select(1.0):
                if key.data is None:
                    continue
                slot, kind = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if kind == "udp":
                        data, peer = sock.recvfrom(4096)
                        if self.pending >= MAX_PENDING:
                            self.dropped += 1
                            continue
                        with self._lock:
                            self.pending += 1
                        self._pool.submit(self._udp, slot, sock, data, peer)
                    else:
                        conn, _peer = sock.accept()
                        self._pool.submit(self._tcp, slot, conn)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as err:  # a socket closed under us (its sandbox went)
                    if not self._stop:
                        log.debug("dns: slot %d: %s", slot, err)
                except RuntimeError:  # the pool is shut down
                    return

    def _udp(self, slot: int, sock: socket.socket, data: bytes, peer: tuple[str, int]) -> None:
        try:
            out = self.answer(slot, data, udp=True)
        except Exception as err:  # a bug must not go unseen in a worker
            log.warning("dns: slot %d: %s", slot, err)
            out = None
        finally:
            with self._lock:
                self.pending -= 1
        if out is not None:
            with contextlib.suppress(OSError):
                sock.sendto(out, peer)

    def _tcp(self, slot: int, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            conn.settimeout(TCP_IDLE)
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    out = self.answer(slot, data, udp=False)
                    if out is None:
                        return
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return

    # -- answers ----------------------------------------------------------------------
    def answer(self, slot: int, data: bytes, udp: bool) -> bytes | None:
        """The reply to query ``data`` from slot ``slot``'s guest (None: not a query to answer)."""
        try:
            q = dw.parse_query(data)
        except dw.DnsError:
            return None
        found = self.lookup(slot)
        sid, policy = found if found is not None else ("-", None)
        verdict = policy.name_verdict(q.name) if policy is not None else "refused"
        addresses: list[str] = []
        if verdict == "refused":
            out = dw.reply(q, dw.REFUSED)
            if policy is not None and policy.name_match(q.name) == "refused":  # its addresses refused too
                self._pool.submit(self._deny_addresses, slot, q.name)
        elif q.qtype == dw.AAAA:
            out = dw.reply(q, dw.NOERROR)  # no IPv6 egress: nothing to try before the A records
        else:
            msg, ttl_offsets, addresses, age, ttl = self._resolve(q, data)
            if msg is None:
                verdict, out = "failed", dw.reply(q, dw.SERVFAIL)
            else:
                out = dw.for_client(msg, q, ttl_offsets, age)
                if verdict == "allowed" and addresses:
                    try:
                        self._admit(slot, 0, addresses, max(0, ttl - age))
                    except Exception as err:  # the guest must not get an address its sandbox cannot reach
                        log.warning("sandbox %s: dns %s: the allow set refused %s: %s", sid, q.name, addresses, err)
                        verdict, out = "failed", dw.reply(q, dw.SERVFAIL)
        if udp and len(out) > q.udp_size:
            out = dw.truncated(out, q)
        with self._lock:
            self.counts[verdict] += 1
        log.info("sandbox %s: dns %s %s -> %s %s", sid, q.name or ".", _qtype(q.qtype),
                 ",".join(addresses) or "-", verdict)
        return out

    def _admit(self, slot: int, which: int, addresses: list[str], ttl: int) -> None:
        """Put ``addresses`` in the slot's set unless they are there for long enough already
        (a cached answer asked again does not cost an nft transaction)."""
        keep = max(ttl, FLOOR)
        now = time.monotonic()
        with self._lock:
            kept = self.kept.setdefault((slot, which), {})
            todo = {a: keep for a in dict.fromkeys(addresses) if kept.get(a, 0) < now + keep - 10}
        if not todo:
            return
        self.admit_hook(slot, which, todo)
        with self._lock:
            kept = self.kept.setdefault((slot, which), {})
            for a in todo:
                kept[a] = now + keep
            if len(kept) > 4 * CACHE_MAX:
                kept.clear()  # only a saving; the kernel's set is the truth

    def _deny_addresses(self, slot: int, name: str) -> None:
        q = dw.Query(0, dw.RD, name, dw.A, dw.CLASS_IN, _question(name, dw.A), dw.MAX_UDP)
        msg, _offs, addresses, age, ttl = self._resolve(q, dw.HEADER.pack(0, dw.RD, 1, 0, 0, 0) + q.question)
        if msg is not None and addresses:
            try:
                self._admit(slot, 1, addresses, max(0, ttl - age))
            except Exception as err:
                log.warning("dns %s: the deny set refused %s: %s", name, addresses, err)

    def deny_names(self, slot: int, names: list[str]) -> None:
        """Resolve the policy's exact denied names now, so their addresses are refused before
        the guest ever asks (wildcards cannot be listed: they are caught when asked)."""
        for name in names:
            if not name.startswith("*."):
                self._pool.submit(self._deny_addresses, slot, name)

    def _resolve(self, q: dw.Query, data: bytes) -> tuple[bytes | None, list[int], list[str], int, int]:
        """(answer, its TTL offsets, its A addresses, its age in the cache, its TTL)."""
        key = (q.name, q.qtype, q.qclass)
        now = time.monotonic()
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None and hit.expires > now:
                self.cache_hits += 1
                return hit.msg, hit.ttl_offsets, hit.addresses, int(now - hit.stored), hit.ttl
        msg = self._upstream(data, q)
        if msg is None:
            return None, [], [], 0, 0
        try:
            r = dw.parse_response(msg)
        except dw.DnsError:
            return None, [], [], 0, 0
        if r.rcode == dw.NOERROR and r.min_answer_ttl is not None:
            ttl = r.min_answer_ttl
        elif r.rcode in (dw.NOERROR, dw.NXDOMAIN):
            ttl = min(r.negative_ttl or 0, NEGATIVE_MAX)
        else:
            ttl = 0
        if ttl > 0 and not r.truncated:
            with self._lock:
                if len(self.cache) >= CACHE_MAX:
                    for k in [k for k, v in self.cache.items() if v.expires <= now] or [next(iter(self.cache))]:
                        del self.cache[k]
                self.cache[key] = _Cached(msg, now, now + ttl, r.ttl_offsets, r.addresses, ttl)
        return msg, r.ttl_offsets, r.addresses, 0, ttl

    def _upstream(self, data: bytes, q: dw.Query) -> bytes | None:
        """The query sent to each upstream in turn (a fresh socket and id each: a forged
        answer must guess both), over TCP when the UDP answer came truncated."""
        for host, port in self.upstreams:
            qid = secrets.randbits(16)
            query = dw.with_id(data, qid)
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
                        if _matches(msg, qid, q):
                            break
                if dw.HEADER.unpack_from(msg)[1] & dw.TC:
                    with socket.create_connection((host, port), UPSTREAM_TIMEOUT) as t:
                        t.sendall(struct.pack("!H", len(query)) + query)
                        head = _recv_exact(t, 2)
                        full = _recv_exact(t, struct.unpack("!H", head)[0]) if head else None
                        if full is not None and _matches(full, qid, q):
                            msg = full
                return msg
            except OSError as err:
                log.warning("dns: upstream %s:%d: %s", host, port, err or "timed out")
        return None

    def metrics(self) -> list[str]:
        lines = ["# TYPE cubefs_sandbox_dns_queries_total counter"]
        lines += [f'cubefs_sandbox_dns_queries_total{{verdict="{v}"}} {self.counts[v]}' for v in VERDICTS]
        lines += ["# TYPE cubefs_sandbox_dns_cache_hits_total counter",
                  f"cubefs_sandbox_dns_cache_hits_total {self.cache_hits}",
                  "# TYPE cubefs_sandbox_dns_dropped_total counter", f"cubefs_sandbox_dns_dropped_total {self.dropped}",
                  "# TYPE cubefs_sandbox_dns_cache_entries gauge",
                  f"cubefs_sandbox_dns_cache_entries {len(self.cache)}"]
        return lines


def _matches(msg: bytes, qid: int, q: dw.Query) -> bool:
    """An answer to our query: our id, a response, the same question."""
    if len(msg) < dw.HEADER.size + len(q.question):
        return False
    rid, flags, *_ = dw.HEADER.unpack_from(msg)
    question = msg[dw.HEADER.size:dw.HEADER.size + len(q.question)]
    return rid == qid and bool(flags & dw.QR) and question.lower() == q.question.lower()


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def _question(name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return labels + b"\0" + struct.pack("!HH", qtype, dw.CLASS_IN)


def _qtype(t: int) -> str:
    return {dw.A: "A", dw.AAAA: "AAAA", dw.CNAME: "CNAME", dw.NS: "NS", dw.SOA: "SOA", 15: "MX", 16: "TXT",
            12: "PTR", 33: "SRV", 65: "HTTPS", 255: "ANY"}.get(t, str(t))
