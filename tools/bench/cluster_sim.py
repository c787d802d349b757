#!/usr/bin/env python3
"""The cluster scheduler at 1,000 and 5,000 simulated nodes (issue 15, "beyond this machine").

Real parts: a real etcd 3.4 (one member, data dir in a temporary dir on this
machine's disk, or on tmpfs with ``--tmpfs``: etcd 3.4 has no
``--unsafe-no-fsync``, and a WAL on tmpfs is what an fsync-free etcd costs),
the real front (``cubefs sandbox api`` as subprocesses: one per ``--fronts``),
and the real node-side publishing code.

The simulation: one process (``--role nodes``, started by this tool) holds N
:class:`sandbox.cluster.member.NodeMember` objects, each over a small fake
service (a real :class:`sandbox.service.SandboxTable` and
:class:`sandbox.pool.Capacity`, ``pools`` and ``startable()``) instead of
QEMU: a create is answered at once, but through what a real node does per
create — its own bin-packing (429 when full), the sandbox added to the table
(which marks the member dirty), the front's reservation handed to
``member.filled`` and the answer held until ``member.settle()``: the member's
own flusher writes one etcd transaction putting the sandbox's route and the
node's updated ``NodeInfo`` and deleting the reservation.  Each member also
runs its own refresher (a republish every 15 s, started at a random phase, as
a real node's).  One aiohttp server answers for all nodes: each node's
``NodeInfo.api`` is ``http://127.0.0.1:PORT/nINDEX`` (a path prefix), which
the front's forwarding must carry (checked at the end of every run).

Leases: a real node keeps its own lease, a keepalive every TTL/3 (3.3 s): at
5,000 nodes that is 1,500 keepalives/s, which would measure keepalive
traffic, not placement.  Here groups of ``--lease-group`` (100) nodes share one
lease; the write path per create is unchanged.

Clients: ``--clients`` tasks in this process POST ``/sandboxes`` to the fronts
(round robin) for ``--seconds``.  Reported: placements/s; the front's decision
latency (``cubefs_front_decision_seconds``: request in -> reservation made, its
last 2,000) and the create latency seen by the client; reservation conflicts;
CPU seconds of the front(s), etcd, the simulated nodes and the clients (from
``/proc``); etcd's committed proposals/s, watch events sent, WAL fsync time;
and the memory of a front's view per node and per route (tracemalloc over
``ClusterView._put`` of what etcd holds after the run).  ``--peer-watchers W``:
W of the simulated nodes also watch ``nodes/``, as a real node's peers file
once did (real nodes now watch ``members/``, written once per lease: this is
the upper bound; what that fan-out costs etcd per event; the default leaves it out, or
5,000 watches from one process would measure this machine, not the design).
Exits 2 with a message when etcd is not installed; 1 when a case failed.

Decision latency (docs/benchmarks.md): ``--probe`` runs each front's own ``run_front`` in this
tool (``--role front``) with a :class:`LoopProbe` (event-loop lag, GC pauses, the loop thread's
run-queue time) and adds the front's split of a decision (the wait for the transaction out, its
own round trip, the loop's turn back); ``--tree DIR`` runs the fronts from another checkout (a
``git worktree`` of the commit before).  ``--load-priority idle`` (or ``nice``/``batch``, and
``--load-cpus``) lowers the simulated nodes and the clients below the front and etcd, as a real
cluster gives the front its own core; the default, ``same``, is how the older rows were measured.

    .venv/bin/python tools/bench/cluster_sim.py --nodes 1000 --seconds 20 [--json]
    .venv/bin/python tools/bench/cluster_sim.py --nodes 5000 --fronts 2 --sample 16
    .venv/bin/python tools/bench/cluster_sim.py --cases all --seconds 12   # docs/benchmarks.md's table, ~4 min
    .venv/bin/python tools/bench/cluster_sim.py --nodes 1000 --clients 0 --peer-watchers 100   # watch fan-out
    .venv/bin/python tools/bench/cluster_sim.py --nodes 1000 --profile /tmp/front.prof   # cProfile the front
    .venv/bin/python tools/bench/cluster_sim.py --nodes 1000 --profile-nodes /tmp/nodes.prof   # ... the sim nodes
    .venv/bin/python tools/bench/cluster_sim.py --nodes 1000 --sample 16 --probe --load-priority idle  # latency
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEMPLATES = {"base": [1, 512], "code-interpreter": [2, 1024], "big": [8, 8192]}
PREFIX = "/cubefs-sim/"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


# ---------------------------------------------------------------------------------------------------
# --role nodes: N simulated nodes in one process
# ---------------------------------------------------------------------------------------------------

class SimSandbox:
    """What NodeMember reads of a sandbox: ``record.template``."""

    __slots__ = ("record", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        self.record = self


class SimService:
    """The parts of SandboxService that NodeMember reads, with no VM behind them."""

    def __init__(self, vcpus: int, memory_mb: int) -> None:
        from sandbox.pool import Capacity
        from sandbox.service import SandboxTable

        self.sandboxes = SandboxTable()
        self.capacity = Capacity(vcpus, memory_mb)
        self.pools: dict[str, list[str]] = {}

    def startable(self) -> dict[str, list[int]]:
        return dict(TEMPLATES)

    async def kill(self, sandbox_id: str) -> None:
        self.capacity.release(sandbox_id)
        self.sandboxes.pop(sandbox_id, None)


async def run_nodes(args: argparse.Namespace) -> None:
    from aiohttp import web

    from sandbox.cluster.etcd import Etcd
    from sandbox.cluster.keys import RESERVATION_HEADER, Layout, NodeInfo
    from sandbox.cluster.member import REFRESH, NodeMember
    from sandbox.pool import CapacityError

    etcd = Etcd([args.etcd])
    layout = Layout(PREFIX)
    rng = random.Random(7)
    members: list[NodeMember] = []
    stats = {"created": 0, "refused": 0, "killed": 0, "leases_lost": 0}
    base = f"http://127.0.0.1:{args.port}"
    for i in range(args.nodes):
        svc = SimService(args.node_vcpus, args.node_memory)
        info = NodeInfo(f"sim{i:05d}", f"{base}/n{i}", f"{base}/n{i}/proxy", peer=f"127.0.0.1:{20000 + i}",
                        cached={"base": 1.0 if rng.random() < args.cached else 0.0}, started=time.time(),
                        version="sim")
        m = NodeMember(svc, etcd, layout, info, ttl=args.ttl)
        svc.sandboxes.watchers.append(m.changed)
        members.append(m)

    leases = [await etcd.grant(args.ttl) for _ in range((args.nodes + args.lease_group - 1) // args.lease_group)]
    for i, m in enumerate(members):
        m.lease = leases[i // args.lease_group]

    async def renew(g: int) -> None:
        if await etcd.keepalive(leases[g]) > 0:
            return
        # Lost (this process was starved longer than the TTL): register the group again, as a
        # real node does, and say so in the results.
        stats["leases_lost"] += 1
        leases[g] = await etcd.grant(args.ttl)
        for m in members[g * args.lease_group:(g + 1) * args.lease_group]:
            m.lease = leases[g]
            m.republish()

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(args.ttl / 3)
            await asyncio.gather(*(renew(g) for g in range(len(leases))), return_exceptions=True)

    tasks = [asyncio.create_task(keepalive())]  # from before registering: 5,000 nodes take seconds
    gate = asyncio.Semaphore(32)

    async def register(m: NodeMember) -> None:
        async with gate:
            await m._flush()

    t0 = time.monotonic()
    await asyncio.gather(*(register(m) for m in members))
    registered_s = time.monotonic() - t0

    async def refresher(m: NodeMember) -> None:
        await asyncio.sleep(rng.random() * REFRESH)
        await m._refresher()

    tasks += [asyncio.create_task(m._flusher()) for m in members]
    stats["peer_events"] = 0

    async def follow_peers() -> None:
        """A watch on nodes/ with its decodes: the upper bound of a node's own follower
        (NodeMember._follow_members watches members/, put once per lease)."""
        async for events in etcd.watch(layout.nodes, 0):
            for ev in events:
                if ev.type == "PUT":
                    NodeInfo.decode(ev.kv.value)
            stats["peer_events"] += len(events)

    tasks += [asyncio.create_task(follow_peers()) for _ in range(args.peer_watchers)]
    if args.refresh:
        tasks += [asyncio.create_task(refresher(m)) for m in members]

    def member_of(request: web.Request) -> NodeMember:
        name = request.match_info["node"]
        if request.headers.get("X-API-KEY") != args.key:
            raise web.HTTPUnauthorized(text='{"code":401,"message":"bad key"}', content_type="application/json")
        try:
            return members[int(name[1:])]
        except (ValueError, IndexError):
            raise web.HTTPNotFound() from None

    async def create(request: web.Request) -> web.Response:
        m = member_of(request)
        doc = await request.json()
        template = doc.get("templateID", "")
        size = m.service.startable().get(template)
        if size is None:
            return web.json_response({"code": 404, "message": f"template {template!r} not found"}, status=404)
        sid = "i" + secrets.token_hex(10)
        try:
            m.service.capacity.reserve(sid, *size)
        except CapacityError as err:
            stats["refused"] += 1
            return web.json_response({"code": 429, "message": str(err)}, status=429,
                                     headers={"Should-Retry": "false"})
        m.service.sandboxes[sid] = SimSandbox(template)
        m.filled(request.headers.get(RESERVATION_HEADER))
        await m.settle()
        stats["created"] += 1
        return web.json_response({"sandboxID": sid, "templateID": template, "clientID": m.info.name,
                                  "envdVersion": "0.2.0", "node": m.info.name}, status=201)

    async def get(request: web.Request) -> web.Response:
        m = member_of(request)
        sid = request.match_info["id"]
        if sid not in m.service.sandboxes:
            return web.json_response({"code": 404, "message": f"sandbox {sid!r} not found"}, status=404)
        return web.json_response({"sandboxID": sid, "node": m.info.name, "path": request.path})

    async def kill(request: web.Request) -> web.Response:
        m = member_of(request)
        sid = request.match_info["id"]
        if sid not in m.service.sandboxes:
            return web.json_response({"code": 404, "message": f"sandbox {sid!r} not found"}, status=404)
        await m.service.kill(sid)
        await m.settle()
        stats["killed"] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{node}/sandboxes", create)
    app.router.add_get("/{node}/sandboxes/{id}", get)
    app.router.add_delete("/{node}/sandboxes/{id}", kill)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "registered_s": round(registered_s, 2), "leases": len(leases)}), flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    stats["flushes"] = sum(m.flushes for m in members)
    print(json.dumps(stats), flush=True)
    for lease in leases:
        with contextlib.suppress(Exception):
            await etcd.revoke(lease)
    await etcd.close()


# ---------------------------------------------------------------------------------------------------
# --role front: the real front in this tool's process, with probes on its event loop
# ---------------------------------------------------------------------------------------------------

class LoopProbe:
    """Where a front's event loop loses time: a coroutine sleeps 1 ms and records how much later
    it woke (the loop's lag), and for every lag over BIG how that interval was spent — running
    (CPU this thread got, ``/proc/thread-self/schedstat``), waiting for a CPU (the run queue),
    and in Python's cyclic GC (``gc.callbacks``; every collection's pause by generation)."""

    BIG = 0.005

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.big: dict[str, float] = {"n": 0, "lag_s": 0.0, "ran_s": 0.0, "runqueue_s": 0.0, "gc_s": 0.0}
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.gc_total = 0.0
        self._gc_t0 = 0.0
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # the loop's thread

    def reset(self) -> None:
        self.lags.clear()
        self.big = dict.fromkeys(self.big, 0.0)
        self.big["n"] = 0
        self.pauses = {0: [], 1: [], 2: []}

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_t0
            self.gc_total += pause
            self.pauses[info["generation"]].append(pause)

    def _sched(self) -> tuple[float, float]:
        ran, waited = os.pread(self._fd, 128, 0).split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9

    async def run(self) -> None:
        while True:
            t0, (r0, w0), g0 = time.perf_counter(), self._sched(), self.gc_total
            await asyncio.sleep(0.001)
            lag = time.perf_counter() - t0 - 0.001
            self.lags.append(lag)
            if lag > self.BIG:
                r1, w1 = self._sched()
                b = self.big
                b["n"] += 1
                b["lag_s"] += lag
                b["ran_s"] += r1 - r0
                b["runqueue_s"] += w1 - w0
                b["gc_s"] += self.gc_total - g0

    def report(self) -> dict[str, Any]:
        lags = self.lags
        out: dict[str, Any] = {
            "lag_samples": len(lags), "lag_p50_ms": round(quantile(lags, 0.5) * 1e3, 2),
            "lag_p99_ms": round(quantile(lags, 0.99) * 1e3, 2), "lag_max_ms": round(max(lags, default=0) * 1e3, 1),
            "lags_over_5ms": self.big["n"],
            # of the time lost in lags over 5 ms: running Python, waiting for a CPU, in the GC (part of running)
            "big_lag_s": {k: round(v, 3) for k, v in self.big.items() if k != "n"},
        }
        for gen, xs in self.pauses.items():
            out[f"gc{gen}"] = {"n": len(xs), "p50_ms": round(quantile(xs, 0.5) * 1e3, 3),
                               "max_ms": round(max(xs, default=0) * 1e3, 2), "sum_ms": round(sum(xs) * 1e3, 1)}
        threads: dict[str, float] = {}  # CPU seconds by thread name (the loop, gRPC's pollers, executors)
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                threads[comm] = round(threads.get(comm, 0.0) + cpu_seconds(int(tid), f"/proc/self/task/{tid}"), 2)
        out["thread_cpu_s"] = threads
        out["gc_objects_tracked"] = len(gc.get_objects())
        out["gc_frozen"] = gc.get_freeze_count()
        out["gc_threshold"] = gc.get_threshold()
        return out


async def run_probed_front(args: argparse.Namespace) -> None:
    """``cubefs sandbox api``'s own ``run_front`` (from ``--tree`` when given: the code before a
    change), with a LoopProbe; what it saw is written to ``--probe-out`` when SIGTERM ends it."""
    from sandbox.cluster import scheduler
    from sandbox.cluster.front import run_front
    from sandbox.config import ApiKeys
    if args.inflight:  # an experiment: transactions out at once (the scheduler's MAX_INFLIGHT)
        scheduler.MAX_INFLIGHT = args.inflight
    if args.hold_ms is not None:  # ... and how long the oldest is out before another goes
        scheduler.HOLD = args.hold_ms / 1e3
    probe = LoopProbe()
    gc.callbacks.append(probe.on_gc)
    ready = asyncio.Event()

    async def measure() -> None:
        await ready.wait()  # from here: the front's own start (its first listing, a GC of it) is not counted
        probe.reset()
        await probe.run()

    task = asyncio.create_task(measure())
    try:
        await run_front(args.etcd, ("127.0.0.1", args.port), ("127.0.0.1", args.proxy_port),
                        ApiKeys([args.key], "cluster_sim"), PREFIX, args.name, "spread", args.sample, ready=ready)
    finally:
        task.cancel()
        Path(args.probe_out).write_text(json.dumps(probe.report()))


# ---------------------------------------------------------------------------------------------------
# the load generator's CPU priority
# ---------------------------------------------------------------------------------------------------

def set_autogroup_nice(pid: int, nice: int) -> int | None:
    """Set the nice of ``pid``'s autogroup; what it was (None: no autogroups).  With
    ``kernel.sched_autogroup_enabled`` (this machine: 1) the scheduler first shares the CPUs
    between sessions, so a task's own nice or SCHED_IDLE only orders it within its session:
    measured here, SCHED_IDLE simulated nodes (a session of their own) left the front's event
    loop waiting in the run queue as long as before (6.3 of 20 s in lags over 5 ms)."""
    path = Path(f"/proc/{pid}/autogroup")
    try:
        was = int(path.read_text().split("nice")[1])
        path.write_text(str(nice))
    except (OSError, IndexError, ValueError):
        return None
    return was


class Priority:
    """What ``--load-priority`` and ``--load-cpus`` give the simulated nodes and the clients (this
    process): the front and etcd keep the default, as on a real cluster where the front has its
    own core.  Per thread (Linux keeps nice, policy and affinity per thread; new threads inherit
    their creator's), so it is applied to every thread there is and before the nodes' exec; and
    to their sessions' autogroups (``set_autogroup_nice``: nice 19 for 'idle')."""

    def __init__(self, mode: str, nice: int, cpus: set[int] | None) -> None:
        self.mode, self.nice, self.cpus = mode, nice, cpus

    def describe(self) -> str:
        what = {"same": "same", "nice": f"nice {self.nice}", "batch": f"SCHED_BATCH nice {self.nice}",
                "idle": "SCHED_IDLE"}[self.mode]
        return what + (f", CPUs {','.join(map(str, sorted(self.cpus)))}" if self.cpus else "")

    @property
    def group_nice(self) -> int:
        return 19 if self.mode == "idle" else self.nice if self.mode in ("nice", "batch") else 0

    def apply_group(self, pid: int) -> int | None:
        return set_autogroup_nice(pid, self.group_nice) if self.mode != "same" else None

    def apply(self, tid: int = 0) -> None:
        if self.mode == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif self.mode == "batch":
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        if self.mode in ("nice", "batch"):
            os.setpriority(os.PRIO_PROCESS, tid, self.nice)
        if self.cpus:
            os.sched_setaffinity(tid, self.cpus)

    @staticmethod
    def tids(pid: int) -> list[int]:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]

    def lower_self(self) -> list[tuple[int, int, int, set[int]]]:
        """Lower every thread of this process and its session's autogroup; what they had, for
        ``restore`` (the autogroup's as tid -1)."""
        saved = []
        group = self.apply_group(os.getpid())
        if group is not None:
            saved.append((-1, 0, group, set()))
        for tid in self.tids(os.getpid()):
            with contextlib.suppress(OSError):
                saved.append((tid, os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid),
                              os.sched_getaffinity(tid)))
                self.apply(tid)
        return saved

    @staticmethod
    def restore(saved: list[tuple[int, int, int, set[int]]]) -> None:
        for tid, policy, nice, cpus in saved:
            if tid == -1:
                set_autogroup_nice(os.getpid(), nice)
                continue
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                os.sched_setaffinity(tid, cpus)


