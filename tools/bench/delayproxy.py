"""A TCP proxy that adds a fixed latency to every request, for benchmarks.

Why this exists: the cold-start benchmark must show what lazy fetching costs
when the object store is not on loopback, where every request pays a round
trip.  This machine's kernel has no ``netem`` (``tc qdisc ... delay``), so
latency is added in user space instead: the proxy listens on 127.0.0.1, opens
one upstream connection per client connection, and holds back each *burst of
client data that starts a new request* for ``delay_ms`` before forwarding it.

"Starts a new request" means: the first data on a connection, or the first
client data after the server has sent something back.  With HTTP/1.1
keep-alive and no pipelining (aiohttp, urllib3) that is exactly one delay
per request; the rest of a large request body is not delayed again, and the
response stream is never delayed at all, so bandwidth is unchanged and only
the per-request latency grows.  A request sent with ``Expect: 100-continue``
pays twice, as it would over a real link.  Opening a connection can cost one
extra delay too (``connect_delay_ms``), like a TCP handshake over the link.

The proxy also timestamps each request (arrival of its first byte, first and
last response byte), so a benchmark can count requests, connections and how
many of them ran strictly one after another (see :func:`summarize`).

Library use::

    with DelayProxy("127.0.0.1", 8333, delay_ms=10) as proxy:
        endpoint = proxy.endpoint          # http://127.0.0.1:<port>
        ...
        print(summarize(proxy.snapshot()))

CLI use (runs until Ctrl-C, SIGTERM or ``--duration``)::

    python tools/bench/delayproxy.py --upstream 127.0.0.1:8333 --delay-ms 10 --port 9333
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

BUF = 256 * 1024


@dataclass
class RequestRecord:
    """One request as the proxy saw it; times are ``time.monotonic()`` seconds."""

    conn: int
    start: float  # first byte of the request arrived from the client
    forwarded: float = 0.0  # ... and was sent upstream, after the delay
    first_response: float = 0.0  # first response byte from the server
    last_response: float = 0.0  # last response byte seen before the next request / close
    bytes_up: int = 0
    bytes_down: int = 0
    line: str = ""  # "GET /bucket/key" when the burst parses as HTTP/1.x
    range: str = ""  # the Range header's value, if any

    @property
    def end(self) -> float:
        return self.last_response or self.forwarded or self.start


@dataclass
class ProxyStats:
    """Counters plus the per-request log; a snapshot is a deep copy."""

    connections: int = 0
    requests: list[RequestRecord] = field(default_factory=list)

    def copy(self) -> ProxyStats:
        return ProxyStats(self.connections, [RequestRecord(**asdict(r)) for r in self.requests])


class DelayProxy:
    """The proxy, running its own asyncio loop in a daemon thread.

    Bounded by construction: :meth:`stop` (or leaving the ``with`` block)
    closes the listener and every open connection and joins the thread, so a
    benchmark that ends, fails or is interrupted leaves nothing listening.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        delay_ms: float,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_delay_ms: float = 0.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay_ms / 1000.0
        self.connect_delay = connect_delay_ms / 1000.0
        self.listen = (listen_host, listen_port)
        self.port = 0
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> DelayProxy:
        """Start listening in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._main, name="delayproxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"delay proxy failed to start: {self._error}") from self._error
        if not self.port:
            raise RuntimeError("delay proxy did not start within 30 s")
        return self

    def stop(self) -> None:
        """Close the listener and all connections, then join the thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen[0], self.listen[1], limit=BUF)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as err:  # reported to start()
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- stats -----------------------------------------------------------------------------------------------

    def snapshot(self) -> ProxyStats:
        """A copy of the counters and request log so far."""
        with self._lock:
            return self._stats.copy()

    def reset(self) -> None:
        """Forget the request log (between benchmark samples); open connections stay open."""
        with self._lock:
            self._stats = ProxyStats()

    def _new_request(self, conn: int, head: bytes) -> RequestRecord:
        rec = RequestRecord(conn=conn, start=time.monotonic())
        rec.line, rec.range = parse_head(head)
        with self._lock:
            self._stats.requests.append(rec)
        return rec

    # -- data path -------------------------------------------------------------------------------------------

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(cwriter)
        swriter: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task[None]] = []
        with self._lock:
            self._stats.connections += 1
            conn = self._stats.connections
        try:
            if self.connect_delay:
                await asyncio.sleep(self.connect_delay)
            sreader, swriter = await asyncio.open_connection(*self.upstream, limit=BUF)
            self._writers.add(swriter)
            # ``state["current"]`` is the request whose response is streaming; None once the server has
            # answered, so that the next client data starts (and is delayed as) a new request.
            state: dict[str, Any] = {"current": None, "turn": True}
            up = asyncio.create_task(self._client_to_server(conn, creader, swriter, state))
            down = asyncio.create_task(self._server_to_client(sreader, cwriter, state))
            pumps = [up, down]
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not up.cancelled() and up.exception() is None:
                # Client finished sending (half-close): let the response drain.
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(down), 60)
            for t in pending:
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the handler ends quietly; asyncio would otherwise log the cancellation
        finally:
            for t in pumps:
                t.cancel()
            for w in (cwriter, swriter):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _client_to_server(
        self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]
    ) -> None:
        while True:
            data = await reader.read(BUF)
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            rec: RequestRecord
            if state["turn"]:
                rec = self._new_request(conn, data)
                state["turn"] = False
                state["current"] = rec
                if self.delay:
                    await asyncio.sleep(self.delay - (time.monotonic() - rec.start))
                rec.forwarded = time.monotonic()
            else:
                rec = state["current"]
            rec.bytes_up += len(data)
            writer.write(data)
            await writer.drain()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]
    ) -> None:
        while True:
            data = await reader.read(BUF)
            if not data:
                return
            now = time.monotonic()
            rec: RequestRecord | None = state["current"]
            if rec is not None:
                if not rec.first_response:
                    rec.first_response = now
                rec.last_response = now
                rec.bytes_down += len(data)
            state["turn"] = True  # the server spoke: the client's next data is a new request
            writer.write(data)
            await writer.drain()
            if rec is not None:
                rec.last_response = time.monotonic()


