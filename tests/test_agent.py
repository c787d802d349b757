"""The guest agent in host mode (vmm/guest/agent.py ``--socket --root``), driven through
its host-side API (vmm/channel.py) as the sandbox service drives it: the real agent
program, on a throwaway copy of the test root filesystem.  tests/test_vm_sandbox.py
runs the same agent inside a micro-VM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmm import channel as ch
from vmm.channel import AgentChannel

REPO = Path(__file__).resolve().parents[1]


class HostAgent:
    def __init__(self, root: Path, sock: Path, log: Path) -> None:
        self.root, self.sock = root, sock
        self.proc = subprocess.Popen([sys.executable, "-m", "vmm.guest.agent", "--socket", str(sock), "--root",
                                      str(root)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)

    def run(self, body: Callable[[AgentChannel], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            chan = await AgentChannel.connect(str(self.sock), "host agent", timeout=10)
            try:
                await chan.set_defaults()
                return await asyncio.wait_for(body(chan), 60)
            finally:
                await chan.close()
        return asyncio.run(go())

    def in_root(self) -> list[int]:
        """Pids of processes whose root is ours (what the agent started and left)."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/root") == str(self.root):
                    out.append(int(pid))
            except OSError:
                continue
        return out

    def stop(self) -> list[int]:
        """Stop the agent; its file helpers end with it.  What else still runs in the
        root is a leftover: killed, and returned."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while (left := self.in_root()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture(scope="module")
def agent(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    base = tmp_path_factory.mktemp("agent")
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(base / "root")], check=True)
    a = HostAgent(base / "root", base / "agent.sock", base / "agent.log")
    yield a
    leftovers = a.stop()
    shutil.rmtree(base / "root", ignore_errors=True)
    assert not leftovers, leftovers


async def collect(p: ch.GuestProcess) -> tuple[bytes, bytes, tuple[Any, ...]]:
    out, err = b"", b""
    async for ev in p.events():
        if ev[0] in ("stdout", "pty"):
            out += ev[1]
        elif ev[0] == "stderr":
            err += ev[1]
        else:
            return out, err, ev
    raise AssertionError("no end event")


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def test_a_process_runs_as_the_default_user_in_its_home(agent: HostAgent) -> None:
    async def body(c: AgentChannel) -> Any:
        p = await c.spawn(["/bin/sh", "-c", "id -un; pwd; echo $HOME $FOO; echo oops >&2; exit 3"],
                          env={"FOO": "bar"})
        assert p.pid > 0
        return await collect(p)

    out, err, end = agent.run(body)
    assert out.decode().split("\n") == ["user", "/home/user", "/home/user bar", ""]
    assert (err, end) == (b"oops\n", ("end", 3, None))
    assert (agent.root / "home/user").stat().st_uid == 1000  # the agent made the user E2B templates have


def test_a_process_holds_none_of_roots_privileges_and_the_agent_keeps_them(agent: HostAgent) -> None:
    """The agent takes the user's ids itself for the instant of a spawn (procs.spawn_in_root):
    the process must end with every id the user's and no capability, in the root, and the
    agent must be root again after, at its own root (a root process, a working directory
    that is not one and a user without a home all still behave)."""
    def status(pid: int) -> dict[str, list[str]]:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return {k: v.split() for k, _, v in (line.partition(":") for line in lines)}

    async def body(c: AgentChannel) -> Any:
        p = await c.spawn(["sleep", "30"])
        await asyncio.sleep(0.3)  # exec'd
        seen = status(p.pid), os.readlink(f"/proc/{p.pid}/root"), os.readlink(f"/proc/{p.pid}/cwd")
        await c.signal(p.pid, signal.SIGKILL)
        await collect(p)
        r = await c.spawn(["/bin/sh", "-c", "id -u; pwd"], user="root")
        as_root = await collect(r)
        with pytest.raises(ch.FailedPrecondition, match="/etc/passwd"):
            await c.spawn(["true"], cwd="/etc/passwd")
        add = await c.spawn(["/bin/sh", "-c", "echo 'nohome:x:1234:1234::/home/nohome:/bin/sh' >> /etc/passwd"],
                            user="root")
        await collect(add)
        h = await c.spawn(["/bin/sh", "-c", "id -u; pwd"], user="nohome")
        return seen, as_root, await collect(h)

    (st, root, cwd), as_root, nohome = agent.run(body)
    assert st["Uid"] == ["1000"] * 4 and st["Gid"] == ["1000"] * 4 and st["Groups"] == ["1000"], st
    assert int(st["CapPrm"][0], 16) == 0 and int(st["CapEff"][0], 16) == 0, st
    assert (root, cwd) == (str(agent.root), str(agent.root / "home/user"))
    assert as_root == (b"0\n/root\n", b"", ("end", 0, None))
    assert nohome == (b"1234\n/\n", b"", ("end", 0, None))  # no home: the root's top
    me = status(agent.proc.pid)
    assert me["Uid"] == ["0"] * 4 and me["Gid"] == ["0"] * 4 and os.readlink(f"/proc/{agent.proc.pid}/root") == "/"


def test_a_sigint_to_the_agent_does_nothing_and_its_commands_still_take_one(agent: HostAgent) -> None:
    """For the instant of a spawn the agent's real uid is the user's, so the user's processes
    may signal it: a SIGINT (the only signal but SIGCHLD that the guest's PID 1 receives) must
    not end it; and the commands it starts must not inherit that: SIGINT still stops them."""
    os.kill(agent.proc.pid, signal.SIGINT)

    async def body(c: AgentChannel) -> Any:
        p = await c.spawn(["sleep", "30"])
        await asyncio.sleep(0.3)  # exec'd
        await c.signal(p.pid, signal.SIGINT)
        return await collect(p)

    assert agent.run(body)[2] == ("end", -1, signal.SIGINT)
    assert agent.proc.poll() is None


def test_stdin_signals_and_a_missing_program(agent: HostAgent) -> None:
    async def body(c: AgentChannel) -> Any:
        cat = await c.spawn(["cat"], stdin=True, user="root", cwd="/tmp")
        await c.send_input(cat.pid, b"x" * 300_000)
        await c.close_stdin(cat.pid)
        out, _err, end = await collect(cat)
        assert (len(out), end) == (300_000, ("end", 0, None))
        sleeper = await c.spawn(["sleep", "600"], tag="zzz")
        assert [p["tag"] for p in await c.processes()] == ["zzz"]
        with pytest.raises(ch.FailedPrecondition):  # stdin is /dev/null unless asked for
            await c.send_input(sleeper.pid, b"x")
        await c.signal(sleeper.pid, signal.SIGKILL)
        assert (await collect(sleeper))[2] == ("end", -1, signal.SIGKILL)
        with pytest.raises(ch.NotFound):
            await c.signal(sleeper.pid, signal.SIGKILL)
        with pytest.raises(ch.NotFound, match="no program"):
            await c.spawn(["no-such-program"])
        with pytest.raises(ch.NotFound, match="/nowhere"):
            await c.spawn(["true"], cwd="/nowhere")
        with pytest.raises(ch.InvalidArgument, match="nobody2"):
            await c.spawn(["true"], user="nobody2")

    agent.run(body)


def test_a_pty_is_a_terminal_and_resizes(agent: HostAgent) -> None:
    async def body(c: AgentChannel) -> Any:
        p = await c.spawn(["/bin/sh"], pty=(100, 30))
        await c.send_input(p.pid, b"stty size; test -t 0 && echo is-a-$((6 * 7))\n")
        seen = b""
        async for ev in p.events():
            assert ev[0] == "pty"
            seen += ev[1]
            if b"is-a-42\r\n" in seen:
                break
        assert b"30 100" in seen
        await c.resize(p.pid, 120, 40)
        await c.send_input(p.pid, b"stty size; exit 7\n")
        out, _err, end = await collect(p)
        assert b"40 120" in out and end == ("end", 7, None)

    agent.run(body)


def test_a_consumer_that_stops_reading_stops_only_its_process(agent: HostAgent) -> None:
    """Backpressure: while nobody reads, the agent stops reading the pipe (the process
    blocks, the agent's memory stays flat); another process streams meanwhile."""
    agent_rss = lambda: int(open(f"/proc/{agent.proc.pid}/status").read().split("VmRSS:")[1].split()[0])  # noqa: E731

    async def body(c: AgentChannel) -> Any:
        big = await c.spawn(["head", "-c", "300M", "/dev/zero"])
        rss0 = agent_rss()
        await asyncio.sleep(1.5)
        assert big.pid in [p["pid"] for p in await c.processes()]  # blocked, not done
        assert agent_rss() - rss0 < 20_000  # KiB
        other = await c.spawn(["sh", "-c", "seq 1 20000"])
        out, _err, end = await collect(other)
        assert out.split()[-1] == b"20000" and end[1] == 0
        n = 0
        async for ev in big.events():
            if ev[0] == "stdout":
                n += len(ev[1])
            else:
                assert ev == ("end", 0, None)
        assert n == 300 << 20

    agent.run(body)


def test_processes_outlive_a_session_and_take_new_consumers(agent: HostAgent) -> None:
    script = "read x; echo got $x; sleep 0.2; echo bye"

    async def first(c: AgentChannel) -> int:
        p = await c.spawn(["sh", "-c", script], stdin=True, tag="keeper")
        return p.pid

    pid = agent.run(first)  # the channel closes: a new host session later

    async def second(c: AgentChannel) -> Any:
        assert [p["pid"] for p in await c.processes()] == [pid]
        a = await c.attach(tag="keeper")
        b = await c.attach(pid=pid)
        await c.send_input(pid, b"line\n")
        outs = await asyncio.gather(collect(a), collect(b))
        assert outs[0] == outs[1] == (b"got line\nbye\n", b"", ("end", 0, None))
        with pytest.raises(ch.NotFound):
            await c.attach(pid=pid)

    agent.run(second)


def test_files_as_the_user(agent: HostAgent) -> None:
    (agent.root / "marker").write_text("inside the root\n")

    async def body(c: AgentChannel) -> Any:
        entry = await c.write_file("d/e/f.bin", chunks(b"a" * 200_000, b"b" * 5), mode=0o600)
        assert entry | {"mtime": 0} == {"name": "f.bin", "path": "/home/user/d/e/f.bin", "type": "file",
                                        "size": 200_005, "mode": 0o600, "uid": 1000, "gid": 1000, "owner": "user",
                                        "group": "user", "mtime": 0, "symlink_target": None}
        assert b"".join([b async for b in c.read_file("/home/user/d/e/f.bin")]) == b"a" * 200_000 + b"b" * 5
        assert (await c.make_dir("d/e")) [1] is False
        made, created = await c.make_dir("d/g/h")
        assert created and made["type"] == "dir" and made["owner"] == "user"
        await c.move("d/e/f.bin", "d/moved/f2.bin")
        names = [e["path"].removeprefix("/home/user/") for e in await c.list_dir("d", depth=3)]
        assert names == ["d/e", "d/g", "d/g/h", "d/moved", "d/moved/f2.bin"]
        assert [e["name"] for e in await c.list_dir("d")] == ["e", "g", "moved"]
        os.symlink("/marker", agent.root / "home/user/link")  # absolute: inside the root, never the host's
        link = await c.stat("link")
        assert (link["type"], link["symlink_target"]) == ("symlink", "/marker")
        assert b"".join([b async for b in c.read_file("link")]) == b"inside the root\n"
        await c.remove("d")
        await c.remove("d")  # rm -rf: missing is fine
        with pytest.raises(ch.NotFound, match="/home/user/d"):
            await c.stat("d")
        with pytest.raises(ch.NotFound):
            [b async for b in c.read_file("nope")]
        with pytest.raises(ch.FailedPrecondition, match="directory"):
            [b async for b in c.read_file("/etc")]
        with pytest.raises(ch.PermissionDenied):
            await c.write_file("/etc/owned", chunks(b"x"))
        with pytest.raises(ch.PermissionDenied):
            await c.stat("/root/.bashrc")
        root_view = await c.write_file("/etc/by-root", chunks(b"x"), user="root")
        assert (root_view["owner"], root_view["path"]) == ("root", "/etc/by-root")
        assert (agent.root / "etc/by-root").read_bytes() == b"x"
        assert not (agent.root / "etc/owned").exists()

    agent.run(body)


def test_watch_a_directory(agent: HostAgent) -> None:
    async def body(c: AgentChannel) -> Any:
        await c.make_dir("w")
        w = await c.watch("w", recursive=True)
        seen: list[tuple[str, str]] = []

        async def take() -> None:
            async for ev in w.events():
                seen.append((ev["name"], ev["type"]))
                if ev["name"] == "sub/deep" and ev["type"] == "create":
                    return

        reader = asyncio.create_task(take())
        await c.write_file("w/a.txt", chunks(b"1"))
        await c.make_dir("w/sub")
        await asyncio.sleep(0.3)  # the agent adds a watch for the new directory
        await c.write_file("w/sub/deep", chunks(b"2"))
        await asyncio.wait_for(reader, 10)
        await w.close()
        assert ("a.txt", "create") in seen and ("a.txt", "write") in seen and ("sub", "create") in seen
        with pytest.raises(ch.NotFound):
            await c.watch("nowhere")

    agent.run(body)


def test_a_tcp_stream_to_a_port_in_the_root(agent: HostAgent) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    async def body(c: AgentChannel) -> Any:
        task = asyncio.get_running_loop().run_in_executor(None, echo)
        r, w = await c.open_tcp(port)
        await w.write(b"hello " * 100_000)
        w.write_eof()
        got = b""
        while data := await r.read(1 << 16):
            got += data
        await task
        assert got == b"HELLO " * 100_000
        srv.close()
        with pytest.raises(ch.Unavailable, match="refused"):
            await c.open_tcp(port)

    agent.run(body)


def test_a_guest_that_sends_past_its_credit_fails_its_stream_not_the_host() -> None:
    """A modified agent that ignores the window it was granted: the host keeps at most one
    window per stream, then fails that stream with a clear error and drops what follows
    (the stream's reader sees the error; nothing grows without end)."""
    from vmm.guest import proto

    class Owner:
        label = "sandbox test"

        def _send(self, frame: bytes) -> None:
            pass  # credit frames back to the guest: not what this test looks at

    async def go() -> None:
        chan = ch._Chan(Owner(), 7, window=1 << 20)  # type: ignore[arg-type]
        block = b"x" * (256 << 10)
        for _ in range(4):  # one whole window: fine
            chan.push(proto.DATA, block)
        assert (await chan.get())[1] == block and chan.queued == 3 * len(block)
        chan.push(proto.DATA, block)  # back to a full window (one was taken): still fine
        chan.push(proto.DATA, block)  # past it
        assert chan.queued > chan.window and not chan.items
        for _ in range(1000):
            chan.push(proto.DATA, block)  # dropped, not queued
        assert not chan.items
        with pytest.raises(ch.AgentError, match="past its window"):
            await chan.get()

    asyncio.run(go())
