"""The node's sandboxes: create, find, time out, kill, and adopt again after a restart.

A sandbox is a micro-VM (``vmm.vm.Vm``, named ``sbx-ID``) restored from its
template's VM template, whose root is its own O(1) clone of the template
volume (``sbx-ID-0``), plus one agent channel (``vmm.channel``) that the envd
data plane (``sandbox.envd``) multiplexes every request over.

**State that survives the service.**  QEMU and the root's daemon run in
sessions of their own, so a service that dies (even ``kill -9``) leaves its
sandboxes running.  Each has ``STATE/sandboxes/ID.json`` (0600: it holds the
access token), written before the VM is started (``state: creating``) and
again once it runs.  A starting service reads them all: a running sandbox is
adopted (a new agent session, its TTL as it was); one that was still being
created, or whose VM is gone, is cleaned away (VM, daemon, volume, record).

**Concurrency.**  All bookkeeping happens on the service's one asyncio loop;
the blocking parts (QEMU start and restore, cubefs subprocesses) run in worker
threads and touch nothing shared until they return.  A sandbox being killed is
removed from the table first, so no request reaches it afterwards; a kill and
the TTL reaper racing for one sandbox kill it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cubefs.cow.index import VolumeIndex
from cubefs.errors import CubefsError, NotFoundError, UsageError
from cubefs.volume.cli import default_volume_dir
from sandbox import templates
from sandbox.admission import MAX_WAIT, AdmissionError, RestoreGate
from sandbox.config import private_dir, state_dir, write_private
from sandbox.ingress import Ingress
from sandbox.lifecycle import Lifecycle
from sandbox.network.pool import Networks, nic
from sandbox.pool import Capacity, CapacityError
from sandbox.snapshots import READY, SnapshotRecord, is_snapshot_id, new_snapshot_id
from sandbox.templates import SandboxTemplate, StoreOptions
from vmm import checkpoint
from vmm import vm as vmm
from vmm.machine import kill_pid
from vmm.qmp import Qmp

log = logging.getLogger("cubefs.sandbox")

ID_ALPHABET = string.ascii_lowercase + string.digits
DEFAULT_TIMEOUT = 300  # seconds; E2B's documented default
MAX_TIMEOUT = 24 * 3600
READY_PORT_WAIT = 60.0  # a template's server must listen this soon after the sandbox starts
MAX_FORKS = 100  # E2B's spec (its SDK asks for at most 20)
ROLLBACK_STOP_WAIT = 30.0  # seconds a stop waits for rollbacks in flight and settling (each ~0.2-4 s)
PAUSE_RETRY = 30  # seconds before a failed pause at a sandbox's timeout is tried again
FORK_CONCURRENCY = 4  # restores at once: each is a QEMU start and a load, CPU-bound under TCG


class ConflictError(CubefsError):
    """The sandbox is not in a state for this (pausing a paused one): 409."""


class NoSpaceError(CubefsError):
    """The node's disk is full (a snapshot's RAM did not fit): 507."""


def new_id() -> str:
    """20 of [a-z0-9]: never a '-' (a Host of PORT-ID.DOMAIN splits on it)."""
    return "i" + "".join(secrets.choice(ID_ALPHABET) for _ in range(19))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SandboxRecord:
    """What the service knows of one sandbox, and what a restarted service reads back."""

    sandbox_id: str
    template: str
    vm: str
    volume: str
    access_token: str
    started: float
    end: float
    cpus: int
    memory_mb: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    state: str = "creating"  # then "running"
    start_pid: int = 0  # the template's start command in the guest, if any
    # E2B's trafficAccessToken: what a caller of the sandbox's ports shows the proxy when
    # public_traffic is off (network.allowPublicTraffic: false).  Not the envd token: a web
    # client given it can reach the sandbox's servers, not run commands in it.  Empty in a
    # record written before it existed: the envd token serves, as it did then.
    traffic_token: str = ""
    public_traffic: bool = True
    mask_request_host: str = ""  # network.maskRequestHost, httpsPorts: how the proxy reaches its ports (ingress.py)
    https_ports: list[int] = field(default_factory=list)
    on_timeout: str = "kill"  # or "pause" (E2B's autoPause; lifecycle.py)
    auto_resume: bool = False  # a paused one is resumed by traffic for it, for ttl seconds
    ttl: int = 0
    paused_at_timeout: bool = False  # what autoResume wakes (a pause asked for through the API stays)
    old_vm: str = ""  # a rollback's VM and volume being ended: a restarted service ends them if it could not
    old_volume: str = ""

    @staticmethod
    def path(sandbox_id: str) -> Path:
        return state_dir() / "sandboxes" / f"{sandbox_id}.json"

    def save(self) -> None:
        write_private(private_dir(state_dir() / "sandboxes") / f"{self.sandbox_id}.json",
                      json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> SandboxRecord:
        doc = json.loads(path.read_text())
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


class Sandbox:
    """A live sandbox: its record, its agent channel and its envd."""

    def __init__(self, record: SandboxRecord) -> None:
        self.record = record
        self.channel: Any = None  # vmm.channel.AgentChannel
        self.envd: Any = None  # sandbox.envd.Envd
        self.vm: vmm.Vm | None = None
        self.busy = asyncio.Lock()  # pause, resume, snapshot, rollback: one at a time

    @property
    def id(self) -> str:
        return self.record.sandbox_id

    def detail(self, envd_version: str, domain: str | None) -> dict[str, Any]:
        """The ``SandboxDetail``/``ListedSandbox`` of the E2B API (every required key)."""
        r = self.record
        return {"templateID": r.template, "sandboxID": r.sandbox_id, "clientID": "cubefs", "alias": r.template,
                "startedAt": iso(r.started), "endAt": iso(r.end), "cpuCount": r.cpus, "memoryMB": r.memory_mb,
                "diskSizeMB": 0, "state": "paused" if r.state == "paused" else "running",
                "envdVersion": envd_version, "metadata": r.metadata,
                "envdAccessToken": r.access_token, "domain": domain}

    def created(self, envd_version: str, domain: str | None) -> dict[str, Any]:
        """The ``Sandbox`` of the E2B API (the create and connect responses)."""
        r = self.record
        return {"templateID": r.template, "sandboxID": r.sandbox_id, "clientID": "cubefs", "alias": r.template,
                "envdVersion": envd_version, "envdAccessToken": r.access_token,
                # the code interpreter SDK sends this one (not X-Access-Token) on its context calls
                "trafficAccessToken": r.traffic_token or r.access_token,
                "domain": domain}


class SandboxTable(dict[str, "Sandbox"]):
    """The service's live sandboxes, telling ``watchers`` of every add and remove (the cluster
    member publishes routes from it): every path that starts or ends a sandbox — create, fork,
    restore, adopt, kill, the reaper — goes through this table, so none can forget to tell."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: list[Callable[[str | None, bool], None]] = []

    def __setitem__(self, key: str, value: Sandbox) -> None:
        super().__setitem__(key, value)
        for watcher in self.watchers:
            watcher(key, True)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        had = key in self
        value = super().pop(key, *default)
        if had:
            for watcher in self.watchers:
                watcher(key, False)
        return value

    def touch(self) -> None:
        """Something else the cluster sees changed: a pool filled, a pooled sandbox evicted."""
        for watcher in self.watchers:
            watcher(None, True)


class Counters:
    def __init__(self) -> None:
        self.created = 0
        self.create_failed = 0
        self.killed = 0
        self.expired = 0
        self.adopted = 0
        self.crashed = 0
        self.from_pool = 0
        self.pool_filled = 0
        self.pool_evicted = 0
        self.snapshots = 0
        self.from_snapshot = 0
        self.rollbacks = 0
        self.auto_paused = 0
        self.auto_resumed = 0
        self.create_seconds: list[float] = []  # the last 1000, for the quantiles in /metrics

    def create_took(self, seconds: float) -> None:
        self.create_seconds.append(seconds)
        del self.create_seconds[:-1000]


