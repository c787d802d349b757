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
E2B's API does): O(K) instead of O(nodes) per decision; 0 scores every node;
None (the default) is automatic: every node up to ``AUTO_NODES``, best-of-
``AUTO_K`` above.

**Reserve**: an etcd transaction puts ``reservations/NODE/RID`` under the
front's lease if no other reservation for that node appeared since the
revision the decision read (a compare over the node's reservation range)
and the node is still registered.  A failed compare means another front
booked the node meanwhile: wait for the view to catch up, decide again.
The node has the last word (its own bin-packing): a 429 from it sends the
create to the next candidate, ``attempts`` times at most.

**Group commit**: a front has one reservation transaction out at a time;
the decisions made while it is out go together in the next one (each
node's two compares, every put), so a busy front sends one transaction for
several placements and an idle one waits for nothing.  A transaction whose
compares fail applies nothing; its failure branch reads each node's record
and reservations, which says which compares failed: only those decisions
are made again, the others go out in the next transaction as they were.
Measured (tools/bench/cluster_sim.py, 1,000 nodes, best-of-16, 32 clients,
docs/benchmarks.md): one transaction per placement cost the front ~0.3 ms
of CPU in gRPC's unary call and etcd a proposal with its watch delivery
(~0.45 ms of etcd CPU); batched, both are paid once per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from sandbox.cluster.etcd import Compare, Etcd, EtcdUnavailable, Op, prefix_end
from sandbox.cluster.keys import Layout, NodeInfo, Reservation
from sandbox.cluster.latency import Latency
from sandbox.cluster.view import ClusterView

POLICIES = ("spread", "pack")
# Best-of-K by default above this many nodes (docs/benchmarks.md, tools/bench/cluster_sim.py):
# scoring every node costs ~0.6 us a node per decision (0.59 ms at 1,000), against ~20-30 us
# for 16, and a placement's whole front CPU with best-of-16 is 0.8-1.3 ms; scoring all 1,000
# made it 3.6-4.5 ms (248-346 placements/s, under the floor's 500).  Up to 256 nodes, scoring
# all adds at most ~0.15 ms (~10-15 % of a placement) and keeps the exact best (a ready pool
# or a cached image the sample would miss); above, 16, the K every measurement used: two
# fronts conflicted on < 1-3 % of reservations with it.
AUTO_NODES = 256
AUTO_K = 16
# Cache locality counts in quarters: a start reads a few percent of an image, so finer steps would
# send every create of a template to the node that happened to start it first, whatever its load.
CACHED_STEPS = 4
# Bookings in one transaction at most: etcd refuses a txn of more than --max-txn-ops (default 128)
# compares or requests per branch, and a batch has two compares and two failure reads per node.
MAX_BATCH = 32
# Transactions out at once.  One batches the most (5-8 reservations a transaction at 250-770
# placements/s).  Two did not make decisions faster (best-of-16, 1,000 nodes, load 5-6, in turns:
# decision p50 13.3-18.4 / p99 77-113 ms against 13.1-15.8 / 51-60 ms): a decision waits for this
# 2-core machine's CPU, not for the transaction out before its own.
MAX_INFLIGHT = 1
LATE_APPLY = 10.0  # seconds after which a transaction whose answer was lost has applied or never will
# With MAX_INFLIGHT > 1: a further transaction goes out only once the oldest one out has been out
# this long (seconds), so a slow answer bounds the wait of the decisions behind it while a fast
# etcd still batches them.
HOLD = 0.004


@dataclass
class _Booking:
    """A reservation decided and waiting for its transaction."""

    node: str
    rid: str
    reservation: Reservation
    since: int  # the view's revision the decision read: the node's reservations up to it were counted
    done: asyncio.Future[tuple[bool, int]] = field(repr=False)  # (written, revision to wait for if not)
    deadline: float = 0.0  # monotonic: its create gives up then (0: never); a read-back waits no longer
    queued: float = 0.0  # monotonic: decided (its wait for a transaction starts)
    sent: float = 0.0  # its transaction went out
    answered: float = 0.0  # etcd's answer was read (the deciding coroutine is woken from here)


class Scheduler:
    def __init__(self, view: ClusterView, etcd: Etcd, layout: Layout, front: str, lease: Callable[[], int],
                 policy: str = "spread", sample: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"placement policy {policy!r}: one of {', '.join(POLICIES)}")
        self.view = view
        self.etcd = etcd
        self.layout = layout
        self.front = front
        self.lease = lease
        self.policy = policy
        self.sample = sample  # K; 0: every node; None: automatic (see AUTO_NODES)
        self.conflicts = 0  # reservations lost to another front's
        self.deadline_misses = 0  # reservations etcd did not answer before their create's deadline
        self._known: dict[str, int] = {}  # node -> revision up to which its reservations are all known here
        self._cleanups: set[asyncio.Future[None]] = set()  # reservations of unknown fate, deleted when etcd is back
        self._queue: list[_Booking] = []  # decided, for the next transaction
        self._sending: dict[asyncio.Task[None], float] = {}  # transactions out -> when sent (MAX_INFLIGHT at most)
        self._timer: asyncio.TimerHandle | None = None  # a kick when the oldest out has been out HOLD
        self._busy: set[str] = set()  # nodes with a reservation of ours in a transaction that is out
        self._kick_due = False
        self._closed = False
        self.transactions = 0  # reservation transactions sent (group commit: fewer than reservations)
        self.reservations = 0
        # Where a decision's time goes after the choice (per decision, since the start): waiting
        # for the transaction out before its own, its own transaction's round trip, and from the
        # answer until the deciding coroutine runs again (the event loop's turn).
        self.waits = Latency()
        self.round_trips = Latency()
        self.resumes = Latency()

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
        k = self.sample_size(len(nodes))
        if k and len(nodes) > k:
            best = self._score([nodes[n] for n in random.sample(self.view.names(), k)], template, cpus,
                               memory_mb, exclude, limit)
            if best:
                return best
        return self._score(nodes.values(), template, cpus, memory_mb, exclude, limit)

    def sample_size(self, nodes: int) -> int:
        """K for a cluster of ``nodes`` nodes (0: score every node)."""
        if self.sample is not None:
            return self.sample
        return AUTO_K if nodes > AUTO_NODES else 0

    def _candidates(self, nodes: Any, template: str, cpus: int, memory_mb: int,
                    exclude: set[str]) -> Iterator[tuple[tuple[bool, float, float], NodeInfo]]:
        """The nodes that know ``template`` and have room for it, net of the reservations held
        on them, each with its key: (a pooled sandbox, cached quarters, room), higher is better."""
        sign = 1.0 if self.policy == "spread" else -1.0
        reserved = self.view.reserved
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
            yield ((n.pools.get(template, 0) > 0, int(n.cached.get(template, 0.0) * CACHED_STEPS) / CACHED_STEPS,
                    sign * (free_mb / n.memory_mb if n.memory_mb else 0.0)), n)

    def _score(self, nodes: Any, template: str, cpus: int, memory_mb: int, exclude: set[str],
               limit: int) -> list[NodeInfo]:
        if limit == 1:
            return self._best(nodes, template, cpus, memory_mb, exclude)
        scored = [((*key, random.random()), n) for key, n in self._candidates(nodes, template, cpus, memory_mb,
                                                                                exclude)]
        if limit:
            return [n for _, n in heapq.nlargest(limit, scored, key=itemgetter(0))]
        scored.sort(key=itemgetter(0), reverse=True)
        return [n for _, n in scored]

    def _best(self, nodes: Any, template: str, cpus: int, memory_mb: int, exclude: set[str]) -> list[NodeInfo]:
        """``_score`` for the best node alone (what a placement asks): one pass keeping the best,
        ties broken by reservoir sampling (each of k tied nodes kept with probability 1/k), so
        no random number, list or heap per node.  Every node scored at 1,000 nodes: 0.59 ms
        against 1.10 ms (tools/bench/cluster_sim.py's record shape, this machine at load ~7)."""
        best: NodeInfo | None = None
        best_key: tuple[bool, float, float] | None = None
        ties = 0
        for key, n in self._candidates(nodes, template, cpus, memory_mb, exclude):
            if best_key is None or key > best_key:
                best, best_key, ties = n, key, 1
            elif key == best_key:
                ties += 1
                if random.random() * ties < 1.0:
                    best = n
        return [best] if best is not None else []

    async def reserve(self, node: NodeInfo, template: str, cpus: int, memory_mb: int,
                      deadline: float | None = None) -> str | None:
        """A reservation's ID, or None when another front booked this node since our view
        (the caller waits for the view and decides again).  EtcdUnavailable passes through,
        and is raised at ``deadline`` (``time.monotonic()``) at the latest: a create waits no
        longer than that on etcd, whatever its transaction and read-back would take."""
        if self._closed:  # nothing is sent any more: the future would never be answered
            raise EtcdUnavailable("the front is closing")
        when = None if deadline is None else asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
        try:
            # asyncio.timeout, not wait_for: no task of its own per placement.  Its expiry
            # cancels the booking's future, which the batch's end deletes if it was written.
            async with asyncio.timeout_at(when):
                rid, conflict = await self._reserve(node, template, cpus, memory_mb, deadline or 0.0)
        except TimeoutError:
            self.deadline_misses += 1
            raise EtcdUnavailable("no answer to the reservation within the placement's deadline") from None
        if conflict is not None:
            # etcd answered: another front booked the node.  Waiting for the view to catch up is
            # outside the deadline (a late conflict is a conflict, not "etcd does not answer").
            await self.view.wait_revision(conflict, timeout=1.0)
        return rid

    async def _reserve(self, node: NodeInfo, template: str, cpus: int, memory_mb: int,
                       deadline: float) -> tuple[str | None, int | None]:
        """(the reservation's ID, None) or, on a conflict, (None, the revision to wait for)."""
        rid = secrets.token_hex(8)
        reservation = Reservation(node.name, template, cpus, memory_mb, self.front)
        # Counted at once, before the watch brings it (before etcd has it, even): this front's
        # concurrent decisions see it and pick another node.
        held = self.view.reserved.setdefault(node.name, {})
        held[rid] = reservation
        booking = _Booking(node.name, rid, reservation, self.view.revision,
                           asyncio.get_running_loop().create_future(), deadline, time.monotonic())
        self._queue.append(booking)
        if not self._kick_due:  # after every decision ready in this turn of the loop: they go together
            self._kick_due = True
            asyncio.get_running_loop().call_soon(self._kick)
        try:
            # Awaited bare, not shielded: a shield is one more turn of the loop between the answer
            # and the decision.  A cancelled caller cancels the future, and _commit deletes what
            # it writes for a cancelled booking (nobody would fill it).
            written, revision = await booking.done
        except BaseException:
            held.pop(rid, None)
            done = booking.done
            if done.done() and not done.cancelled() and done.exception() is None and done.result()[0]:
                # written, then the caller was cancelled before it resumed: nobody will fill it
                self._later_forget(self.layout.reservation(node.name, rid))
            raise
        if booking.answered:
            self.waits.add(booking.sent - booking.queued)
            self.round_trips.add(booking.answered - booking.sent)
            self.resumes.add(time.monotonic() - booking.answered)
        if not written:
            held.pop(rid, None)
            self.conflicts += 1
            return None, revision
        return rid, None

    def _later_forget(self, key: str, after: float = 0.0) -> None:
        task = asyncio.ensure_future(self._forget(key, after))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        self._closed = True  # nothing more is sent, not even what a cancelled batch's end would kick
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._sending):
            task.cancel()
        for task in list(self._sending):
            with contextlib.suppress(BaseException):
                await task
        for b in self._queue:
            b.done.cancel()
        self._queue.clear()
        for task in list(self._cleanups):  # what they would delete goes with our lease
            task.cancel()

    def _timed_kick(self) -> None:
        self._timer = None
        self._kick()

    def _kick(self) -> None:
        """Send what waits, up to MAX_INFLIGHT transactions out.  A booking on a node that has one
        of ours out waits for it: its compare must start after that reservation, or ours would
        conflict with each other (best-of-16 at 1,000 nodes: 173 conflicts in 3,806 placements)."""
        self._kick_due = False
        while len(self._sending) < MAX_INFLIGHT and self._queue and not self._closed:
            if self._sending:  # one is out already: another only once it has been out HOLD
                age = time.monotonic() - min(self._sending.values())
                if age < HOLD:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(HOLD - age, self._timed_kick)
                    return
            batch: list[_Booking] = []
            rest: list[_Booking] = []
            for b in self._queue:
                if b.done.cancelled():  # its caller is gone before it was sent: nothing to write
                    continue
                (rest if b.node in self._busy or len(batch) >= MAX_BATCH else batch).append(b)
            if not batch:
                return
            self._queue = rest
            nodes = {b.node for b in batch}
            self._busy |= nodes
            task = asyncio.ensure_future(self._send(batch, nodes))
            self._sending[task] = time.monotonic()

    async def _send(self, batch: list[_Booking], nodes: set[str]) -> None:
        try:
            await self._commit(batch)
        except asyncio.CancelledError:
            for b in batch:
                b.done.cancel()
            raise
        except Exception as err:  # an error etcd answered (auth, say): every create of the batch has it
            for b in batch:
                if not b.done.done():
                    b.done.set_exception(err)
        finally:
            self._sending.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._busy -= nodes
            if self._queue and not self._kick_due:
                self._kick_due = True
                asyncio.get_running_loop().call_soon(self._kick)

    async def _commit(self, batch: list[_Booking]) -> None:
        sent = time.monotonic()
        for b in batch:
            b.sent = sent
        try:
            await self._commit_batch(batch)
        finally:
            answered = time.monotonic()
            for b in batch:
                b.answered = answered

    async def _commit_batch(self, batch: list[_Booking]) -> None:
        lay = self.layout
        # The node's reservations are all known here up to the view's revision when we decided,
        # and up to our own last reservation on it (its compare proved that nothing came in
        # between): our own are no conflict.  Measured at 1,000 nodes, 32 clients, one front:
        # with the view's revision alone, 352 of 1,630 decisions conflicted with the front's own.
        since: dict[str, int] = {}
        for b in batch:  # one compare per node: the oldest revision any of its decisions read
            s = max(b.since, self._known.get(b.node, 0))
            since[b.node] = min(since.get(b.node, s), s)
        compares, failure = [], []
        for name, rev in since.items():
            mine = lay.reservations_of(name)
            compares += [Compare.version(lay.node(name), ">", 0),
                         Compare.mod_revision(mine, "<", rev + 1, range_end=prefix_end(mine))]
            failure += [Op.get(lay.node(name)), Op.get(mine, prefix=True)]
        lease = self.lease()
        puts = [Op.put(lay.reservation(b.node, b.rid), b.reservation.encode(), lease=lease) for b in batch]
        self.transactions += 1
        self.reservations += len(batch)
        deadlines = [b.deadline for b in batch]
        try:
            res = await self.etcd.txn(compares, puts, failure, deadline=max(deadlines) if all(deadlines) else None)
        except EtcdUnavailable as err:
            await self._unknown(batch, err)
            return
        if res.succeeded:
            for name in since:
                self._known[name] = max(self._known.get(name, 0), res.revision)
            for b in batch:
                if b.done.cancelled():
                    self._later_forget(lay.reservation(b.node, b.rid))
                elif not b.done.done():
                    b.done.set_result((True, res.revision))
            return
        # Which nodes' compares failed: gone from etcd, or a reservation newer than we knew.
        failed = set()
        for i, name in enumerate(since):
            record, held = res.responses[2 * i], res.responses[2 * i + 1]
            if not record or any(kv.mod_revision > since[name] for kv in held):
                failed.add(name)
        if not failed:  # cannot be (the reads are the compares' own revision); never loop on it
            failed = set(since)
        again = []
        for b in batch:
            if b.node in failed:
                if not b.done.done():
                    b.done.set_result((False, res.revision))
            else:
                again.append(b)
        self._queue[:0] = again  # their compares held: out in the next transaction, not decided again

    async def _unknown(self, batch: list[_Booking], err: EtcdUnavailable) -> None:
        """A conditional txn cut off mid-way has an unknown outcome (etcd may have applied it):
        read it back; what is there is ours.  etcd gone altogether: the creates fail (503), and
        the keys, if they were written, are deleted once etcd answers again (our lease lives on
        with us: it would hold the nodes' room for ever)."""
        keys = [self.layout.reservation(b.node, b.rid) for b in batch]
        # Read back no longer than the last of the batch's creates waits for it (their deadline):
        # an etcd that stopped answering (not refusing) would otherwise hold them here for the
        # client's whole failover, ~7 s at three endpoints, on top of the transaction's 2 s.
        deadlines = [b.deadline for b in batch if not b.done.done()]
        deadline = max(deadlines) if deadlines and all(deadlines) else None
        try:
            if not deadlines:  # every create of the batch is gone: nobody waits for the answer
                raise EtcdUnavailable("nobody waits for the read-back")
            back = await self.etcd.txn([], [Op.get(k) for k in keys], deadline=deadline)
        except EtcdUnavailable:
            for key, b in zip(keys, batch):
                self._later_forget(key)
                self._later_forget(key, LATE_APPLY)  # and once more, past a late apply
                if not b.done.done():
                    b.done.set_exception(err)
            return
        for key, found, b in zip(keys, back.responses, batch):
            if found and b.done.cancelled():
                self._later_forget(key)
            elif not found:
                # not there yet: the transaction may still be in flight and apply after this read;
                # its create failed (nobody will fill it), so what it may yet write is deleted then
                self._later_forget(key, LATE_APPLY)
            if not b.done.done():
                if found:
                    b.done.set_result((True, back.revision))
                else:
                    b.done.set_exception(err)

    async def _forget(self, key: str, after: float = 0.0) -> None:
        await asyncio.sleep(after)
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


