"""Mounts outlive their daemon: the mount server keeps each mount's ``/dev/fuse``.

A FUSE mount lives as long as some process holds its ``/dev/fuse`` descriptor;
the kernel fails every request with ``ENOTCONN`` once the last copy closes.  So
the mount server (:func:`cubefs.daemon.run_mount_server`) keeps a copy of each
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
replacement (as at any mount of the volume; a reader still holding it gets
``ESTALE``), and writes the dead daemon acknowledged but had not yet flushed
(``fsync`` or the 5 s background flush) are lost as in a power cut.

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
import socket
import time
from dataclasses import dataclass, field
from typing import Any

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
        if not msg:
            return bool(fds)
        try:
            info = json.loads(msg)
        except ValueError:
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
        if self.session is not None and not int(self.session.get("kernel_flags", 0)) & (1 << 39):
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
