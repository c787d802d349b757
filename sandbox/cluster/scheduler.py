"""Where a create goes: filter the nodes, score them, reserve on the best in one transaction.

**Filter**: the node is in the view (its lease is alive), knows the template
(or holds the snapshot: a snapshot is a template ID to the SDK, and only its
node can restore it), and has room: limits − held − outstanding reservations.

**Score**, best first: a ready pooled sandbox of the template (a create there
is a resume: tens of ms instead of a restore), then the fraction of the
template's image already in the node's disk cache, in quarters (a cold start
there fetches little), then room by policy — ``spread`` (most free memory, the default:
noisy neighbours and failures hit fewer sandboxes) or ``pack`` (least free
that fits: whole nodes stay empty for big sandboxes or to be drained).  Ties
are broken at random, so fronts deciding at once pick different nodes.
With ``sample`` K > 0 only K random candidates are scored (best-of-K, as
E2B's API does): O(K) instead of O(nodes) per decision.

**Reserve**: one etcd transaction puts ``reservations/NODE/RID`` under the
front's lease if no other reservation for that node appeared since the
revision the decision read (a compare over the node's reservation range)
and the node is still registered.  A failed compare means another front
booked the node meanwhile: wait for the view to catch up, decide again.
The node has the last word (its own bin-packing): a 429 from it sends the
create to the next candidate, ``attempts`` times at most.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import secrets
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from sandbox.cluster.etcd import Compare, Etcd, EtcdUnavailable, Op, prefix_end
from sandbox.cluster.keys import Layout, NodeInfo, Reservation
from sandbox.cluster.view import ClusterView

POLICIES = ("spread", "pack")
# Cache locality counts in quarters: a start reads a few percent of an image, so finer steps would
# send every create of a template to the node that happened to start it first, whatever its load.
CACHED_STEPS = 4


class Scheduler:
    def __init__(self, view: ClusterView, etcd: Etcd, layout: Layout, front: str, lease: Callable[[], int],
                 policy: str = "spread", sample: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"placement policy {policy!r}: one of {', '.join(POLICIES)}")
        self.view = view
        self.etcd = etcd
        self.layout = layout
        self.front = front
        self.lease = lease
        self.policy = policy
        self.sample = sample
        self.conflicts = 0  # reservations lost to another front's
        self._known: dict[str, int] = {}  # node -> revision up to which its reservations are all known here
        self._cleanups: set[asyncio.Future[None]] = set()  # reservations of unknown fate, deleted when etcd is back
        self._booking: dict[str, asyncio.Lock] = {}  # node -> held while our reservation txn on it is out

    def size_of(self, template: str) -> tuple[int, int] | None:
        """(vCPUs, MiB) of a template, as any node that knows it says."""
        for node in self.view.nodes.values():
            size = node.templates.get(template)
            if size:
                return int(size[0]), int(size[1])
        return None

    def free(self, node: NodeInfo) -> tuple[int, int]:
        res_cpus, res_mb = self.view.reserved_on(node.name)
        return node.vcpus - node.used_vcpus - res_cpus, node.memory_mb - node.used_mb - res_mb

    def rank(self, template: str, cpus: int, memory_mb: int, exclude: set[str] = frozenset(),  # type: ignore[assignment]
             limit: int = 0) -> list[NodeInfo]:
        """The nodes that can take this create, best first (only the best ``limit`` when > 0).

        This is a front's hot spot at 1,000 nodes (tools/bench/cluster_sim.py, cProfile: 13.3 of
        16 s of placing), so it is one pass with no call per node.  Best-of-K samples K nodes
        before filtering, O(K) per decision; when none of the K can take the create (a snapshot
        lives on one node), every node is scored."""
        nodes = self.view.nodes
        if self.sample and len(nodes) > self.sample:
            best = self._score(random.sample(list(nodes.values()), self.sample), template, cpus, memory_mb,
                               exclude, limit)
            if best:
                return best
        return self._score(nodes.values(), template, cpus, memory_mb, exclude, limit)

    def _score(self, nodes: Any, template: str, cpus: int, memory_mb: int, exclude: set[str],
               limit: int) -> list[NodeInfo]:
        sign = 1.0 if self.policy == "spread" else -1.0
        reserved = self.view.reserved
        scored = []
        for n in nodes:
            if template not in n.templates or n.name in exclude:
                continue
            free_cpus, free_mb = n.vcpus - n.used_vcpus, n.memory_mb - n.used_mb
            held = reserved.get(n.name)
            if held:
                for r in held.values():
                    free_cpus -= r.vcpus
                    free_mb -= r.memory_mb
            if free_cpus < cpus or free_mb < memory_mb:
                continue
            room = sign * (free_mb / n.memory_mb if n.memory_mb else 0.0)
            cached = int(n.cached.get(template, 0.0) * CACHED_STEPS) / CACHED_STEPS
            scored.append(((n.pools.get(template, 0) > 0, cached, room,
                            random.random()), n))
        if limit:
            return [n for _, n in heapq.nlargest(limit, scored, key=itemgetter(0))]
        scored.sort(key=itemgetter(0), reverse=True)
        return [n for _, n in scored]

    async def reserve(self, node: NodeInfo, template: str, cpus: int, memory_mb: int) -> str | None:
        """A reservation's ID, or None when another front booked this node since our view
        (the caller waits for the view and decides again).  EtcdUnavailable passes through."""
        rid = secrets.token_hex(8)
        lay = self.layout
        mine = lay.reservations_of(node.name)
        reservation = Reservation(node.name, template, cpus, memory_mb, self.front)
        # Counted at once, before the watch brings it (before etcd has it, even): this front's
        # concurrent decisions see it and pick another node.
        held = self.view.reserved.setdefault(node.name, {})
        held[rid] = reservation
        # The node's reservations are all known here up to the view's revision, and up to our own
        # last reservation on it (its compare proved that nothing came in between): our own are
        # no conflict.  Measured at 1,000 nodes, 32 clients, one front: with the view's revision
        # alone, 352 of 1,630 decisions conflicted with the front's own reservations.
        # Two of our decisions on one node go one after the other, or the second would fail its
        # compare on the first (best-of-16 at 1,000 nodes: 173 conflicts in 3,806 placements).
        booking = self._booking.setdefault(node.name, asyncio.Lock())
        try:
            async with booking:
                since = max(self.view.revision, self._known.get(node.name, 0))
                res = await self.etcd.txn(
                    [Compare.version(lay.node(node.name), ">", 0),
                     Compare.mod_revision(mine, "<", since + 1, range_end=prefix_end(mine))],
                    [Op.put(lay.reservation(node.name, rid), reservation.encode(), lease=self.lease())])
                if res.succeeded:
                    self._known[node.name] = max(self._known.get(node.name, 0), res.revision)
        except EtcdUnavailable:
            # A conditional txn cut off mid-way has an unknown outcome (etcd may have applied it):
            # read it back; if it is there it is ours.  etcd gone altogether: the create fails
            # (503), and the key, if it was written, is deleted once etcd answers again (our
            # lease lives on with us: it would hold the node's room for ever).
            key = lay.reservation(node.name, rid)
            held.pop(rid, None)
            try:
                if await self.etcd.get(key) is not None:
                    held[rid] = reservation
                    return rid
            except EtcdUnavailable:
                task = asyncio.ensure_future(self._forget(key))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            raise
        except BaseException:
            held.pop(rid, None)  # if it was applied after all, the watch brings it back
            raise
        if not res.succeeded:
            held.pop(rid, None)
            self.conflicts += 1
            await self.view.wait_revision(res.revision, timeout=1.0)
            return None
        return rid

    async def _forget(self, key: str) -> None:
        while True:
            try:
                await self.etcd.delete(key)
                return
            except EtcdUnavailable:
                await asyncio.sleep(1.0)

    async def release(self, node: str, rid: str) -> None:
        held = self.view.reserved.get(node)
        if held is not None:
            held.pop(rid, None)
        await self.etcd.delete(self.layout.reservation(node, rid))


