"""The mount daemon's main: image metadata → ImageFS → a FUSE transport, until unmounted.

Fetch the image metadata (the only thing a mount fetches up front), mount,
tell the parent process the mount is live, then serve FUSE requests, the
control socket and background fetches on one trio loop until unmounted.

Two transports serve the same :class:`cubefs.image.fs.ImageFS`: our own
``/dev/fuse`` session (:mod:`cubefs.fuse.kernel`, the default) and pyfuse3
(:mod:`cubefs.fuse.pyfuse3_ops`).  Kernel caching is on in both: an image
never changes, so entries and attributes are cached for an hour and file
pages survive ``open``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import lmdb
import trio

from cubefs.cache.disk import DiskCache
from cubefs.cache.hot import HotFile
from cubefs.cache.peers import PeerSet
from cubefs.cache.source import ChunkSource
from cubefs.cache.tiers import MemoryTier
from cubefs.errors import UsageError
from cubefs.format.manifest import Manifest, parse_ref
from cubefs.format.trace import trace_key
from cubefs.fuse.kernel import keep_freed_heap
from cubefs.fuse.protocol import HAS_RESEND
from cubefs.image.catalog import KeepingTraces, load_cached, refresh_trace
from cubefs.image.fs import ImageFS
from cubefs.node import control
from cubefs.node.hotkeep import HotKeeper
from cubefs.node.supervise import SupervisorLink
from cubefs.remote import RetryingStore, RetryPolicy, store_session
from cubefs.remote.loop import LoopThread

if TYPE_CHECKING:
    from cubefs.fuse.passthrough import Passthrough
    from cubefs.node.prepared import Prepared

log = logging.getLogger(__name__)


SYNC_INTERVAL = 5.0  # seconds between a volume's background flushes (power-loss window)


def passthrough_mode(value: Any) -> str:
    """``--passthrough``'s value as a mount request carries it: "auto", "on" or "off"; a request
    made by the code before session 13 (a daemon replaced by ``serve --upgrade``, a restart)
    carries a bool, which meant "asked for" (True) or "not asked" (False: now auto)."""
    if value is None or value is False:
        return "auto"
    if value is True:
        return "on"
    if value in ("auto", "on", "off"):
        return str(value)
    raise ValueError(f"passthrough must be auto, on or off, not {value!r}")


@dataclass
class MountOptions:
    ref: str
    mountpoint: str
    store_url: str | None
    s3_endpoint: str | None
    cache_dir: str
    memory_cache: int = 256 * 1024 * 1024
    disk_cache: int = 10 * 1024 * 1024 * 1024
    readahead: int = 4 * 1024 * 1024
    pack_readahead: int = 512 * 1024
    dir_prefetch: int = 4 * 1024 * 1024  # a directory's other files, once two miss (ImageFS._dir_neighbours)
    stream: int = 0  # stored bytes of the image streamed once reads miss (ImageFS._stream_plan)
    hot_pack: int = 2  # files missed in a pack before its rest is fetched (ImageFS._hot_pack); 0: off
    read_timeout: float = 60.0
    store_attempts: int = 4
    store_timeout: float = 10.0
    allow_other: bool = os.geteuid() == 0  # non-root needs user_allow_other in /etc/fuse.conf
    transport: str = "kernel"  # or "pyfuse3", or "virtiofs" (mountpoint: the vhost-user socket)
    peers: tuple[str, ...] = ()
    peers_file: str = ""  # the peers follow this file (cubefs.cache.peers.PeersFile) instead of ``peers``
    peer_timeout: float = 3.0
    record_trace: bool = False
    auto_trace: bool = True  # record the start-up and publish it with the image (cubefs.image.autotrace)
    prefetch: bool = True  # prefetch the image's pushed trace, if it has one
    # FUSE passthrough of local copies (cubefs.fuse.passthrough): "auto" (only for an image holding a
    # file of 64 MiB or more: measured), "on" (--passthrough), "off" (--no-passthrough)
    passthrough: str = "auto"
    fuse_uring: bool = False  # FUSE over io_uring where the kernel offers it (cubefs.fuse.kernel.uring_wanted)
    writeback_cache: bool = False  # a volume's writes cached by the kernel (cubefs mount --writeback-cache)
    volume: str | None = None  # mount this volume (read-write) instead of the image ``ref``
    volume_dir: str = ""
    supervisor_fd: int = -1  # the link to the mount server that keeps this mount's /dev/fuse
    resume: dict[str, Any] | None = None  # a replacement's: fd, session, image, restarts (cubefs.node.supervise)
    # When the mount server accepted the request (CLOCK_MONOTONIC, shared by every process): the
    # origin of the start-up phases ``cubefs stats`` shows (``mount_phases``); else the daemon's start.
    accepted: float = field(default_factory=time.monotonic)

    @classmethod
    def from_args(cls, args: Any, mountpoint: str, cache_dir: str,
                  supervision: dict[str, Any] | None = None) -> MountOptions:
        """The options of ``cubefs mount``'s parsed ``args`` (as the mount server got them)."""
        return cls(
            ref=args.ref, mountpoint=mountpoint, store_url=args.store, s3_endpoint=args.s3_endpoint,
            cache_dir=cache_dir, memory_cache=args.memory_cache, disk_cache=args.cache_size,
            readahead=args.readahead, pack_readahead=args.pack_readahead, read_timeout=args.read_timeout,
            dir_prefetch=getattr(args, "dir_prefetch", 4 * 1024 * 1024), stream=getattr(args, "stream", 0),
            hot_pack=getattr(args, "hot_pack", 2),
            store_timeout=args.store_timeout, store_attempts=args.store_attempts,
            transport=getattr(args, "transport", "kernel"), record_trace=getattr(args, "record_trace", False),
            prefetch=getattr(args, "prefetch", True), auto_trace=getattr(args, "auto_trace", True),
            passthrough=passthrough_mode(getattr(args, "passthrough", None)),
            fuse_uring=getattr(args, "fuse_uring", False),
            writeback_cache=getattr(args, "writeback_cache", False),
            peers=tuple(p.strip() for p in (getattr(args, "peers", "") or "").split(",") if p.strip()),
            peers_file=getattr(args, "peers_file", "") or "", peer_timeout=getattr(args, "peer_timeout", 3.0),
            volume=getattr(args, "volume", None), volume_dir=getattr(args, "volume_dir", "") or "",
            supervisor_fd=int((supervision or {}).get("fd", -1)), resume=(supervision or {}).get("resume"),
            accepted=float((supervision or {}).get("accepted") or time.monotonic()),
        )


