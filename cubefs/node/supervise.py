"""Mounts outlive their daemon: the mount server keeps each mount's ``/dev/fuse``.

A FUSE mount lives as long as some process holds its ``/dev/fuse`` descriptor;
the kernel fails every request with ``ENOTCONN`` once the last copy closes.  So
the mount server (:func:`cubefs.node.mount_server.run_mount_server`) keeps a copy of each
mount's descriptor, which its daemon passes up (``SCM_RIGHTS``) over a
``SOCK_SEQPACKET`` pair made before the fork, together with what the FUSE INIT
settled and the image digest it mounted.  When a daemon dies without saying
``unmounted`` (kill -9, a crash), the server forks a replacement on the same
descriptor at once: it loads the same image (the digest, not the tag, which
may have moved; from the metadata cache if the store is down), skips mount and
INIT, and sends ``FUSE_NOTIFY_RESEND`` (Linux 6.9+, ``FUSE_HAS_RESEND`` in the
kernel's INIT flags), which puts the requests the dead daemon had read and
never answered back in the queue.  Readers see a stall, never an error.

Node ids keep their meaning: an image's are its inode numbers, a volume's are
the inode numbers of its index.  What is lost are the kernel's lookup counts
the dead daemon kept: a volume file unlinked while open is dropped by the
replacement (as at any mount of the volume; a process still holding it open
gets errors from it).  Nothing a volume's dead daemon answered is lost: every completed
operation is in the index and the data files (the kernel has them; only a power
cut loses what was not fsynced).  A change it made but had not answered comes
back as a resent request that finds it done: a create finds its name, a removal
finds nothing; :meth:`cubefs.fuse.server.FuseServer._replayed` answers those as
the successes they were, so writers see no error either.

Without ``FUSE_HAS_RESEND`` a replacement could not answer the requests the
dead daemon took, and their callers would hang; the server then closes its
copy instead, and the mount fails with ``ENOTCONN`` as before (logged).  A
daemon that dies 5 times in a minute is given up the same way.

Upgrades use the same path: a daemon told to hand over (SIGUSR2) stops reading
requests, answers those in flight, flushes, says ``handover`` and exits; the
server forks its successor from the code it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cubefs.fuse.protocol import HAS_RESEND

log = logging.getLogger(__name__)

MESSAGE_MAX = 65536
CRASH_LOOP = (5, 60.0)  # this many replacements within this many seconds: give up


class SupervisorLink:
    """The daemon's end: tell the mount server what it needs to replace this daemon."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.outcome = ""  # "unmounted" or "handover", sent by finish()

    def fuse_fd(self, fd: int) -> None:
        self._send(lambda: socket.send_fds(self.sock, [json.dumps({"kind": "fd"}).encode()], [fd]))

    def tell(self, kind: str, **info: Any) -> None:
        self._send(lambda: self.sock.send(json.dumps({"kind": kind, **info}).encode()))

    def finish(self) -> None:
        if self.outcome:
            self.tell(self.outcome)
        self.sock.close()

    def _send(self, fn: Any) -> None:
        try:
            fn()
        except OSError as err:  # the server is gone: the mount goes on unsupervised
            log.debug("mount server does not listen: %s", err)


@dataclass
class Supervised:
    """The server's record of one mount and its current daemon."""

    request: dict[str, Any]
    sock: socket.socket
    pid: int
    fuse_fd: int = -1
    session: dict[str, Any] | None = None
    image: str | None = None
    restarts: int = 0
    outcome: str = ""
    replaced_at: list[float] = field(default_factory=list)
    live: bool = False  # the daemon serves the mount (it sent its descriptor)

    @property
    def mountpoint(self) -> str:
        return str(self.request["mountpoint"])

    def receive(self) -> bool:
        """Take one message from the daemon; False once it has gone."""
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, MESSAGE_MAX, 1)
        except OSError:
            return False
        for fd in fds:
            if self.fuse_fd < 0:
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
                self.fuse_fd = fd
            else:
                os.close(fd)
        if fds:
            self.live = True
        if not msg:
            return bool(fds)
        try:
            info = json.loads(msg)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            log.warning("mount daemon %d sent a bad message", self.pid)
            return True
        kind = info.pop("kind", "")
        if kind == "session":
            self.session = info
        elif kind == "image":
            self.image = str(info.get("digest") or "") or None
        elif kind in ("unmounted", "handover"):
            self.outcome = kind
        return True

    def replacement_allowed(self) -> str:
        """'' if a dead daemon may be replaced, else why not."""
        if self.outcome == "unmounted":
            return "it unmounted"
        if self.fuse_fd < 0:
            return "it died before its mount was live"
        if self.outcome == "handover":
            return ""
        if self.session is not None and not int(self.session.get("kernel_flags", 0)) & HAS_RESEND:
            return ("this kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+) to replay what it had read; the mount "
                    "fails with ENOTCONN until 'cubefs umount' and a new mount, as before")
        now = time.monotonic()
        self.replaced_at = [t for t in self.replaced_at if now - t < CRASH_LOOP[1]]
        if len(self.replaced_at) >= CRASH_LOOP[0]:
            return f"its daemon died {CRASH_LOOP[0]} times within {CRASH_LOOP[1]:.0f} s"
        return ""

    def resume_info(self) -> dict[str, Any]:
        """What the replacement needs (sent in its request)."""
        return {"fd": self.fuse_fd, "session": self.session, "image": self.image, "restarts": self.restarts + 1}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)
            self.fuse_fd = -1

    def state(self) -> dict[str, Any]:
        return {"request": self.request, "sock": self.sock.fileno(), "pid": self.pid, "fuse_fd": self.fuse_fd,
                "session": self.session, "image": self.image, "restarts": self.restarts}


