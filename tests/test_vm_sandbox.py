"""``cubefs vm`` as a user drives it (TCG here): a VM on a cubefs image runs a command
through the guest agent; a template restores instead of booting; a VM on a volume
writes, snapshots and rolls back; a running VM forks into three that diverge."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cubefs

from cubefs.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel


@pytest.fixture(scope="module")
def vm_env(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Where VMs, templates, volumes and the store of these tests live; debian:12 built
    into it and one template, made once for the module."""
    base = tmp_path_factory.mktemp("vms")
    env = {"CUBEFS_VM_DIR": str(base / "vm"), "CUBEFS_TEMPLATE_DIR": str(base / "templates"),
           "CUBEFS_VOLUME_DIR": str(base / "volumes"), "CUBEFS_STORE": f"file://{base / 'store'}",
           "CUBEFS_CACHE_DIR": str(base / "cache"), "CUBEFS_VM_KERNEL": str(make_kernel(Path(DEFAULT)))}
    run_cubefs("build", str(rootfs), "--tag", "debian:12", env=env)
    made = json.loads(run_cubefs("vm", "template", "create", "base", "--accel", "tcg", "--json", env=env).stdout)
    assert made["name"] == "base"
    yield env
    run_cubefs("vm", "rm", "--all", env=env, check=False)


def vm(env: dict[str, str], *args: str, check: bool = True) -> dict:  # type: ignore[type-arg]
    res = run_cubefs("vm", *args, env=env, check=check)
    return json.loads(res.stdout) if "--json" in args else {"out": res.stdout, "err": res.stderr,
                                                              "code": res.returncode}


def test_vm_run_boots_an_image_and_returns_what_the_command_did(vm_env: dict[str, str]) -> None:
    res = vm(vm_env, "run", "debian:12", "--accel", "tcg", "--json", "--",
             "python3", "-c", "import json, sys; print(42); print('to stderr', file=sys.stderr); sys.exit(3)",
             check=False)
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (3, "42\n", "to stderr\n")
    plain = vm(vm_env, "run", "debian:12", "--accel", "tcg", "--", "python3", "-c", "import json; print(42)")
    assert (plain["code"], plain["out"]) == (0, "42\n")
    # The image is read-only in the guest, and nothing outlives a run.
    ro = vm(vm_env, "run", "debian:12", "--accel", "tcg", "--", "sh", "-c", "touch /x", check=False)
    assert ro["code"] != 0 and "Read-only file system" in ro["err"]
    assert vm(vm_env, "ls", "--json") == []
    # --writable: a volume of its own over the image, gone with the VM.
    rw = vm(vm_env, "run", "--template", "base", "--writable", "debian:12", "--", "sh", "-c",
            "echo data > /x && cat /x")
    assert (rw["code"], rw["out"]) == (0, "data\n")
    volumes = json.loads(run_cubefs("volume", "list", "--json", env=vm_env).stdout)
    assert not [v for v in volumes if v["name"].startswith("vm-")], volumes


def test_accel_auto_uses_kvm_only_where_hardware_backs_it() -> None:
    from vmm.machine import pick_accel

    hardware = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
    if not hardware:  # these machines: /dev/kvm is nested PVM, ~3000x too slow for a guest kernel
        assert pick_accel("auto") == "tcg"
    assert pick_accel("kvm") == "kvm" and pick_accel("tcg") == "tcg"
    with pytest.raises(UsageError):
        pick_accel("xen")


def test_a_template_restores_in_a_fraction_of_a_boot(vm_env: dict[str, str]) -> None:
    cold = vm(vm_env, "run", "debian:12", "--accel", "tcg", "--json", "--", "python3", "-c", "print(42)")
    warm = vm(vm_env, "run", "--template", "base", "debian:12", "--json", "--", "python3", "-c", "print(42)")
    assert cold["stdout"] == warm["stdout"] == "42\n"
    assert warm["start_seconds"] < 0.5 * cold["start_seconds"], (warm, cold)
    templates = vm(vm_env, "template", "ls", "--json")
    assert [t["name"] for t in templates] == ["base"]
    assert vm(vm_env, "template", "rm", "nope", check=False)["code"] == 3
    for args in (("exec", "nope", "--", "true"), ("rm", "nope"), ("cp", "nope:/etc/hostname", "-")):
        missing = vm(vm_env, *args, check=False)
        assert missing["code"] == 3 and "no VM nope" in missing["err"], missing


