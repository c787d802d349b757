"""Mount daemons kept ready: how a remount of an image already on the node skips its start-up.

A remount through the mount server (issue 18, "image already on the node":
disk cache kept, daemon gone, kernel caches dropped) spent ~35 ms in the
daemon before the mount was live, measured on deb-python (``mount_phases``):
fork and store client 6-7, LMDB open 1-10, the image's metadata (kept copies
read, zstd, SHA-256, msgpack decode) 13-16, then mount, trio and INIT ~8.
Only the last part depends on the mountpoint.  So after a mount of an image
the server forks a *spare* for the same request: a child that adopts the
request's environment, opens the store session and the disk cache, loads
the image's metadata and then waits on its link to the server.  The next
request that differs only in its mountpoint is handed to it (the request and
the client's connection, ``SCM_RIGHTS``); the spare asks the store for the
manifest (a moved tag is seen: another digest and the spare loads that
image as any daemon would, never serving the kept one), re-reads the trace
the node keeps (the first start publishes it at its end, after the spare was
made), mounts and reports ``ready``.  From then on it is a mount daemon like
any other, supervised on the same link.

What is kept is bounded: at most ``CUBEFS_KEEP_READY`` spares (default 4; 0 in
a client's environment: none made or used for its mounts), their private
memory in all at most ``CUBEFS_KEEP_READY_BYTES`` (each spare reports its own,
read from ``/proc/self/smaps_rollup``, once prepared; the least recently
wanted spare goes first), each for ``KEEP_SECONDS`` after the mount that made
it wanted.  A spare whose server goes away sees its link close and exits.

Only the bytes a daemon needs to start are kept ready, never the image's
file data: the run after a remount reads the disk cache as before.  Once prepared
(and reported), a spare warms up while it waits (:func:`warm_up`: its heap mapped,
the image's attributes built), a step at a time, still at nice 19 (its autogroup
too), and reports again; a request that comes first stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cubefs.errors import CubefsError
from cubefs.humanize import parse_size
from cubefs.node.prepared import Prepared

log = logging.getLogger(__name__)

COUNT_ENV = "CUBEFS_KEEP_READY"
BYTES_ENV = "CUBEFS_KEEP_READY_BYTES"
DEFAULT_COUNT = 4
DEFAULT_BYTES = 512 << 20
KEEP_SECONDS = 600.0  # a spare nobody asked for in this long is dropped
SPARE_DELAY = 0.2  # seconds after a mount before its spare is forked: not during its start-up
MOUNT_REPORT_WAIT = 10.0  # seconds a mount has to say which image it mounted before it gets no spare
REQUEST_MAX = 1 << 20  # as the server's own request limit


def request_key(request: dict[str, Any]) -> str | None:
    """What a spare shares with the requests it may serve: everything but the mountpoint.
    None for a mount no spare serves (volumes, other transports, replacements)."""
    args = request.get("args") or {}
    env = request.get("env") or {}
    if (args.get("volume") or request.get("resume") or args.get("foreground")
            or (args.get("transport") or "kernel") != "kernel" or env.get(COUNT_ENV, "") == "0"):
        return None
    rest = {k: v for k, v in args.items() if k not in ("targets", "mountpoint")}
    return json.dumps([rest, request.get("cache_dir"), request.get("cwd"), env], sort_keys=True)


def _setting(name: str, parse: Callable[[str], int], default: int) -> int:
    """``$name`` parsed; a value that does not parse is logged and the default used (the
    server must not fail to start over an optimisation's knob)."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return max(0, int(parse(text)))
    except (ValueError, CubefsError):
        log.warning("%s=%r is not a number or size; using %d", name, text, default)
        return default


@dataclass
class Spare:
    """The server's record of one spare."""

    key: str
    ref: str
    sock: socket.socket
    pid: int
    wanted: float  # when a mount last made it wanted
    private_bytes: int = 0  # reported once prepared, and again once warmed up
    warmed: bool = False  # its warm-up done: it waits at the usual priority (warm_up)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Spares:
    """The mount server's spares, by request key, least recently wanted first."""

    def __init__(self, count: int | None = None, max_bytes: int | None = None,
                 keep_seconds: float = KEEP_SECONDS) -> None:
        self.count = _setting(COUNT_ENV, int, DEFAULT_COUNT) if count is None else count
        self.max_bytes = _setting(BYTES_ENV, parse_size, DEFAULT_BYTES) if max_bytes is None else max_bytes
        self.keep_seconds = keep_seconds
        self.kept: dict[str, Spare] = {}
        # key -> (fork at, no spare after, request, the digest its daemon mounted once it said:
        # no manifest GET ahead, and a mount that never says, a failed one, gets no spare)
        self.due: dict[str, tuple[float, float, dict[str, Any], Callable[[], str | None]]] = {}

    def take(self, key: str | None) -> Spare | None:
        return self.kept.pop(key, None) if key is not None else None

    def want(self, key: str | None, request: dict[str, Any], digest: Callable[[], str | None] = lambda: None) -> None:
        """A mount of ``key`` was asked for: keep a spare of it ready for the next.  ``digest``:
        the image its daemon mounted, once it has said (the spare then loads that image)."""
        if key is None or self.count <= 0:
            return
        if key in self.kept:
            s = self.kept.pop(key)
            s.wanted = time.monotonic()
            self.kept[key] = s  # most recently wanted last
            return
        now = time.monotonic()
        self.due[key] = (now + SPARE_DELAY, now + MOUNT_REPORT_WAIT, request, digest)

    def fds(self) -> dict[int, Spare]:
        return {s.sock.fileno(): s for s in self.kept.values()}

    def heard(self, s: Spare) -> None:
        """``s`` said it is prepared (and its size), or went away."""
        try:
            msg = s.sock.recv(4096)
        except OSError:
            msg = b""
        if not msg:
            log.info("spare %d for %s exited", s.pid, s.ref)
            self._drop(s)
            return
        try:
            info = json.loads(msg)
            s.private_bytes = int(info.get("bytes", 0))
            s.warmed = bool(info.get("warmed"))
        except (ValueError, AttributeError, TypeError):
            log.warning("spare %d sent a bad message", s.pid)
            return
        log.info("spare %d for %s ready (%d KiB private)", s.pid, s.ref, s.private_bytes >> 10)
        while self.kept and sum(k.private_bytes for k in self.kept.values()) > self.max_bytes:
            oldest = next(iter(self.kept.values()))
            log.info("dropping spare %d for %s: the spares hold more than %d bytes", oldest.pid, oldest.ref,
                     self.max_bytes)
            self._drop(oldest)

    def step(self, fork: Callable[[dict[str, Any]], tuple[socket.socket, int]]) -> float:
        """Fork the spares that are due, drop those kept too long; the seconds until the next is due."""
        now = time.monotonic()
        for s in [s for s in self.kept.values() if now - s.wanted > self.keep_seconds]:
            log.info("dropping spare %d for %s: not wanted for %.0f s", s.pid, s.ref, self.keep_seconds)
            self._drop(s)
        for key, (when, give_up, request, digest) in list(self.due.items()):
            if when > now:
                continue
            del self.due[key]
            if key in self.kept:
                continue
            mounted = digest()
            if mounted is None:  # its daemon has not said it mounted: still starting, or failed
                if now < give_up:  # a slow start on a loaded node: ask again in half a second
                    self.due[key] = (now + 0.5, give_up, request, digest)
                else:  # a failed mount (a typo, no such image) gets no spare
                    log.info("no spare for %s: its mount did not report an image", request["args"].get("ref"))
                continue
            while len(self.kept) >= self.count:
                self._drop(next(iter(self.kept.values())))
            sock, pid = fork({**request, "kept_digest": mounted})
            ref = str(request["args"].get("ref"))
            self.kept[key] = Spare(key, ref, sock, pid, now)
            log.info("forked spare %d for %s", pid, ref)
        return min((when - now for when, *_ in self.due.values()), default=60.0)

    def hand(self, s: Spare, request: dict[str, Any], conn: socket.socket) -> bool:
        """Give ``s`` the request and the client's connection; False if it is gone."""
        if not s.warmed:  # still preparing or warming up at nice 19: it finishes at the mount's priority
            raise_priority(s.pid)
        try:
            socket.send_fds(s.sock, [json.dumps(request).encode()], [conn.fileno()])
            return True
        except OSError as err:
            log.info("spare %d for %s is gone (%s); forking a daemon", s.pid, s.ref, err)
            s.close()
            return False

    def _drop(self, s: Spare) -> None:
        if self.kept.get(s.key) is s:
            del self.kept[s.key]
        s.close()  # its link closes: it exits

    def close(self) -> None:
        for s in list(self.kept.values()):
            self._drop(s)
        self.due.clear()


# -- the spare's side (a child of the server) ---------------------------------------------


@contextlib.contextmanager
def prepare(request: dict[str, Any], link_fd: int) -> Iterator[Prepared]:
    """In the spare: open what ``request``'s mount will use, tell the server its size."""
    from cubefs.format.manifest import Manifest, parse_ref
    from cubefs.image.catalog import load_cached
    from cubefs.node.mount import MountOptions, open_disk_cache, store_policy
    from cubefs.remote import store_session

    t0 = time.monotonic()
    opts = MountOptions.from_args(argparse.Namespace(**request["args"]), request["mountpoint"],
                                  request["cache_dir"])
    lowered = _lower_priority()
    from cubefs.fuse.kernel import keep_freed_heap

    keep_freed_heap()  # before the store's loop thread starts (see cubefs.node.mount._run)
    with store_session(opts.store_url, opts.s3_endpoint, policy=store_policy(opts)) as (loop, store):
        disk = open_disk_cache(opts.cache_dir, opts.disk_cache)
        kept = None
        wanted: str | Manifest = opts.ref
        if request.get("kept_digest"):  # what the last daemon mounted: no manifest GET now (one at the mount)
            name, tag = parse_ref(opts.ref)
            wanted = Manifest(name, tag, str(request["kept_digest"]), "")
        try:
            manifest, image, chunkmap, _trace, _offline = loop.submit(
                load_cached(store, opts.cache_dir, wanted)).result()
            kept = (manifest, image, chunkmap)
            # The chunks' pack order, which a read that misses the node looks at for neighbours
            # (ImageFS._pack_neighbours): 5 ms of Python for numpy's 10,791 chunks, that read's
            # wait (and the event loop's) if built only then.
            chunkmap.by_pack()
            # this frame lives as long as the daemon serves (suspended at the yield below): what
            # it loaded is the Prepared's only, not kept here for an image the daemon may not serve
            del manifest, image, chunkmap, _trace, _offline
        except Exception as err:  # the mount itself will say what is wrong, if it still is
            log.info("spare for %s: image not loaded ahead (%s)", opts.ref, err)
        prepared = Prepared(loop, store, disk, kept)
        rehearse(opts.cache_dir)
        prepared.lowered = lowered
        prepared.warm = warm_up(kept)
        log.info("spare for %s prepared in %.1f ms", opts.ref, (time.monotonic() - t0) * 1000)
        _tell(link_fd, {"kind": "spare", "bytes": private_bytes()})
        try:
            yield prepared
        finally:
            left = prepared.take_disk()
            if left is not None:
                left.close()


AUTOGROUP = "/proc/self/autogroup"  # the session's CPU share (sched(7), "The autogroup feature")


def _lower_priority() -> tuple[int, int | None] | None:
    """A spare prepares 0.2 s after the mount that made it wanted, while that mount's program
    starts: at nice 19, so that the program and its daemon come first (on two cores its ~20-90
    ms of CPU otherwise ran beside them).  Only where the priority can be raised back (root):
    a daemon left at nice 19 would serve its reads last.  The old values (nice, and the nice
    of its autogroup, or None where there is none: see :func:`wait_for_request`), or None.

    A spare is a session of its own (setsid), and with autogroups (Debian's default,
    ``kernel.sched_autogroup_enabled``) a task's nice orders it only within its session,
    each session getting an equal share: so this nice 19 leaves the preparation beside the
    program at full weight.  Kept so on purpose: with its autogroup at 19 too, a spare under
    load (3-5 here) was not prepared when the next mount came 0.3-0.6 s later, and that
    mount waited for it (in process 13 -> 27 ms median, json, 20 rounds alternated)."""
    if os.geteuid() != 0:
        return None
    try:
        old = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError:
        return None
    return old, _autogroup_nice()


def _autogroup_nice(path: str = AUTOGROUP) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split("nice")[1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup_nice(path: str, nice: int) -> None:
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(str(nice))


def _restore_priority(old: tuple[int, int | None], pid: str = "self") -> None:
    """Every thread back to the old nice (on Linux a thread's nice is its own: the store's
    loop thread, started while lowered, took the lowered one), and the autogroup's."""
    nice, group = old
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    if group is not None:
        _set_autogroup_nice(f"/proc/{pid}/autogroup", group)


def raise_priority(pid: int) -> None:
    """In the server: a spare handed a request before it said it warmed up (at nice 19, its
    autogroup too while it warms: see wait_for_request) finishes the step it is in at the
    server's priority, not in what CPU the node leaves it.  Best effort: it restores the
    same values itself."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        _restore_priority((os.getpriority(os.PRIO_PROCESS, 0), 0), str(pid))


def warm_up(kept: tuple[Any, Any, Any] | None) -> Iterator[None]:
    """What a fresh daemon's first requests did on the remount's path, done ahead in steps
    of a few ms (:func:`wait_for_request` takes one at a time while no request came, so a
    mount never waits for it): its heap mapped (the first READs' buffers took a page fault
    per 4 KiB: cubefs.fuse.kernel.keep_freed_heap) and the image's packed attributes built
    (the first LOOKUPs and READDIRPLUSes built them: cubefs.fuse.server.attrs_ahead).
    Measured on deb-python, a remounted ``import json`` (9 runs each, load 3-5): the
    daemon's minor faults in the run ~1,800 -> ~670, its requests' time before the reply
    (median) 27.9 -> 17.7 ms, LOOKUPs' 5.0 -> 3.2, READDIRPLUSes' 4.0 -> 1.7, READs' 16.5 -> 11.6."""
    from cubefs.fuse import kernel, server

    t0 = time.monotonic()
    if kernel.keep_freed_heap():
        # blocks under the mmap threshold (so from the heap), less than it keeps in all, a
        # step each (~1 ms of page faults), freed together (one free region, kept)
        blocks = []
        for _ in range((kernel.HEAP_KEEP >> 20) - 1):
            blocks.append(bytearray(1 << 20))
            yield
        del blocks
    built = 0
    if kept is not None:
        from cubefs.image.fs import ImageFS

        _manifest, image, chunkmap = kept
        for n in server.attrs_ahead(ImageFS(image, chunkmap, None, "")):  # type: ignore[arg-type]
            built = n
            yield
        from cubefs.fuse import passthrough

        passthrough.has_big_file(image)  # auto passthrough's question at INIT, answered ahead
        yield
    log.debug("spare warmed up in %.1f ms (%d inodes' attributes)", (time.monotonic() - t0) * 1000, built)


def rehearse(directory: str) -> None:
    """Run the daemon's event loop once, as it starts (a control socket served, then cancelled).
    The first ``trio.run`` in a process forked from the server took 6-10 ms here, the next
    1.2: the first one's work (trio's lazy set-up, and the copy-on-write faults of every page
    of the server's heap it touches) is done ahead, off the remount's path.  Run in the
    server once (forked daemons then start at ~4 ms) and in each spare."""
    import trio

    from cubefs.node.control import serve_control

    path = os.path.join(directory, f".rehearsal-{os.getpid()}.sock")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, dict, {})
            nursery.cancel_scope.cancel()

    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        trio.run(main)
    except (OSError, trio.TrioInternalError) as err:  # only ever a head start
        log.debug("event loop not rehearsed: %s", err)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def wait_for_request(link_fd: int, prepared: Prepared | None = None) -> tuple[dict[str, Any], int] | None:
    """Block until the server hands over a request and its client's connection; None when
    the server closed the link (it dropped this spare, or it exited).  Meanwhile, still at
    the spare's low priority, ``prepared``'s warm-up (:func:`warm_up`) a step at a time, the
    link looked at between steps; the old priority is back before this returns."""
    warm = prepared.warm if prepared is not None else None
    if warm is not None:
        assert prepared is not None
        if prepared.lowered is not None and prepared.lowered[1] is not None:
            # The warm-up is only a head start: in the CPU the node leaves (its autogroup at 19;
            # the server raises it back if a request comes first, see Spares.hand).
            _set_autogroup_nice(AUTOGROUP, 19)
        # poll, not select: the link's descriptor number is the server's, past 1024 on a node of
        # hundreds of mounts (select raises there)
        ready = select.poll()
        ready.register(link_fd, select.POLLIN)
        try:
            while not ready.poll(0):
                if next(warm, StopIteration) is StopIteration:
                    _tell(link_fd, {"kind": "spare", "bytes": private_bytes(), "warmed": True})  # what it holds now
                    break
        except Exception as err:  # a head start only: never a spare that dies with a request in its link
            log.warning("spare: warm-up stopped: %s: %s", type(err).__name__, err)
        prepared.warm = None
    if prepared is not None and prepared.lowered is not None:
        _restore_priority(prepared.lowered)
        prepared.lowered = None
    sock = socket.socket(fileno=link_fd)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, REQUEST_MAX, 1)
    except OSError:
        return None
    finally:
        sock.detach()
    if not msg or not fds:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(msg), fds[0]


def _tell(link_fd: int, info: dict[str, Any]) -> None:
    sock = socket.socket(fileno=link_fd)
    try:
        sock.send(json.dumps(info).encode())
    except OSError:
        pass
    finally:
        sock.detach()


def private_bytes() -> int:
    """This process's own memory (anonymous pages not shared with the server): what keeping it costs."""
    total = 0
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Private_Dirty", "Swap"):
                    total += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total