# ---------------------------------------------------------------------------------------------------
# the orchestrator
# ---------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int, proc: str | None = None) -> float:
    try:
        with open(f"{proc or f'/proc/{pid}'}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


ETCD_METRICS = {
    "proposals": "etcd_server_proposals_committed_total",
    "events": "etcd_debugging_mvcc_events_total",
    "fsync_sum": "etcd_disk_wal_fsync_duration_seconds_sum",
    "fsync_count": "etcd_disk_wal_fsync_duration_seconds_count",
    "commit_sum": "etcd_disk_backend_commit_duration_seconds_sum",
    "commit_count": "etcd_disk_backend_commit_duration_seconds_count",
    "keys": "etcd_debugging_mvcc_keys_total",
    "db_bytes": "etcd_mvcc_db_total_size_in_bytes",
}


async def scrape(http: Any, url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    async with http.get(url, headers=headers or {}) as res:
        return parse_metrics(await res.text())


def quantile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))] if ys else 0.0


async def wait_fronts(http: Any, apis: list[str], key: str, nodes: int, procs: list[subprocess.Popen[bytes]],
                      timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for api, proc in zip(apis, procs):
        while True:
            with contextlib.suppress(Exception):
                async with http.get(api + "/health", headers={"X-API-KEY": key}) as res:
                    if res.status == 200 and (await res.json()).get("nodes") == nodes:
                        break
            if proc.poll() is not None:
                raise SystemExit(f"cluster_sim: front {api} exited with {proc.returncode} (see its log)")
            if time.monotonic() > deadline:
                raise SystemExit(f"cluster_sim: front {api} did not list {nodes} nodes in {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def drive(apis: list[str], key: str, clients: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}
    ids: list[str] = []
    deadline = time.monotonic() + seconds
    body = json.dumps({"templateID": "base", "timeout": 300}).encode()
    headers = {"X-API-KEY": key, "Content-Type": "application/json"}

    async def client(k: int, http: aiohttp.ClientSession) -> None:
        api = apis[k % len(apis)]
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                async with http.post(api + "/sandboxes", data=body, headers=headers) as res:
                    raw = await res.read()
                    status = res.status
            except aiohttp.ClientError:
                status, raw = 0, b""
            latencies.append(time.perf_counter() - t0)
            codes[status] = codes.get(status, 0) + 1
            if status == 201 and len(ids) < 20:
                ids.append(json.loads(raw)["sandboxID"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        if not clients:  # idle: what the nodes alone (refreshes, keepalives, watches) cost etcd
            await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
    return {"elapsed": elapsed, "codes": codes, "ids": ids, "e2e_p50_ms": round(quantile(latencies, 0.5) * 1e3, 2),
            "e2e_p99_ms": round(quantile(latencies, 0.99) * 1e3, 2)}


async def view_memory(endpoint: str) -> dict[str, Any]:
    """Bytes a front's view holds per node and per route: the real ClusterView, fed what etcd holds."""
    from sandbox.cluster.etcd import Etcd
    from sandbox.cluster.keys import Layout
    from sandbox.cluster.view import ClusterView

    etcd = Etcd([endpoint])
    try:
        layout = Layout(PREFIX)
        kvs, _ = await etcd.range(PREFIX)
        view = ClusterView(etcd, layout)
        nodes = [kv for kv in kvs if kv.key.startswith(layout.nodes)]
        routes = [kv for kv in kvs if kv.key.startswith(layout.sandboxes)]
        tracemalloc.start()
        b0 = tracemalloc.get_traced_memory()[0]
        for kv in nodes:
            view._put(kv)
        b1 = tracemalloc.get_traced_memory()[0]
        for kv in routes:
            view._put(kv)
        b2 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        node_value = sum(len(kv.value) for kv in nodes) / max(1, len(nodes))
        return {"view_bytes_per_node": round((b1 - b0) / max(1, len(nodes))),
                "view_bytes_per_route": round((b2 - b1) / max(1, len(routes))) if routes else None,
                "nodeinfo_json_bytes": round(node_value), "routes_in_etcd": len(routes),
                "nodes_in_etcd_after": len(nodes)}
    finally:
        await etcd.close()


def start_front(cubefs: list[str], endpoint: str, api: int, proxy: int, name: str, sample: int, key: str,
                log: Path, profile: str | None, probe_out: Path | None = None,
                tree: str | None = None, inflight: int = 0, hold_ms: float | None = None) -> subprocess.Popen[bytes]:
    if probe_out is not None:  # the same run_front, in --role front with its event loop probed
        cmd = [sys.executable, __file__, "--role", "front", "--etcd", endpoint, "--port", str(api), "--proxy-port",
               str(proxy), "--name", name, "--sample", str(sample), "--key", key, "--probe-out", str(probe_out),
               *(["--tree", tree] if tree else []), *(["--inflight", str(inflight)] if inflight else []),
               *(["--hold-ms", str(hold_ms)] if hold_ms is not None else [])]
    else:
        cmd = [*cubefs, "sandbox", "api", "--etcd", endpoint, "--etcd-prefix", PREFIX, "--api-listen",
               f"127.0.0.1:{api}", "--proxy-listen", f"127.0.0.1:{proxy}", "--name", name, "--sample", str(sample)]
    if profile:  # the console script run under cProfile (its stats are written when SIGTERM ends it)
        cmd = [sys.executable, "-m", "cProfile", "-o", profile, *cmd] if probe_out is None else \
            [sys.executable, "-m", "cProfile", "-o", profile, *cmd[1:]]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "CUBEFS_SANDBOX_API_KEY": key})


def stop_proc(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def disk_of(path: Path) -> str:
    """The filesystem and device a path lives on (``/proc/mounts``, longest matching mount)."""
    best = ("", "", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    return f"{best[2]} on {best[0]}"


async def run_case(nodes: int, fronts: int, sample: int, seconds: float, clients: int, tmpfs: bool,
                   refresh: bool, lease_group: int, profile: str | None, keep_logs: Path | None,
                   peer_watchers: int = 0, profile_nodes: str | None = None, priority: Priority | None = None,
                   probe: bool = False, tree: str | None = None, front_nice: int = 0,
                   inflight: int = 0, hold_ms: float | None = None) -> dict[str, Any]:
    import aiohttp
    from conftest import free_ports
    from etcd_cluster import EtcdCluster

    key = "e2b_" + secrets.token_hex(20)
    base = Path("/dev/shm") if tmpfs else None
    with tempfile.TemporaryDirectory(prefix="cubefs-sim-", dir=base) as tmp_text:
        tmp = Path(tmp_text)
        cluster = EtcdCluster(tmp / "etcd", 1)
        sim: subprocess.Popen[str] | None = None
        front_procs: list[subprocess.Popen[bytes]] = []
        try:
            endpoint = cluster.endpoints[0]
            etcd_pid = cluster.members[0].proc.pid  # type: ignore[union-attr]
            ports = free_ports(1 + 2 * fronts)
            t_setup = time.monotonic()
            sim = subprocess.Popen(
                [sys.executable, *(["-m", "cProfile", "-o", profile_nodes] if profile_nodes else []), __file__,
                 "--role", "nodes", "--etcd", endpoint, "--nodes", str(nodes),
                 "--port", str(ports[0]), "--key", key, "--lease-group", str(lease_group),
                 "--peer-watchers", str(peer_watchers), *([] if refresh else ["--no-refresh"])],
                stdout=subprocess.PIPE, stderr=open(tmp / "nodes.log", "ab"), text=True, start_new_session=True,
                preexec_fn=priority.apply if priority else None)
            assert sim.stdout is not None
            if priority:  # its own session (start_new_session): its own autogroup
                priority.apply_group(sim.pid)
            ready = json.loads(await asyncio.to_thread(sim.stdout.readline) or "{}")
            if not ready.get("ready"):
                raise SystemExit(f"cluster_sim: the simulated nodes did not start:\n"
                                 f"{(tmp / 'nodes.log').read_text()[-3000:]}")
            cubefs = [str(Path(sys.executable).parent / "cubefs")]
            if not Path(cubefs[0]).exists():
                raise SystemExit(f"cluster_sim: no {cubefs[0]}: run with the project's venv python")
            apis = []
            for j in range(fronts):
                api, proxy = ports[1 + 2 * j], ports[2 + 2 * j]
                front_procs.append(start_front(cubefs, endpoint, api, proxy, f"sim-front-{j}", sample, key,
                                               tmp / f"front{j}.log", profile if j == 0 else None,
                                               tmp / f"probe{j}.json" if probe else None, tree, inflight,
                                               hold_ms))
                apis.append(f"http://127.0.0.1:{api}")
            async with aiohttp.ClientSession() as http:
                await wait_fronts(http, apis, key, nodes, front_procs)
                if front_nice:  # the front and etcd above everything else on the machine (root only)
                    for pid in [etcd_pid, *(p.pid for p in front_procs)]:
                        set_autogroup_nice(pid, front_nice)
                        for tid in Priority.tids(pid):
                            with contextlib.suppress(OSError):
                                os.setpriority(os.PRIO_PROCESS, tid, front_nice)
                setup_s = time.monotonic() - t_setup
                etcd_url = endpoint + "/metrics"
                e0 = await scrape(http, etcd_url)
                pids = {"front": [p.pid for p in front_procs], "etcd": [etcd_pid], "nodes": [sim.pid],
                        "clients": [os.getpid()]}
                saved = priority.lower_self() if priority else []  # the clients, from here on
                try:
                    c0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                    load0 = os.getloadavg()[0]
                    load = await drive(apis, key, clients, seconds)
                    c1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                finally:
                    Priority.restore(saved)
                e1 = await scrape(http, etcd_url)
                fm = [await scrape(http, a + "/metrics", {"X-API-KEY": key}) for a in apis]
                check = "no sandbox created"
                if load["ids"]:
                    sid = load["ids"][0]
                    async with http.get(f"{apis[-1]}/sandboxes/{sid}", headers={"X-API-KEY": key}) as res:
                        doc = await res.json() if res.status == 200 else {}
                        check = (f"ok: GET {apis[-1]}/sandboxes/{sid} -> {doc.get('path')}" if res.status == 200
                                 else f"FAILED: HTTP {res.status}")
                rss = [rss_mb(p.pid) for p in front_procs]
            for p in front_procs:
                stop_proc(p)
            probes = [json.loads(f.read_text()) for j in range(fronts) if (f := tmp / f"probe{j}.json").exists()]
            mem = await view_memory(endpoint)
            stop_proc(sim)
            sim_stats = json.loads((sim.stdout.read().strip().splitlines() or ["{}"])[-1])
        finally:
            for p in front_procs:
                stop_proc(p)
            stop_proc(sim)
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, keep_logs / log.name)
                for log in (tmp / "etcd").glob("*.log"):
                    shutil.copy(log, keep_logs / ("etcd-" + log.name))
            cluster.close()

    elapsed = load["elapsed"]
    placed = sum(f.get("cubefs_front_placed_total", 0) for f in fm)
    cpu = {k: round(c1[k] - c0[k], 2) for k in c0}

    def d(name: str) -> float:
        return e1.get(ETCD_METRICS[name], 0.0) - e0.get(ETCD_METRICS[name], 0.0)

    def fq(name: str, q: str) -> float | None:  # None: a front before the metric
        vals = [v for f in fm if (v := f.get(f'cubefs_front_{name}_seconds{{quantile="{q}"}}')) is not None]
        return round(max(vals) * 1e3, 2) if vals else None

    out: dict[str, Any] = {
        "nodes": nodes, "fronts": fronts, "sample": sample, "clients": clients, "seconds": round(elapsed, 1),
        "etcd_disk": "tmpfs (/dev/shm): no fsync cost" if tmpfs else disk_of(Path(tempfile.gettempdir())),
        "refresh": refresh, "lease_group": lease_group, "peer_watchers": peer_watchers, "setup_s": round(setup_s, 1),
        "loadavg_before_after": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "registered_s": ready.get("registered_s"),
        "placements_per_s": round(placed / elapsed, 1), "placed": int(placed), "codes": load["codes"],
        "decision_p50_ms": fq("decision", "0.5"), "decision_p99_ms": fq("decision", "0.99"),
        "front_create_p50_ms": fq("create", "0.5"), "front_create_p99_ms": fq("create", "0.99"),
        "e2e_p50_ms": load["e2e_p50_ms"], "e2e_p99_ms": load["e2e_p99_ms"],
        "conflicts": int(sum(f.get("cubefs_front_reservation_conflicts_total", 0) for f in fm)),
        "refused_by_node": int(sum(f.get("cubefs_front_refused_total", 0) for f in fm)),
        # Group commit (sandbox/cluster/scheduler.py): reservations per transaction (absent: a front before it).
        "reservations_per_txn": round(sum(f.get("cubefs_front_reservations_total", 0) for f in fm)
                                      / txns, 2) if (txns := sum(f.get("cubefs_front_reservation_txns_total", 0)
                                                                  for f in fm)) else None,
        "etcd_proposals_per_placement": round(d("proposals") / placed, 2) if placed else None,
        "cpu_s": cpu,
        "cpu_ms_per_placement": {k: round(v / placed * 1e3, 2) if placed else None for k, v in cpu.items()},
        "etcd_proposals_per_s": round(d("proposals") / elapsed, 1),
        "etcd_watch_events_per_s": round(d("events") / elapsed, 1),
        "etcd_wal_fsync_ms": round(d("fsync_sum") / d("fsync_count") * 1e3, 3) if d("fsync_count") else None,
        "etcd_fsyncs_per_s": round(d("fsync_count") / elapsed, 1),
        "etcd_keys": int(e1.get(ETCD_METRICS["keys"], 0)), "etcd_db_mb": round(e1.get(ETCD_METRICS["db_bytes"], 0)
                                                                                / 2**20, 1),
        "front_rss_mb": [round(r, 1) for r in rss], "sim_nodes": sim_stats, "path_prefix_forwarding": check,
        "load_priority": priority.describe() if priority else "same", "front_tree": tree or str(ROOT),
        "front_nice": front_nice, "inflight": inflight or None, "hold_ms": hold_ms,
        # after the choice: the wait for the transaction out before a decision's own, and its round trip
        "decision_wait_p50_ms": fq("decision_wait", "0.5"), "decision_wait_p99_ms": fq("decision_wait", "0.99"),
        "txn_p50_ms": fq("reservation_txn", "0.5"), "txn_p99_ms": fq("reservation_txn", "0.99"),
        "resume_p50_ms": fq("decision_resume", "0.5"), "resume_p99_ms": fq("decision_resume", "0.99"),
        "front_probe": probes,
        **mem,
    }
    return out


# (nodes, fronts, sample, tmpfs, refresh, clients or None for --clients, peer watchers).  At 5,000
# nodes the simulated nodes' 15-s republishing (333 txns/s from one process) starved this 2-core
# machine (leases lapsed), so those rows go without it; the last two rows have no clients: what
# 1,000 idle nodes cost etcd, without and with 100 of them watching nodes/ for their peers.
CASES = [
    (1000, 1, 0, False, True, None, 0), (1000, 1, 0, True, True, None, 0), (1000, 1, 16, False, True, None, 0),
    (5000, 1, 0, False, False, None, 0), (5000, 1, 16, False, False, None, 0), (5000, 2, 0, False, False, None, 0),
    (5000, 2, 16, False, False, None, 0), (1000, 1, 16, False, True, 0, 0), (1000, 1, 16, False, True, 0, 100),
]


def row(r: dict[str, Any]) -> str:
    cpu = r["cpu_ms_per_placement"]
    return (f"| {r['nodes']:>5} | {r['fronts']} | {r['sample'] or 'all':>3} | "
            f"{'tmpfs' if r['etcd_disk'].startswith('tmpfs') else 'disk'}{'' if r['refresh'] else ', no refresh'}"
            f"{'' if r['clients'] else ', idle'}{f', {w} peer watches' if (w := r['peer_watchers']) else ''} | "
            f"{r['placements_per_s']:>6} | "
            f"{r['decision_p50_ms']} / {r['decision_p99_ms']} | {r['e2e_p50_ms']} / {r['e2e_p99_ms']} | "
            f"{r['conflicts']} | {cpu['front']} | {cpu['etcd']} | {cpu['nodes']} | {r['etcd_proposals_per_s']} | "
            f"{r['cpu_s']['etcd'] / r['seconds']:.2f} |")


HEADER = ("| nodes | fronts | K | etcd | placements/s | decision p50 / p99 ms | client create p50 / p99 ms | "
          "conflicts | CPU ms per placement: front | etcd | sim nodes | etcd proposals/s | etcd cores |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


LATENCY_HEADER = ("| front code | load generator | front nice | placements/s | decision p50 / p99 ms | wait for the "
                  "txn out p50 / p99 | own txn p50 / p99 | loop lag p99 / max ms | lags > 5 ms: s lost, in run queue, "
                  "in GC | GC gen-2: n, max ms | load |\n|---|---|---|---|---|---|---|---|---|---|---|")


def latency_row(r: dict[str, Any]) -> str:
    """docs/benchmarks.md's decision-latency table (a --probe run)."""
    p = (r.get("front_probe") or [{}])[0]
    big = p.get("big_lag_s", {})
    g2 = p.get("gc2", {})
    return (f"| {Path(r['front_tree']).name} | {r['load_priority']} | {r['front_nice']} | {r['placements_per_s']} | "
            f"{r['decision_p50_ms']} / {r['decision_p99_ms']} | {r['decision_wait_p50_ms']} / "
            f"{r['decision_wait_p99_ms']} | {r['txn_p50_ms']} / {r['txn_p99_ms']} | {p.get('lag_p99_ms')} / "
            f"{p.get('lag_max_ms')} | {big.get('lag_s')}, {big.get('runqueue_s')}, {big.get('gc_s')} | "
            f"{g2.get('n')}, {g2.get('max_ms')} | {r['loadavg_before_after'][0]} / {r['loadavg_before_after'][1]} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("bench", "nodes", "front"), default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    ap.add_argument("--fronts", type=int, default=1, help="fronts (cubefs sandbox api processes; default 1)")
    ap.add_argument("--sample", type=int, default=0, metavar="K",
                    help="best-of-K scoring (default 0: all nodes, as the table's 'all' rows; a front "
                    "started without --sample scores all up to 256 nodes and 16 above)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the clients create (default 20)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--tmpfs", action="store_true", help="etcd's data dir on /dev/shm (no fsync cost)")
    ap.add_argument("--no-refresh", dest="refresh", action="store_false",
                    help="the simulated nodes do not republish every 15 s")
    ap.add_argument("--lease-group", type=int, default=100, help="simulated nodes per shared lease (default 100)")
    ap.add_argument("--peer-watchers", type=int, default=0, metavar="W",
                    help="W simulated nodes also watch nodes/ (the upper bound of a real node's watch of members/) "
                    "(default 0: that fan-out is measured on its own, see docs/benchmarks.md)")
    ap.add_argument("--cases", choices=("one", "all"), default="one",
                    help="'all': the table of docs/benchmarks.md (1,000 and 5,000 nodes, 1 and 2 fronts, "
                    "best-of-16 vs all, disk vs tmpfs)")
    ap.add_argument("--profile", metavar="FILE", help="run the (first) front under cProfile, stats to FILE")
    ap.add_argument("--profile-nodes", metavar="FILE", help="run the simulated nodes under cProfile, stats to FILE")
    ap.add_argument("--logs", metavar="DIR", help="keep the fronts', nodes' and etcd's logs here")
    ap.add_argument("--load-priority", choices=("same", "nice", "batch", "idle"), default="same",
                    help="the simulated nodes' and the clients' CPU priority against the front's and etcd's: "
                    "'same' (default, as before), 'nice' (--load-nice), 'batch' (SCHED_BATCH and --load-nice), "
                    "'idle' (SCHED_IDLE)")
    ap.add_argument("--load-nice", type=int, default=10, metavar="N", help="nice for 'nice'/'batch' (default 10)")
    ap.add_argument("--load-cpus", metavar="LIST", help="pin the simulated nodes and clients to these CPUs (0,1)")
    ap.add_argument("--probe", action="store_true",
                    help="run the fronts in this tool (--role front) with an event-loop lag and GC pause probe")
    ap.add_argument("--tree", metavar="DIR", help="with --probe: the fronts' sandbox package from this checkout "
                    "(a git worktree of the commit before, for before/after in turns)")
    ap.add_argument("--front-nice", type=int, default=0, metavar="N",
                    help="renice the front(s) and etcd to N once up (negative: above other people's load; root)")
    ap.add_argument("--inflight", type=int, default=0, metavar="N",
                    help="with --probe: the fronts' reservation transactions out at once (default: the code's)")
    ap.add_argument("--hold-ms", type=float, metavar="MS",
                    help="with --probe: how long the oldest transaction is out before another goes (the "
                    "scheduler's HOLD; with --inflight 2)")
    ap.add_argument("--json", action="store_true")
    # --role nodes
    ap.add_argument("--etcd", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--proxy-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--ttl", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--cached", type=float, default=0.1, help="fraction of nodes with the image cached (0.1)")
    ap.add_argument("--node-vcpus", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--node-memory", type=int, default=262144, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    if args.role == "nodes":
        asyncio.run(run_nodes(args))
        return 0
    if args.role == "front":
        asyncio.run(run_probed_front(args))
        return 0
    if (args.tree or args.inflight or args.hold_ms is not None) and not args.probe:
        ap.error("--tree and --inflight need --probe (the console script runs this checkout's code as it is)")
    priority = None
    if args.load_priority != "same" or args.load_cpus:
        cpus = {int(c) for c in args.load_cpus.split(",")} if args.load_cpus else None
        priority = Priority(args.load_priority, args.load_nice, cpus)
    if etcd_binary() is None:
        print("cluster_sim: etcd is not installed (no 'etcd' on PATH or /usr/bin/etcd): "
              "scripts/setup.sh installs Debian's etcd-server", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    cases = CASES if args.cases == "all" else [(args.nodes, args.fronts, args.sample, args.tmpfs, args.refresh, None,
                                                args.peer_watchers)]
    results = []
    failed = 0
    for nodes, fronts, sample, tmpfs, refresh, clients, watchers in cases:
        try:
            r = asyncio.run(run_case(nodes, fronts, sample, args.seconds,
                                     args.clients if clients is None else clients, tmpfs, refresh,
                                     args.lease_group, args.profile, Path(args.logs) if args.logs else None,
                                     watchers, args.profile_nodes, priority, args.probe, args.tree,
                                     args.front_nice, args.inflight, args.hold_ms))
        except SystemExit as err:
            if len(cases) == 1:
                raise
            failed += 1
            print(f"case {nodes} nodes, {fronts} fronts, K={sample}: {err}", file=sys.stderr, flush=True)
            continue
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)  # as it comes: a long matrix shows progress
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
    elif args.probe:
        print(LATENCY_HEADER)
        for r in results:
            print(latency_row(r))
    else:
        print(HEADER)
        for r in results:
            print(row(r))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
