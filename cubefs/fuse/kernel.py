"""A FUSE session on ``/dev/fuse``, without libfuse.

Why not pyfuse3 (which the first version used, and which remains available as
``--transport pyfuse3``): libfuse decides the INIT flags and pyfuse3 passes
only a file handle to ``read``/``readdir``.  So the kernel could not be told
to cache symlinks, nor to skip OPEN/OPENDIR (which needs reads addressed by
inode), and a warm ``python3 -c 'import json'`` cost ~70 synchronous round
trips through the daemon -- 1.6x the time on a native disk.  Speaking the
protocol ourselves (:mod:`cubefs.fuse.server`) brings that to a handful, and
a session is a file descriptor, so one process can serve many mounts.

Mounting: as root, ``mount(2)`` with the ``fd=`` of our ``/dev/fuse``; as
anyone else, the setuid ``fusermount3``, which passes the descriptor back over
a unix socket (``_FUSE_COMMFD``), as libfuse does.

The serve loop runs on trio: it waits for the descriptor to become readable
(after a request, it polls for the next one for a few microseconds first:
:func:`spin_seconds`), reads one request per ``read`` (the kernel's unit), answers what can be
answered at once inline and starts a task for a read that must wait for
chunks.  It yields to other tasks every few requests so that a busy mount
never starves fetches or the control socket.  With ``--fuse-uring`` (opt-in: see
:func:`uring_wanted`) most requests come through io_uring ring entries instead
(:mod:`cubefs.fuse.uring`), served by a second loop beside the /dev/fuse one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from cubefs.errors import CubefsError
from cubefs.fuse import passthrough, uring
from cubefs.fuse import protocol as p
from cubefs.fuse.server import MAX_READAHEAD, MAX_WRITE, REQUEST_BUFFER, FuseServer, Reply

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
YIELD_EVERY = 16  # requests handled inline between two checkpoints
SPIN_US = 50.0  # microseconds the serve loop polls for the next request: see spin_seconds
MAX_SPIN_US = 10_000.0  # what CUBEFS_FUSE_SPIN_US may ask for: a poll that never ends is a spinning daemon
HANDOVER_WAIT = 5.0  # seconds a daemon handing over waits for its requests in flight


def spin_seconds() -> float:
    """How long the serve loop polls ``/dev/fuse`` after a request before it sleeps.

    Why poll: on this machine (a nested VM) waking a process that sleeps on another CPU
    costs ~13-20 us each way; a FUSE request is two such wake-ups, the daemon's and the
    caller's.  A pipe ping-pong between two processes took 41 us a round trip with both
    sleeping, 14.5 us with the server polling, 5.9 us with both on one CPU.  A request that
    arrives while the loop polls saves the daemon's wake-up: a TCGETS ioctl on a mount
    answered in 18-22 us (p50) with 0.1 ms between calls instead of 56-61 us.  What it
    buys: an untar of python3.11 onto a ``--writeback-cache`` volume, 0.77-0.88 s (daemon
    CPU 0.68-0.83 s) polling 50 us against 1.16-1.22 s (0.91-0.94 s) not polling, in turns
    (``tools/bench/volume_untar.py``; waking costs the daemon CPU too); 200 us bought no
    more.  It does not help a program that makes a request every millisecond or so (a
    Python start's isatty ioctls): that gap is past any window worth polling through.
    Bounded (``SPIN_US``), only right after a request (an idle daemon sleeps), and not
    while a reply is pending in another task (polling would hold the loop those tasks
    need).  ``CUBEFS_FUSE_SPIN_US`` overrides it (0 turns polling off); with one CPU to
    run on it is off: the caller could not run while the daemon polls."""
    env = os.environ.get("CUBEFS_FUSE_SPIN_US")
    us = SPIN_US
    if env:
        try:
            us = min(float(env), MAX_SPIN_US)  # nan fails the comparisons below: off
        except ValueError:
            log.warning("CUBEFS_FUSE_SPIN_US=%r is not a number of microseconds: polling %g us", env, SPIN_US)
        if not us >= 0:
            us = 0.0
    try:
        if len(os.sched_getaffinity(0)) < 2:
            return 0.0
    except OSError:
        pass
    return us / 1e6


RING_ENTRIES = 8  # ring entries per CPU queue: see uring_wanted
URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"


def uring_wanted() -> bool:
    """Whether a new session asks for FUSE over io_uring (``CUBEFS_FUSE_URING=1``; off by default).

    Why not the default where the kernel offers it (measured on 6.18, docs/benchmarks.md):
    a ring entry the kernel filled belongs to the daemon that registered it.  A daemon
    killed -9 (or handing over while a request lands on one of its entries) leaves the
    requests it held in the ring's own queues, which ``FUSE_NOTIFY_RESEND`` does not
    requeue (it walks only the /dev/fuse queues), so their callers hang until they are
    killed; over /dev/fuse the replacement answers them.  And a connection that took the
    ring never goes back: its successor must register entries too.  The kernel sends
    ring requests only when ``/sys/module/fuse/parameters/enable_uring`` is Y (a global
    switch for every FUSE mount of the node, which root sets, not cubefs), and only
    once every CPU's queue holds an entry; interrupts, forgets and our notifications
    stay on /dev/fuse, which this session keeps serving beside the ring."""
    return os.environ.get("CUBEFS_FUSE_URING", "") not in ("", "0")


def uring_enabled() -> bool:
    """The kernel's switch (absent: a kernel without CONFIG_FUSE_IO_URING)."""
    try:
        with open(URING_PARAMETER) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt(3) parameters
HEAP_MMAP_THRESHOLD = 2 << 20  # allocations under this come from the heap (a READ's chunk buffers)...
HEAP_KEEP = 8 << 20  # ...and up to this much of it freed stays mapped


def keep_freed_heap() -> bool:
    """Have glibc keep up to HEAP_KEEP of freed heap mapped instead of returning it to the kernel.

    Why: a READ answered from the hot file (cubefs.cache.hot.HotFile.get_now) allocates a
    buffer per chunk (~70 KB each, 1 MiB a request), writes the reply and frees them.  With
    glibc's defaults the free at the heap's top gives everything above 128 KiB back
    (M_TRIM_THRESHOLD; it adapts only after a free of an mmapped block, which 70 KB blocks
    never are), so the next READ takes a page fault for every 4 KiB of its buffers again:
    ~150 faults per MiB, each 3.5-5 us in this VM (measured: 15 x 70 KB allocated and freed 20
    times, 3,898 faults and 18.6 ms against none and 0.6 ms with these settings; a 1 MiB
    get_now from cached pages 724 us against 396-482 us).  A remounted ``import json``'s
    daemon took ~1,450 minor faults in its run, 730 of them zeroing new buffers on its event
    loop.  What it costs: up to HEAP_KEEP of memory the daemon already used stays its own.

    And no new malloc arena per thread (M_ARENA_MAX 1): a READ that waits is read and decoded
    in a worker thread, whose own new arena took its page faults again (~450 of the ~700
    left in a remounted json run's daemon, perf record -e page-faults); in the one arena
    they reuse the heap a spare mapped ahead, and what is kept is HEAP_KEEP per daemon, not
    per thread.  Its threads allocate holding the GIL, so the one arena's lock is not
    contended.  Measured, json remounts, 9 fresh runs each alternated (load 4-5): faults
    659-709 -> 409-583, the daemon's READ time 64.5 -> 45.7 ms, LOOKUP 10.3 -> 6.7 (medians).

    Process-wide, and set before the process's first thread runs (the mount server, a
    daemon's start, a spare's: cubefs.node.mount._run, cubefs.node.spare): a thread that
    allocated before it keeps an arena of its own, which the next threads are then handed
    in turn (measured: a worker's buffers faulted in again, 209 faults, beside 1-6); again by
    every session (idempotent).  False where glibc's mallopt is missing."""
    try:
        c = _libc()
        return bool(c.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) and c.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP)
                    and c.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


