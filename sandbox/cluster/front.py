"""``cubefs sandbox api --etcd URL``: a stateless front — the E2B API and proxy for a whole cluster.

Run as many as you like behind one address: a front keeps nothing that is
not in etcd.  It reads a watched copy of the cluster (:mod:`sandbox.cluster.view`),
places creates (:mod:`sandbox.cluster.scheduler`) and forwards everything
else to the node that runs the sandbox (:mod:`sandbox.cluster.forward`):

* ``POST /sandboxes`` (and ``/v2``): rank the nodes, reserve on the best in one
  etcd transaction, forward the create with the reservation's ID; a node that
  refuses (429: its own bin-packing disagrees) or cannot be reached sends it to
  the next candidate, ``ATTEMPTS`` times at most (one that took it and hangs is a
  504: it may still make the sandbox);
* ``/sandboxes/{id}/…``: to the node the route names; an unknown sandbox is
  404, as on a node;
* lists (sandboxes, templates, snapshots) are asked of every node at once and
  merged;
* the proxy routes ``PORT-ID.DOMAIN`` or the ``E2b-Sandbox-*`` headers to the
  sandbox's node's proxy; unknown → 502 "The sandbox was not found".

Every front and node of a cluster accepts the same API keys: the front checks
the caller's key and forwards it, so a node never trusts a front more than it
trusts a caller.

etcd unreachable: creates fail at once with 503 (a placement needs its
reservation transaction); everything else keeps being served from the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from cubefs.errors import UsageError
from sandbox import api as node_api
from sandbox import proxy as node_proxy
from sandbox.cluster import forward as fwd
from sandbox.cluster import heap
from sandbox.cluster.etcd import Etcd, EtcdError, EtcdUnavailable, LeaseKeeper
from sandbox.cluster.keys import RESERVATION_HEADER, Layout, NodeInfo
from sandbox.cluster.latency import Latency
from sandbox.cluster.scheduler import Scheduler
from sandbox.cluster.view import ClusterView
from sandbox.config import ApiKeys

log = logging.getLogger("cubefs.sandbox.front")

ATTEMPTS = 3  # nodes a create is offered to before it fails
LEASE_TTL = 10  # seconds a killed front's reservations outlive it
# Seconds a create may wait on etcd in all (its reservation's transaction, a read-back of an
# unknown outcome, re-decisions after conflicts) before it is 503: the transaction's own 2 s
# (the etcd client's timeout, one member that does not answer) and half a second to read back
# from another.  Without it, an etcd that stopped answering (SIGSTOP: not refusing) held a
# create ~9 s (2 s transaction, then a read-back failing over three members at 2 s each).
PLACE_DEADLINE = 2.5
# Seconds a node may take to answer a create it took before the front answers 504 (not the next
# candidate: the node may still make the sandbox, and a second would be an orphan).  A create
# queued behind others' VM restores takes seconds (a burst of 20 on three nodes: p99 11.3 s,
# docs/benchmarks.md), so this bounds a node that accepted and hangs, not a slow one; the
# node drops a queued create whose caller went away (sandbox/admission.py).
NODE_TIMEOUT = 60.0
error = node_api.error


class Stats:
    def __init__(self) -> None:
        self.placed = 0
        self.refused = 0  # a node said 429
        self.unreachable = 0
        self.failed = 0
        self.no_room = 0
        self.etcd_down = 0
        self.decisions = Latency()  # seconds from request to reservation
        self.creates = Latency()  # seconds from request to the node's answer


class Front:
    def __init__(self, etcd: Etcd, layout: Layout, name: str, policy: str = "spread", sample: int | None = None,
                 domain: str | None = None, lease_ttl: int = LEASE_TTL, place_deadline: float = PLACE_DEADLINE,
                 node_timeout: float = NODE_TIMEOUT) -> None:
        self.etcd = etcd
        self.place_deadline = place_deadline
        self.node_timeout = node_timeout
        self.layout = layout
        self.name = name
        self.domain = domain
        self.view = ClusterView(etcd, layout)
        self.keeper = LeaseKeeper(etcd, lease_ttl)
        self.scheduler = Scheduler(self.view, etcd, layout, name, lambda: self.keeper.lease, policy, sample)
        self.stats = Stats()
        self.http: aiohttp.ClientSession | None = None
        self.idempotent: dict[str, tuple[float, asyncio.Future[web.StreamResponse]]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        self.http = fwd.session()
        await self.view.start()
        await self.keeper.start()

    async def close(self) -> None:
        await self.scheduler.close()
        await self.view.close()
        with contextlib.suppress(EtcdError):
            await self.keeper.stop(revoke=True)
        if self.http is not None:
            await self.http.close()

    # -- the API ---------------------------------------------------------------------
    def api_app(self, keys: ApiKeys) -> web.Application:
        app = web.Application(middlewares=[node_api._errors, node_api._auth(keys)],
                              client_max_size=node_api.MAX_BODY)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_post("/sandboxes", self.create)
        r.add_post("/v2/sandboxes", self.create)
        r.add_get("/sandboxes", self.list_sandboxes)
        r.add_get("/v2/sandboxes", self.list_sandboxes)
        r.add_get("/templates", self.templates)
        r.add_delete("/templates/{id}", self.delete_template)
        r.add_get("/snapshots", self.snapshots)
        r.add_get("/sandboxes/metrics", self.usage_of_many)  # before /sandboxes/{id}
        r.add_route("*", "/sandboxes/{id}", self.to_sandbox)
        r.add_route("*", "/sandboxes/{id}/{tail:.*}", self.to_sandbox)
        r.add_route("*", "/v2/sandboxes/{id}/{tail:.*}", self.to_sandbox)
        return app

    def proxy_app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        return app

    async def health(self, request: web.Request) -> web.Response:
        v = self.view
        return web.json_response({"status": "ok" if v.connected else "degraded", "front": self.name,
                                  "nodes": len(v.nodes), "sandboxes": len(v.routes), "etcd": v.connected,
                                  "revision": v.revision})

    async def create(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            doc = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the request body is not valid JSON") from None
        template = doc.get("templateID") if isinstance(doc, dict) else None
        if not isinstance(template, str) or not template:
            raise UsageError("templateID is required")
        key = request.headers.get("Idempotency-Key")
        if not key:
            return await self._place(request, raw, template)
        # A retried create (same key) gets the answer of the first attempt, never a second sandbox.
        now = time.monotonic()
        for k in [k for k, (t, _) in self.idempotent.items() if now - t > node_api.IDEMPOTENCY_SECONDS]:
            del self.idempotent[k]
        if key in self.idempotent:
            first = await asyncio.shield(self.idempotent[key][1])
            body = getattr(first, "body", None)
            return web.Response(status=first.status, body=body, content_type="application/json")
        fut: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()
        self.idempotent[key] = (now, fut)
        try:
            res = await self._place(request, raw, template)
        except BaseException as err:
            self.idempotent.pop(key, None)
            fut.set_exception(err)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        fut.set_result(res)
        return res

    async def _place(self, request: web.Request, raw: bytes, template: str) -> web.StreamResponse:
        t0 = time.monotonic()
        deadline = t0 + self.place_deadline  # for what etcd does for this create, until a node is asked
        size = self.scheduler.size_of(template)
        if size is None:
            return error(404, f"template {template!r} not found on any node of the cluster "
                              f"({len(self.view.nodes)} nodes)")
        tried: set[str] = set()
        busy: list[int] = []  # Retry-After of the nodes whose restore queue was full
        conflicts = 0
        while len(tried) < ATTEMPTS:
            ranked = self.scheduler.rank(template, *size, exclude=tried, limit=1)
            if not ranked:
                break
            node = ranked[0]
            try:
                rid = await self.scheduler.reserve(node, template, *size, deadline=deadline)
            except EtcdUnavailable as err:
                self.stats.etcd_down += 1
                return error(503, f"the cluster's store does not answer ({err}): creates are refused until it "
                                  "does; running sandboxes are still served")
            if rid is None:
                conflicts += 1
                if conflicts > 20:
                    return error(503, "placement kept conflicting with other fronts: retry")
                continue
            self.stats.decisions.add(time.monotonic() - t0)
            tried.add(node.name)
            res = None
            try:
                res = await self._create_on(request, node, raw, rid, busy)
            finally:
                # A node that made the sandbox deleted the reservation in the transaction that
                # published it: a delete from here too would be one more etcd write per create
                # (a third of them, tools/bench/cluster_sim.py) for nothing.
                if res is None or not 200 <= res.status < 300:
                    self._background(self._release(node.name, rid))
            if res is not None:
                self.stats.creates.add(time.monotonic() - t0)
                return res
            deadline = time.monotonic() + self.place_deadline  # the next candidate's reservation: afresh
        self.stats.no_room += 1
        if busy:  # room, but not soon enough: a retry later may land
            return error(503, f"the nodes that could take a sandbox of template {template!r} are busy (their restore "
                              f"queues are full): {len(tried)} tried", headers={"Retry-After": str(min(busy))})
        return error(503, f"no node of the cluster can take a sandbox of template {template!r} "
                          f"({size[0]} vCPU, {size[1]} MiB): {len(self.view.nodes)} nodes, "
                          f"{len(tried)} tried", headers={"Should-Retry": "false"} if not tried else None)

    async def _create_on(self, request: web.Request, node: NodeInfo, raw: bytes, rid: str,
                         busy: list[int]) -> web.Response | None:
        """The node's answer to the create, or None when it refused (429, 503: its Retry-After
        added to ``busy``) or did not answer."""
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in fwd.HOP_BY_HOP}
        headers[RESERVATION_HEADER] = rid
        try:
            async with self.http.post(node.api + request.path_qs, data=raw, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=self.node_timeout, connect=3.0)) as res:
                body = await res.read()
                status = res.status
                answer = {k: v for k, v in res.headers.items() if k.lower() not in fwd.HOP_BY_HOP}
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError) as err:
            # Not reached, or gone before answering (a node that dies takes its creates with it).
            self.stats.unreachable += 1
            log.warning("create on node %s: cannot reach it (%s): next candidate", node.name, err)
            return None
        except TimeoutError:
            # The node has the request and may still make the sandbox: asking another would
            # make two, one an orphan nobody holds.  The caller decides (E2B's SDK retries).
            self.stats.unreachable += 1
            log.warning("create on node %s: no answer in %.0f s: answered 504", node.name, self.node_timeout)
            return error(504, f"node {node.name} took the create and did not answer in {self.node_timeout:.0f} s; "
                              "it may still make the sandbox")
        except aiohttp.ClientError as err:
            self.stats.unreachable += 1
            log.warning("create on node %s: it does not answer (%s): next candidate", node.name, err)
            return None
        if status in (429, 503):  # full, or its restore queue is (or it is stopping): it made nothing
            self.stats.refused += 1
            if status == 503:
                with contextlib.suppress(ValueError):
                    busy.append(max(1, int(answer.get("Retry-After", "1"))))
            log.info("create on node %s: refused, %d (%s): next candidate", node.name, status,
                     body[:200].decode(errors="replace"))
            return None
        if status == 201:
            self.stats.placed += 1
            with contextlib.suppress(ValueError, KeyError, TypeError):
                doc = json.loads(body)
                # Known here at once; the watch brings the node's own put soon after.
                self.view.routes[doc["sandboxID"]] = node.name
        else:
            self.stats.failed += 1
        return web.Response(status=status, body=body, headers=answer)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, node: str, rid: str) -> None:
        try:
            await self.scheduler.release(node, rid)
        except EtcdError as err:  # its lease ends it anyway
            log.debug("releasing reservation %s on %s: %s", rid, node, err)

    async def to_sandbox(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["id"]
        node = self.view.node_of(sid)
        if node is None:
            return error(404, f"sandbox {sid!r} not found")
        assert self.http is not None
        try:
            return await fwd.forward(request, node.api, self.http)
        except fwd.NodeUnreachable as err:
            return error(502, f"sandbox {sid!r}: its node {node.name} does not answer ({err})")

    async def usage_of_many(self, request: web.Request) -> web.Response:
        """``GET /sandboxes/metrics?sandbox_ids=``: asked of each sandbox's node, answers merged."""
        assert self.http is not None
        by_node: dict[str, list[str]] = {}
        for sid in dict.fromkeys(s for s in request.query.get("sandbox_ids", "").split(",") if s):
            if (node := self.view.node_of(sid)) is not None:
                by_node.setdefault(node.api, []).append(sid)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("x-api-key", "authorization")}
        results = await asyncio.gather(*(fwd.fetch_json(self.http, "GET", api + "/sandboxes/metrics?"
                                                        + urlencode({"sandbox_ids": ",".join(ids)}), headers)
                                         for api, ids in by_node.items()), return_exceptions=True)
        merged: dict[str, Any] = {}
        for res in results:
            if isinstance(res, BaseException):
                log.warning("sandbox metrics from a node: %s", res)
            elif res[0] == 200 and isinstance(res[1], dict):
                merged |= res[1].get("sandboxes") or {}
        return web.json_response({"sandboxes": merged})

    async def _fan_out(self, request: web.Request, path: str) -> list[Any]:
        """GET ``path`` on every node at once; the JSON lists they answer, concatenated."""
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("x-api-key", "authorization")}
        nodes = list(self.view.nodes.values())
        results = await asyncio.gather(*(fwd.fetch_json(self.http, "GET", n.api + path, headers) for n in nodes),
                                       return_exceptions=True)
        out: list[Any] = []
        for node, res in zip(nodes, results):
            if isinstance(res, BaseException):
                log.warning("listing on node %s: %s", node.name, res)
                continue
            status, doc = res
            if status == 200 and isinstance(doc, list):
                out += doc
        return out

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        q = {k: v for k, v in request.query.items() if k not in ("limit", "nextToken")}
        items = await self._fan_out(request, "/sandboxes?" + urlencode(q))
        items.sort(key=lambda s: (s.get("startedAt", ""), s.get("sandboxID", "")),
                   reverse=request.query.get("order") == "desc")
        if request.path.startswith("/v2/"):
            return node_api._page(items, request.query, "sandboxID")
        return web.json_response(items)

    async def templates(self, request: web.Request) -> web.Response:
        seen: dict[str, Any] = {}
        for t in await self._fan_out(request, "/templates"):
            seen.setdefault(t.get("templateID"), t)
        return web.json_response(list(seen.values()))

    async def snapshots(self, request: web.Request) -> web.Response:
        items = await self._fan_out(request, "/snapshots?" + urlencode(dict(request.query)))
        return web.json_response(items)

    async def delete_template(self, request: web.Request) -> web.Response:
        name = request.match_info["id"]
        nodes = [n for n in self.view.nodes.values() if name in n.templates]
        if not nodes:
            return error(404, f"template or snapshot {name!r} not found on any node")
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("x-api-key", "authorization")}
        results = await asyncio.gather(*(fwd.fetch_json(self.http, "DELETE", n.api + f"/templates/{name}", headers)
                                         for n in nodes), return_exceptions=True)
        codes = [r[0] for r in results if not isinstance(r, BaseException)]
        if codes and all(c < 300 for c in codes):
            return web.Response(status=204)
        bad = [r for r in results if isinstance(r, BaseException) or r[0] >= 300]
        first = bad[0]
        if isinstance(first, BaseException):
            return error(502, f"deleting {name!r}: a node does not answer ({first})")
        doc = first[1]
        return error(first[0], doc.get("message", "") if isinstance(doc, dict) else f"deleting {name!r} failed")

    # -- the proxy -------------------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        try:
            sid, _port = node_proxy.target(request, self.domain)
        except web.HTTPBadRequest as exc:
            return web.json_response({"code": 400, "message": exc.reason}, status=400)
        node = self.view.node_of(sid)
        if node is None:
            return node_proxy.not_found(sid)
        assert self.http is not None
        try:
            return await fwd.forward(request, node.proxy, self.http, keep_host=True)
        except fwd.NodeUnreachable:
            return node_proxy.not_found(sid)

    # -- metrics ---------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        s, v = self.stats, self.view
        lines = ["# TYPE cubefs_front_nodes gauge", f"cubefs_front_nodes {len(v.nodes)}",
                 "# TYPE cubefs_front_routes gauge", f"cubefs_front_routes {len(v.routes)}",
                 "# TYPE cubefs_front_etcd_connected gauge", f"cubefs_front_etcd_connected {int(v.connected)}",
                 "# TYPE cubefs_front_view_revision gauge", f"cubefs_front_view_revision {v.revision}"]
        for name, value in (("placed", s.placed), ("refused", s.refused), ("unreachable", s.unreachable),
                            ("failed", s.failed), ("no_room", s.no_room), ("etcd_unavailable", s.etcd_down),
                            ("reservation_conflicts", self.scheduler.conflicts), ("relists", v.relists),
                            ("reservation_deadline_misses", self.scheduler.deadline_misses),
                            ("reservation_txns", self.scheduler.transactions),
                            ("reservations", self.scheduler.reservations)):
            lines += [f"# TYPE cubefs_front_{name}_total counter", f"cubefs_front_{name}_total {value}"]
        sch = self.scheduler
        for name, xs in (("decision", s.decisions), ("create", s.creates), ("decision_wait", sch.waits),
                         ("reservation_txn", sch.round_trips), ("decision_resume", sch.resumes)):
            if xs.n:
                lines.append(f"# TYPE cubefs_front_{name}_seconds summary")
                for q in (0.5, 0.99):
                    lines.append(f'cubefs_front_{name}_seconds{{quantile="{q}"}} {xs.quantile(q):.4f}')
                lines.append(f"cubefs_front_{name}_seconds_count {xs.n}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def run_front(etcd_text: str, api_addr: tuple[str, int], proxy_addr: tuple[str, int], keys: ApiKeys,
                    prefix: str, name: str | None = None, policy: str = "spread", sample: int | None = None,
                    domain: str | None = None, lease_ttl: int = LEASE_TTL, ready: asyncio.Event | None = None) -> None:
    etcd = Etcd.from_text(etcd_text)
    front = Front(etcd, Layout(prefix), name or f"{socket.gethostname()}:{api_addr[1]}", policy, sample, domain,
                  lease_ttl)
    try:
        await front.start()
    except EtcdError as err:
        await etcd.close()
        raise UsageError(f"cannot join the cluster: {err}") from None
    heap.settle()  # the view is loaded: freeze it and the front's machinery out of every collection
    runners = [web.AppRunner(front.api_app(keys), access_log=None), web.AppRunner(front.proxy_app(), access_log=None)]
    try:
        for runner, (host, port) in zip(runners, (api_addr, proxy_addr)):
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("front %s: API on http://%s:%d, proxy on http://%s:%d, etcd %s, %d nodes", front.name, *api_addr,
                 *proxy_addr, etcd.endpoints, len(front.view.nodes))
        print(f"cubefs sandbox api: API http://{api_addr[0]}:{api_addr[1]}  proxy http://{proxy_addr[0]}:"
              f"{proxy_addr[1]}  ({len(front.view.nodes)} nodes, etcd {','.join(etcd.endpoints)})", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await front.close()
        await etcd.close()
