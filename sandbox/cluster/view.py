"""A front's local copy of the cluster: nodes, outstanding reservations, sandbox routes.

Listed once, then kept fresh by one watch over the whole prefix (one etcd
stream per front, whatever the cluster's size).  Everything a front decides —
where a create goes, which node a request for sandbox X is forwarded to —
reads this copy and never waits on etcd, so:

* routing keeps working while etcd is unreachable (the copy goes stale, it
  does not go away), and recovers by itself: the watch resumes from the last
  revision it applied, so nothing is missed or applied twice;
* a placement costs no etcd read, only the reservation's one transaction.

A watch whose revision was compacted away lists everything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from sandbox.cluster.etcd import KV, Compacted, Etcd, EtcdError
from sandbox.cluster.keys import Layout, NodeInfo, Reservation, Route

log = logging.getLogger("cubefs.sandbox.cluster")


class ClusterView:
    def __init__(self, etcd: Etcd, layout: Layout) -> None:
        self.etcd = etcd
        self.layout = layout
        self.nodes: dict[str, NodeInfo] = {}
        self.reserved: dict[str, dict[str, Reservation]] = {}  # node -> reservation id -> reservation
        # sandbox -> its node's name: a str, not a Route, so a route is nothing to the cyclic GC (a
        # str is never tracked; a frozen dict of them is not traversed: see sandbox/cluster/heap.py)
        self.routes: dict[str, str] = {}
        self.revision = 0
        self.connected = False  # the watch is streaming (else the copy may be stale)
        self.relists = 0
        self._names: list[str] | None = None  # the nodes' names, for sampling; None: to be listed again
        self._moved = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """List everything (raises EtcdUnavailable when etcd does not answer), then watch."""
        await self._list()
        self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    # -- what the scheduler and the router read ------------------------------------
    def reserved_on(self, node: str) -> tuple[int, int]:
        held = self.reserved.get(node)
        if not held:  # most nodes, most of the time: no generator, no sums
            return 0, 0
        return sum(r.vcpus for r in held.values()), sum(r.memory_mb for r in held.values())

    def names(self) -> list[str]:
        """The nodes' names (kept between calls: best-of-K samples it every decision, and listing
        1,000 names each time was half of a decision's 30 us)."""
        if self._names is None:
            self._names = list(self.nodes)
        return self._names

    def node_of(self, sandbox_id: str) -> NodeInfo | None:
        node = self.routes.get(sandbox_id)
        return self.nodes.get(node) if node is not None else None

    async def wait_revision(self, revision: int, timeout: float = 2.0) -> bool:
        """Until the copy has applied ``revision`` (a transaction of ours, say); False on timeout."""
        async with self._moved:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait_for(lambda: self.revision >= revision), timeout)
        return self.revision >= revision

    # -- keeping it fresh ---------------------------------------------------------------
    async def _list(self) -> None:
        kvs, revision = await self.etcd.range(self.layout.prefix)
        self.nodes.clear()
        self._names = None
        self.reserved.clear()
        self.routes.clear()
        for kv in kvs:
            self._put(kv)
        await self._advance(revision)

    async def _follow(self) -> None:
        while True:
            try:
                async for events in self.etcd.watch(self.layout.prefix, self.revision + 1):
                    self.connected = True
                    for ev in events:
                        if ev.type == "PUT":
                            self._put(ev.kv)
                        else:
                            self._delete(ev.kv.key)
                    await self._advance(events[-1].kv.mod_revision if events else self.revision)
            except Compacted:
                log.warning("cluster view: revision %d was compacted away: listing everything again",
                            self.revision + 1)
                self.relists += 1
                self.connected = False
                await self._relist()
            except EtcdError as err:
                self.connected = False
                log.warning("cluster view: etcd watch lost (%s): serving the last copy, retrying", err)
                await asyncio.sleep(0.5)
            else:
                self.connected = False
                await asyncio.sleep(0.1)

    async def _relist(self) -> None:
        while True:
            try:
                await self._list()
                return
            except EtcdError as err:
                log.warning("cluster view: listing failed (%s): retrying", err)
                await asyncio.sleep(0.5)

    async def _advance(self, revision: int) -> None:
        async with self._moved:
            self.revision = max(self.revision, revision)
            self._moved.notify_all()

    def _put(self, kv: KV) -> None:
        key, lay = kv.key, self.layout
        try:
            if key.startswith(lay.nodes):
                name = key[len(lay.nodes):]
                if name not in self.nodes:
                    self._names = None
                self.nodes[name] = NodeInfo.decode(kv.value)
            elif key.startswith(lay.sandboxes):
                self.routes[key[len(lay.sandboxes):]] = sys.intern(Route.decode(kv.value).node)
            elif key.startswith(lay.reservations):
                node, _, rid = key[len(lay.reservations):].partition("/")
                held = self.reserved.setdefault(node, {})
                if rid not in held:  # ours are here already (the scheduler counts them before the put)
                    held[rid] = Reservation.decode(kv.value)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("cluster view: ignoring %s: not what a cubefs node writes (%s)", key, err)

    def _delete(self, key: str) -> None:
        lay = self.layout
        if key.startswith(lay.nodes):
            name = key[len(lay.nodes):]
            if self.nodes.pop(name, None) is not None:
                self._names = None
                log.info("cluster view: node %s left (its lease ended or it deregistered)", name)
        elif key.startswith(lay.sandboxes):
            self.routes.pop(key[len(lay.sandboxes):], None)
        elif key.startswith(lay.reservations):
            node, _, rid = key[len(lay.reservations):].partition("/")
            held = self.reserved.get(node)
            if held is not None:
                held.pop(rid, None)
                if not held:
                    del self.reserved[node]
