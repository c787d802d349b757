"""Bytes per connection per sandbox: conntrack's accounting, read when a connection ends.

The node's namespace counts every connection's bytes and packets in each direction
(``nf_conntrack_acct=1``) and stamps its start and end (``nf_conntrack_timestamp=1``); both
are per-namespace sysctls, set at start.  A sandbox's connections leave its namespace with its
slot's address as their source (``gateway.addresses``), so the conntrack entry in the node's
namespace names the sandbox without a mark.  One thread reads the ``DESTROY`` events of a
ctnetlink socket (one message per ended connection, parsed by ``ctnetlink``): each one ended
by a sandbox is logged in one line (sandbox, protocol, destination, port, bytes out and in,
packets, duration, verdict) and added to the sandbox's books and the node's totals.

Connections still open: every ``interval`` seconds (10) the thread dumps the table and keeps
each open connection's counts so far, so the metrics of a long download move while it runs
and never go backwards (an open connection's counts only grow; when it ends its final counts
replace them).  No line is logged for an open connection; the per-sandbox record lists them.
A sandbox killed with connections open: ``flush`` deletes their entries and logs them with the
counts read just before (nothing of a dead sandbox stays in the kernel's table for the 5 days
an established TCP entry lives).  Refused connections never become conntrack entries (the
packet is rejected before the entry is confirmed): ``flowlog`` reports them and ``refused``
logs them at once with 0 bytes.

Cost: one recv per ended connection of the node, a sandbox's or not; a sandbox's is parsed
(~23 µs, Python) and logged, any other dropped once its source address is read (~0.7 µs).
Events are read in batches: at most ``DRAIN_MAX`` datagrams per wake-up (a flood that never
stops still lets the thread dump and stop), booked ``DRAIN_BATCH`` at a time under the books'
lock, which ``record`` and ``metrics`` take on the service's asyncio loop: a guest opening and
closing connections as fast as it can never holds that loop.  A sandbox's open connections
kept between dumps are at most ``OPEN_MAX`` (the rest counted); how many it may have at all
is the gateway's ``ct count`` limit.  The thread sleeps in ``select`` otherwise.
Measured: docs/benchmarks.md (``tools/bench/egress_accounting.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.network import ctnetlink, gateway, netns
from sandbox.network.ctnetlink import Conn

log = logging.getLogger("cubefs.sandbox.network")

REFRESH = 10.0  # seconds between dumps of the open connections (their metrics move this often)
RECENT = 50  # ended connections kept per sandbox for its record
BATCH_WAIT = 0.02  # at most 50 wake-ups a second, however many connections end
ENDED_IDS = 1 << 16  # ids of entries already booked (a late duplicate event is ignored)
DRAIN_BATCH = 64  # event datagrams booked per hold of the books' lock (the service's loop reads the books)
DRAIN_MAX = 4096  # event datagrams read per wake-up; a flood's rest waits for the next (the loop goes on)
OPEN_MAX = 1024  # open connections kept per sandbox between dumps; the rest only counted (``untracked``)


@dataclass
class Books:
    """One live sandbox's traffic: what ended, what is open (as of the last dump)."""

    bytes_out: int = 0
    bytes_in: int = 0
    packets: int = 0
    ended: int = 0
    open: dict[int, Conn] = field(default_factory=dict)
    untracked: int = 0  # open connections past ``OPEN_MAX`` at the last dump (their bytes booked when they end)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def totals(self) -> tuple[int, int, int]:
        return (self.bytes_out + sum(c.bytes_out for c in self.open.values()),
                self.bytes_in + sum(c.bytes_in for c in self.open.values()),
                self.packets + sum(c.packets for c in self.open.values()))


def _entry(conn: Conn, verdict: str, state: str) -> dict[str, Any]:
    seconds = conn.seconds if state != "open" or not conn.start_ns else (time.time_ns() - conn.start_ns) / 1e9
    return {"protocol": conn.proto, "destination": conn.dest, "port": conn.port, "verdict": verdict,
            "bytesOut": conn.bytes_out, "bytesIn": conn.bytes_in, "packets": conn.packets,
            "seconds": round(max(0.0, seconds), 3), "state": state,
            "started": round(conn.start_ns / 1e9, 3) if conn.start_ns else None}