def run_daemon(opts: MountOptions, notify: Any = None, prepared: Prepared | None = None) -> int:
    """Mount and serve until unmounted; ``notify(msg)`` reports ready or an error.  The
    mount server hears last whether this daemon unmounted or handed over (after the
    volume lock is released: a successor takes it); a daemon that says neither died.
    ``prepared``: what a spare the mount server kept ready opened before the request
    (cubefs.node.spare)."""
    link = SupervisorLink(opts.supervisor_fd) if opts.supervisor_fd >= 0 and opts.transport == "kernel" else None
    try:
        return _run(opts, notify, link, prepared)
    finally:
        if link is not None:
            link.finish()


def store_policy(opts: MountOptions) -> RetryPolicy:
    return RetryPolicy(attempts=opts.store_attempts, timeout=opts.store_timeout, max_backoff=1.0)


def _run(opts: MountOptions, notify: Any, link: SupervisorLink | None, prepared: Prepared | None = None) -> int:
    # before any thread of ours starts (the store's loop): a thread that allocated first keeps
    # an arena of its own, which M_ARENA_MAX 1 no longer stops the next threads from sharing
    keep_freed_heap()
    policy = store_policy(opts)
    if opts.volume is None:
        if prepared is not None:  # its store session is the spare's, closed when it returns
            return _serve(opts, notify, prepared.loop, prepared.store, None, link, prepared)
        with store_session(opts.store_url, opts.s3_endpoint, policy=policy) as (loop, store):
            return _serve(opts, notify, loop, store, None, link)
    if opts.transport == "pyfuse3":
        raise UsageError("volumes are served by the kernel and virtiofs transports (not --transport pyfuse3)")
    from cubefs.cow.index import VolumeIndex
    from cubefs.cow.lock import VolumeLock

    index = VolumeIndex(opts.volume_dir)
    volume, _, snapshot = opts.volume.partition("@")
    try:
        # A snapshot's layers never change: any number of read-only mounts, no lock.
        lock = VolumeLock.take(index, volume, os.path.abspath(opts.mountpoint)) if not snapshot else None
        try:
            with index.read() as txn:
                base = index.volume(txn, volume).base
                if snapshot:
                    index.get_snapshot(txn, volume, snapshot)
            if base is None:
                return _serve(opts, notify, None, None, index, link)
            url, endpoint = opts.store_url or base.store, opts.s3_endpoint or base.s3_endpoint
            with store_session(url, endpoint, policy=policy) as (loop, store):
                return _serve(opts, notify, loop, store, index, link)
        finally:
            if lock is not None:
                lock.release()
    finally:
        index.close()


