"""A real front (sandbox.cluster.front.Front, its API served on loopback) on a real etcd, in
front of nodes that misbehave on purpose: one refuses (429, as a node whose own bin-packing
disagrees), one accepts the connection and never answers, one stops being there.  The nodes
are small fakes registered as node records (the fault is what is injected: a real node does
neither on demand); the cluster with real nodes and VMs is tests/test_cluster.py.

Also etcd that stops answering (SIGSTOP of every member: not a refusal, which fails at once,
but silence): a create must get its 503 within the front's placement deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from conftest import free_ports
from etcd_cluster import EtcdCluster, etcd1, etcd3  # noqa: F401 (fixtures)

from sandbox.cluster import front as front_mod
from sandbox.cluster.etcd import Etcd
from sandbox.cluster.front import Front
from sandbox.cluster.keys import RESERVATION_HEADER, Layout, NodeInfo
from sandbox.config import ApiKeys

KEY = "e2b_cluster_front_test_key"
NODE_TIMEOUT = 1.0  # seconds the front waits for a node that accepted and hangs


class FakeNode:
    """One node's API: ``refuse`` (429 with Should-Retry: false, as a full node answers),
    ``busy`` (503 with Retry-After, as a node whose restore queue is full answers),
    ``hang`` (accepts the connection, reads the request, never answers), ``dead`` (nothing
    listens on its port: the connection is refused) or ``accept`` (201,
    and deletes the reservation it filled, as a node does in the transaction that publishes
    the sandbox)."""

    def __init__(self, name: str, mode: str, etcd: Etcd, layout: Layout) -> None:
        self.name, self.mode, self.etcd, self.layout = name, mode, etcd, layout
        self.port = free_ports(1)[0]
        self.reservations: list[str] = []  # the reservation IDs its creates carried, in order
        self.connections = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._hung: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.mode == "dead":
            return
        if self.mode == "hang":
            self._server = await asyncio.start_server(self._hang, "127.0.0.1", self.port)
            return
        app = web.Application()
        app.router.add_post("/v2/sandboxes", self._create)
        app.router.add_get("/v2/sandboxes/{id}", self._get)
        app.router.add_get("/sandboxes/{id}", self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._hung.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.decode().split("\r\n"):
            if line.lower().startswith(RESERVATION_HEADER.lower() + ":"):
                self.reservations.append(line.split(":", 1)[1].strip())
        await reader.read()  # until the front gives up and closes; no answer is ever written

    async def _create(self, request: web.Request) -> web.Response:
        self.connections += 1
        rid = request.headers.get(RESERVATION_HEADER, "")
        self.reservations.append(rid)
        if self.mode == "refuse":
            return web.json_response({"code": 429, "message": f"node {self.name} is full"}, status=429,
                                     headers={"Should-Retry": "false"})
        if self.mode == "busy":  # its restore queue is full (sandbox/admission.py): 503, nothing made
            return web.json_response({"code": 503, "message": f"node {self.name}: restore queue full"}, status=503,
                                     headers={"Retry-After": "7"})
        await self.etcd.delete(self.layout.reservation(self.name, rid))
        sid = f"sbx{self.name}{len(self.reservations)}"
        return web.json_response({"sandboxID": sid, "templateID": "base", "clientID": self.name}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response({"sandboxID": request.match_info["id"], "node": self.name})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            self._server.close()
            for w in self._hung:
                w.close()
            await self._server.wait_closed()


def record(n: FakeNode, pool: int = 0, cached: float = 0.0, free_mb: int = 8192) -> NodeInfo:
    return NodeInfo(n.name, n.url, n.url, vcpus=64, memory_mb=8192, used_mb=8192 - free_mb,
                    templates={"base": [1, 512]}, pools={"base": pool}, cached={"base": cached})


@asynccontextmanager
async def running_front(etcd: EtcdCluster, layout: Layout, nodes: list[tuple[FakeNode, NodeInfo]],
                        **kw: float) -> AsyncIterator[tuple[Front, Callable[..., object]]]:
    """The fakes started and registered, a Front serving its API on loopback; yields the front
    and ``post()`` (a create through its API: (status, JSON body, seconds it took))."""
    client = Etcd(etcd.endpoints)
    for n, info in nodes:
        await n.start()
        await client.put(layout.node(n.name), info.encode())
    front = Front(Etcd(etcd.endpoints), layout, "test-front", **kw)  # type: ignore[arg-type]
    await front.start()
    runner = web.AppRunner(front.api_app(ApiKeys([KEY], "test")), access_log=None)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    http = aiohttp.ClientSession(headers={"X-API-KEY": KEY})

    async def post() -> tuple[int, dict[str, object], float]:
        t0 = time.monotonic()
        async with http.post(f"http://127.0.0.1:{port}/v2/sandboxes", json={"templateID": "base"},
                             timeout=aiohttp.ClientTimeout(total=60)) as res:
            front.last_headers = res.headers  # type: ignore[attr-defined]
            return res.status, await res.json(), time.monotonic() - t0

    front.get = lambda path: http.get(f"http://127.0.0.1:{port}{path}")  # type: ignore[attr-defined]
    try:
        yield front, post
    finally:
        await http.close()
        await runner.cleanup()
        await front.close()
        await front.etcd.close()
        for n, _ in nodes:
            await n.close()
        await client.close()


async def metrics(front: Front) -> dict[str, float]:
    async with front.get("/metrics") as res:  # type: ignore[attr-defined]
        text = await res.text()
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and line[0] != "#")
            if "{" not in k}


async def reservations(client: Etcd, layout: Layout) -> list[str]:
    return [kv.key for kv in (await client.range(layout.reservations))[0]]


async def eventually(what: str, check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


def test_a_refusing_node_and_a_dead_one_send_the_create_on(etcd1: EtcdCluster) -> None:  # noqa: F811
    """The best-scored node (a ready pool) refuses, the second (most cached) is down (its port
    refuses the connection): the create lands on the third at once; /metrics counts one
    refusal and one unreachable node; the two unfilled reservations are deleted (from etcd and
    from the front's own count)."""
    async def main() -> None:
        lay = Layout("/refuse/")
        client = Etcd(etcd1.endpoints)
        full, silent, good = (FakeNode(n, m, client, lay) for n, m in
                              (("full", "refuse"), ("silent", "dead"), ("good", "accept")))
        nodes = [(full, record(full, pool=1, free_mb=2048)), (silent, record(silent, cached=0.9, free_mb=4096)),
                 (good, record(good))]
        try:
            async with running_front(etcd1, lay, nodes, node_timeout=NODE_TIMEOUT) as (front, post):
                status, doc, took = await post()  # type: ignore[misc]
                assert status == 201 and doc["clientID"] == "good", (status, doc)
                assert took < NODE_TIMEOUT + 1.5, took
                assert [full.connections, silent.connections, good.connections] == [1, 0, 1]
                rids = [full.reservations[0], good.reservations[0]]
                assert len(set(rids)) == 2 and all(rids), rids
                m = await metrics(front)
                assert (m["cubefs_front_refused_total"], m["cubefs_front_unreachable_total"],
                        m["cubefs_front_placed_total"]) == (1, 1, 1), m
                await eventually("the unfilled reservations deleted", lambda: _none_left(client, lay), 5)
                assert not any(front.view.reserved.get(n) for n in ("full", "silent", "good")), front.view.reserved
                assert front.view.routes.get(str(doc["sandboxID"])) == "good"
        finally:
            await client.close()

    asyncio.run(main())


def test_a_node_whose_restore_queue_is_full_sends_the_create_on(etcd1: EtcdCluster) -> None:  # noqa: F811
    """The best-scored node answers 503 (its restore queue is full: it made nothing): the create
    lands on the next node at once, counted as a refusal; with every node busy the front answers
    503 with the soonest Retry-After (not "no room": a retry later may land)."""
    async def main() -> None:
        lay = Layout("/busy/")
        client = Etcd(etcd1.endpoints)
        busy, good = FakeNode("busy", "busy", client, lay), FakeNode("good", "accept", client, lay)
        nodes = [(busy, record(busy, pool=1, free_mb=4096)), (good, record(good))]
        try:
            async with running_front(etcd1, lay, nodes, node_timeout=NODE_TIMEOUT) as (front, post):
                status, doc, _took = await post()  # type: ignore[misc]
                assert status == 201 and doc["clientID"] == "good", (status, doc)
                assert [busy.connections, good.connections] == [1, 1]
                m = await metrics(front)
                assert (m["cubefs_front_refused_total"], m["cubefs_front_placed_total"]) == (1, 1), m
                await eventually("the unfilled reservation deleted", lambda: _none_left(client, lay), 5)
                good.mode = "busy"  # now every node is busy: 503 with the soonest Retry-After, not "no room"
                status, doc, _took = await post()  # type: ignore[misc]
                retry = front.last_headers.get("Retry-After")  # type: ignore[attr-defined]
                assert status == 503 and retry == "7" and "busy" in str(doc["message"]), (status, retry, doc)
        finally:
            await client.close()

    asyncio.run(main())


def test_a_node_that_took_the_create_and_hangs_is_504_not_a_second_sandbox(etcd1: EtcdCluster) -> None:  # noqa: F811
    """The best node accepts the create and never answers: after the node timeout the front
    answers 504 saying the node may still make it, and asks no other node (a second sandbox
    would be an orphan nobody holds); the reservation is deleted."""
    async def main() -> None:
        lay = Layout("/hang/")
        client = Etcd(etcd1.endpoints)
        silent, good = (FakeNode(n, m, client, lay) for n, m in (("silent", "hang"), ("good", "accept")))
        nodes = [(silent, record(silent, pool=1)), (good, record(good))]
        try:
            async with running_front(etcd1, lay, nodes, node_timeout=NODE_TIMEOUT) as (front, post):
                status, doc, took = await post()  # type: ignore[misc]
                assert status == 504 and "may still make" in str(doc["message"]), (status, doc)
                assert NODE_TIMEOUT <= took < NODE_TIMEOUT + 1.5, took
                assert [silent.connections, good.connections] == [1, 0]
                m = await metrics(front)
                assert (m["cubefs_front_unreachable_total"], m["cubefs_front_placed_total"]) == (1, 0), m
                await eventually("the reservation deleted", lambda: _none_left(client, lay), 5)
        finally:
            await client.close()

    asyncio.run(main())


async def _none_left(client: Etcd, layout: Layout) -> bool:
    return await reservations(client, layout) == []


def test_every_candidate_refusing_is_503_after_the_attempts(etcd1: EtcdCluster) -> None:  # noqa: F811
    """Four nodes, all full by their own count: the create is offered to ATTEMPTS (3) of them,
    then answered 503; nothing stays reserved."""
    async def main() -> None:
        lay = Layout("/allfull/")
        client = Etcd(etcd1.endpoints)
        fakes = [FakeNode(f"f{i}", "refuse", client, lay) for i in range(4)]
        try:
            async with running_front(etcd1, lay, [(f, record(f)) for f in fakes]) as (front, post):
                status, doc, _took = await post()  # type: ignore[misc]
                assert status == 503 and "3 tried" in str(doc["message"]), (status, doc)
                assert sorted(f.connections for f in fakes) == [0, 1, 1, 1]
                m = await metrics(front)
                assert m["cubefs_front_refused_total"] == 3 and m["cubefs_front_no_room_total"] == 1, m
                await eventually("every reservation deleted", lambda: _none_left(client, lay), 5)
        finally:
            await client.close()

    asyncio.run(main())


def _signal_all(etcd: EtcdCluster, sig: int) -> None:
    for m in etcd.members:
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, sig)