HANDOVER_TIMEOUT = 30.0  # seconds an upgrade waits for one daemon before it moves on
STATE_ENV = "CUBEFS_SERVER_STATE_FD"


@dataclass
class Upgrade:
    """Old daemons to hand over to successors of the new code, one at a time: the next
    is asked once the previous one's successor serves (or after HANDOVER_TIMEOUT)."""

    todo: list[int]  # pids of daemons still to replace
    conn: socket.socket | None  # 'cubefs serve --upgrade' waiting for the outcome
    asked: int = 0  # pid asked to hand over, 0 if none
    asked_at: float = 0.0
    successor: Supervised | None = None
    done: int = 0

    def step(self, mounts: dict[int, Supervised]) -> None:
        if self.asked:
            waiting = self.successor is None or not self.successor.live
            if waiting and time.monotonic() - self.asked_at < HANDOVER_TIMEOUT:
                return
            if waiting:
                log.warning("mount daemon %d was not replaced within %.0f s; moving on", self.asked,
                            HANDOVER_TIMEOUT)
        self.asked, self.successor = 0, None
        live = {m.pid: m for m in mounts.values()}
        while self.todo:
            pid = self.todo.pop(0)
            m = live.get(pid)
            if m is None or m.fuse_fd < 0:
                continue
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                continue  # died meanwhile: replaced as any daemon that dies
            self.asked, self.asked_at = pid, time.monotonic()
            log.info("asked mount daemon %d of %s to hand over", pid, m.mountpoint)
            return
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.sendall(f"upgraded {self.done}\n".encode())
            self.conn.close()
            self.conn = None

    def replaced(self, old: Supervised, successor: Supervised | None) -> None:
        if old.pid != self.asked:
            return
        if successor is None:  # it unmounted meanwhile, or could not be replaced: next one
            self.asked = 0
            return
        self.successor = successor
        self.done += 1


def exec_upgrade(path: str, idle_exit: float | None, srv: socket.socket, lock_fd: int,
                 mounts: dict[int, Supervised], conn: socket.socket | None) -> None:
    """Exec the installed code as this same process (same pid, so the daemons stay its
    children), handing it the listening socket, the lock, every mount's descriptor and
    link, and ``conn``; returns only if the exec failed."""
    state = {"srv": srv.fileno(), "lock": lock_fd, "conn": conn.fileno() if conn is not None else -1,
             "mounts": [m.state() for m in mounts.values()]}
    fds = [srv.fileno(), lock_fd, *(m.sock.fileno() for m in mounts.values()),
           *(m.fuse_fd for m in mounts.values() if m.fuse_fd >= 0), *([conn.fileno()] if conn is not None else [])]
    memfd = os.memfd_create("cubefs-server-state", 0)
    os.write(memfd, json.dumps(state).encode())
    os.lseek(memfd, 0, os.SEEK_SET)
    for fd in [*fds, memfd]:
        os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "cubefs", "serve", "--socket", path]
    if idle_exit is not None:
        argv += ["--idle-exit", str(idle_exit)]
    try:
        os.execve(sys.executable, argv, {**os.environ, STATE_ENV: str(memfd)})
    except OSError as err:
        log.error("cannot exec %s for the upgrade: %s", sys.executable, err)
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(memfd)


def inherited_state() -> tuple[socket.socket, int, dict[int, Supervised], Upgrade] | None:
    """What :func:`exec_upgrade` handed this process, or None when it was started afresh."""
    fd = os.environ.pop(STATE_ENV, None)
    if fd is None:
        return None
    with os.fdopen(int(fd), "rb") as f:
        state = json.load(f)

    def adopt(n: int) -> int:
        os.set_inheritable(n, False)
        return n

    srv = socket.socket(fileno=adopt(state["srv"]))
    conn = socket.socket(fileno=adopt(state["conn"])) if state["conn"] >= 0 else None
    mounts: dict[int, Supervised] = {}
    for d in state["mounts"]:
        sock = socket.socket(fileno=adopt(d["sock"]))
        if d["fuse_fd"] >= 0:
            adopt(d["fuse_fd"])
        m = Supervised(d["request"], sock, d["pid"], d["fuse_fd"], d["session"], d["image"], d["restarts"],
                       live=d["fuse_fd"] >= 0)
        mounts[sock.fileno()] = m
    todo = [m.pid for m in mounts.values() if m.fuse_fd >= 0]
    return srv, adopt(state["lock"]), mounts, Upgrade(todo, conn)
