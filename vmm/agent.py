"""The host side of the guest agent (vmm/guest_init.sh): one line per request, one per
reply, over the unix socket QEMU exposes for the virtio-serial port ``cubefs.agent``.

The channel outlives the connection: QEMU drops what the guest writes while no
host is connected, so a client never trusts a line it did not ask for — every
request carries a fresh id, and replies with other ids (answers to a previous
client that went away) are skipped.  Free-form fields travel base64-encoded,
``-`` standing for an empty one, since the guest splits lines on spaces.
"""

from __future__ import annotations

import base64
import itertools
import os
import time
from dataclasses import dataclass

from cubefs.errors import CubefsError
from vmm.lines import LineSocket


class AgentError(CubefsError):
    """The agent could not be reached, or refused a request."""


@dataclass
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() or "-"


def _unb64(field: str) -> bytes:
    return base64.b64decode(field) if field not in ("", "-") else b""


class Agent:
    """A connection to one guest's agent; one request at a time."""

    _ids = itertools.count(int.from_bytes(os.urandom(3), "little"))

    def __init__(self, path: str, label: str = "") -> None:
        self.path = path
        self.label = label or path
        self.chan: LineSocket | None = None

    def connect(self, timeout: float = 30.0) -> None:
        """Connect, and wait until the agent answers (the guest may still be booting)."""
        deadline = time.monotonic() + timeout
        self.chan = LineSocket(self.path, f"VM {self.label}: agent", timeout, AgentError)
        while True:  # a PING sent before the agent reads its port may wait there: ask again
            try:
                self.request("PING", timeout=min(1.0, max(0.05, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AgentError(f"VM {self.label}: the guest agent did not answer in {timeout:.0f} s") from None

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, *args: str, timeout: float | None = 60.0) -> list[str]:
        """Send one request; its reply's fields after ``OK``.  Raises AgentError on ERR,
        TimeoutError if no reply came in ``timeout`` seconds (None: wait forever)."""
        if self.chan is None:
            raise AgentError(f"VM {self.label}: not connected to the agent")
        rid = str(next(self._ids))
        self.chan.send(" ".join([rid, op, *args]).encode())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            line = self.chan.line(deadline).decode(errors="replace").strip("\r")
            fields = line.split(" ")
            if fields[0] != rid:
                continue  # an answer nobody waits for any more
            if len(fields) > 1 and fields[1] == "OK":
                return fields[2:]
            why = _unb64(fields[2]).decode(errors="replace").strip() if len(fields) > 2 else line
            raise AgentError(f"VM {self.label}: {op} failed in the guest: {why or 'no reason given'}")

    # -- requests --------------------------------------------------------------
    def mount(self, read_only: bool) -> None:
        self.request("MOUNT", "ro" if read_only else "rw", timeout=60)

    def umount(self) -> None:
        self.request("UMOUNT", timeout=60)

    def run(self, script: str, stdin: bytes = b"", timeout: float | None = None) -> CommandResult:
        """Run a shell script (``/bin/sh -c``) in the guest's root; after ``timeout``
        seconds the guest kills it (exit code 137) and the agent is free again."""
        t0 = time.monotonic()
        limit = [str(max(1, round(timeout)))] if timeout is not None else []
        fields = self.request("RUN", _b64(script.encode()), _b64(stdin), *limit,
                              timeout=None if timeout is None else timeout + 30)
        if len(fields) != 3:
            raise AgentError(f"VM {self.label}: malformed RUN reply ({len(fields)} fields)")
        return CommandResult(int(fields[0]), _unb64(fields[1]), _unb64(fields[2]), time.monotonic() - t0)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.request("PUT", _b64(path.encode()), _b64(data), f"{mode:o}")

    def get(self, path: str) -> bytes:
        return _unb64(self.request("GET", _b64(path.encode()))[0])

    def freshen(self, hostname: str, machine_id: str) -> None:
        """After a restore: fresh randomness mixed into the guest's pool, a hostname and
        a machine-id of its own (clones of one template must not share them)."""
        self.request("FRESH", _b64(os.urandom(64)), hostname, machine_id)

    def poweroff(self) -> None:
        try:
            self.request("POWEROFF", timeout=10)
        except (AgentError, TimeoutError, OSError):
            pass  # it went down before or while answering