def _serve(
    opts: MountOptions, notify: Any, loop: LoopThread | None, store: RetryingStore | None, index: Any,
    link: SupervisorLink | None = None, prepared: Prepared | None = None,
) -> int:
    """Serve an image (``index`` None) or the volume ``opts.volume`` of ``index`` (whose base
    image, if it has one, is in ``store``)."""
    mountpoint = os.path.abspath(opts.mountpoint)
    phases = Phases(opts.accepted)
    phases.mark("daemon")  # forked, logging set up, the store client made
    parts: ImageParts | None = None
    if store is not None and loop is not None:
        wanted: str | Manifest = opts.ref
        if index is not None:
            wanted = volume_base(index, str(opts.volume))
        elif opts.resume and opts.resume.get("image"):  # the image the mount showed, not what the tag says now
            name, tag = parse_ref(opts.ref)
            wanted = Manifest(name, tag, str(opts.resume["image"]), "")
        parts = open_image(opts, loop, store, wanted, phases, prepared)
        if link is not None and index is None:
            link.tell("image", digest=parts.image_fs.image.digest)
    image_fs = parts.image_fs if parts is not None else None
    source = parts.source if parts is not None else None
    trace = parts.trace if parts is not None else []
    ref = parts.ref if parts is not None else ""
    fs: Any = image_fs
    actions: dict[str, Any] = {}
    if index is not None:
        from cubefs.volume.fs import VolumeFS

        volume, _, snapshot = str(opts.volume).partition("@")
        fs = VolumeFS(index, volume, image_fs, f"volume {opts.volume}", snapshot or None)
        # /dev/fuse only: a guest's dirty pages (virtio-fs) would be in no volume snapshot taken without its RAM
        fs.writeback_cache = opts.writeback_cache and fs.writable and opts.transport == "kernel"
        label = f"volume:{opts.volume}"
    else:
        assert image_fs is not None
        label = ref
    publisher = None
    if image_fs is not None and store is not None and loop is not None and (opts.record_trace or opts.auto_trace):
        from cubefs.image.autotrace import RECORD_SECONDS, TracePublisher

        image_fs.record_trace(None if opts.record_trace else RECORD_SECONDS)
        kept = KeepingTraces(store, opts.cache_dir)  # what it publishes, the next mount here starts from
        publisher = TracePublisher(image_fs, kept, loop, trace, ref) if opts.auto_trace else None  # type: ignore[arg-type]
    keeper = None
    # No prefetch, no keeper: such a mount never reads the file, and one kept by it alone
    # would be written again by every such mount.
    if parts is not None and parts.disk is not None and opts.resume is None and opts.prefetch and (
            trace or parts.image_fs.trace is not None):
        keeper = HotKeeper(opts.cache_dir, parts.image_fs, parts.source, parts.disk, trace, opts.disk_cache)
    transport = _transport(opts.transport, fs, mountpoint, f"cubefs:{label}", opts.allow_other)
    passthrough = None
    if opts.passthrough != "off" and hasattr(transport, "enable_passthrough"):
        transport.enable_passthrough(auto=opts.passthrough == "auto")
        passthrough = transport.server.passthrough  # type: ignore[attr-defined]
        if keeper is not None and passthrough is not None:
            keeper.leave_out = passthrough.copied_chunks
    if opts.fuse_uring and hasattr(transport, "enable_uring"):
        transport.enable_uring()
    resume = opts.resume if link is not None else None
    if resume is not None:
        transport.adopt(int(resume["fd"]), resume.get("session"))  # type: ignore[attr-defined]
        log.info("replacing a daemon that exited (restart %d): %s stays mounted", resume["restarts"], mountpoint)
    else:
        transport.mount()
    phases.mark("mount")
    if link is not None:
        link.fuse_fd(transport.fd)  # type: ignore[attr-defined]

    def settled(state: dict[str, Any]) -> None:
        phases.mark("init")
        if link is not None:
            _session_settled(link, state)

    if hasattr(transport, "on_session"):
        transport.on_session = settled  # type: ignore[attr-defined]

    def get_stats() -> dict[str, Any]:
        return {**mount_stats(opts, mountpoint, fs, transport, parts, store, index,
                              int(resume["restarts"]) if resume else 0), "mount_phases": phases.as_dict(),
                # CPU this daemon (all its threads) spent since it was live: what serving a
                # start cost it, a figure the machine's load moves far less than wall time
                "cpu_since_ready": round(time.process_time() - phases.cpu_at_ready, 4)}

    async def push_trace(_arg: str) -> dict[str, Any]:
        """Store the chunks read so far, in first-read order, as the image's trace."""
        if image_fs is None or image_fs.trace is None or store is None or loop is None:
            raise UsageError(f"{mountpoint} records no trace (mounted with --no-auto-trace)")
        from cubefs.image.autotrace import TracePublisher

        result = await (publisher or TracePublisher(image_fs, store, loop, [], ref)).publish()
        return {"image": ref, "key": trace_key(image_fs.image.digest), **result}

    actions["/trace/push"] = push_trace
    if index is not None:
        actions.update(volume_actions(opts, index, fs, transport))
    control.write_registry(
        mountpoint,
        {"mountpoint": mountpoint, "pid": os.getpid(), "image": ref or None, "volume": opts.volume,
         "transport": opts.transport,
         "store": store.url if store is not None else None, "socket": control.socket_path(mountpoint)},
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if source is not None:
                source.start(nursery)
            if index is not None and fs.writable:
                nursery.start_soon(fs.sync_every, SYNC_INTERVAL)
            await nursery.start(control.serve_control, control.socket_path(mountpoint), get_stats, actions)
            token = trio.lowlevel.current_trio_token()
            signal.signal(signal.SIGTERM, lambda *_a: token.run_sync_soon(transport.stop))
            signal.signal(signal.SIGINT, lambda *_a: token.run_sync_soon(transport.stop))
            if link is not None:  # an upgrade: a successor from the server's code takes over
                signal.signal(signal.SIGUSR2, lambda *_a: token.run_sync_soon(transport.handover))  # type: ignore
            if notify is not None:
                notify("ready")
            phases.mark("ready")
            phases.cpu_at_ready = time.process_time()
            if trace and opts.prefetch and resume is None and parts is not None:
                nursery.start_soon(_prefetch, parts, opts.cache_dir, passthrough)
            if publisher is not None:
                nursery.start_soon(publisher.run)
            if parts is not None and parts.trace_kept and loop is not None and store is not None:
                nursery.start_soon(_refresh_trace_later, loop, store, opts.cache_dir, parts.image_fs.image.digest)
            if keeper is not None:
                nursery.start_soon(keeper.run)
            await transport.serve()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException:
        log.exception("mount daemon for %s failed", mountpoint)
        raise
    finally:
        try:
            transport.close()
            if publisher is not None:
                publisher.publish_at_exit()
            if keeper is not None:
                try:
                    keeper.at_exit()
                except Exception:  # never fails by design; the mount's own cleanup runs regardless
                    log.exception("image %s: keeping its hot file at exit failed", label)
            if index is not None:
                fs.close()
            if parts is not None:
                parts.close()
        finally:
            handed_over = bool(getattr(getattr(transport, "session", None), "handed_over", False))
            if link is not None:
                link.outcome = "handover" if handed_over else "unmounted"
            if handed_over:
                log.info("handed %s over to a successor", mountpoint)
            else:
                control.remove_registry(mountpoint)
                log.info("unmounted %s", mountpoint)
    return 0


@dataclass
class ImageParts:
    """What serves an image's bytes: shared by every mount of a root host (cubefs.node.roots)."""

    image_fs: ImageFS
    source: ChunkSource
    disk: DiskCache | None
    peers: PeerSet | None
    ref: str
    trace: list[int]  # the image's pushed trace: chunks to prefetch
    trace_kept: bool = False  # taken from the node's copy: refreshed once the mount is live

    def close(self) -> None:
        self.source.flush()
        if self.source.hot is not None:
            self.source.hot.close()
        if self.disk is not None:
            self.disk.close()


def volume_base(index: Any, volume: str) -> Manifest:
    """The base image of ``volume`` (``NAME[@SNAP]``) as a manifest to load."""
    with index.read() as txn:
        base = index.volume(txn, volume.partition("@")[0]).base
    name, _, tag = base.ref.rpartition(":")
    return Manifest(name, tag, base.digest, "")


def open_image(opts: MountOptions, loop: LoopThread, store: RetryingStore, wanted: str | Manifest,
               phases: Phases | None = None, prepared: Prepared | None = None) -> ImageParts:
    """Fetch the image's metadata (or take what the cache kept, or what a spare loaded
    ahead: ``prepared``) and build its chunk source."""
    t0 = time.monotonic()
    phases = phases or Phases(t0)
    local: list[str] = []
    if prepared is not None:  # the disk cache is open, the image decoded if the tag still names it
        loading = loop.submit(prepared.load(opts.cache_dir, wanted, local))
        disk = prepared.take_disk()
    else:
        # The disk cache (LMDB) opens while the metadata loads on the store's loop thread.
        loading = loop.submit(load_cached(store, opts.cache_dir, wanted, local))
        disk = open_disk_cache(opts.cache_dir, opts.disk_cache)
    phases.mark("disk_cache")
    try:
        manifest, image, chunkmap, trace, offline = loading.result()
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    phases.mark("metadata")
    ref = manifest.ref
    if offline:
        log.warning("store %s is unreachable: image %s mounted from the metadata kept in %s; chunks not in "
                    "the disk cache fail with EIO until it is back", store.url, ref, opts.cache_dir)
    log.info(
        "image %s (sha256:%s): %d inodes, trace of %d chunks, metadata loaded in %.3fs from %s",
        ref, image.digest[:12], len(image), len(trace), time.monotonic() - t0,
        "the metadata cache" if offline else f"{store.url} ({len(local)} of its objects kept on the node)",
    )
    memory = MemoryTier(opts.memory_cache)
    peers = PeerSet(list(opts.peers), store.url, timeout=opts.peer_timeout, peers_file=opts.peers_file or None) \
        if opts.peers or opts.peers_file else None
    source = ChunkSource(store, loop, memory, disk, label=ref, peers=peers)
    image_fs = ImageFS(image, chunkmap, source, ref, readahead=opts.readahead, read_timeout=opts.read_timeout,
                       pack_readahead=opts.pack_readahead, dir_prefetch=opts.dir_prefetch, stream=opts.stream,
                       hot_pack=opts.hot_pack)
    phases.mark("fs")
    return ImageParts(image_fs, source, disk, peers, ref, trace, trace_key(image.digest) in local)


class Phases:
    """Where a mount's start-up went: milliseconds from the previous mark to each mark,
    from the moment the mount server accepted the request (``cubefs stats --json``,
    ``mount_phases``).  For finding what a remount on a warm node waits for."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self._last = origin
        self.cpu_at_ready = time.process_time()
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self._last) * 1000, 2)
        self._last = now

    def as_dict(self) -> dict[str, float]:
        return {**self.ms, "total": round(sum(self.ms.values()), 2)}


async def _prefetch(parts: ImageParts, cache_dir: str, passthrough: Passthrough | None = None) -> None:
    """The trace's chunks into memory from the disk cache, except those the image's hot file
    holds if the node kept one (cubefs.cache.hot: the kernel reads it all ahead from now on,
    and READs take those chunks from its pages as they ask: prefetching them into memory too
    cost the daemon ~50 ms of CPU and its event loop the GIL while the program ran).
    Opened and advised only now, as the mount is live: done before the mount, its read-ahead
    queued the mount's own small reads of a dropped cache behind 5 MB (json: the remount
    22 -> 37 ms)."""
    source = parts.source
    if parts.disk is not None:
        def open_hot() -> HotFile | None:
            try:
                hot = HotFile.open(cache_dir, parts.image_fs.image.digest)
            except Exception as err:  # an optimisation: never the mount's end
                log.warning("image %s: its hot file is not used: %s: %s", parts.image_fs.label,
                            type(err).__name__, err)
                return None
            if hot is not None:
                hot.advise()
            return hot

        source.hot = await trio.to_thread.run_sync(open_hot)
    trace = parts.trace
    if passthrough is not None and passthrough.active:  # negotiated at INIT, answered before this runs
        # files the kernel reads from their local copies: their chunks are a read for nobody
        try:
            copied = await trio.to_thread.run_sync(passthrough.copied_chunks, trace)
        except Exception as err:  # an optimisation: never the mount's end
            log.warning("image %s: the prefetch keeps the copied files' chunks: %s: %s", parts.image_fs.label,
                        type(err).__name__, err)
            copied = set()
        trace = [i for i in trace if i not in copied]
    refs = parts.image_fs.chunk_refs(trace)
    hot = source.hot
    if hot is not None and hot.nowait:
        # What the hot file holds is read from the kernel's pages as it is asked for
        # (ChunkSource.from_memory): only the rest is fetched into memory.  A kernel that
        # refuses RWF_NOWAIT on the file gets all of it prefetched, as before.
        refs = [r for r in refs if r.digest not in hot]
    await source.prefetch(refs)


TRACE_REFRESH_AFTER = 2.0  # seconds: a start's first reads never share the store's loop with it


async def _refresh_trace_later(loop: LoopThread, store: RetryingStore, cache_dir: str, digest: str) -> None:
    await trio.sleep(TRACE_REFRESH_AFTER)
    await loop.trio_run(refresh_trace(store, cache_dir, digest))


def mount_stats(opts: MountOptions, mountpoint: str, fs: Any, transport: Any, parts: ImageParts | None,
                store: RetryingStore | None, index: Any, restarts: int = 0) -> dict[str, Any]:
    """What ``cubefs stats`` shows of one mount (a root host's mounts share ``parts``)."""
    image_fs, source, peers = (parts.image_fs, parts.source, parts.peers) if parts is not None else (None, None, None)
    stats = {
        "image": parts.ref if parts is not None else None,
        "digest": f"sha256:{image_fs.image.digest}" if image_fs is not None else None,
        "mountpoint": mountpoint,
        "store": store.url if store is not None else None,
        "pid": os.getpid(),
        "restarts": restarts,
        "transport": opts.transport,
        "reads": transport.ops["read"] - fs.read_errors,
        "read_bytes": transport.read_bytes,
        "read_errors": fs.read_errors,
        "requests": dict(transport.ops),
        # seconds in the daemon by operation (kernel transport): request read to answer written
        "request_seconds": transport.request_seconds() if hasattr(transport, "request_seconds") else None,
        "tiers": source.stats() if source is not None else {},
        "peers": peers.stats() if peers is not None else {},
        "store_requests": store.stats.as_dict() if store is not None else {},
        "store_info": store.describe() if store is not None else {},  # endpoint, region, credential source
        "trace_recorded": len(image_fs.trace) if image_fs is not None and image_fs.trace is not None else None,
        "trace_published": image_fs.trace_published if image_fs is not None else {},
        # kernel image mounts: passthrough opens and local copies (cubefs.fuse.passthrough)
        "passthrough": transport.passthrough_stats() if hasattr(transport, "passthrough_stats") else None,
        # kernel mounts: FUSE over io_uring or /dev/fuse, and why not the ring (cubefs.fuse.kernel)
        "fuse_path": transport.fuse_path() if hasattr(transport, "fuse_path") else None,
    }
    if index is not None:
        stats["volume"] = {"name": opts.volume, "written_bytes": fs.files.written_bytes,
                           "compaction": fs.compaction, "held": fs.held()}
    return stats


def volume_actions(opts: MountOptions, index: Any, fs: Any, transport: Any) -> dict[str, Any]:
    """A writable volume's control actions: rollback (through the mount) and roll."""
    if not fs.writable:
        return {}

    async def rollback(snap: str) -> dict[str, Any]:
        """Show snapshot ``snap``: new state in the index, then the kernel told to forget the old."""
        t0 = time.perf_counter()
        layer, inodes, names = index.rollback(str(opts.volume), snap)
        fs.rolled_back()
        sent = await transport.invalidate(inodes, names)
        took = time.perf_counter() - t0
        log.info("volume %s: rolled back to snapshot %s (layer %d) in %.1f ms, %d cache invalidations",
                 opts.volume, snap, layer, took * 1000, sent)
        return {"volume": opts.volume, "snapshot": snap, "layer": layer, "invalidations": sent,
                "seconds": took}

    async def roll(_arg: str) -> dict[str, Any]:
        """Stop appending to the current data file, so that 'cubefs volume gc' may compact it."""
        return dict(fs.roll())

    return {"/volume/rollback/": rollback, "/volume/roll": roll}


def _session_settled(link: SupervisorLink, state: dict[str, Any]) -> None:
    """Tell the mount server what INIT settled (a replacement resumes with it), and the log
    whether this mount can outlive its daemon."""
    link.tell("session", **state)
    if int(state.get("kernel_flags", 0)) & HAS_RESEND:
        log.info("the kernel offers FUSE_NOTIFY_RESEND: the mount server replaces this daemon if it dies")
    else:
        log.warning("the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+): if this daemon dies, the mount fails "
                    "with ENOTCONN until remounted")


def open_disk_cache(directory: str, limit: int) -> DiskCache | None:
    """The node's disk cache, or None (reads go on without it) if it cannot be opened."""
    if limit <= 0:
        return None
    try:
        return DiskCache(directory, limit)
    except (OSError, lmdb.Error) as err:  # a full or read-only disk, a file where the cache should be
        log.error("disk cache in %s cannot be used (%s); serving without it", directory, err)
        return None


class Transport(Protocol):
    """What the daemon needs of a FUSE transport."""

    ops: Counter[str]  # requests served, by operation
    read_bytes: int

    def mount(self) -> None: ...  # make the mount live (before the event loop starts)
    async def serve(self) -> None: ...  # answer requests until unmounted
    def stop(self) -> None: ...  # unmount; serve() then returns
    def close(self) -> None: ...  # after serve(): unmount if still mounted, release everything


def _transport(name: str, fs: Any, mountpoint: str, fsname: str, allow_other: bool) -> Transport:
    if name not in ("kernel", "pyfuse3"):
        # Transports of other packages ("virtiofs" from vmm/: mountpoint is then the
        # vhost-user socket QEMU connects to), by entry point: cubefs never imports them.
        from importlib.metadata import entry_points

        found = list(entry_points(group="cubefs.transports", name=name))
        if not found:
            raise UsageError(f"transport {name} is not installed")
        return found[0].load()(fs, mountpoint)  # type: ignore[no-any-return]
    if name == "pyfuse3":
        from cubefs.fuse.pyfuse3_ops import Pyfuse3Transport

        return Pyfuse3Transport(fs, mountpoint, fsname, allow_other)
    from cubefs.fuse.kernel import KernelTransport

    return KernelTransport(fs, mountpoint, fsname, allow_other)