def parse_head(data: bytes) -> tuple[str, str]:
    """("METHOD /path", Range value) from the start of an HTTP/1.x request; empty strings if it is not one."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1", "replace")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "", ""
    rng = ""
    for h in lines[1:]:
        name, _, value = h.partition(":")
        if name.strip().lower() == "range":
            rng = value.strip()
    return f"{parts[0]} {parts[1].split('?', 1)[0]}", rng


def max_sequential_chain(intervals: list[tuple[float, float]]) -> int:
    """Most requests that ran strictly one after another (none overlapping the next).

    Earliest-end-first greedy gives the maximum set of pairwise disjoint
    intervals.  Requests that never overlapped were, at the least, not sent
    in parallel: each one in the chain paid its round trip on the critical
    path, so ``chain * delay`` is a lower bound on the latency it added.
    """
    count, last_end = 0, float("-inf")
    for start, end in sorted(intervals, key=lambda iv: iv[1]):
        if start >= last_end:
            count += 1
            last_end = end
    return count


def busy_periods(intervals: list[tuple[float, float]]) -> tuple[int, float]:
    """(number of periods with at least one request in flight, their total length in seconds)."""
    periods, total = 0, 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            periods += 1
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return periods, total


def summarize(stats: ProxyStats, since: float = 0.0) -> dict[str, Any]:
    """Request count, connections, bytes, parallelism and the sequential chain, for a report."""
    reqs = [r for r in stats.requests if r.start >= since]
    intervals = [(r.start, r.end) for r in reqs]
    periods, busy = busy_periods(intervals)
    span = (max(r.end for r in reqs) - min(r.start for r in reqs)) if reqs else 0.0
    in_flight = sum(e - s for s, e in intervals)
    server = [r.first_response - r.forwarded for r in reqs if r.first_response and r.forwarded]
    gaps, last_end = [], None
    for start, end in sorted(intervals):
        if last_end is not None and start > last_end:
            gaps.append(start - last_end)
        last_end = end if last_end is None else max(last_end, end)
    return {
        "requests": len(reqs),
        "connections_used": len({r.conn for r in reqs}),
        "bytes_down": sum(r.bytes_down for r in reqs),
        "bytes_up": sum(r.bytes_up for r in reqs),
        "max_sequential_chain": max_sequential_chain(intervals),
        "busy_periods": periods,
        "busy_seconds": round(busy, 4),
        "span_seconds": round(span, 4),
        "mean_parallelism": round(in_flight / busy, 2) if busy else 0.0,
        # forwarded -> first response byte: the server's own time per request, without the added delay
        "median_server_ms": round(1000 * statistics.median(server), 2) if server else 0.0,
        # idle time between one request's last response byte and the next request: client-side work per step
        "median_idle_gap_ms": round(1000 * statistics.median(gaps), 2) if gaps else 0.0,
    }


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the S3 server to forward to")
    ap.add_argument("--listen", default="127.0.0.1", metavar="HOST", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="delay added to each request (default 10)")
    ap.add_argument("--connect-delay-ms", type=float, default=0.0, help="delay added to each new connection")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: never)")
    args = ap.parse_args(argv)
    host, port = _hostport(args.upstream)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_a: stop.set())
    with DelayProxy(host, port, args.delay_ms, args.listen, args.port, args.connect_delay_ms) as proxy:
        print(f"delayproxy: {proxy.endpoint} -> {host}:{port}, +{args.delay_ms:g} ms per request", flush=True)
        stop.wait(args.duration or None)
        summary = summarize(proxy.snapshot())
    print(f"delayproxy: stopped; {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
