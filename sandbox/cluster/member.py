"""A node in a cluster: registered in etcd under a lease, its sandboxes routed, its peers known.

``cubefs sandbox serve --etcd URL --node NAME`` keeps, under one lease it
renews every third of its TTL:

* ``nodes/NAME``: what the scheduler needs (:class:`~sandbox.cluster.keys.NodeInfo`):
  limits and what is held, templates and snapshots it can start, ready pool
  sandboxes, the fraction of each template's image in its disk cache, and its
  API, proxy and peer-cache addresses;
* ``sandboxes/ID`` for every sandbox it runs, so every front can route to it;
* ``members/NAME``: its peer chunk server's address, written once per lease.

Changes are written as they happen (a create, a kill, a pool fill) in one
transaction per batch, which also deletes the reservations the new sandboxes
filled; a create through the API is answered only after its route is in etcd
(so any front can proxy the SDK's next request), or after 2 s without etcd.

**A lost lease** (the node was dead, or cut off from etcd, longer than the
TTL): etcd deleted its keys, and the cluster has reported its sandboxes gone.
When the node is back it takes a new lease and kills every sandbox that etcd no
longer lists — a sandbox the API called gone does not come back to life —
then publishes itself afresh.  A node restarted within the TTL keeps its lease
(its ID is kept in ``STATE/cluster-lease``) and loses nothing.

**Peers.**  The node watches ``members/`` and writes every node's peer address,
its own included, to ``STATE/peers`` (``cubefs mount --peers-file``): each
chunk then has one owner in the whole cluster (rendezvous hashing over the same
list everywhere), which fetches it from the store once and serves it to every
other node — an image is read from the store about once per cluster, not once
per node — with no list to keep by hand.  The same watch tells whoever else
follows the members (``follow_members``: the sandbox networks' protected set,
sandbox/network/protect.py) of each node that joins: one watch per node, not one
per follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cubefs.errors import CubefsError
from sandbox.cluster.etcd import Etcd, EtcdError, Op
from sandbox.cluster.keys import Layout, NodeInfo, Route
from sandbox.config import private_dir, state_dir, write_private

log = logging.getLogger("cubefs.sandbox.cluster")

DEFAULT_TTL = 10  # seconds: how long a dead node's sandboxes are still reported (the "lease time")
SETTLE_WAIT = 2.0  # a create waits this long at most for its route to reach etcd
REFRESH = 15.0  # seconds between republishing what changes without an event (cache locality)

MemberListener = Callable[[str, str], Awaitable[None]]  # (node name, its peer address): a node (re)joined


class NodeMember:
    def __init__(self, service: Any, etcd: Etcd, layout: Layout, info: NodeInfo, ttl: int = DEFAULT_TTL,
                 locality: Callable[[], dict[str, float]] | None = None) -> None:
        self.service = service  # sandbox.service.SandboxService (not imported: no cycle)
        self.etcd = etcd
        self.layout = layout
        self.info = info
        self.ttl = ttl
        self.locality = locality
        self.lease = 0
        self.lease_file = state_dir() / "cluster-lease"
        self.peers_file = state_dir() / "peers"
        self.published: dict[str, Route] = {}  # what etcd holds for us, as far as we know
        self.consumed: list[tuple[str, str]] = []  # (node, reservation id) filled by creates, to delete
        self.flushes = 0
        self.lease_losses = 0
        self._dirty = asyncio.Event()
        self._flushed = asyncio.Condition()
        self._generation = 0  # bumped by every change
        self._written = 0  # the generation the last successful flush covered
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: list[str] | None = None
        self._members: dict[str, str] = {}  # members/NAME -> its peer address, as last read
        self._member_queues: list[asyncio.Queue[tuple[str, str]]] = []  # one per follow_members listener
        self._record_written: tuple[bytes, int] = (b"", 0)  # the node record etcd has, under which lease
        self._member_written = 0  # the lease members/NAME was written under
        # Sandboxes added or removed since the last flush: a flush compares only those with what etcd
        # holds, not every sandbox of the node (O(sandboxes) per create was 1.5 of 8.0 s of the
        # simulated nodes' publishing at ~8 sandboxes a node; a real node holds hundreds).
        # ``_full``: compare them all (after registering again, and every REFRESH as a safety net).
        self._touched: set[str] = set()
        self._full = True

    # -- life ----------------------------------------------------------------------
    async def start(self) -> None:
        """Register (raises EtcdUnavailable when etcd does not answer: a node told to join a
        cluster does not start alone) and keep registered."""
        private_dir(state_dir())
        lost = await self._take_lease()
        await self._reconcile(lost)
        kvs, revision = await self.etcd.range(self.layout.members)  # the peers before the first sandbox's root
        self._members = {kv.key: kv.value.decode() for kv in kvs}
        self._write_peers(self._members)
        self.service.sandboxes.watchers.append(self.changed)
        self._tasks = [asyncio.create_task(self._flusher()), asyncio.create_task(self._keepalive()),
                       asyncio.create_task(self._follow_members(revision)), asyncio.create_task(self._refresher())]
        log.info("cluster: node %s registered in etcd %s (lease %x, %d s)", self.info.name, self.etcd.endpoints,
                 self.lease, self.ttl)

    async def close(self) -> None:
        """Stop publishing; the lease is *not* revoked: the sandboxes keep running for the next
        service to adopt, and a restart within the TTL keeps them routed."""
        with contextlib.suppress(ValueError):
            self.service.sandboxes.watchers.remove(self.changed)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(EtcdError):
            await asyncio.wait_for(self._flush(), 2.0)

    # -- what the service tells us -------------------------------------------------
    def changed(self, sandbox_id: str | None, present: bool) -> None:
        """Called by the service's sandbox table on every add and remove, and when a pool
        changes (``sandbox_id`` None), on the loop."""
        if sandbox_id:
            self._touched.add(sandbox_id)
        self._generation += 1
        self._dirty.set()

    def republish(self) -> None:
        """Write everything again at the next flush (etcd lost what it had: a new lease)."""
        self.published = {}
        self._record_written = (b"", 0)
        self._member_written = 0
        self._full = True
        self._generation += 1
        self._dirty.set()

    def filled(self, reservation: str | None) -> None:
        """A create answered a front's reservation (``RESERVATION_HEADER``): deleted with the next
        flush, in the transaction that publishes the sandbox."""
        if reservation and "/" not in reservation:
            self.consumed.append((self.info.name, reservation))
            self._generation += 1
            self._dirty.set()

    async def settle(self) -> bool:
        """Until everything changed so far is in etcd (False after SETTLE_WAIT: etcd is away)."""
        want = self._generation
        self._dirty.set()
        async with self._flushed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait_for(lambda: self._written >= want), SETTLE_WAIT)
        return self._written >= want

    # -- the lease -------------------------------------------------------------------
    async def _take_lease(self) -> bool:
        """Keep the lease a previous run left if it is alive; else grant one.  True when there
        was a previous lease and it ended (the cluster reported our sandboxes gone)."""
        old = 0
        with contextlib.suppress(OSError, ValueError):
            old = int(self.lease_file.read_text().strip(), 16)
        if old and await self.etcd.time_to_live(old) > 0:
            self.lease = old
            return False
        self.lease = await self.etcd.grant(self.ttl)
        write_private(self.lease_file, f"{self.lease:x}\n")
        return bool(old)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(max(self.ttl / 3, 0.5))
            try:
                if await self.etcd.keepalive(self.lease) > 0:
                    continue
            except EtcdError as err:
                log.warning("cluster: renewing lease %x of node %s: %s", self.lease, self.info.name, err)
                continue
            self.lease_losses += 1
            log.warning("cluster: node %s lost its lease %x (cut off from etcd for over %d s): its sandboxes "
                        "were reported gone; registering again", self.info.name, self.lease, self.ttl)
            while True:
                try:
                    self.lease = await self.etcd.grant(self.ttl)
                    write_private(self.lease_file, f"{self.lease:x}\n")
                    await self._reconcile(lost=True)
                    break
                except EtcdError as err:
                    log.warning("cluster: registering node %s again: %s", self.info.name, err)
                    await asyncio.sleep(1.0)

    async def _reconcile(self, lost: bool) -> None:
        """Make etcd and this node agree: after a lost lease, kill what etcd no longer lists; drop
        routes etcd still has for sandboxes this node no longer runs; publish the rest."""
        kvs, _ = await self.etcd.range(self.layout.sandboxes)
        listed = set()
        stale = []
        for kv in kvs:
            with contextlib.suppress(ValueError, TypeError):
                if Route.decode(kv.value).node == self.info.name:
                    sid = kv.key[len(self.layout.sandboxes):]
                    if sid in self.service.sandboxes:
                        listed.add(sid)
                    else:
                        stale.append(sid)
        if lost:
            for sid in [s for s in list(self.service.sandboxes) if s not in listed]:
                log.warning("cluster: sandbox %s was reported gone when node %s's lease ended: killed", sid,
                            self.info.name)
                await self.service.kill(sid)
        self.published = {}
        self._record_written = (b"", 0)
        self._member_written = 0
        self._full = True
        if stale:
            await self.etcd.txn([], [Op.delete(self.layout.sandbox(s)) for s in stale])
        await self._flush()

    # -- publishing ------------------------------------------------------------------
    def node_info(self) -> NodeInfo:
        svc = self.service
        info = self.info
        info.vcpus, info.memory_mb = svc.capacity.vcpus, svc.capacity.memory_mb
        info.used_vcpus, info.used_mb = svc.capacity.used
        info.sandboxes = len(svc.sandboxes)
        info.templates = svc.startable()
        info.pools = {name: len(pool) for name, pool in svc.pools.items()}
        return info

    async def _flush(self) -> None:
        generation = self._generation
        sandboxes = self.service.sandboxes
        full, touched = self._full, self._touched
        if full:
            touched = set(sandboxes) | set(self.published)
        self._full, self._touched = False, set()
        want: dict[str, Route | None] = {}
        for sid in touched:
            sbx = sandboxes.get(sid)
            want[sid] = Route(self.info.name, sbx.record.template) if sbx is not None else None
        try:
            await self._write(want, generation)
        except BaseException:  # not written: the next flush tries them again
            self._touched |= touched
            self._full = self._full or full
            raise

    async def _write(self, want: dict[str, Route | None], generation: int) -> None:
        lay = self.layout
        record = self.node_info().encode()
        lease = self.lease
        # Only what changed: an unchanged record rewritten every 15 s by 10,000 nodes would be
        # 667 writes/s for nothing (tools/bench/cluster_sim.py).
        ops = [] if (record, lease) == self._record_written else [Op.put(lay.node(self.info.name), record,
                                                                          lease=lease)]
        if self._member_written != lease:
            ops.append(Op.put(lay.member(self.info.name), self.info.peer, lease=lease))
        published = self.published
        for sid, r in want.items():
            if r is None:
                if sid in published:
                    ops.append(Op.delete(lay.sandbox(sid)))
            elif published.get(sid) != r:
                ops.append(Op.put(lay.sandbox(sid), r.encode(), lease=lease))
        consumed = list(self.consumed)
        ops += [Op.delete(lay.reservation(node, rid)) for node, rid in consumed]
        if ops:
            await self.etcd.txn([], ops)
            self.flushes += 1
        for sid, r in want.items():
            if r is None:
                published.pop(sid, None)
            else:
                published[sid] = r
        self._record_written = (record, lease)
        self._member_written = lease
        del self.consumed[:len(consumed)]
        async with self._flushed:
            self._written = max(self._written, generation)
            self._flushed.notify_all()

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._flush()
            except EtcdError as err:
                log.warning("cluster: publishing node %s: %s (retrying)", self.info.name, err)
                await asyncio.sleep(0.5)
                self._dirty.set()

    async def _refresher(self) -> None:
        """Republish what changes without an event: cache locality, pools, held capacity."""
        while True:
            if self.locality is not None:
                try:
                    self.info.cached = await asyncio.to_thread(self.locality)
                except Exception as err:  # a locality estimate must never stop the node
                    log.warning("cluster: cache locality of node %s: %s", self.info.name, err)
            self._full = True
            self._generation += 1
            self._dirty.set()
            await asyncio.sleep(REFRESH)

    # -- peers ----------------------------------------------------------------------
    def follow_members(self, listener: MemberListener) -> asyncio.Future[None]:
        """Call ``listener(name, peer)`` for every node known now and every node that joins later
        (each ``members/NAME`` put: once per lease); a node leaving is not told.  The listener
        runs in a task of its own, fed by the member's one watch (a slow or failing listener
        holds up neither the peers file nor another listener); one that raises a
        ``CubefsError`` (etcd's, nft's) is called again for that node a second later.  It may
        be called twice for a node (after etcd was lost every member is told again).  The
        future returned is done once the nodes known now were told."""
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for item in self._members.items():
            queue.put_nowait(item)
        caught_up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._member_queues.append(queue)
        self._tasks.append(asyncio.create_task(self._tell(listener, queue, queue.qsize(), caught_up)))
        return caught_up

    async def _tell(self, listener: MemberListener, queue: asyncio.Queue[tuple[str, str]], known: int,
                    caught_up: asyncio.Future[None]) -> None:
        told = 0
        while True:
            if told >= known and not caught_up.done():
                caught_up.set_result(None)
            key, peer = await queue.get()
            while True:
                try:
                    await listener(key[len(self.layout.members):], peer)
                    break
                except CubefsError as err:
                    log.debug("cluster: telling of member %s: %s", key, err)
                    await asyncio.sleep(1.0)
                except Exception as err:  # a listener's bug must not end the following of others
                    log.warning("cluster: telling of member %s failed: %s", key, err)
                    break
            told += 1

    async def _follow_members(self, revision: int) -> None:
        """Keep ``STATE/peers`` listing every node's peer address, and feed ``follow_members``'
        listeners the nodes joining.  Nodes watch ``members/`` (written once per lease), not
        ``nodes/``: every record put would otherwise go to every node — at 10,000 nodes and
        100,000 creates a minute, ~23 M watch events/s."""
        members = self.layout.members
        while True:
            try:
                if revision == 0:  # etcd was lost: read afresh, every member told again
                    kvs, revision = await self.etcd.range(members)
                    self._members = {kv.key: kv.value.decode() for kv in kvs}
                    self._write_peers(self._members)
                    for queue in self._member_queues:
                        for item in self._members.items():
                            queue.put_nowait(item)
                async for events in self.etcd.watch(members, revision + 1):
                    for ev in events:
                        if ev.type == "PUT":
                            self._members[ev.kv.key] = peer = ev.kv.value.decode()
                            for queue in self._member_queues:
                                queue.put_nowait((ev.kv.key, peer))
                        else:
                            self._members.pop(ev.kv.key, None)
                        revision = ev.kv.mod_revision
                    self._write_peers(self._members)
            except EtcdError as err:
                log.debug("cluster: following members: %s", err)
                revision = 0
                await asyncio.sleep(1.0)

    def _write_peers(self, nodes: dict[str, str]) -> None:
        peers = sorted({p for p in nodes.values() if p})
        if peers == self._peers:
            return
        self._peers = peers
        write_private(self.peers_file, "".join(f"{p}\n" for p in peers))
        log.info("cluster: node %s peers: %s", self.info.name, ", ".join(peers) or "none")



def template_locality() -> dict[str, float]:
    """Per sandbox template, the fraction of its image's bytes in this node's disk cache."""
    from cubefs.cache.locality import cached_digests, cached_fraction
    from cubefs.errors import CubefsError
    from cubefs.node.control import default_cache_dir
    from sandbox.templates import SandboxTemplate

    out: dict[str, float] = {}
    held: dict[str, set[bytes]] = {}
    for t in SandboxTemplate.list():
        opts = t.store_options
        cache_dir = opts.cache_dir or default_cache_dir()
        if cache_dir not in held:
            held[cache_dir] = cached_digests(cache_dir)
        try:
            out[t.name] = round(cached_fraction(opts.store, opts.s3_endpoint, cache_dir, t.image, held[cache_dir]), 3)
        except (CubefsError, OSError) as err:
            log.debug("cluster: cache locality of template %s: %s", t.name, err)
    return out