class MountError(CubefsError):
    """The kernel (or fusermount3) refused the mount."""


_libc = uring.libc


def _option_value(text: str) -> str:
    """A mount option value without the separators the option syntax uses."""
    return "".join(c if c.isprintable() and c not in ", \t\n\\" else "_" for c in text) or "cubefs"


class KernelSession:
    """One FUSE mount: the ``/dev/fuse`` descriptor and the mountpoint it serves."""

    def __init__(self, mountpoint: str, fsname: str, allow_other: bool = False, read_only: bool = True) -> None:
        self.mountpoint = mountpoint
        self.fsname = _option_value(fsname)
        self.allow_other = allow_other
        self.read_only = read_only
        self.fd = -1
        self._mounted = False
        self.resumed = False  # serving a session another daemon started (adopt)
        self.handed_over = False  # stopped serving for a successor: leave the mount be
        # Seconds from reading each request to writing its answer, by opcode (``cubefs stats``:
        # where a start's time in the daemon goes; a read that waits counts its wait).  Keyed by
        # the number: the name is looked up when stats are asked, not on every request.
        self.busy: Counter[int] = Counter()
        self._reading = trio.CancelScope()
        self.spin = spin_seconds()
        self.ring: uring.FuseRing | None = None  # FUSE over io_uring, if asked for and set up
        self.ring_on = False  # the kernel sends requests through self.ring (INIT took it)
        self.want_ring = uring_wanted()
        self.ring_note = "" if self.want_ring else "not asked for: --fuse-uring or CUBEFS_FUSE_URING=1"
        self._later = 0  # replies pending in tasks of their own (no polling meanwhile)
        self.dev_ops: Counter[int] = Counter()  # with the ring: what still came through read(2), by opcode
        self._ring_scope = trio.CancelScope()
        keep_freed_heap()

    def adopt(self, fd: int, ring: bool = False) -> None:
        """Serve the session on ``fd`` that a daemon now gone started (the mount server
        kept the descriptor): no mount, no INIT; ``serve`` first asks the kernel to
        send again what the old daemon read and never answered.  ``ring``: the session
        took FUSE over io_uring, which it cannot leave: this daemon registers entries of
        its own (the old daemon's died with it)."""
        self.ring_on = ring
        self.fd = fd
        fcntl.fcntl(self.fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        os.set_blocking(self.fd, False)
        self._mounted = True
        self.resumed = True
        log.info("resumed the FUSE session of %s on fd %d", self.mountpoint, self.fd)

    def handover(self) -> None:
        """Stop reading requests (a successor will): what is in flight is answered, the
        mount stays."""
        self.handed_over = True
        self._reading.cancel()

    def mount(self) -> None:
        if os.geteuid() == 0:
            self._mount_directly()
        else:
            self._mount_with_fusermount()
        os.set_blocking(self.fd, False)
        self._mounted = True
        log.info("mounted %s at %s (fd %d)", self.fsname, self.mountpoint, self.fd)
        self._raise_readahead()

    def _raise_readahead(self) -> None:
        """Let the kernel read ahead MAX_READAHEAD instead of its default 128 KiB, so a
        sequential read keeps several 1 MiB requests in flight.  The knob is the
        mount's backing device in sysfs, found through mountinfo (never by
        stat-ing our own mountpoint, which would wait on ourselves), and it must
        be set before INIT, which keeps the smaller of it and our offer.  Needs
        root; without it the default stays."""
        escaped = self.mountpoint.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        try:
            with open("/proc/self/mountinfo") as f:
                devs = [fields[2] for fields in map(str.split, f) if len(fields) > 4 and fields[4] == escaped]
            if devs:
                with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
                    f.write(str(MAX_READAHEAD // 1024))
        except OSError as err:
            log.debug("kernel read-ahead left at its default: %s", err)

    def _mount_directly(self) -> None:
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        st = os.stat(self.mountpoint)  # before mounting: never stat our own mount
        data = f"fd={self.fd},rootmode={st.st_mode & 0o170000:o},user_id=0,group_id=0,default_permissions"
        if self.allow_other:
            data += ",allow_other"
        libc = _libc()
        rc = libc.mount(
            self.fsname.encode(), self.mountpoint.encode(), b"fuse.cubefs",
            ctypes.c_ulong((MS_RDONLY if self.read_only else 0) | MS_NOSUID | MS_NODEV), data.encode(),
        )
        if rc != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise MountError(f"cannot mount on {self.mountpoint}: {os.strerror(err)}")

    def _mount_with_fusermount(self) -> None:
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        if tool is None:
            raise MountError("mounting as a non-root user needs fusermount3 (Debian: apt-get install fuse3)")
        mode = "ro" if self.read_only else "rw"
        opts = f"{mode},nosuid,nodev,default_permissions,fsname={self.fsname},subtype=cubefs"
        if self.allow_other:
            opts += ",allow_other"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            res = subprocess.run(
                [tool, "-o", opts, "--", self.mountpoint], env=env, pass_fds=(theirs.fileno(),),
                capture_output=True, text=True,
            )
            if res.returncode != 0:
                raise MountError(f"cannot mount on {self.mountpoint}: {res.stderr.strip() or 'fusermount3 failed'}")
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"cannot mount on {self.mountpoint}: fusermount3 passed no descriptor")
        self.fd = fds[0]
        fcntl.fcntl(self.fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)

    def unmount(self) -> None:
        """Detach the mount (lazily: open files keep being served until closed)."""
        if not self._mounted:
            return
        self._mounted = False
        if os.geteuid() == 0:
            if _libc().umount2(self.mountpoint.encode(), MNT_DETACH) == 0:
                return
            log.warning("umount2(%s) failed: %s", self.mountpoint, os.strerror(ctypes.get_errno()))
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        if tool:
            subprocess.run([tool, "-u", "-z", "--", self.mountpoint], capture_output=True)

    def close(self) -> None:
        self._close_ring()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- FUSE over io_uring --------------------------------------------------------

    def _open_ring(self) -> None:
        """Set the ring up before INIT is answered: a session that took the ring waits
        for entries on every queue, so only a daemon that has one may ask for it."""
        if not self.ring_on and not (self.want_ring and uring_enabled()):
            if self.want_ring:
                self.ring_note = f"the kernel does not offer it ({URING_PARAMETER} is not Y)"
            return
        try:
            self.ring = uring.FuseRing(self.fd, uring.possible_cpus(), RING_ENTRIES, MAX_WRITE)
        except OSError as err:
            self.ring_note = f"no io_uring: {err}"
            log.warning("FUSE over io_uring not set up, serving /dev/fuse: %s", err)
            if self.ring_on:
                log.error("%s took io_uring and this daemon has none: its requests wait", self.mountpoint)

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def path(self) -> dict[str, Any]:
        """Which way requests come (``cubefs stats``): ``io_uring`` or ``/dev/fuse``, and why."""
        out: dict[str, Any] = {"path": "io_uring" if self.ring_on else "/dev/fuse"}
        if self.ring_on and self.ring is not None:
            out.update(queues=self.ring.queues, entries_per_queue=self.ring.per_queue,
                       dev_requests={p.OPCODE_NAMES.get(op, str(op)): n for op, n in self.dev_ops.items()})
        elif self.ring_note:
            out["why"] = self.ring_note
        return out

    def _kick_queues(self) -> None:
        """After a replacement registers: a request that came while no entry was there waits
        in its queue until the next request on that queue (registering fetches none), so
        one statfs from each CPU gets each queue going."""
        def kick(cpu: int) -> None:
            try:
                os.sched_setaffinity(0, {cpu})
                os.statvfs(self.mountpoint)
            except OSError as err:
                log.debug("queue %d not kicked: %s", cpu, err)

        for cpu in sorted(os.sched_getaffinity(0)):
            threading.Thread(target=kick, args=(cpu,), daemon=True, name=f"cubefs-kick-{cpu}").start()

    def _start_ring(self, server: FuseServer, nursery: trio.Nursery) -> None:
        assert self.ring is not None
        try:
            self.ring.register()
        except OSError as err:
            log.warning("FUSE ring entries not registered (%s): serving /dev/fuse", err)
            self.ring_note = f"registration failed: {err}"
            self.ring_on = False
            return
        self.ring_on = True
        log.info("FUSE over io_uring: %d queues of %d entries", self.ring.queues, self.ring.per_queue)
        nursery.start_soon(self._serve_ring, server, nursery)

    def _commit_to(self, i: int, unique: int) -> Callable[[Reply], None]:
        """How a deferred reply to ring entry ``i``'s request goes out (see _reply_later)."""
        def commit(msg: Reply) -> None:
            ring = self.ring
            if ring is None or ring.ring.fd < 0:  # closed by a handover meanwhile: nobody to answer
                log.warning("a FUSE ring reply (request %d) dropped: the ring closed first", unique)
                return
            ring.commit(i, msg if msg is not None else p.error_reply(unique, errno.EIO))
            ring.ring.submit()
        return commit

    async def _serve_ring(self, server: FuseServer, nursery: trio.Nursery) -> None:
        """Answer the requests the kernel puts in ring entries: each answer is queued as a
        COMMIT_AND_FETCH (the answer, and the entry offered again), all of a batch's in
        one ``io_uring_enter``; then poll the completion ring (memory, no syscall) for
        :func:`spin_seconds` before sleeping on the ring's descriptor."""
        ring = self.ring
        assert ring is not None
        r = ring.ring
        spin = self.spin
        spin_until = 0.0
        handled = 0
        gone: set[int] = set()
        refused = ""
        with self._ring_scope:
            while len(gone) < ring.count:
                if r.pending:
                    r.submit()
                if not r.ready():
                    if spin_until and not self._later and time.perf_counter() < spin_until:
                        continue
                    spin_until = 0.0
                    await trio.lowlevel.wait_readable(r.fd)
                    continue
                for i, res in r.reap():
                    if res < 0:
                        if res != -errno.ENOTCONN and not refused:
                            refused = os.strerror(-res)
                            log.warning("FUSE ring entry %d: %s", i, refused)
                        gone.add(i)  # torn down (unmount), or refused: no more requests on it
                        continue
                    t0 = time.perf_counter()
                    try:
                        request = ring.request(i)
                    except ValueError as err:
                        log.error("%s", err)
                        ring.commit(i, p.error_reply(ring.uniques[i], errno.EIO))
                        continue
                    opcode = int.from_bytes(request[4:8], "little")
                    out = server.handle(request)
                    if isinstance(out, bytes | list):
                        ring.commit(i, out)
                        self.busy[opcode] += time.perf_counter() - t0
                    elif out is not None:
                        self._later += 1
                        nursery.start_soon(self._reply_later, out, opcode, t0, self._commit_to(i, ring.uniques[i]))
                    else:  # every request on the ring wants an answer (FORGETs come on /dev/fuse)
                        ring.commit(i, p.error_reply(ring.uniques[i], errno.ENOSYS))
                    handled += 1
                    if handled % YIELD_EVERY == 0:
                        r.submit()
                        # shielded: a cancel (handover) here would drop the rest of a reaped batch
                        await trio.lowlevel.cancel_shielded_checkpoint()
                if spin:
                    spin_until = time.perf_counter() + spin
        if len(gone) == ring.count and not handled and refused:
            # the kernel refused the entries (it then serves /dev/fuse, as if INIT had not taken the ring)
            self.ring_on = False
            self.ring_note = f"the kernel refused the ring's entries: {refused}"
        elif len(gone) == ring.count:
            log.info("FUSE ring of %s closed by the kernel", self.mountpoint)
        elif self.handed_over:
            ring.ring.close()  # the buffers stay mapped until the session closes: a late copy lands there

    def _send(self, msg: bytes | list[bytes | memoryview]) -> None:
        try:
            if isinstance(msg, list):
                os.writev(self.fd, msg)
            else:
                os.write(self.fd, msg)
        except OSError as err:
            # ENOENT: the request was interrupted and its reply is not wanted.
            if err.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("cannot write a FUSE reply: %s", err)

    async def _reply_later(self, work: Coroutine[Any, Any, Reply], opcode: int = 0, t0: float = 0.0,
                           deliver: Callable[[Reply], None] | None = None) -> None:
        """Answer a request that waits (a read of chunks not yet here): written to /dev/fuse,
        or ``deliver``ed (a ring entry's commit).  Counted in ``_later`` by its caller before
        ``start_soon``: a task starts later, and the serve loop must not poll for the next
        request in the meantime (see spin_seconds)."""
        try:
            msg = await work
        finally:
            self._later -= 1
        if deliver is not None:
            deliver(msg)
        elif msg is not None:
            self._send(msg)
        if t0:
            self.busy[opcode] += time.perf_counter() - t0

    def _resend(self, server: FuseServer) -> None:
        if not server.minor:
            # The old daemon died before answering INIT, which it may have read: ask for it
            # again (a kernel without RESEND refuses the notification, and then sends INIT
            # to us only if the old daemon had not read it).
            try:
                os.write(self.fd, p.resend())
            except OSError as err:
                log.debug("FUSE_NOTIFY_RESEND before INIT refused: %s", err)
            return
        if not server.kernel_flags & p.HAS_RESEND:
            log.warning("this kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+): requests the previous daemon "
                        "read and never answered stay unanswered")
            return
        try:
            os.write(self.fd, p.resend())
            log.info("asked the kernel to resend the requests the previous daemon left unanswered")
        except OSError as err:
            log.warning("FUSE_NOTIFY_RESEND failed: %s", err)

    async def serve(self, server: FuseServer, on_session: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Answer requests until the filesystem is unmounted (or :meth:`handover`).
        ``on_session`` gets what INIT settled, once it is settled."""
        buf = bytearray(REQUEST_BUFFER)
        view = memoryview(buf)
        told = server.minor != 0
        if not told or self.ring_on:
            self._open_ring()
        server.uring = self.ring is not None  # offered at INIT (FuseServer._init)
        async with trio.open_nursery() as nursery:
            if told and self.ring_on and self.ring is not None:  # a replacement: the session took the ring
                self._start_ring(server, nursery)
                self._kick_queues()
            if self.resumed:
                self._resend(server)
            with self._reading:
                await self._serve_requests(server, nursery, buf, view, on_session, told)
            if self.handed_over:  # answer what is in flight, within a bound
                nursery.cancel_scope.deadline = trio.current_time() + HANDOVER_WAIT
                if self.ring_on:
                    # The ring's entries cannot be withdrawn (6.18): a request the kernel puts in
                    # one after the ring loop stops is lost.  So the loop serves until every reply
                    # in flight is out, and then the ring is closed at once (its idle entries are
                    # cancelled; requests wait in the kernel for the successor's), not at exit.
                    while self._later:
                        await trio.sleep(0.001)
                    self._ring_scope.cancel()
                return
            self._ring_scope.cancel()
            nursery.cancel_scope.cancel()
        self._mounted = False

    async def _serve_requests(self, server: FuseServer, nursery: trio.Nursery, buf: bytearray, view: memoryview,
                              on_session: Callable[[dict[str, Any]], None] | None, told: bool) -> None:
        handled = 0
        spin_until = 0.0
        spin = self.spin
        while not server.destroyed:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                if spin_until and not self._later and time.perf_counter() < spin_until:
                    continue  # poll: the next request of a burst is likely microseconds away
                spin_until = 0.0
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if err.errno == errno.ENODEV:  # unmounted
                    break
                raise
            t0 = time.perf_counter()
            opcode = int.from_bytes(view[4:8], "little")
            if self.ring_on:
                self.dev_ops[opcode] += 1
            out = server.handle(view[:n])  # valid until the next read: see FuseServer.handle
            if isinstance(out, bytes | list):
                self._send(out)
                self.busy[opcode] += time.perf_counter() - t0
            elif out is not None:
                self._later += 1
                nursery.start_soon(self._reply_later, out, opcode, t0)
            handled += 1
            if spin and not self.ring_on:  # with the ring, /dev/fuse carries only forgets and interrupts
                spin_until = time.perf_counter() + spin
            if not told and server.minor:
                told = True
                if self.ring is not None and server.uring_on:
                    self._start_ring(server, nursery)
                elif self.ring is not None:
                    self.ring_note = "the kernel did not offer it at INIT"
                    self._close_ring()
                if on_session is not None:
                    on_session({**server.session(), "uring": self.ring_on})
            if handled % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()


class KernelTransport:
    """An ImageFS or a VolumeFS served on its own ``/dev/fuse`` session (the daemon's Transport)."""

    def __init__(self, fs: Any, mountpoint: str, fsname: str, allow_other: bool) -> None:
        self.server = FuseServer(fs)
        self.server.mknod_creates = self.server.writable  # the kernel's fallback: see FuseServer.mknod_creates
        self.ops = self.server.ops
        self.session = KernelSession(mountpoint, fsname, allow_other, read_only=not self.server.writable)
        self.on_session: Callable[[dict[str, Any]], None] | None = None  # told what INIT settled

    def adopt(self, fd: int, session: dict[str, Any] | None) -> None:
        """Serve the session another daemon started on ``fd`` (instead of :meth:`mount`);
        ``session`` is what its INIT settled (None: INIT is still to come)."""
        if session is not None:
            self.server.resume(session)
        self.session.adopt(fd, ring=bool(session and session.get("uring")))

    def handover(self) -> None:
        self.session.handover()

    @property
    def fd(self) -> int:
        return self.session.fd

    async def invalidate(self, inodes: set[int], names: set[tuple[int, bytes]]) -> int:
        """Make the kernel drop what it cached of ``inodes`` and ``names`` (after a rollback).
        From a worker thread: an entry invalidation waits for the directory's lock, which
        a request this loop must answer may hold.  Returns the notifications sent."""
        msgs = self.server.invalidations(inodes, names)

        def send() -> None:
            for msg in msgs:
                try:
                    os.write(self.session.fd, msg)
                except OSError as err:  # ENOENT: the kernel had not cached it
                    if err.errno != errno.ENOENT:
                        log.warning("cache invalidation failed: %s", err)

        await trio.to_thread.run_sync(send)
        return len(msgs)

    @property
    def read_bytes(self) -> int:
        return self.server.read_bytes

    def enable_passthrough(self, auto: bool = False) -> None:
        """Offer FUSE passthrough at INIT (``auto``: only for an image worth it, the default;
        else ``cubefs mount --passthrough``).  Only here, on
        /dev/fuse: a virtio-fs root's guest kernel cannot read our files."""
        self.server.passthrough = passthrough.for_mount(self.server.fs, lambda: self.session.fd, auto=auto)

    def request_seconds(self) -> dict[str, float]:
        return {p.OPCODE_NAMES.get(op, str(op)): round(sec, 6) for op, sec in self.session.busy.items()}

    def enable_uring(self) -> None:
        """Ask for FUSE over io_uring at INIT (``cubefs mount --fuse-uring``): see uring_wanted."""
        self.session.want_ring = True
        self.session.ring_note = ""

    def fuse_path(self) -> dict[str, Any]:
        """How requests reach this daemon: FUSE over io_uring or /dev/fuse (and why not the ring)."""
        return self.session.path()

    def passthrough_stats(self) -> dict[str, Any] | None:
        pt = self.server.passthrough
        return pt.stats() if pt is not None else None

    def mount(self) -> None:
        self.session.mount()

    async def serve(self) -> None:
        await self.session.serve(self.server, self.on_session)

    def stop(self) -> None:
        self.session.unmount()

    def close(self) -> None:
        if not self.session.handed_over:  # a successor serves the mount on the server's descriptor
            self.session.unmount()
        self.session.close()
        if self.server.passthrough is not None:
            self.server.passthrough.close()