def test_etcd_that_stops_answering_fails_creates_within_the_deadline(etcd3: EtcdCluster) -> None:  # noqa: F811
    """Every member of a three-member etcd stopped (SIGSTOP: connections stay open, nothing
    answers): creates through the front are 503 "does not answer" within ~3 s (the placement's
    2.5 s deadline; it was ~9 s: the reservation's 2 s, then a read-back failing over three
    silent members), a sandbox already placed is still routed, and once etcd runs again
    creates succeed by themselves and no reservation stays behind."""
    async def main() -> None:
        lay = Layout("/stopped/")
        client = Etcd(etcd3.endpoints)
        good = FakeNode("good", "accept", client, lay)
        try:
            async with running_front(etcd3, lay, [(good, record(good))]) as (front, post):
                status, doc, _ = await post()  # type: ignore[misc]
                assert status == 201, doc
                placed = str(doc["sandboxID"])
                await eventually("the route in the view", lambda: front.view.routes.get(placed), 5)
                _signal_all(etcd3, signal.SIGSTOP)
                try:
                    for _ in range(2):  # the second after the first moved the client on: no faster path
                        status, doc, took = await post()  # type: ignore[misc]
                        assert status == 503 and "does not answer" in str(doc["message"]), (status, doc)
                        assert took < front_mod.PLACE_DEADLINE + 0.5, took
                    async with front.get(f"/sandboxes/{placed}") as res:  # type: ignore[attr-defined]
                        assert res.status == 200 and (await res.json())["node"] == "good"
                finally:
                    _signal_all(etcd3, signal.SIGCONT)
                deadline = time.monotonic() + 20
                while True:
                    status, doc, _ = await post()  # type: ignore[misc]
                    if status == 201 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert status == 201, doc
                # what the failed creates' transactions may have written is deleted once etcd answers
                await eventually("no reservation left", lambda: _none_left(client, lay), 15)
                m = await metrics(front)  # the two, and any the retries above met while etcd came back
                assert m["cubefs_front_etcd_unavailable_total"] >= 2, m
        finally:
            _signal_all(etcd3, signal.SIGCONT)
            await client.close()

    asyncio.run(main())
