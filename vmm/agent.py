"""A synchronous facade on the guest agent for ``cubefs vm`` (vmm/vm.py, vmm/qemu.py):
connect, mount, run a script, put/get a file, freshen, power off — each call runs the
asyncio host API (vmm/channel.py) on a private event loop, so callers stay plain
functions while the agent underneath streams and multiplexes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from vmm.channel import AgentChannel, AgentError

__all__ = ["Agent", "AgentError", "CommandResult"]
T = TypeVar("T")


@dataclass
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float


class Agent:
    """A connection to one guest's agent, used by one thread."""

    def __init__(self, path: str, label: str = "") -> None:
        self.path = path
        self.label = label or path
        self.chan: AgentChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self.chan is None:
            coro.close()
            raise AgentError(f"VM {self.label}: not connected to the agent")
        try:
            return self._loop.run_until_complete(coro)
        except AgentError as err:
            why = str(err).removeprefix(f"VM {self.label}: ")
            raise type(err)(f"VM {self.label}: {op} failed in the guest: {why}") from None

    def connect(self, timeout: float = 30.0) -> None:
        """Connect, and wait until the agent answers (the guest may still be booting)."""
        self._loop = asyncio.new_event_loop()
        try:
            self.chan = self._loop.run_until_complete(AgentChannel.connect(self.path, f"VM {self.label}", timeout))
        except AgentError as err:
            self.close()
            raise AgentError(f"VM {self.label}: the guest agent did not answer in {timeout:.0f} s ({err})") from None

    def close(self) -> None:
        if self._loop is not None:
            if self.chan is not None:
                self._loop.run_until_complete(self.chan.close())
            self._loop.close()
        self.chan, self._loop = None, None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------
    def mount(self, read_only: bool, disk: bool = False) -> None:
        self._run("MOUNT", self._c().mount(read_only, disk))

    def umount(self) -> None:
        self._run("UMOUNT", self._c().umount())

    def run(self, script: str, stdin: bytes = b"", timeout: float | None = None) -> CommandResult:
        """Run a shell script (``/bin/sh -c``) as root in the guest's root; after ``timeout``
        seconds its process group is killed (exit code 137) and the agent is free again."""
        return self._run("RUN", self._script(script, stdin, timeout))

    async def _script(self, script: str, stdin: bytes, timeout: float | None) -> CommandResult:
        t0 = time.monotonic()
        chan = self._c()
        p = await chan.spawn(["/bin/sh", "-c", script], user="root", cwd="/", stdin=bool(stdin))
        if stdin:
            await chan.send_input(p.pid, stdin)
            await chan.close_stdin(p.pid)
        out, err = bytearray(), bytearray()

        async def collect() -> tuple[int, int | None]:
            async for ev in p.events():
                if ev[0] == "stderr":
                    err.extend(ev[1])
                elif ev[0] == "end":
                    return int(ev[1]), ev[2]
                else:
                    out.extend(ev[1])
            raise AgentError(f"VM {self.label}: the command's stream ended without its exit status")

        task = asyncio.ensure_future(collect())
        try:
            code, sig = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            await chan.signal(p.pid, signal.SIGKILL, group=True)
            code, sig = await task
        return CommandResult(128 + sig if sig else code, bytes(out), bytes(err), time.monotonic() - t0)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        self._run("PUT", self._c().write_file(path, one(), user="root", mode=mode))

    def get(self, path: str) -> bytes:
        async def read() -> bytes:
            return b"".join([chunk async for chunk in self._c().read_file(path, user="root")])

        return self._run("GET", read())

    def freshen(self, hostname: str, machine_id: str) -> None:
        """After a restore: fresh randomness mixed into the guest's pool, a hostname and
        a machine-id of its own (clones of one template must not share them)."""
        self._run("FRESH", self._c().freshen(hostname, machine_id))

    def poweroff(self) -> None:
        try:
            self._run("POWEROFF", self._c().poweroff())
        except (AgentError, OSError):
            pass  # it went down before or while answering

    def _c(self) -> AgentChannel:
        if self.chan is None:
            raise AgentError(f"VM {self.label}: not connected to the agent")
        return self.chan