def test_a_volume_in_a_vm_snapshots_and_rolls_back(vm_env: dict[str, str]) -> None:
    run_cubefs("volume", "create", "agent", "--from", "debian:12", env=vm_env)
    vm(vm_env, "start", "box", "--volume", "agent", "--template", "base")
    try:
        assert vm(vm_env, "exec", "box", "--", "sh", "-c", "echo one > /root/step1")["code"] == 0
        vm(vm_env, "snapshot", "box", "--name", "s1")
        vm(vm_env, "exec", "box", "--", "sh", "-c", "echo two > /root/step2; rm /root/step1")
        assert vm(vm_env, "exec", "box", "--", "ls", "/root")["out"].split() == ["step2"]
        vm(vm_env, "rollback", "box", "s1")
        listing = vm(vm_env, "exec", "box", "--", "sh", "-c", "ls /root; cat /root/step1")
        assert listing["out"].split() == ["step1", "one"], listing
        # Files in and out through the agent; a command past its time limit is killed
        # and the VM takes the next one.
        local = Path(vm_env["CUBEFS_VM_DIR"]).parent / "input.bin"
        local.write_bytes(bytes(range(256)) * 100)
        vm(vm_env, "cp", str(local), "box:/root/input.bin")
        assert vm(vm_env, "exec", "box", "--", "sha256sum", "/root/input.bin")["out"].split()[0] == \
            hashlib.sha256(local.read_bytes()).hexdigest()
        vm(vm_env, "cp", "box:/etc/debian_version", str(local))
        assert local.read_text().strip().startswith("12")
        t0 = time.monotonic()
        slow = vm(vm_env, "exec", "box", "--timeout", "3", "--", "sleep", "60", check=False)
        assert slow["code"] == 137 and time.monotonic() - t0 < 30
        assert vm(vm_env, "exec", "box", "--", "echo", "still here")["out"] == "still here\n"
        # What the guest wrote is in the volume, on the host, too.
        snaps = json.loads(run_cubefs("snapshots", "agent", "--json", env=vm_env).stdout)
        assert [s["snapshot"] for s in snaps] == ["s1"]
    finally:
        vm(vm_env, "rm", "box")
    assert not (Path(vm_env["CUBEFS_VM_DIR"]) / "box").exists()


def test_a_running_vm_forks_into_three_that_diverge(vm_env: dict[str, str]) -> None:
    run_cubefs("volume", "create", "forkme", "--from", "debian:12", env=vm_env)
    vm(vm_env, "start", "parent", "--volume", "forkme", "--template", "base")
    names = ["parent"]
    try:
        vm(vm_env, "exec", "parent", "--", "sh", "-c", "echo parent > /root/log; touch /etc/machine-id")
        # A process still running in the root: the fork is refused, and the VM keeps
        # everything it had (its root, /proc in it).
        vm(vm_env, "exec", "parent", "--", "sh", "-c", "cd /root; sleep 600 >/dev/null 2>&1 & echo $! > /root/pid")
        busy = vm(vm_env, "fork", "parent", "--count", "3", check=False)
        assert busy["code"] != 0 and "UMOUNT failed" in busy["err"] and "busy" in busy["err"], busy
        assert vm(vm_env, "exec", "parent", "--", "sh", "-c", "kill $(cat /root/pid); ls /proc/self/status; "
                  "cat /root/log")["out"].split() == ["/proc/self/status", "parent"]
        forks = vm(vm_env, "fork", "parent", "--count", "3", "--json")
        names += [f["name"] for f in forks]
        assert len(forks) == 3
        for name in names:
            vm(vm_env, "exec", name, "--", "sh", "-c", f"echo {name} >> /root/log")
        seen = {}
        for name in names:
            out = vm(vm_env, "exec", name, "--", "sh", "-c",
                     "cat /root/log | tr '\\n' ' '; echo; hostname; cat /etc/machine-id; "
                     "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")["out"].split("\n")
            assert out[0].split() == ["parent", name], out  # its own writes and the parent's before the fork
            assert out[1] == name
            seen[name] = (out[2], out[3])
        assert len({m for m, _r in seen.values()}) == 4 and len({r for _m, r in seen.values()}) == 4
        listed = {v["name"]: v for v in vm(vm_env, "ls", "--json")}
        assert set(names) <= set(listed) and all(listed[n]["running"] for n in names)
    finally:
        vm(vm_env, "rm", *names, check=False)
    for f in os.listdir(vm_env["CUBEFS_TEMPLATE_DIR"]):
        if f.startswith("parent-fork"):
            vm(vm_env, "template", "rm", f)