class SandboxService:
    def __init__(self, domain: str | None = None, kernel: Path | None = None, pool_size: int = 0,
                 capacity: Capacity | None = None, max_restores: int | None = None,
                 max_queue_wait: float = MAX_WAIT) -> None:
        """Where images, volumes and caches live is each template's (``cubefs sandbox template
        create --store ...``), not the service's.  ``max_restores``: restores at once on the node
        (``sandbox/admission.py``; default one per host CPU); ``max_queue_wait``: a create whose
        restore would start later than that is refused at once (503 with Retry-After; 0: never)."""
        self.domain = domain
        self.kernel = kernel
        self.sandboxes = SandboxTable()
        self.creating: set[str] = set()
        self.counters = Counters()
        self.pool_size = pool_size
        self.pools: dict[str, list[Sandbox]] = {}  # template -> ready sandboxes, paused
        self.capacity = capacity or Capacity.of_host()
        self.restores = RestoreGate(max_restores, max_queue_wait)
        self._making_tasks: dict[str, asyncio.Task[Any]] = {}  # sandbox id -> the task making it (for a stop)
        self._reaper: asyncio.Task[None] | None = None
        self._pause_retry: dict[str, float] = {}  # sandbox -> when its failed pause at timeout is tried again
        self._rolling: set[asyncio.Task[Any]] = set()  # rollbacks and their settling: a stop waits for them
        self._filler: asyncio.Task[None] | None = None
        self._pool_wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._indexes: dict[str, VolumeIndex] = {}
        self._index_lock = threading.Lock()  # clones run in worker threads
        self._snapshot_lock = threading.Lock()  # a snapshot's record: its sync's last write against a delete
        self._syncing: set[threading.Thread] = set()  # snapshots answered, being trimmed and synced
        self.network: Networks | None = None  # serve --network: a NIC per sandbox (sandbox/network/)
        self.peers_file: str | None = None  # in a cluster: the other nodes' peer chunk servers

    @property
    def envd_version(self) -> str:
        from sandbox.envd import Envd

        return str(Envd.ENVD_VERSION)

    # -- life of the service ---------------------------------------------------
    async def start(self) -> None:
        private_dir(state_dir() / "sandboxes")
        if self.network is not None:  # keeps the networks of sandboxes with a record, for adopt or cleanup
            await asyncio.to_thread(self.network.start, {p.stem for p in (state_dir() / "sandboxes").glob("*.json")})
        self._pool_wake = asyncio.Event()
        await self.adopt()
        self._spawn(asyncio.to_thread(self._clean_snapshots))  # leftovers of a killed service
        self._reaper = asyncio.create_task(self._reap())
        if self.pool_size > 0:
            for t in SandboxTemplate.list():
                self.pools.setdefault(t.name, [])
            self._filler = asyncio.create_task(self._fill())

    async def close(self) -> None:
        """Stop serving; the sandboxes keep running for the next service to adopt.  Pooled
        ones, which nobody has yet, are removed (one being made is finished first, then removed)."""
        self.restores.close()  # queued creates answered at once (503), none restored for a gone service
        if self._rolling:  # a rollback in flight or settling: finished, so the next service adopts it running
            await asyncio.wait(list(self._rolling), timeout=ROLLBACK_STOP_WAIT)
        for task in (self._reaper, self._filler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for sbx in list(self.sandboxes.values()):
            await self._disconnect(sbx)
        pooled = [sbx for pool in self.pools.values() for sbx in pool]
        self.pools.clear()
        await asyncio.gather(*(self._finish(sbx) for sbx in pooled), return_exceptions=True)
        if self.network is not None:
            await asyncio.to_thread(self.network.close)
        for done in list(self._syncing):  # snapshots being synced: finished before the indexes close
            await asyncio.to_thread(done.join)
        for index in self._indexes.values():
            index.close()

    async def quiesce(self) -> None:
        """A stop's first step, once the listeners are closed: queued creates fail at once (503),
        restores in flight are cancelled (each removes what it made once its QEMU start
        returns: a VM started for nobody would otherwise be adopted and live out its TTL),
        every open envd stream ends (its client reads the end: "unavailable") and the agent
        sessions close, which ends the proxy's relays to the sandboxes' ports too.  What holds a
        request open is gone, so the server's shutdown need not wait for it.  A sandbox being
        paused, snapshotted or rolled back keeps its session: only its envd streams end."""
        self.restores.close()
        for task in list(self._making_tasks.values()):  # a restore in flight: nobody will get it; it cleans up
            task.cancel()
        sbxs = list(self.sandboxes.values())
        await asyncio.gather(*(sbx.envd.close() for sbx in sbxs if sbx.envd is not None), return_exceptions=True)
        await asyncio.gather(*(self._disconnect(sbx) for sbx in sbxs if not sbx.busy.locked()))

    async def adopt(self) -> None:
        for path in sorted((state_dir() / "sandboxes").glob("*.json")):
            try:
                record = SandboxRecord.load(path)
            except (OSError, ValueError, TypeError) as err:
                log.warning("sandbox record %s is unreadable (%s): removed", path, err)
                path.unlink(missing_ok=True)
                continue
            sbx = Sandbox(record)
            vm = vmm.Vm(record.vm)
            if record.old_vm or record.old_volume:  # a rollback's old VM and volume, not ended before it stopped
                self._spawn(asyncio.to_thread(self._end_old, record.old_vm, record.old_volume, record.template))
                record.old_vm = record.old_volume = ""
                record.save()
            if record.state == "paused" and vm.alive:  # its agent sleeps: connected on resume
                sbx.vm = vm
                self.sandboxes[record.sandbox_id] = sbx
                self.capacity.held[record.sandbox_id] = (record.cpus, record.memory_mb)
                self.counters.adopted += 1
                log.info("sandbox %s adopted, paused (template %s, VM %s)", record.sandbox_id, record.template,
                         record.vm)
                continue
            if record.state not in ("running", "rolling-back") or not vm.alive:
                why = {"creating": "was still being created", "pooled": "was in a pool"}.get(
                    record.state, "had lost its VM")
                log.warning("sandbox %s %s when the service stopped: cleaned away", record.sandbox_id, why)
                self._spawn(self._cleanup(record))  # in the background: serving need not wait for it
                continue
            try:  # a rolled-back guest not settled when the service stopped: settled now (its clock, tokens)
                await self._connect(sbx, vm, restored=record.state == "rolling-back")
            except (CubefsError, OSError) as err:
                log.warning("sandbox %s: its agent does not answer (%s): killed", record.sandbox_id, err)
                self._spawn(self._cleanup(record))
                continue
            if record.state == "rolling-back":
                record.state = "running"
                record.save()
            self.sandboxes[record.sandbox_id] = sbx
            self.capacity.held[record.sandbox_id] = (record.cpus, record.memory_mb)
            self.counters.adopted += 1
            log.info("sandbox %s adopted (template %s, VM %s, %.0f s left)", record.sandbox_id, record.template,
                     record.vm, record.end - time.time())

    # -- create ------------------------------------------------------------------
    async def create(self, template_id: str, timeout: int | None = None, metadata: dict[str, str] | None = None,
                     env_vars: dict[str, str] | None = None, gone: Callable[[], bool] | None = None) -> Sandbox:
        """A running sandbox of ``template_id``: from its pool when one is ready, else made now (a
        restore: it queues at the node's restore gate, and is dropped if ``gone()`` before its turn)."""
        t0 = time.monotonic()
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        check_timeout(timeout)
        if is_snapshot_id(template_id) or not SandboxTemplate.path(template_id).exists():
            snap: SnapshotRecord | None = None
            with contextlib.suppress(NotFoundError):
                snap = SnapshotRecord.find(template_id)
            if snap is not None and snap.memory:
                return await self._from_snapshot(snap, timeout, metadata or {}, env_vars or {}, t0, gone)
            if snap is not None:
                return await self._create(SandboxTemplate.load(snap.template), timeout, metadata, env_vars, t0,
                                          disk=(snap.volume, READY), gone=gone)
        return await self._create(SandboxTemplate.load(template_id), timeout, metadata, env_vars, t0, gone=gone)

    async def _create(self, template: SandboxTemplate, timeout: int, metadata: dict[str, str] | None,
                      env_vars: dict[str, str] | None, t0: float, disk: tuple[str, str] | None = None,
                      gone: Callable[[], bool] | None = None) -> Sandbox:
        if self.pool_size > 0 and self._pool_wake is not None:
            self.pools.setdefault(template.name, [])
            self._pool_wake.set()
        sbx = self._take(template.name) if disk is None else None
        pooled = sbx is not None
        if sbx is None:
            self._make_room(template.cpus, template.memory_mb)
            sbx = await self._build(template, "creating", disk, gone)
        try:
            await self._assign(sbx, timeout, metadata or {}, env_vars or {}, resume=pooled)
        except BaseException as err:
            self.counters.create_failed += 1
            log.warning("sandbox %s (template %s): create failed: %s", sbx.id, template.name, err)
            await self._finish(sbx)
            raise
        self.sandboxes[sbx.id] = sbx
        took = time.monotonic() - t0
        self.counters.created += 1
        self.counters.from_pool += pooled
        self.counters.create_took(took)
        log.info("sandbox %s created from template %s in %.3f s (%s; VM %s, volume %s, timeout %d s)", sbx.id,
                 template.name, took, "from the pool" if pooled else "made now", sbx.record.vm, sbx.record.volume,
                 timeout)
        return sbx

    async def _build(self, template: SandboxTemplate, state: str, disk: tuple[str, str] | None = None,
                     gone: Callable[[], bool] | None = None) -> Sandbox:
        """Make a sandbox of ``template`` up to its start command running (``state``: creating
        or pooled).  Capacity is booked before anything is made (a create that does not fit is
        refused at once, not after queueing); a failure leaves nothing.  The restore and the
        agent's first answers hold a slot of the restore gate (a pool fill yields to queued
        creates); the start command does not (it may wait up to a minute for a port)."""
        async with self._making(template.name, template.cpus, template.memory_mb, f"template {template.name}",
                                state=state) as sbx:
            async with self.restores.slot(gone, low=state == "pooled"):
                self._restoring(sbx)
                vm = await _finish_thread(self._start_vm, template, sbx.record, disk)
                await self._connect(sbx, vm)
            await self._start_command(sbx, template)
        return sbx

    def _restoring(self, sbx: Sandbox) -> None:
        """Admitted: its restore starts, and a stop cancels it (a queued one fails at the gate).  A
        pool fill is not: ``close`` cancels the filler, and a second cancel would cut its cleanup."""
        if sbx.record.state != "pooled" and (task := asyncio.current_task()) is not None:
            self._making_tasks[sbx.id] = task

    @contextlib.asynccontextmanager
    async def _making(self, template: str, cpus: int, memory_mb: int, what: str,
                      **fields: Any) -> AsyncIterator[Sandbox]:
        """A new sandbox's record, booked (capacity), written (``creating``: a restarted service
        cleans it away) and counted as being made while the body makes it; a body that fails
        (or is cancelled) leaves nothing of it."""
        now = time.time()
        sid = new_id()
        record = SandboxRecord(sid, template, f"sbx-{sid}", f"sbx-{sid}-0", secrets.token_urlsafe(24), now, now,
                               cpus, memory_mb, traffic_token=secrets.token_urlsafe(24), **fields)
        self.capacity.reserve(sid, cpus, memory_mb)
        record.save()
        self.creating.add(sid)
        sbx = Sandbox(record)
        try:
            yield sbx
        except AdmissionError as err:  # never admitted to restore: nothing was made but the booking
            self.counters.create_failed += 1
            log.info("sandbox %s (%s): not made: %s", sid, what, err)
            self.capacity.release(sid)
            SandboxRecord.path(sid).unlink(missing_ok=True)
            raise
        except BaseException as err:
            self.counters.create_failed += 1
            log.warning("sandbox %s (%s): making it failed: %s", sid, what, err)
            await asyncio.shield(self._finish(sbx))  # a further cancel (a stop's) must not cut it short
            raise
        finally:
            self.creating.discard(sid)
            self._making_tasks.pop(sid, None)

    async def _assign(self, sbx: Sandbox, timeout: int, metadata: dict[str, str], env_vars: dict[str, str],
                      resume: bool) -> None:
        """Make a made sandbox the caller's: resumed (from a pool: with fresh randomness and the
        host's clock, since it slept), its envVars, metadata and TTL."""
        r = sbx.record
        t0 = time.monotonic()
        phases = []
        if resume:
            await asyncio.to_thread(qmp, sbx, "cont")
            phases.append(("cont", time.monotonic()))
            await self._freshen(sbx)
            phases.append(("freshen", time.monotonic()))
        await sbx.channel.set_defaults(user="user", env=env_vars)
        phases.append(("defaults", time.monotonic()))
        r.metadata, r.env_vars = dict(metadata), dict(env_vars)
        r.started = time.time()
        r.end = r.started + timeout
        r.state = "running"
        r.save()
        phases.append(("saved", time.monotonic()))
        log.info("sandbox %s: made the caller's in %.1f ms (%s)", r.sandbox_id, (phases[-1][1] - t0) * 1e3,
                 ", ".join(f"{name} {(t - t0) * 1e3:.1f}" for name, t in phases))

    # -- pools ------------------------------------------------------------------------
    def _take(self, template: str) -> Sandbox | None:
        """A pooled sandbox whose VM still runs (no await: two creates never take one)."""
        pool = self.pools.get(template) or []
        while pool:
            sbx = pool.pop(0)
            if self._pool_wake is not None:
                self._pool_wake.set()
            if sbx.vm is not None and sbx.vm.alive:
                return sbx
            log.warning("pooled sandbox %s of template %s lost its VM: removed", sbx.id, template)
            self._spawn(self._finish(sbx))
        return None

    def _make_room(self, cpus: int, memory_mb: int) -> None:
        """Evict pooled sandboxes (fullest pool first) until a sandbox of this size fits."""
        while not self.capacity.fits(cpus, memory_mb):
            pools = [p for p in self.pools.values() if p]
            if not pools:
                return  # _build's reservation refuses it, with the figures
            sbx = max(pools, key=len).pop()
            self.capacity.release(sbx.id)
            self.counters.pool_evicted += 1
            self.sandboxes.touch()
            log.info("pooled sandbox %s (template %s) evicted to make room", sbx.id, sbx.record.template)
            self._spawn(self._finish(sbx))

    async def _warm(self, sbx: Sandbox) -> None:
        """Run what the SDK runs first (``bash -l -c``, as the user) once before pausing: the
        caller's first command then finds bash, its libraries and profile in the guest's page
        cache and, under TCG, the code of the spawn, of bash and of the profile's ``id -u``
        already translated (pooled create + first ``commands.run("true")``: p50 0.40-0.53 s
        warmed, 1.0-2.4 s not; docs/benchmarks.md "The pool's warm-up").

        What it costs is what the first command costs anyway: a sandbox made cold holds, after
        its first ``true``, the guest pages (+4.9 MiB, most of it the page cache of what bash
        reads) and translated code (+8 MiB) a pooled one holds before its first.  So nothing
        cheaper gives the same first command: ``bash -c`` (no profile) saves ~3.8 MiB and is
        0.22-0.29 s slower at p50; reading the files only (the agent's file helper) or running
        ``/bin/true`` left half or more of the first command's wait."""
        try:
            proc = await sbx.channel.spawn(["/bin/bash", "-l", "-c", "true"])
            async for _event in proc.events():
                pass
        except CubefsError as err:  # an image without bash: nothing to warm
            log.debug("sandbox %s: warming: %s", sbx.id, err)

    def _next_to_fill(self) -> SandboxTemplate | None:
        for name in sorted(self.pools, key=lambda n: len(self.pools[n])):
            if len(self.pools[name]) >= self.pool_size:
                return None
            try:
                t = SandboxTemplate.load(name)
            except CubefsError:
                self.pools.pop(name, None)  # the template was removed
                continue
            return t if self.capacity.fits(t.cpus, t.memory_mb) else None
        return None

    async def _fill(self) -> None:
        """Keep every pool at ``pool_size``, one sandbox at a time."""
        assert self._pool_wake is not None
        while True:
            self._pool_wake.clear()
            template = self._next_to_fill()
            if template is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pool_wake.wait(), 2.0)
                continue
            try:
                sbx = await self._build(template, "pooled")  # its restore yields to queued creates
            except CapacityError:
                continue
            except Exception as err:  # a broken template must not spin: try again later
                log.warning("pool of template %s: %s", template.name, err)
                await asyncio.sleep(5)
                continue
            try:
                await self._warm(sbx)
                await asyncio.to_thread(qmp, sbx, "stop")
            except BaseException as err:  # made but not pooled (or the service stopping): remove it
                await asyncio.shield(self._finish(sbx))
                if not isinstance(err, Exception):
                    raise
                log.warning("pool of template %s: %s", template.name, err)
                continue
            self.pools.setdefault(template.name, []).append(sbx)
            self.sandboxes.touch()
            self.counters.pool_filled += 1
            log.info("pool of template %s: %d ready (sandbox %s)", template.name,
                     len(self.pools[template.name]), sbx.id)

    def _start_vm(self, template: SandboxTemplate, record: SandboxRecord,
                  disk: tuple[str, str] | None = None) -> vmm.Vm:
        """A VM restored from the template's VM template on a clone of ``disk`` (a volume and
        snapshot; the template's own by default)."""
        opts = template.store_options
        index = self._volume_index(opts.volume_dir)
        with self._index_lock:
            index.clone(*(disk or (template.volume, templates.READY)), [record.volume])
        vm_template = templates.vm_template_for(template.cpus, template.memory_mb, self.kernel)
        with nic(self.network, record.sandbox_id) as netdev:
            return vmm.Vm.start(record.vm, self._root(opts, record.volume, template.name), vm_template.spec,
                                template=vm_template.name, netdev=netdev)

    def _root(self, opts: StoreOptions, volume: str, template: str) -> vmm.Root:
        """A sandbox's root: its volume, served by the node's root host for the image, reading
        through the cluster's peers when the node is in one; of a disk template (``--disk``),
        the template's image over virtio-fs with the volume as the disk of its writes."""
        try:
            root_image = SandboxTemplate.load(template).root_image
        except CubefsError:
            root_image = ""
        return templates.root_for(opts, volume, root_image, self.peers_file)

    def _volume_index(self, volume_dir: str | None) -> VolumeIndex:
        """The volume index of ``volume_dir``, opened once: a clone in it takes ~1 ms where a
        ``cubefs clone`` process took ~0.25 s of a create, and LMDB forbids opening one
        environment twice in a process (its locks are per process)."""
        path = os.path.abspath(volume_dir or default_volume_dir())
        with self._index_lock:
            if path not in self._indexes:
                self._indexes[path] = VolumeIndex(path)
            return self._indexes[path]

    async def _connect(self, sbx: Sandbox, vm: vmm.Vm, restored: bool = False) -> None:
        """Open the sandbox's agent channel.  ``restored`` (a VM just restored from a snapshot):
        its identity (``_freshen``) and tokens (``_write_tokens``) too, sent together: the agent
        answers requests in order, and a restored guest's round trips are slow (its code is
        translated anew under TCG), so three one after another took ~0.05 s more
        (docs/benchmarks.md)."""
        from sandbox.envd import Envd
        from vmm.channel import AgentChannel

        r = sbx.record
        sbx.vm = vm
        sbx.channel = await AgentChannel.connect(str(vm.dir / "agent.sock"), f"sandbox {r.sandbox_id}", timeout=30)
        calls = [sbx.channel.set_defaults(user="user", env=r.env_vars)]
        if restored:
            calls += [self._freshen(sbx), self._write_tokens(sbx)]
        await _all_or_first_failure(calls)
        sbx.envd = Envd(sbx.channel, access_token=r.access_token)

    async def _freshen(self, sbx: Sandbox) -> None:
        """After a restore or a pause: new randomness, the host's clock, the VM's own hostname
        and machine-id (its VM's record keeps them)."""
        vm = sbx.vm or vmm.Vm(sbx.record.vm)
        await sbx.channel.freshen(str(vm.info.get("hostname") or sbx.record.vm),
                                  str(vm.info.get("machine_id") or uuid.uuid4().hex))

    async def _start_command(self, sbx: Sandbox, template: SandboxTemplate) -> None:
        argv = templates.start_script(template)
        if argv is None:
            return
        ch = sbx.channel
        await self._write_tokens(sbx, template)
        proc = await ch.spawn(argv, user="root", cwd="/", tag="start-cmd")
        sbx.record.start_pid = proc.pid
        await proc.detach()
        if template.ready_port:
            await self._wait_port(sbx, template.ready_port)

    async def _write_tokens(self, sbx: Sandbox, template: SandboxTemplate | None = None,
                            channel: Any = None) -> None:
        """The sandbox's tokens where its start command's server reads them (root's only): at
        its start, and after every restore (a snapshot's guest holds the tokens of the sandbox
        it was taken of; this one has its own).  Nothing for a template without a start command.
        ``channel``: the agent's, if not yet the sandbox's (a rollback settling)."""
        r = sbx.record
        ch = channel or sbx.channel
        if template is None:
            try:
                template = SandboxTemplate.load(r.template)
            except NotFoundError:
                return
        if templates.start_script(template) is None:
            return
        if not template.traffic_token:
            r.traffic_token = ""  # its server reads one token: the envd token serves as both
        text = r.access_token + (f"\n{r.traffic_token}" if r.traffic_token else "") + "\n"

        async def one() -> Any:
            yield text.encode()

        await ch.make_dir(str(Path(templates.TOKEN_PATH).parent), user="root")
        await ch.write_file(templates.TOKEN_PATH, one(), user="root", mode=0o600)

    async def _wait_port(self, sbx: Sandbox, port: int) -> None:
        deadline = time.monotonic() + READY_PORT_WAIT
        while True:
            try:
                _reader, writer = await sbx.channel.open_tcp(port)
            except CubefsError:
                if time.monotonic() > deadline:
                    raise CubefsError(f"sandbox {sbx.id}: nothing listens on port {port} "
                                      f"{READY_PORT_WAIT:.0f} s after start") from None
                await asyncio.sleep(0.1)
                continue
            await writer.close()
            return

    # -- pause, resume -------------------------------------------------------------------
    async def pause(self, sandbox_id: str, at_timeout: bool = False) -> None:
        """Stop the guest where it is (memory and disk kept, in place); its envd answers 502
        until it is resumed; it does not time out while paused.  ConflictError if paused."""
        sbx = self.get(sandbox_id)
        async with sbx.busy:
            if sbx.record.state == "paused":
                raise ConflictError(f"sandbox {sandbox_id} is already paused")
            await self._disconnect(sbx)
            await asyncio.to_thread(qmp, sbx, "stop")
            sbx.record.state = "paused"
            sbx.record.paused_at_timeout = at_timeout
            sbx.record.save()
        log.info("sandbox %s paused", sandbox_id)

    async def resume(self, sandbox_id: str, timeout: int | None) -> bool:
        """``connect``: resume a paused sandbox (True), or only lengthen a running one's TTL."""
        sbx = self.get(sandbox_id)
        async with sbx.busy:
            if sbx.record.state != "paused":
                self.extend(sandbox_id, timeout)
                return False
            timeout = DEFAULT_TIMEOUT if timeout is None else timeout
            check_timeout(timeout)
            await asyncio.to_thread(qmp, sbx, "cont")
            try:
                await self._connect(sbx, sbx.vm or vmm.Vm(sbx.record.vm))
                await self._freshen(sbx)  # the clock stood still while it slept
            except BaseException:  # paused again, as its record says, and no channel left open
                await self._disconnect(sbx)
                with contextlib.suppress(CubefsError, OSError):
                    await asyncio.shield(asyncio.to_thread(qmp, sbx, "stop"))
                raise
            sbx.record.state = "running"
            sbx.record.paused_at_timeout = False
            sbx.record.end = time.time() + timeout
            sbx.record.save()
        log.info("sandbox %s resumed", sandbox_id)
        return True

    # -- snapshots, fork, rollback -----------------------------------------------------
    async def snapshot(self, sandbox_id: str, name: str | None = None, hidden: bool = False,
                       memory: bool = True, shared: bool = False) -> SnapshotRecord:
        """Memory and disk of a running sandbox at one instant (it is paused for that instant
        only), kept under ``STATE/snapshots`` until deleted, whatever becomes of the sandbox."""
        sbx = self.get(sandbox_id)
        if name is not None:
            vmm.check_name(name, "snapshot")
        async with sbx.busy:
            if sbx.record.state != "running" or sbx.vm is None:
                raise ConflictError(f"sandbox {sandbox_id} is {sbx.record.state}: only a running one is snapshotted")
            if not memory:  # what the guest's page cache holds of the root, to the volume first
                proc = await sbx.channel.spawn(["/bin/sync"], user="root")
                async for _event in proc.events():
                    pass
            rec = await _finish_thread(self._take_snapshot, sbx, name, hidden, memory, shared)
        self.counters.snapshots += 1
        log.info("sandbox %s: snapshot %s taken (guest paused %.0f ms, %.2f s in all, %.1f MiB of RAM kept)",
                 sandbox_id, rec.snapshot_id, rec.paused_seconds * 1000, rec.seconds, rec.ram_bytes / 2**20)
        return rec

    def _take_snapshot(self, sbx: Sandbox, name: str | None, hidden: bool, memory: bool,
                       shared: bool) -> SnapshotRecord:
        from sandbox import snapshots

        r = sbx.record
        assert sbx.vm is not None
        sid = new_snapshot_id()
        opts = _template_opts(r.template)
        index = self._volume_index(opts.volume_dir)
        rec = SnapshotRecord(sid, r.sandbox_id, r.template, snapshots.volume_of(sid), r.cpus,
                             r.memory_mb, time.time(), [name] if name else [], hidden, memory, dict(r.env_vars))
        made: list[str] = []
        later = memory and not shared  # trimmed and synced after the answer (sandbox/snapshots.py)
        ck: checkpoint.Checkpoint | None = None

        def at_instant() -> tuple[str | None, str | None]:
            with self._index_lock:
                snap = index.snapshot(r.volume)
            made.append(snap.name)
            return r.volume, snap.name

        try:
            if memory:
                ck = checkpoint.take(sbx.vm, snapshots.new_dir(sid) / "ckpt", at_instant, shared=shared,
                                     trim_later=later)
                rec.paused_seconds, rec.seconds, rec.ram_bytes = ck.paused_seconds, ck.seconds, ck.ram_bytes
                rec.phases = dict(ck.phases)
            else:  # the disk alone (the guest's page cache was synced by the caller)
                t0 = time.monotonic()
                snapshots.new_dir(sid)
                at_instant()
                rec.seconds = round(time.monotonic() - t0, 4)
            t1 = time.monotonic()
            with self._index_lock:  # the snapshot's own disk, so it outlives the sandbox
                index.clone(r.volume, made[0], [rec.volume])
                index.snapshot(rec.volume, READY)
                index.remove_snapshot(r.volume, made[0])
            t2 = time.monotonic()
            if later:
                rec.durable, rec.boot_id = False, snapshots.boot_id()
            else:
                index.sync_all()
            t3 = time.monotonic()
            rec.phases |= {"clone": round(t2 - t1, 4), "sync": round(t3 - t2, 4)}
            rec.save()
            rec.phases["record"] = round(time.monotonic() - t3, 4)
            log.info("snapshot %s: checkpoint %.3f s (QEMU's save %.3f), volume clone %.3f s, sync %.3f s; phases %s",
                     sid, rec.seconds, ck.saved_seconds if ck else 0.0, t2 - t1, t3 - t2, rec.phases)
            if later:
                assert ck is not None
                done = threading.Thread(target=self._make_durable, args=(rec, ck, index), name=f"sync {sid}")
                self._syncing.add(done)
                done.start()
        except BaseException as err:
            if ck is not None:
                checkpoint.forget(ck)
            snapshots.remove_dir(sid)
            self._remove_volume(rec.volume, opts)
            if made:  # the sandbox's own snapshot of that instant, if the failure came after it
                with self._index_lock, contextlib.suppress(CubefsError):
                    index.remove_snapshot(r.volume, made[0])
            if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err):
                raise NoSpaceError(f"sandbox {r.sandbox_id}: no room for its snapshot in "
                                   f"{snapshots.snapshots_dir()} (disk full); the sandbox runs on") from None
            raise
        return rec

    def _make_durable(self, rec: SnapshotRecord, ck: checkpoint.Checkpoint | None, index: VolumeIndex) -> None:
        """After the answer: the RAM file trimmed (if ``ck``), the volume directory and the
        snapshot's files synced, the record marked durable.  A snapshot deleted meanwhile is
        left alone; a failure leaves the record not durable (the next start syncs it)."""
        t0 = time.monotonic()
        try:
            if ck is not None:
                try:
                    checkpoint.trim(ck)
                except OSError as err:  # untrimmed is a good snapshot, only a bigger one
                    if not (rec.dir / "snapshot.json").exists():
                        return
                    log.warning("snapshot %s: its RAM file stays untrimmed: %s", rec.snapshot_id, err)
            t1 = time.monotonic()
            index.sync_all()  # the volume directory: the snapshot's volume and the blocks under it
            checkpoint.fsync_tree(rec.dir)  # its RAM file and checkpoint (--snapshot-dir may be another filesystem)
            with self._snapshot_lock:
                if not (rec.dir / "snapshot.json").exists():
                    return  # deleted meanwhile
                rec.durable = True
                rec.phases |= {"later_trim": round(t1 - t0, 4), "later_sync": round(time.monotonic() - t1, 4)}
                rec.save()
            log.info("snapshot %s durable (trim %.3f s, sync %.3f s after the answer)", rec.snapshot_id, t1 - t0,
                     time.monotonic() - t1)
        except Exception as err:  # a thread's last word: logged, retried at the next start
            log.warning("snapshot %s: syncing it failed (%s): retried when the service starts", rec.snapshot_id, err)
        finally:
            self._syncing.discard(threading.current_thread())

    def _clean_snapshots(self) -> None:
        """What a service killed while snapshotting or forking left: a snapshot directory with
        no record (half-made) or a fork's hidden snapshot, and the volume each had."""
        from sandbox import snapshots

        root = snapshots.snapshots_dir()
        started = time.time() - 1.0  # what this service makes from now on is not a leftover
        boot = snapshots.boot_id()
        kept = set()
        for rec in SnapshotRecord.list(include_hidden=True):
            if rec.hidden:
                continue
            if not rec.durable and rec.boot_id != boot:  # the host went down before its sync
                log.warning("snapshot %s was not yet synced when the host went down: removed", rec.snapshot_id)
                continue
            kept.add(rec.snapshot_id)
            if not rec.durable:  # only the service stopped: its files are all in the page cache
                self._make_durable(rec, None, self._volume_index(_template_opts(rec.template).volume_dir))
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.name in kept or not snapshots.is_snapshot_id(d.name) or d.stat().st_mtime > started:
                continue
            try:
                rec = SnapshotRecord.load(d.name)
                opts = _template_opts(rec.template)
            except (CubefsError, OSError, ValueError, TypeError):
                rec, opts = None, StoreOptions(volume_dir=os.environ.get("CUBEFS_VOLUME_DIR"))
            log.warning("snapshot %s was %s when the service stopped: removed", d.name,
                        "a fork's" if rec is not None else "half-made")
            self._remove_volume(snapshots.volume_of(d.name), opts)
            snapshots.remove_dir(d.name)

    def startable(self) -> dict[str, list[int]]:
        """Every name a create may give on this node — templates, snapshot IDs and names — with
        the (vCPUs, MiB) a sandbox of it takes: what a cluster scheduler filters on."""
        out = {t.name: [t.cpus, t.memory_mb] for t in SandboxTemplate.list()}
        for snap in SnapshotRecord.list():
            for name in (snap.snapshot_id, *snap.names):
                out[name] = [snap.cpus, snap.memory_mb]
        return out

    def list_snapshots(self, sandbox_id: str | None = None, name: str | None = None) -> list[SnapshotRecord]:
        return [s for s in SnapshotRecord.list() if (sandbox_id is None or s.sandbox_id == sandbox_id)
                and (name is None or name in s.names or name == s.snapshot_id)]

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        try:
            rec = SnapshotRecord.find(snapshot_id)
        except NotFoundError:
            return False
        await asyncio.to_thread(self._delete_snapshot, rec)
        log.info("snapshot %s deleted", rec.snapshot_id)
        return True

    def _delete_snapshot(self, rec: SnapshotRecord) -> None:
        from sandbox import snapshots

        with self._snapshot_lock:  # not re-saved by its sync after the answer
            (rec.dir / "snapshot.json").unlink(missing_ok=True)  # gone for readers first
        self._remove_volume(rec.volume, _template_opts(rec.template))
        snapshots.remove_dir(rec.snapshot_id)

    async def _from_snapshot(self, snap: SnapshotRecord, timeout: int, metadata: dict[str, str],
                             env_vars: dict[str, str], t0: float, gone: Callable[[], bool] | None = None) -> Sandbox:
        """A new sandbox that continues from ``snap``: its processes, memory and files (the
        restore through the node's restore gate, as a create's)."""
        await asyncio.to_thread(self._check_restorable, snap)  # before anything is made
        async with self._making(snap.template, snap.cpus, snap.memory_mb, f"snapshot {snap.snapshot_id}",
                                env_vars=dict(snap.env_vars)) as sbx:
            async with self.restores.slot(gone):
                self._restoring(sbx)
                vm = await _finish_thread(self._restore_vm, snap, sbx.record)
                await self._connect(sbx, vm, restored=True)  # with its identity and tokens
            await self._assign(sbx, timeout, metadata, {**snap.env_vars, **env_vars}, resume=False)
        sid, record = sbx.id, sbx.record
        self.sandboxes[sid] = sbx
        took = time.monotonic() - t0
        self.counters.created += 1
        self.counters.from_snapshot += 1
        self.counters.create_took(took)
        log.info("sandbox %s created from snapshot %s in %.3f s (VM %s, volume %s)", sid, snap.snapshot_id, took,
                 record.vm, record.volume)
        return sbx

    def _check_restorable(self, snap: SnapshotRecord) -> None:
        """ConflictError unless ``snap``'s checkpoint loads on this node's QEMU, machine type and
        guest kernel: asked before a rollback pauses the sandbox or a create makes anything, as a
        load that fails halfway costs the sandbox (a rollback's old VM is already stopped then)."""
        if not snap.memory:
            raise ConflictError(f"snapshot {snap.snapshot_id} holds the sandbox's files only (no memory): "
                                "a sandbox cannot be rolled back to it")
        try:
            checkpoint.check_machine(checkpoint.Checkpoint.load(snap.dir / "ckpt"))
        except checkpoint.StaleCheckpointError:
            raise ConflictError(f"snapshot {snap.snapshot_id} was saved by another QEMU, machine type or guest "
                                "kernel than this node runs: it cannot be restored (take it again)") from None

    def _restore_vm(self, snap: SnapshotRecord, record: SandboxRecord) -> vmm.Vm:
        opts = _template_opts(snap.template)
        index = self._volume_index(opts.volume_dir)
        with self._index_lock:
            index.clone(snap.volume, READY, [record.volume])
        ck = checkpoint.Checkpoint.load(snap.dir / "ckpt")
        with nic(self.network, record.sandbox_id) as netdev:
            return checkpoint.restore(record.vm, self._root(opts, record.volume, snap.template), ck, freshen=False,
                                      netdev=netdev)

    async def fork(self, sandbox_id: str, count: int, timeout: int | None) -> list[Sandbox | BaseException]:
        """``count`` sandboxes that continue from this one's present instant (it runs on); one
        result per fork, a sandbox or why that one failed."""
        if not 1 <= count <= MAX_FORKS:
            raise UsageError(f"count must be from 1 to {MAX_FORKS}, not {count}")
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        check_timeout(timeout)
        src = self.get(sandbox_id)
        if src.vm is not None:  # a VM from before an upgrade: its children could not load its state
            try:
                await asyncio.to_thread(checkpoint.check_vm, src.vm)
            except checkpoint.StaleCheckpointError:
                raise ConflictError(f"sandbox {sandbox_id} runs on another QEMU, machine type or guest kernel than "
                                    "this node starts now (it started before they changed): it cannot be forked"
                                    ) from None
        # the whole RAM, mapped by every child: they share the parent's pages of this instant
        snap = await self.snapshot(sandbox_id, hidden=True, shared=True)
        try:
            sem = asyncio.Semaphore(FORK_CONCURRENCY)

            async def one() -> Sandbox:
                async with sem:
                    return await self._from_snapshot(snap, timeout, dict(src.record.metadata), {}, time.monotonic())

            results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
            parent = Ingress(src.record.public_traffic, src.record.mask_request_host, src.record.https_ports)
            life = Lifecycle.of(src.record)
            for child in results:  # as its parent is reached (one that asks for its traffic token: its own)
                if isinstance(child, Sandbox) and parent.apply(child.record) | life.apply(child.record):
                    child.record.save()
        finally:  # the children map its RAM file: unlinked, it lives until the last of them ends
            await asyncio.shield(asyncio.to_thread(self._delete_snapshot, snap))
        log.info("sandbox %s forked: %d of %d running", sandbox_id,
                 sum(isinstance(r, Sandbox) for r in results), count)
        return list(results)

    async def rollback(self, sandbox_id: str, snapshot_id: str) -> Sandbox:
        """Put a sandbox back to a snapshot in place: same ID, token, TTL and metadata; its
        memory, processes and files as they were in the snapshot (processes holding files
        open included: nothing is unmounted, the whole VM is restored).

        The call answers once the restored VM runs.  Its agent's new session and what the
        guest must get before anyone uses it (the host's clock, and where they differ from the
        snapshot's: the default user's environment, the tokens) are settled right after
        (``_settle``, ~0.1-0.2 s of a restored guest's first, TCG-translated round trips);
        until then the sandbox's envd and ports are a ``_Settling`` that holds every request
        and hands it over once they are done, so no client request reaches the guest before
        its clock is right.  A snapshot whose checkpoint this node cannot load (saved by
        another QEMU, machine type or guest kernel; or files only) is refused first, 409, the
        sandbox untouched; a rollback that fails after that, settling included, leaves
        the sandbox gone, never half-rolled-back (docs/design.md).  Its record says
        ``rolling-back`` until settled, and names the old VM and volume until they are ended: a
        service killed meanwhile ends those on restart and settles the new VM, or cleans it away
        if it is gone.  A stop waits for rollbacks in flight; a caller gone does not cut one
        short; a kill during one leaves nothing of it; it takes a slot of the restore gate."""
        sbx = self.get(sandbox_id)
        snap = SnapshotRecord.find(snapshot_id)
        if (snap.cpus, snap.memory_mb) != (sbx.record.cpus, sbx.record.memory_mb):
            raise UsageError(f"snapshot {snap.snapshot_id} is of a {snap.cpus}-vCPU {snap.memory_mb} MiB sandbox; "
                             f"sandbox {sandbox_id} has {sbx.record.cpus} vCPU {sbx.record.memory_mb} MiB")
        await asyncio.to_thread(self._check_restorable, snap)  # refused with the sandbox untouched
        task = asyncio.ensure_future(self._rollback(sbx, snap))
        self._track(task)
        return await asyncio.shield(task)  # a caller gone (a stop's cancel) does not cut it short: close() waits

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._rolling.add(task)
        task.add_done_callback(self._rolling.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its caller may be gone: retrieved

    async def _rollback(self, sbx: Sandbox, snap: SnapshotRecord) -> Sandbox:
        sandbox_id = sbx.id
        t0 = time.monotonic()
        await sbx.busy.acquire()  # released by _settle once the guest is settled, else below
        settling = False
        try:
            if self.sandboxes.get(sandbox_id) is not sbx:  # killed while this waited its turn
                raise NotFoundError(f"sandbox {sandbox_id!r} not found")
            r = sbx.record
            old_volume = r.volume
            phases: dict[str, float] = {}
            async with self.restores.slot():  # a QEMU start and a load, as a create's: the node's restore gate
                await self._disconnect(sbx)
                r.state = "rolling-back"  # saved with the new VM's name: adopt() settles it, or cleans it away
                try:
                    old_vm = await _finish_thread(self._rollback_vm, sbx, snap, phases)
                except BaseException as err:  # the sandbox is gone: say so, leave nothing
                    killed = self.sandboxes.get(sandbox_id) is not sbx  # its VM went under the restore
                    log.warning("sandbox %s: rollback to %s failed, sandbox removed: %s", sandbox_id,
                                snap.snapshot_id, "it was killed" if killed else err)
                    self.sandboxes.pop(sandbox_id, None)
                    await asyncio.shield(self._finish(sbx))
                    if old_volume != r.volume:
                        await asyncio.shield(asyncio.to_thread(self._remove_volume, old_volume,
                                                               _template_opts(r.template)))
                    if killed and isinstance(err, Exception):
                        raise NotFoundError(f"sandbox {sandbox_id!r} was killed during its rollback") from None
                    raise
            self._spawn(asyncio.to_thread(self._end_old_vm, sbx, old_vm, old_volume if old_volume != r.volume
                                          else None, r.template))
            if self.sandboxes.get(sandbox_id) is not sbx:  # killed during the restore: what it made goes too
                await asyncio.shield(asyncio.to_thread(self._destroy, r))
                raise NotFoundError(f"sandbox {sandbox_id!r} was killed during its rollback")
            gate = _Settling(sbx)
            sbx.envd = sbx.channel = gate
            self.counters.rollbacks += 1
            phases["answer"] = round(time.monotonic() - t0, 4)
            settle = asyncio.ensure_future(self._settle(sbx, snap, gate, phases, t0))
            self._track(settle)
            settling = True
        finally:
            if not settling:
                sbx.busy.release()
        log.info("sandbox %s rolled back to snapshot %s: running in %.3f s (phases %s; restore: %s)", sandbox_id,
                 snap.snapshot_id, phases["answer"], phases, sbx.vm.info.get("restore_phases") if sbx.vm else None)
        return sbx

    async def _settle(self, sbx: Sandbox, snap: SnapshotRecord, gate: _Settling, phases: dict[str, float],
                      t0: float) -> None:
        """A rolled-back sandbox's agent session, then what its guest needs before any client
        request: the host's clock, new randomness, its own hostname and machine-id (``freshen``,
        one request), always; the default user's environment and the tokens only where the
        snapshot's differ (a snapshot of another sandbox, or taken before an env change): each
        request is a round trip the restored guest runs for the first time under TCG, ~5x its
        second run (docs/benchmarks.md).  Then the channel and envd become the sandbox's and the
        held requests go on.  Holds ``sbx.busy`` until done; any failure removes the sandbox."""
        from sandbox.envd import Envd
        from vmm.channel import AgentChannel

        r = sbx.record
        vm = sbx.vm
        channel: AgentChannel | None = None
        t1 = time.monotonic()
        try:
            assert vm is not None
            channel = await AgentChannel.connect(str(vm.dir / "agent.sock"), f"sandbox {r.sandbox_id}",
                                                 timeout=vmm.RESTORE_AGENT_TIMEOUT)
            phases["hello"] = round(time.monotonic() - t1, 4)
            calls = [channel.freshen(str(vm.info.get("hostname") or r.vm),
                                     str(vm.info.get("machine_id") or uuid.uuid4().hex))]
            if snap.env_vars != r.env_vars:  # the snapshot's agent has the defaults of the sandbox it was of
                calls.append(channel.set_defaults(user="user", env=r.env_vars))
            if snap.sandbox_id != r.sandbox_id:  # its disk holds that sandbox's tokens
                calls.append(self._write_tokens(sbx, channel=channel))
            # bounded: an agent that said hello and then went silent must not hold the sandbox (its
            # requests, the reaper, pause and snapshot all wait on busy)
            await asyncio.wait_for(_all_or_first_failure(calls), vmm.RESTORE_AGENT_TIMEOUT)
            phases["agent"] = round(time.monotonic() - t1, 4)
            if self.sandboxes.get(r.sandbox_id) is not sbx:  # killed meanwhile: its VM is going (idempotent)
                await channel.close()
                gate.failed("it was killed")
                await asyncio.shield(asyncio.to_thread(self._destroy, r))
                return
            sbx.channel, sbx.envd = channel, Envd(channel, access_token=r.access_token)
            r.state = "running"
            r.save()
            gate.ready()
            phases["settled"] = round(time.monotonic() - t0, 4)
            vm.info["rollback_phases"] = phases  # where the call's time went, for the benchmarks
            with contextlib.suppress(OSError):  # settled: a benchmark's note must not undo that
                vm._save()
            log.info("sandbox %s: rolled-back guest settled %.3f s after the call began (phases %s)",
                     r.sandbox_id, phases["settled"], phases)
        except BaseException as err:
            gate.failed(f"its rollback failed ({err})")
            if channel is not None and sbx.channel is not channel:
                with contextlib.suppress(Exception):
                    await channel.close()
            if not isinstance(err, Exception):  # the service stopping: its record (rolling-back) has it cleaned
                raise
            if self.sandboxes.get(r.sandbox_id) is sbx:
                log.warning("sandbox %s: rolled-back guest did not settle, sandbox removed: %s", r.sandbox_id, err)
                self.sandboxes.pop(r.sandbox_id, None)
                await self._finish(sbx)
        finally:
            sbx.busy.release()

    def _rollback_vm(self, sbx: Sandbox, snap: SnapshotRecord, phases: dict[str, float]) -> threading.Thread:
        """Stop the VM, give the sandbox a new volume cloned from the snapshot's, restore the
        snapshot's checkpoint under the same VM name.  A failure leaves the sandbox gone (its
        record says so: the reaper cleans it), never half-rolled-back.  The old VM, stopped
        (no CPU of the restore's), is ended once the new one runs: by the thread returned."""
        r = sbx.record
        t0 = time.monotonic()
        old = vmm.Vm(r.vm)
        with contextlib.suppress(CubefsError, OSError):
            qmp(sbx, "stop")  # it is discarded: it must not use the CPU the restore needs
        phases["stop"] = round(time.monotonic() - t0, 4)
        try:
            opts = _template_opts(snap.template)
            index = self._volume_index(opts.volume_dir)
            tail = r.volume.rsplit("-", 1)[-1]
            gen = int(tail) + 1 if tail.isdigit() else 1
            r.old_vm, r.old_volume = r.vm, r.volume  # until _end_old_vm has ended them (adopt() otherwise)
            r.volume, r.vm = f"sbx-{r.sandbox_id}-{gen}", f"sbx-{r.sandbox_id}-{gen}"
            with self._index_lock:
                index.clone(snap.volume, READY, [r.volume])
            r.save()
            ck = checkpoint.Checkpoint.load(snap.dir / "ckpt")
            with nic(self.network, r.sandbox_id) as netdev:  # the same network: a tap has a queue for each QEMU
                sbx.vm = checkpoint.restore(r.vm, self._root(opts, r.volume, snap.template), ck,
                                            hostname=old.info.get("hostname"), freshen=False, netdev=netdev)
            sbx.vm.info["machine_id"] = old.info.get("machine_id") or sbx.vm.info["machine_id"]
            sbx.vm._save()
            phases["restore"] = round(time.monotonic() - t0 - phases["stop"], 4)
        except BaseException:
            old.destroy()
            raise
        # QEMU quits, its root's daemon syncs and ends while the call answers and the guest settles
        gone = threading.Thread(target=old.destroy, name=f"destroy {old.name}")
        gone.start()
        return gone

    def _end_old_vm(self, sbx: Sandbox, gone: threading.Thread, volume: str | None, template: str) -> None:
        """After a rollback: its old VM ended (``gone``), then its old volume removed, then the
        record no longer names them."""
        try:
            gone.join()
            if volume is not None:
                self._remove_volume(volume, _template_opts(template))
        except Exception as err:  # a thread's failure is nobody's to see otherwise
            log.warning("sandbox %s: ending its VM before the rollback: %s", sbx.id, err)
            return
        r = sbx.record  # the next save says so (none from this thread: the loop may be saving it)
        r.old_vm = r.old_volume = ""

    def _end_old(self, vm: str, volume: str, template: str) -> None:
        """What ``_end_old_vm`` did not get to (the service stopped): a VM and a volume by name."""
        if vm:
            with contextlib.suppress(CubefsError, OSError):
                vmm.Vm(vm).destroy()
        if volume:
            self._remove_volume(volume, _template_opts(template))

    def _remove_volume(self, volume: str, opts: StoreOptions) -> None:
        res = subprocess.run([sys.executable, "-m", "cubefs", "volume", "rm", volume, *opts.args("--volume-dir")],
                             capture_output=True, text=True)
        if res.returncode not in (0, 3):  # 3: never made
            log.warning("removing volume %s: %s", volume, res.stderr.strip())

    # -- find, list, time out -----------------------------------------------------
    def get(self, sandbox_id: str) -> Sandbox:
        sbx = self.sandboxes.get(sandbox_id)
        if sbx is None:
            raise NotFoundError(f"sandbox {sandbox_id!r} not found")
        return sbx

    def list(self) -> list[Sandbox]:
        return sorted(self.sandboxes.values(), key=lambda s: (s.record.started, s.id))

    def set_timeout(self, sandbox_id: str, timeout: int) -> Sandbox:
        """The TTL becomes now + timeout (it may shorten it), as E2B's API says."""
        check_timeout(timeout)
        sbx = self.get(sandbox_id)
        sbx.record.end = time.time() + timeout
        sbx.record.save()
        return sbx

    def extend(self, sandbox_id: str, timeout: int | None) -> Sandbox:
        """``connect`` on a running sandbox: only ever lengthens its TTL."""
        sbx = self.get(sandbox_id)
        if timeout is not None:
            check_timeout(timeout)
            end = time.time() + timeout
            if end > sbx.record.end:
                sbx.record.end = end
                sbx.record.save()
        return sbx

    async def _reap(self) -> None:
        """Kill what outlived its TTL, and clean away sandboxes whose QEMU died (a crashed
        guest or a kill from outside): they answer "not found" from then on."""
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for sbx in list(self.sandboxes.values()):
                if sbx.busy.locked():
                    continue  # being paused, snapshotted or rolled back (its VM may be down for a moment)
                if sbx.record.state == "paused" and sbx.vm is not None and sbx.vm.alive:
                    continue  # kept until resumed or killed, as E2B keeps paused sandboxes
                if sbx.record.end <= now and sbx.record.on_timeout == "pause" and sbx.record.state == "running":
                    self._spawn(self._pause_at_timeout(sbx))
                    continue
                if sbx.record.end <= now:
                    log.info("sandbox %s: its timeout passed: killed", sbx.id)
                    self.counters.expired += 1
                elif sbx.vm is not None and not sbx.vm.alive:
                    log.warning("sandbox %s: its VM %s is gone (QEMU exited): cleaned away", sbx.id, sbx.record.vm)
                    self.counters.crashed += 1
                else:
                    continue
                self.sandboxes.pop(sbx.id, None)
                self._spawn(self._finish(sbx))

    async def _pause_at_timeout(self, sbx: Sandbox) -> None:
        """``autoPause``: paused at its timeout, kept until resumed or killed.  A pause that
        fails is tried again a while later (never a kill: its user asked to keep it); one
        whose VM died is the reaper's to clean away, as any."""
        if sbx.busy.locked() or time.monotonic() < self._pause_retry.get(sbx.id, 0.0):
            return
        try:
            await self.pause(sbx.id, at_timeout=True)
        except (ConflictError, NotFoundError):
            return
        except (CubefsError, OSError) as err:
            self._pause_retry[sbx.id] = time.monotonic() + PAUSE_RETRY
            log.warning("sandbox %s: its timeout passed, pausing it failed (%s): tried again in %d s", sbx.id,
                        err, PAUSE_RETRY)
            return
        self._pause_retry.pop(sbx.id, None)
        self.counters.auto_paused += 1
        log.info("sandbox %s: its timeout passed: paused (autoPause)", sbx.id)

    async def auto_resume(self, sbx: Sandbox) -> None:
        """Traffic for a sandbox paused at its timeout with ``autoResume`` (from a caller the
        proxy let through: ``proxy.may_wake``): resume it, for the timeout it was created with
        (a request that raced another's resume finds it running)."""
        if await self.resume(sbx.id, sbx.record.ttl or None):
            self.counters.auto_resumed += 1
            log.info("sandbox %s: resumed by traffic for it (autoResume)", sbx.id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- kill -------------------------------------------------------------------------
    async def kill(self, sandbox_id: str) -> bool:
        sbx = self.sandboxes.pop(sandbox_id, None)
        if sbx is None:
            return False
        await self._finish(sbx)
        self.counters.killed += 1
        log.info("sandbox %s killed", sandbox_id)
        return True

    async def _cleanup(self, record: SandboxRecord) -> None:
        t0 = time.monotonic()
        await asyncio.shield(asyncio.to_thread(self._destroy, record))
        log.info("sandbox %s: cleaned away in %.1f s", record.sandbox_id, time.monotonic() - t0)

    async def _finish(self, sbx: Sandbox) -> None:
        """Tear down a sandbox already taken out of the table (no request reaches it)."""
        await self._disconnect(sbx)
        await asyncio.shield(asyncio.to_thread(self._destroy, sbx.record))
        self.capacity.release(sbx.id)

    async def _disconnect(self, sbx: Sandbox) -> None:
        for part in (sbx.envd, sbx.channel):
            if part is not None:
                try:
                    await part.close()
                except Exception as err:  # closing must never stop a kill
                    log.debug("sandbox %s: closing %s: %s", sbx.id, type(part).__name__, err)
        sbx.envd = sbx.channel = None

    def _destroy(self, record: SandboxRecord) -> None:
        """Everything a sandbox had, gone: QEMU, the root's daemon, the volume, the record."""
        try:
            vmm.Vm(record.vm).destroy()
        except (CubefsError, OSError) as err:
            log.warning("sandbox %s: removing VM %s: %s", record.sandbox_id, record.vm, err)
        for pid in _qemu_named(record.vm):  # started, but killed before vm.json named its pid
            log.warning("sandbox %s: QEMU %d of VM %s had no record: killed", record.sandbox_id, pid, record.vm)
            kill_pid(pid)
        if self.network is not None:
            self.network.release(record.sandbox_id)
        self._remove_volume(record.volume, _template_opts(record.template))
        SandboxRecord.path(record.sandbox_id).unlink(missing_ok=True)

    # -- metrics -------------------------------------------------------------------------
    def metrics(self) -> str:
        c = self.counters
        lines = ["# TYPE cubefs_sandboxes gauge", f"cubefs_sandboxes {len(self.sandboxes)}",
                 "# TYPE cubefs_sandboxes_creating gauge", f"cubefs_sandboxes_creating {len(self.creating)}"]
        for name, value in (("created", c.created), ("create_failed", c.create_failed), ("killed", c.killed),
                            ("expired", c.expired), ("auto_paused", c.auto_paused),
                            ("auto_resumed", c.auto_resumed), ("adopted", c.adopted), ("crashed", c.crashed),
                            ("from_pool", c.from_pool), ("pool_filled", c.pool_filled),
                            ("pool_evicted", c.pool_evicted), ("snapshots", c.snapshots),
                            ("from_snapshot", c.from_snapshot), ("rollbacks", c.rollbacks)):
            lines += [f"# TYPE cubefs_sandbox_{name}_total counter", f"cubefs_sandbox_{name}_total {value}"]
        lines.append("# TYPE cubefs_sandbox_pool_ready gauge")
        lines += [f'cubefs_sandbox_pool_ready{{template="{name}"}} {len(pool)}' for name, pool in self.pools.items()]
        used_cpus, used_mb = self.capacity.used
        lines += ["# TYPE cubefs_sandbox_vcpus_held gauge", f"cubefs_sandbox_vcpus_held {used_cpus}",
                  "# TYPE cubefs_sandbox_vcpus_limit gauge", f"cubefs_sandbox_vcpus_limit {self.capacity.vcpus}",
                  "# TYPE cubefs_sandbox_memory_mb_held gauge", f"cubefs_sandbox_memory_mb_held {used_mb}",
                  "# TYPE cubefs_sandbox_memory_mb_limit gauge",
                  f"cubefs_sandbox_memory_mb_limit {self.capacity.memory_mb}"]
        if c.create_seconds:
            xs = sorted(c.create_seconds)
            lines.append("# TYPE cubefs_sandbox_create_seconds summary")
            for q in (0.5, 0.95, 0.99):
                value = xs[min(len(xs) - 1, int(q * len(xs)))]
                lines.append(f'cubefs_sandbox_create_seconds{{quantile="{q}"}} {value:.4f}')
        lines += self.restores.metrics()
        if self.network is not None:
            lines += self.network.metrics()
        return "\n".join(lines) + "\n"


async def _all_or_first_failure(calls: list[Any]) -> None:
    """Agent requests sent together (the agent answers in order): each finished, none left
    running, then the first failure raised."""
    for res in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(res, BaseException):
            raise res


async def _finish_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread; if the caller is cancelled (the service stopping, a
    client gone), the thread still runs to its end before the cancellation goes on, so that
    what cleans up after it sees everything it made (a QEMU started after the cleanup leaked)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():  # a second cancel (a stop cancels, then aiohttp or asyncio.run again)
            with contextlib.suppress(BaseException):  # must not end the wait: shielded, fut stays
                await asyncio.shield(fut)
        raise


def qmp(sbx: Sandbox, command: str) -> Any:
    """One QMP command in a session of its own (QEMU's monitor serves one client at a time:
    a connection held here would block ``Vm.destroy``'s)."""
    q = Qmp(str(vmm.vm_root() / sbx.record.vm / "qmp.sock"), sbx.record.vm)
    try:
        return q.execute(command)
    finally:
        q.close()


def _qemu_named(vm_name: str) -> list[int]:
    """QEMU processes started for VM ``vm_name`` (``-name NAME`` on their command line)."""
    needle = b"\0-name\0" + vm_name.encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if needle in cmdline and b"qemu-system" in cmdline.split(b"\0", 1)[0]:
                found.append(int(entry.name))
    return found


def _template_opts(name: str) -> StoreOptions:
    try:
        return SandboxTemplate.load(name).store_options
    except CubefsError:
        return StoreOptions(volume_dir=os.environ.get("CUBEFS_VOLUME_DIR"))


def check_timeout(timeout: int) -> None:
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_TIMEOUT:
        raise UsageError(f"timeout must be a whole number of seconds from 0 to {MAX_TIMEOUT}, not {timeout!r}")


class _Settling:
    """A rolled-back sandbox's envd and agent channel while ``_settle`` runs: the proxy's
    requests to it (envd's, and ``open_tcp`` for its ports) wait here until the restored
    guest has its session and clock, then go to the real ones; if the sandbox is gone
    instead, they get what a gone sandbox gets (502, "not found")."""

    def __init__(self, sbx: Sandbox) -> None:
        self.sbx = sbx
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ready(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def failed(self, why: str) -> None:
        if not self.done.done():
            from vmm.channel import Unavailable

            self.done.set_exception(Unavailable(f"sandbox {self.sbx.id}: {why}"))
            self.done.exception()  # retrieved: nobody may be waiting

    async def _settled(self) -> bool:
        with contextlib.suppress(Exception):
            await asyncio.shield(self.done)
        return self.done.done() and self.done.exception() is None

    async def handle(self, request: Any) -> Any:
        """envd's ``handle``."""
        if await self._settled() and self.sbx.envd is not None and self.sbx.envd is not self:
            return await self.sbx.envd.handle(request)
        from sandbox.answers import not_found

        return not_found(self.sbx.id)

    async def open_tcp(self, port: int, host: str = "127.0.0.1") -> Any:
        """The agent channel's ``open_tcp`` (the proxy's relays to the sandbox's ports)."""
        if await self._settled() and self.sbx.channel is not None and self.sbx.channel is not self:
            return await self.sbx.channel.open_tcp(port, host)
        from vmm.channel import Unavailable

        raise Unavailable(f"sandbox {self.sbx.id}: gone (its rollback did not settle)")

    async def close(self) -> None:
        """A kill or a stop: the held requests get their answer now."""
        self.failed("it was closed")
