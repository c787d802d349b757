"""What a hostile guest can do to the sandboxes' resolver and the gateway (issue 17's security
review), without a VM: queries and connections are made from inside a sandbox's own network
namespace, at the socket a guest's DNAT lands on (169.254.0.22:53), so they reach the node's
resolver and gateway as a guest's do.  "The internet" runs a recording DNS server (dnslib
parses and builds its messages): what the resolver sent upstream is checked too.

Run in a pytest process of its own (tests/test_sandbox_network.py): the main thread enters the
test's "node" namespace (setns moves only the calling thread)."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from egress_accounting import INTERNET, Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun (network namespaces, taps)")

RESOLVER = ("169.254.0.22", 53)
GOOD_IP, RACE_IP, BAD_IP, LONG_IP = "198.18.6.6", "198.18.6.7", "198.18.6.8", "198.18.6.9"


class Upstream:
    """A DNS server in "the internet"'s namespace that records every name it is asked."""

    def __init__(self, lab: Lab) -> None:
        from sandbox.network import netns

        self.sock = netns.in_netns(lab.inet_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.bind((INTERNET, 0))
        self.port = self.sock.getsockname()[1]
        self.asked: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._one, args=(data, peer), daemon=True).start()

    def _one(self, data: bytes, peer: tuple[str, int]) -> None:
        from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord

        q = DNSRecord.parse(data)
        name = str(q.q.qname).rstrip(".").lower()
        self.asked.append(name)
        r = q.reply()
        answers = {"good.test": (GOOD_IP, 300), "race.test": (RACE_IP, 300), "bad.test": (BAD_IP, 300),
                   "long.test": (LONG_IP, 10_000_000)}
        if name.startswith("slow"):
            return  # never answered: the resolver's upstream timeout
        if name == "race.test":
            time.sleep(0.8)
        if name in answers and q.q.qtype == QTYPE.A:
            ip, ttl = answers[name]
            r.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=ttl))
        elif name not in answers:
            r.header.rcode = RCODE.NXDOMAIN
            r.add_auth(RR("test", QTYPE.SOA, rdata=SOA("ns.test", "h.test", (1, 2, 3, 4, 300)), ttl=300))
        with __import__("contextlib").suppress(OSError):
            self.sock.sendto(r.pack(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Lab, Upstream]]:
    from sandbox.network import resolver

    monkeypatch.setattr(resolver, "TCP_DEADLINE", 1.5)
    with Lab(f"cfdn{os.getpid() % 100000}", tmp_path) as lab:
        up = Upstream(lab)
        assert lab.nets is not None and lab.nets._resolver is not None
        lab.nets._resolver.upstreams = [(INTERNET, up.port)]
        try:
            yield lab, up
        finally:
            up.close()


def wire(name: bytes | list[bytes], qtype: int = 1, qid: int = 7) -> bytes:
    labels = name if isinstance(name, list) else name.split(b".")
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(x)]) + x for x in labels)
            + b"\0" + struct.pack("!HH", qtype, 1))