def test_the_agent_channel_in_a_vm(vm_env: dict[str, str]) -> None:
    """What the sandbox service does through vmm/channel.py, in a guest restored from a
    template: a PTY as the default user in its home, a file in and out, a watch, a TCP
    stream to a server in the guest, a process that outlives the host's session."""
    import asyncio

    from vmm.channel import AgentChannel, Unavailable

    run_cubefs("volume", "create", "chan", "--from", "debian:12", env=vm_env)
    vm(vm_env, "start", "chan", "--volume", "chan", "--template", "base")
    sock = str(Path(vm_env["CUBEFS_VM_DIR"]) / "chan" / "agent.sock")

    async def data(*parts: bytes):  # type: ignore[no-untyped-def]
        for p in parts:
            yield p

    async def output(p) -> bytes:  # type: ignore[no-untyped-def]
        out = b""
        async for ev in p.events():
            if ev[0] == "end":
                assert ev[1] == 0, (ev, out)
                return out
            out += ev[1]
        raise AssertionError("no end")

    async def first() -> int:
        c = await AgentChannel.connect(sock, "chan")
        try:
            await c.set_defaults()
            tty = await c.spawn(["sh", "-c", "id -un; pwd; test -t 0 && stty size"], pty=(90, 20))
            assert (await output(tty)).split() == [b"user", b"/home/user", b"20", b"90"]
            w = await c.watch(".")
            entry = await c.write_file("data/in.bin", data(b"x" * 300_000, b"end"))
            assert (entry["path"], entry["size"], entry["owner"]) == ("/home/user/data/in.bin", 300_003, "user")
            assert b"".join([b async for b in c.read_file("data/in.bin")]) == b"x" * 300_000 + b"end"
            events = w.events()
            assert await asyncio.wait_for(events.__anext__(), 10) == {"name": "data", "type": "create"}
            await w.close()
            server = await c.spawn(["python3", "-m", "http.server", "8123", "--bind", "127.0.0.1"], tag="web")
            for _ in range(100):
                try:
                    r, wr = await c.open_tcp(8123)
                    break
                except Unavailable:
                    await asyncio.sleep(0.2)
            await wr.write(b"GET /data/ HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := await r.read(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.0 200") and b"in.bin" in reply
            return server.pid
        finally:
            await c.close()

    async def second(pid: int) -> None:
        c = await AgentChannel.connect(sock, "chan")
        try:
            assert [(p["pid"], p["tag"]) for p in await c.processes()] == [(pid, "web")]
            web = await c.attach(pid=pid)
            await c.signal(pid, 9)
            assert [ev async for ev in web.events() if ev[0] == "end"] == [("end", -1, 9)]
            await c.umount()  # nothing of ours is left in the root
            await c.mount(read_only=False)
        finally:
            await c.close()

    try:
        asyncio.run(second(asyncio.run(first())))
    finally:
        vm(vm_env, "rm", "chan")


def test_a_template_saved_for_another_machine_is_refused_and_removable(vm_env: dict[str, str]) -> None:
    """A template whose saved state no longer fits (QEMU options, guest kernel or agent changed
    since) must not be restored: a clear error, and 'template rm' still works."""
    base = Path(vm_env["CUBEFS_TEMPLATE_DIR"])
    stale = base / "stale"
    stale.mkdir()
    doc = json.loads((base / "base" / "template.json").read_text())
    (stale / "template.json").write_text(json.dumps(doc | {"name": "stale", "machine": "0" * 16}))
    (stale / "ram").write_bytes(b"")
    (stale / "state").write_bytes(b"")
    res = vm(vm_env, "run", "--template", "stale", "debian:12", "--", "true", check=False)
    assert res["code"] != 0 and "saved for another machine" in res["err"], res
    assert "stale" in [t["name"] for t in vm(vm_env, "template", "ls", "--json")]
    vm(vm_env, "template", "rm", "stale")
    assert not stale.exists()