class Accounting:
    """The node's egress accounting: a ctnetlink reader thread and every live sandbox's books.

    ``sandbox_of(slot)`` names the sandbox holding a slot (None: nobody's, the event is ignored);
    ``active()`` says whether any sandbox has a network (no dump otherwise)."""

    def __init__(self, sandbox_of: Callable[[int], str | None], active: Callable[[], bool],
                 interval: float | None = None) -> None:
        self.sandbox_of = sandbox_of
        self.active = active
        self.interval = REFRESH if interval is None else interval
        self.books: dict[str, Books] = {}
        self.totals = {"out": 0, "in": 0, "packets": 0, "ended": 0}  # every sandbox ever, ended connections
        self.lost = 0  # overruns of the event socket (ENOBUFS): events the kernel dropped
        self.cpu = 0.0  # the reader thread's CPU seconds
        self._reported = (0, 0, 0)
        self._ended: dict[int, None] = {}
        self._killing: set[int] = set()  # ids ``flush`` is deleting
        self._lock = threading.Lock()  # the books (held briefly: ``record`` and ``metrics`` run on the service's loop)
        self._read_lock = threading.Lock()  # reading the event socket (a flush's events are read in order)
        self._ctl_lock = threading.Lock()  # the dump/delete socket
        self._prefix = gateway.SANDBOX_NET.network_address.packed[:2]
        netns.write_sysctl("net.netfilter.nf_conntrack_acct", "1")
        with contextlib.suppress(OSError):  # durations are 0 without it
            netns.write_sysctl("net.netfilter.nf_conntrack_timestamp", "1")
        self._events = ctnetlink.socket_for((ctnetlink.NFNLGRP_CONNTRACK_DESTROY,), rcvbuf=4 << 20)
        self._events.setblocking(False)
        try:
            self._ctl = self._new_ctl()
        except BaseException:
            self._events.close()
            raise
        self._seq = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="egress accounting", daemon=True)
        self.thread.start()

    # -- the reader ----------------------------------------------------------------------
    def _run(self) -> None:
        next_dump = time.monotonic() + self.interval
        while not self._stop.is_set():
            wait = max(0.0, min(0.5, next_dump - time.monotonic()))
            try:
                select.select([self._events], [], [], wait)
            except (OSError, ValueError):  # closed under us
                return
            if self._stop.wait(BATCH_WAIT):  # let a burst queue up: one wake-up books it all
                return
            t0 = time.thread_time()
            try:
                with self._read_lock:
                    self._drain()
                if time.monotonic() >= next_dump:
                    next_dump = time.monotonic() + self.interval
                    self._refresh()
            except Exception as err:  # the accounting must outlive a bad message
                if self._stop.is_set():
                    return
                log.warning("egress accounting: %s", err)
            self.cpu += time.thread_time() - t0

    def _drain(self, limit: int = DRAIN_MAX) -> None:
        """The queued events, at most ``limit`` datagrams, booked ``DRAIN_BATCH`` at a time (the
        caller holds ``_read_lock``; ``_lock`` is taken per batch, so a flood of events never
        holds the books from the service's loop, and a flood that never ends still returns)."""
        read = 0
        more = True
        while more and read < limit:
            conns: list[Conn] = []
            for _ in range(DRAIN_BATCH):
                try:
                    data = self._events.recv(1 << 16)
                except BlockingIOError:
                    more = False
                    break
                except OSError as err:
                    if err.errno == 105:  # ENOBUFS: the kernel dropped events; the next dump catches up
                        self.lost += 1
                        continue
                    raise
                read += 1
                for kind, a, b in ctnetlink.messages(data):
                    if kind == ctnetlink.DESTROY and (conn := ctnetlink.parse(data, a, b, self._prefix)) is not None:
                        conns.append(conn)
            if conns:
                with self._lock:
                    for conn in conns:
                        self._end(conn, "closed")

    def _owner(self, source: str) -> str | None:
        offset = int(ipaddress.IPv4Address(source)) - int(gateway.SANDBOX_NET.network_address)
        slot = offset // 4
        if offset % 4 != 2 or slot >= gateway.MAX_SLOTS:  # the sandbox namespace's end of the pair
            return None
        return self.sandbox_of(slot)

    def _end(self, conn: Conn, state: str, sid: str | None = None) -> None:
        """Book an ended connection once (the caller holds ``_lock``)."""
        if conn.id in self._ended:
            return
        sid = sid or self._owner(conn.source)
        if sid is None:
            return
        books = self.books.setdefault(sid, Books())
        if conn.id in self._killing:
            state = "open at kill"
        if conn.tcp_state in (ctnetlink.TCP_TIME_WAIT, ctnetlink.TCP_CLOSE) and conn.stop_ns:
            conn.stop_ns -= gateway.ENDED_SECONDS * 10**9  # it ended that long before its entry went
        seen = books.open.pop(conn.id, None)
        if seen is not None:  # counts only grow: the final ones are at least the dumped ones
            conn.bytes_out, conn.bytes_in = max(conn.bytes_out, seen.bytes_out), max(conn.bytes_in, seen.bytes_in)
            conn.packets = max(conn.packets, seen.packets)
        self._ended[conn.id] = None
        if len(self._ended) > ENDED_IDS:
            del self._ended[next(iter(self._ended))]
        books.bytes_out += conn.bytes_out
        books.bytes_in += conn.bytes_in
        books.packets += conn.packets
        books.ended += 1
        books.recent.append(_entry(conn, "allowed", state))
        self.totals["out"] += conn.bytes_out
        self.totals["in"] += conn.bytes_in
        self.totals["packets"] += conn.packets
        self.totals["ended"] += 1
        log.info("sandbox %s: connection %s %s:%d allowed: %d B out, %d B in, %d packets, %.3f s%s", sid, conn.proto,
                 conn.dest, conn.port, conn.bytes_out, conn.bytes_in, conn.packets, conn.seconds,
                 "" if state == "closed" else f" ({state})")

    @staticmethod
    def _new_ctl() -> socket.socket:
        sock = ctnetlink.socket_for()
        sock.settimeout(5)
        return sock

    def _dump(self, prefix: bytes) -> list[Conn]:
        with self._ctl_lock:
            self._seq += 1
            try:
                return ctnetlink.dump(self._ctl, prefix, self._seq)
            except OSError:  # a dump cut short leaves its rest queued: the next one starts clean
                self._ctl.close()
                self._ctl = self._new_ctl()
                raise

    def _refresh(self) -> None:
        """The open connections' counts so far; one that vanished without its event (an
        overrun) is booked with the counts last seen."""
        if not self.active():
            return
        conns = self._dump(self._prefix)
        with self._read_lock:
            self._drain()  # an event queued during the dump is booked before the dump is read
        with self._lock:
            now: dict[str, dict[int, Conn]] = {}
            over: dict[str, int] = {}
            for conn in conns:
                if conn.id in self._ended or (sid := self._owner(conn.source)) is None:
                    continue
                mine = now.setdefault(sid, {})
                books = self.books.setdefault(sid, Books())
                if len(mine) >= OPEN_MAX and conn.id not in books.open:
                    over[sid] = over.get(sid, 0) + 1  # counted, not kept: one guest's flood costs no memory
                    continue
                mine[conn.id] = conn
            for sid, books in self.books.items():
                books.untracked = over.get(sid, 0)
                fresh = now.get(sid, {})
                for cid, old in list(books.open.items()):
                    if cid not in fresh:
                        self._end(old, "lost event", sid)
                for cid, conn in fresh.items():
                    old = books.open.get(cid)
                    if old is not None:
                        conn.bytes_out, conn.bytes_in = max(conn.bytes_out, old.bytes_out), max(conn.bytes_in,
                                                                                               old.bytes_in)
                        conn.packets = max(conn.packets, old.packets)
                books.open = fresh

    # -- what the pool tells it ------------------------------------------------------------
    def refused(self, sandbox_id: str, proto: str, dest: str, port: int) -> None:
        """A refused connection (from the flow log): logged and listed at once, 0 bytes."""
        conn = Conn(0, "", dest, proto, port, start_ns=time.time_ns())
        with self._lock:
            self.books.setdefault(sandbox_id, Books()).recent.append(_entry(conn, "refused", "refused"))
        log.info("sandbox %s: connection %s %s:%d refused: 0 B out, 0 B in", sandbox_id, proto, dest, port)

    def flush(self, sandbox_id: str, address: str) -> None:
        """The sandbox is going: its open connections deleted from the table and booked as
        they stood, its books dropped (its metrics go with them)."""
        prefix = socket.inet_aton(address)
        with self._read_lock:
            self._drain()
        try:
            conns = self._dump(prefix)
        except OSError as err:
            log.warning("sandbox %s: its open connections: %s", sandbox_id, err)
            conns = []
        with self._lock:
            self._killing = {c.id for c in conns}
        for conn in conns:
            try:
                with self._ctl_lock:
                    self._seq += 1
                    ctnetlink.delete(self._ctl, conn, self._seq)
            except OSError as err:
                log.warning("sandbox %s: deleting a connection's entry: %s", sandbox_id, err)
        with self._read_lock:
            self._drain()  # the deletes' events (queued before their acks): the final counts
        with self._lock:
            for conn in conns:  # any whose event was lost: as dumped
                conn.stop_ns = time.time_ns()
                self._end(conn, "open at kill", sandbox_id)
            self._killing = set()
            self.books.pop(sandbox_id, None)

    def forget(self, sandbox_id: str) -> None:
        with self._lock:
            self.books.pop(sandbox_id, None)

    # -- what it shows -----------------------------------------------------------------------
    def record(self, sandbox_id: str) -> dict[str, Any]:
        """The sandbox's traffic so far: totals, open connections, the last ``RECENT`` ended."""
        with self._lock:
            books = self.books.get(sandbox_id) or Books()
            out, inn, packets = books.totals()
            return {"bytesOut": out, "bytesIn": inn, "packets": packets, "ended": books.ended,
                    "untracked": books.untracked,
                    "open": [_entry(c, "allowed", "open") for c in books.open.values()],
                    "recent": list(books.recent)}

    def metrics(self) -> list[str]:
        with self._lock:
            per = {sid: b.totals() for sid, b in sorted(self.books.items())}
            opened = {sid: len(b.open) + b.untracked for sid, b in self.books.items()}
            live = [sum(t[i] for t in per.values()) for i in range(3)]
            node = (self.totals["out"] + live[0], self.totals["in"] + live[1], self.totals["packets"] + live[2])
            node = tuple(max(a, b) for a, b in zip(node, self._reported, strict=True))  # never backwards
            self._reported = node  # type: ignore[assignment]
            ended, lost = self.totals["ended"], self.lost
        lines = ["# TYPE cubefs_sandbox_egress_bytes_total counter"]
        for sid, (out, inn, _p) in per.items():
            lines += [f'cubefs_sandbox_egress_bytes_total{{sandbox="{sid}",direction="out"}} {out}',
                      f'cubefs_sandbox_egress_bytes_total{{sandbox="{sid}",direction="in"}} {inn}']
        lines.append("# TYPE cubefs_sandbox_egress_packets_total counter")
        lines += [f'cubefs_sandbox_egress_packets_total{{sandbox="{sid}"}} {t[2]}' for sid, t in per.items()]
        lines.append("# TYPE cubefs_sandbox_egress_connections_open gauge")
        lines += [f'cubefs_sandbox_egress_connections_open{{sandbox="{sid}"}} {n}' for sid, n in sorted(opened.items())]
        lines += ["# TYPE cubefs_egress_bytes_total counter",
                  f'cubefs_egress_bytes_total{{direction="out"}} {node[0]}',
                  f'cubefs_egress_bytes_total{{direction="in"}} {node[1]}',
                  "# TYPE cubefs_egress_packets_total counter", f"cubefs_egress_packets_total {node[2]}",
                  "# TYPE cubefs_egress_connections_ended_total counter",
                  f"cubefs_egress_connections_ended_total {ended}",
                  "# TYPE cubefs_egress_accounting_overruns_total counter",
                  f"cubefs_egress_accounting_overruns_total {lost}",
                  "# TYPE cubefs_egress_accounting_cpu_seconds_total counter",
                  f"cubefs_egress_accounting_cpu_seconds_total {self.cpu:.6f}"]
        return lines

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self._events.close()
        self._ctl.close()