def ask(lab: Lab, sid: str, query: bytes, timeout: float = 3.0) -> bytes | None:
    """The resolver's answer to ``query`` sent over UDP from the sandbox's namespace (None: none came)."""
    from sandbox.network import netns

    assert lab.nets is not None
    s = netns.in_netns(lab.nets.ns(lab.nets.slots[sid]), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with s:
        s.settimeout(timeout)
        s.sendto(query, RESOLVER)
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def rcode(msg: bytes | None) -> int | None:
    return None if msg is None else struct.unpack_from("!H", msg, 2)[0] & 0xF


def set_has(lab: Lab, which: str, address: str) -> bool:
    from sandbox.network import gateway
    from sandbox.network.nft import run_once

    return address in run_once(f"list set inet {gateway.TABLE} {which}")


def metric(lab: Lab, line: str) -> int:
    assert lab.nets is not None
    for x in lab.nets.metrics():
        if x.startswith(line + " "):
            return int(float(x.split()[-1]))
    raise AssertionError(f"no metric {line}")


def two_open_sandboxes(lab: Lab) -> Any:
    """Sandboxes "a" (the abuser) and "b" (the bystander), both with the default policy."""
    from sandbox.network.policy import Policy

    nets = lab.nets
    assert nets is not None
    for sid in ("a", "b"):
        nets.attach(sid)
        nets.set_policy(sid, Policy())
    return nets


def test_slow_tcp_connections_of_one_guest_stop_no_ones_dns(world: tuple[Lab, Upstream]) -> None:
    """A guest opening 20 TCP connections that never finish a query: 4 are kept (then closed at
    their deadline), the rest closed at once; another sandbox's DNS goes on meanwhile."""
    from dnslib import DNSRecord

    from sandbox.network import netns

    lab, _up = world
    nets = two_open_sandboxes(lab)
    conns = []
    for _ in range(20):
        s = netns.in_netns(nets.ns(nets.slots["a"]), socket.socket)
        s.settimeout(5)
        s.connect(RESOLVER)
        s.sendall(b"\x00\x40")  # a frame of 64 bytes announced, never sent
        conns.append(s)
    time.sleep(0.3)
    t0 = time.monotonic()
    # well within the 10 s the old code's pinned workers held every query for (the bound is
    # loose: a loaded machine, a full test suite beside it, once took over 1 s)
    got = ask(lab, "b", wire(b"good.test"), timeout=5.0)
    assert rcode(got) == 0 and time.monotonic() - t0 < 5.0, got
    assert str(DNSRecord.parse(got).rr[0].rdata) == GOOD_IP  # type: ignore[arg-type]
    with netns.in_netns(nets.ns(nets.slots["b"]), socket.socket) as t:  # b's TCP too
        t.settimeout(3)
        t.connect(RESOLVER)
        q = wire(b"good.test", qid=9)
        t.sendall(struct.pack("!H", len(q)) + q + struct.pack("!H", len(q)) + q)  # two pipelined
        for _ in range(2):
            n = struct.unpack("!H", t.recv(2, socket.MSG_WAITALL))[0]
            assert rcode(t.recv(n, socket.MSG_WAITALL)) == 0
    closed_at_once = sum(1 for s in conns if _closed(s, 0.2))
    assert closed_at_once == 16
    assert metric(lab, 'cubefs_sandbox_dns_dropped_total{reason="tcp_limit"}') == 16
    time.sleep(2.0)  # past the deadline (1.5 s here, 10 s in service): the 4 kept are closed too
    assert all(_closed(s, 0.2) for s in conns)
    assert metric(lab, "cubefs_sandbox_dns_tcp_connections") == 0
    for s in conns:
        s.close()


def _closed(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_one_guests_flood_costs_no_other_sandbox_its_answers(world: tuple[Lab, Upstream]) -> None:
    """2,000 queries for names the upstream never answers, from one guest: its own past 32 are
    dropped (counted), and another sandbox is answered at once."""
    from sandbox.network import netns

    lab, _up = world
    nets = two_open_sandboxes(lab)
    with netns.in_netns(nets.ns(nets.slots["a"]), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
        for i in range(2000):
            s.sendto(wire(b"slow%d.test" % i, qid=i), RESOLVER)
        time.sleep(0.2)
        t0 = time.monotonic()
        # the old code dropped it (one queue for the node, full): no answer at all; the bound is
        # loose for a loaded machine (a full test suite beside it once took over 1.5 s)
        got = ask(lab, "b", wire(b"good.test"), timeout=5.0)
        assert rcode(got) == 0 and time.monotonic() - t0 < 5.0, (got, time.monotonic() - t0)
    # each of the 2,000 is answered, waiting (32), or dropped and counted: here (slot_busy) or by
    # the kernel when the guest outran the reader (socket_buffer: 1,546 of them in one CI run);
    # the slack is for slots freed by the upstream timing out while the flood is still read
    busy = metric(lab, 'cubefs_sandbox_dns_dropped_total{reason="slot_busy"}')
    assert busy >= 1 and busy + metric(lab, 'cubefs_sandbox_dns_dropped_total{reason="socket_buffer"}') >= 1900
    assert metric(lab, 'cubefs_sandbox_dns_dropped_total{reason="node_busy"}') == 0


def test_a_wildcard_deny_sends_no_guest_name_upstream_and_exact_names_are_blocked_unasked(
        world: tuple[Lab, Upstream]) -> None:
    from sandbox.network import gateway
    from sandbox.network.policy import Policy

    lab, up = world
    nets = lab.nets
    assert nets is not None
    nets.attach("x")
    nets.set_policy("x", Policy.from_api({"denyOut": ["*.evil.test", "bad.test"]}))
    deny = gateway.set_names(nets.slots["x"])[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not set_has(lab, deny, BAD_IP):
        time.sleep(0.1)
    assert set_has(lab, deny, BAD_IP)  # the policy's exact name: its address refused before anyone asks
    for i in range(5):
        assert rcode(ask(lab, "x", wire(b"c2VjcmV0%d.evil.test" % i))) == 5  # REFUSED
    assert rcode(ask(lab, "x", wire(b"bad.test"))) == 5
    time.sleep(0.5)
    assert not [n for n in up.asked if "evil" in n], up.asked  # nothing the guest chose left the node
    assert rcode(ask(lab, "x", wire(b"good.test"))) == 0


def test_odd_names_are_formerr_and_poison_nothing(world: tuple[Lab, Upstream]) -> None:
    """A label holding a dot, a byte no host name has, compression in the question, a name past
    255 bytes: FORMERR, nothing sent upstream, nothing cached; and TTLs are capped."""
    from dnslib import DNSRecord

    from sandbox.network import gateway
    from sandbox.network.policy import Policy

    lab, up = world
    nets = lab.nets
    assert nets is not None
    nets.attach("p")
    nets.set_policy("p", Policy.from_api({"allowOut": ["long.test", "good.test"], "denyOut": ["0.0.0.0/0"]}))
    odd = [wire([b"good.test"]), wire([b"go\x00d", b"test"]), wire([b"g od", b"test"]),
           struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
           wire([b"a" * 60] * 5)]
    for q in odd:
        got = ask(lab, "p", q)
        assert rcode(got) == 1 and got is not None and got[:2] == q[:2], (q, got)
    assert up.asked == [], up.asked
    got = ask(lab, "p", wire(b"Good.TEST"))
    assert rcode(got) == 0 and str(DNSRecord.parse(got).rr[0].rdata) == GOOD_IP  # type: ignore[arg-type]
    long = DNSRecord.parse(ask(lab, "p", wire(b"long.test")))  # type: ignore[arg-type]
    assert long.rr[0].ttl == 86_400  # the upstream said 10,000,000 s
    allow = gateway.set_names(nets.slots["p"])[0]
    from sandbox.network.nft import run_once

    listing = run_once(f"list set inet {gateway.TABLE} {allow}")
    assert LONG_IP in listing and "timeout 1d " in listing.replace(",", " ") + " ", listing


def test_a_name_removed_from_allow_out_while_asked_is_not_added_after(world: tuple[Lab, Upstream]) -> None:
    """A query judged under the old policy (its upstream slow) that ends after a PUT removed its
    name: its address does not go into the new policy's set."""
    from sandbox.network import gateway
    from sandbox.network.policy import Policy

    lab, _up = world
    nets = lab.nets
    assert nets is not None
    nets.attach("r")
    nets.set_policy("r", Policy.from_api({"allowOut": ["race.test"], "denyOut": ["0.0.0.0/0"]}))
    out: list[bytes | None] = []
    t = threading.Thread(target=lambda: out.append(ask(lab, "r", wire(b"race.test"))))
    t.start()
    time.sleep(0.3)  # judged "allowed", waiting for the upstream (0.8 s)
    nets.set_policy("r", Policy.from_api({"allowOut": ["good.test"], "denyOut": ["0.0.0.0/0"]}))
    t.join(5)
    assert rcode(out[0]) == 5  # judged again under the new policy: REFUSED
    assert not set_has(lab, gateway.set_names(nets.slots["r"])[0], RACE_IP)


def test_one_sandbox_cannot_hold_more_than_its_connection_limit(world: tuple[Lab, Upstream],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway refuses a sandbox's new connection past ``--max-connections`` (here 5) while
    the others are open, and takes one again when one has closed; accounting keeps at most
    OPEN_MAX (here 3) open entries per sandbox and counts the rest."""
    from sandbox.network import accounting
    from sandbox.network.policy import Policy

    monkeypatch.setattr(accounting, "OPEN_MAX", 3)
    lab, _up = world
    nets = lab.nets
    assert nets is not None
    nets.max_conns = 5
    nets.attach("c")
    nets.set_policy("c", Policy())
    held = []
    for _ in range(5):
        s = lab.sandbox_socket("c")
        s.settimeout(3)
        s.connect((INTERNET, lab.port))
        s.sendall(b"PUT 100\n")  # and nothing more: the server waits, the connection stays open
        held.append(s)
    with pytest.raises(OSError), lab.sandbox_socket("c") as s:
        s.settimeout(3)
        s.connect((INTERNET, lab.port))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and nets.traffic("c").get("untracked") != 2:
        time.sleep(0.1)
    record = nets.traffic("c")
    assert len(record["open"]) == 3 and record["untracked"] == 2, record
    assert any(x == 'cubefs_sandbox_egress_connections_open{sandbox="c"} 5' for x in nets.metrics())
    held.pop().close()
    deadline = time.monotonic() + 6  # its entry counts until it has closed (TIME_WAIT, then 2 s gone)
    while True:
        try:
            assert lab.get("c", 1000) == 1000  # a free place again
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for s in held:
        s.close()


def test_a_flood_of_conntrack_events_never_holds_the_books() -> None:
    """The accounting's reader fed an endless stream of events (a socket pair stands in for the
    ctnetlink one: the flood is the fault): ``_drain`` returns, and ``metrics`` never waits long."""
    from sandbox.network import accounting

    acc = accounting.Accounting.__new__(accounting.Accounting)
    acc._lock, acc._read_lock = threading.Lock(), threading.Lock()
    acc._prefix, acc.lost, acc.books, acc._ended = b"\x0a\xc8", 0, {}, {}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    acc._events = a
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            with __import__("contextlib").suppress(OSError):
                b.send(b"\0" * 64)

    feeder = threading.Thread(target=flood, daemon=True)
    feeder.start()
    waits: list[float] = []

    def reader() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            with acc._lock:
                waits.append(time.perf_counter() - t)
            time.sleep(0.001)

    r = threading.Thread(target=reader, daemon=True)
    r.start()
    try:
        t0 = time.monotonic()
        with acc._read_lock:
            acc._drain()
        assert time.monotonic() - t0 < 5
    finally:
        stop.set()
        feeder.join(5)
        r.join(5)
        a.close()
        b.close()
    assert waits and max(waits) < 0.05, max(waits)
