"""``cubefs vm`` as a user drives it (TCG here): a VM on a cubefs image runs a command
through the guest agent; a template restores instead of booting; a VM on a volume
writes, snapshots and rolls back; a VM whose root is in use (a process holds files open
in it) is snapshotted, rolled back and forked with that process running on."""

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


def test_vm_rm_all_with_no_vm_is_no_error_and_names_with_all_are(tmp_path: Path) -> None:
    env = {"CUBEFS_VM_DIR": str(tmp_path / "vms")}
    assert run_cubefs("vm", "rm", "--all", env=env).returncode == 0
    for argv in (("vm", "rm"), ("vm", "rm", "--all", "x")):
        res = run_cubefs(*argv, env=env, check=False)
        assert res.returncode == 2 and "cubefs vm rm" in res.stderr, res


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


# A process that holds a file open in the root (and an unlinked one) and counts in RAM: each
# round it checks that the unlinked file holds the count it last wrote, appends "N MARK" to
# held.txt (MARK: what /root/mark says now) and says "PID N ok|BAD" in /root/count.
COUNTER = """\
import os, time
held = open("/root/held.txt", "a")
gone = open("/root/gone.txt", "w+")
os.unlink("/root/gone.txt")
n = 0
while True:
    gone.seek(0)
    last = gone.read()
    status = "ok" if last == (str(n) if n else "") else "BAD:" + last
    n += 1
    with open("/root/mark") as f:
        mark = f.read().strip()
    held.write(f"{n} {mark}\\n")
    held.flush()
    gone.seek(0)
    gone.truncate()
    gone.write(str(n))
    gone.flush()
    with open("/root/count.tmp", "w") as f:
        f.write(f"{os.getpid()} {n} {status}\\n")
    os.rename("/root/count.tmp", "/root/count")
    time.sleep(0.1)
"""


def count(env: dict[str, str], name: str) -> tuple[int, int, str]:
    pid, n, status = vm(env, "exec", name, "--", "cat", "/root/count")["out"].split()
    return int(pid), int(n), status


def counting_on(env: dict[str, str], name: str, above: int, timeout: float = 60) -> tuple[int, int, str]:
    """The counter's (pid, count, status) once its count is past ``above``."""
    deadline = time.monotonic() + timeout
    while True:
        res = vm(env, "exec", name, "--", "cat", "/root/count", check=False)  # none yet: Python starts
        if res["code"] == 0:
            pid, n, status = res["out"].split()
            if int(n) > above:
                return int(pid), int(n), status
        assert time.monotonic() < deadline, f"VM {name}: the counter stands at {res}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def counting_vm(vm_env: dict[str, str]) -> Iterator[str]:
    """A VM on a volume whose root is in use: the counter runs in it, its working directory
    and files in /root.  Before it starts, a disk-only snapshot and rollback of the free root
    (unmount, roll back, mount) puts /etc/machine-id on it (bound at mount)."""
    run_cubefs("volume", "create", "counted", "--from", "debian:12", env=vm_env)
    vm(vm_env, "start", "counter", "--volume", "counted", "--template", "base")
    try:
        vm(vm_env, "exec", "counter", "--", "sh", "-c", "touch /etc/machine-id; echo before > /root/mark")
        vm(vm_env, "snapshot", "counter", "--name", "d0", "--disk-only")
        vm(vm_env, "rollback", "counter", "d0")
        assert vm(vm_env, "exec", "counter", "--", "cat", "/etc/machine-id")["out"].strip() == \
            json.loads((Path(vm_env["CUBEFS_VM_DIR"]) / "counter" / "vm.json").read_text())["machine_id"]
        script = Path(vm_env["CUBEFS_VM_DIR"]).parent / "counter.py"
        script.write_text(COUNTER)
        vm(vm_env, "cp", str(script), "counter:/root/counter.py")
        vm(vm_env, "exec", "counter", "--", "sh", "-c",
           "cd /root && setsid python3 counter.py </dev/null >/dev/null 2>&1 &")
        counting_on(vm_env, "counter", 2)
        yield "counter"
    finally:
        vm(vm_env, "rm", "counter", check=False)


def test_a_rollback_brings_back_the_processes_and_their_open_files(vm_env: dict[str, str],
                                                                    counting_vm: str) -> None:
    name, vms = counting_vm, Path(vm_env["CUBEFS_VM_DIR"])
    who = vm(vm_env, "exec", name, "--", "sh", "-c", "hostname; cat /etc/machine-id")["out"]
    pid = count(vm_env, name)[0]
    snap = vm(vm_env, "snapshot", name, "--name", "s1", "--json")
    assert (snap["snapshot"], snap["volume"], snap["memory"]) == ("s1", "counted", True), snap
    assert 0 < snap["paused_seconds"] < snap["seconds"] and 0 < snap["ram_bytes"] < 512 << 20, snap
    assert (vms / name / "checkpoints" / "s1").stat().st_mode & 0o777 == 0o700
    # A disk-only snapshot cannot be rolled back while the root is in use: a clear error,
    # and the VM runs on untouched (the same process, still counting).
    vm(vm_env, "snapshot", name, "--name", "d1", "--disk-only")
    n1 = count(vm_env, name)[1]
    busy = vm(vm_env, "rollback", name, "d1", check=False)
    assert busy["code"] != 0 and busy["err"].count("\n") == 1, busy
    assert "use a memory snapshot (cubefs vm snapshot without --disk-only) to roll back a VM whose root is in use" \
        in busy["err"], busy
    assert counting_on(vm_env, name, n1)[::2] == (pid, "ok")
    assert vm(vm_env, "rollback", name, "nope", check=False)["code"] == 3
    # After the snapshot: the mark changes (the counter writes it into held.txt), a file
    # comes, one goes, and the process is killed.
    vm(vm_env, "exec", name, "--", "sh", "-c", "echo after > /root/mark; echo x > /root/new; rm /root/counter.py; "
       "until grep -q after /root/held.txt; do sleep 0.1; done; kill -9 $(cut -d' ' -f1 /root/count)")
    assert vm(vm_env, "exec", name, "--", "sh", "-c", f"test -d /proc/{pid}", check=False)["code"] == 1
    back = vm(vm_env, "rollback", name, "s1", "--json")
    assert (back["vm"], back["snapshot"], back["memory"]) == (name, "s1", True), back
    # The process is back, counting on from the snapshot: every line of the file it holds
    # open follows the one before, all written with the snapshot's mark; the unlinked file
    # holds what its memory says; the files are as they were.
    pid2, n2, status = counting_on(vm_env, name, 0)
    assert (pid2, status) == (pid, "ok")
    counting_on(vm_env, name, n2)
    # (not 'ls': a volume's directory read while the counter renames in it can list an entry
    # twice, its offsets being positions in a listing that changed between two READDIRs)
    out = vm(vm_env, "exec", name, "--", "sh", "-c", "cat /root/mark; test -e /root/new || echo no-new; "
             "test -e /root/counter.py && echo script; echo --; cat /root/held.txt")["out"]
    files, held = out.split("--\n")
    assert files.split() == ["before", "no-new", "script"], files
    lines = held.splitlines()
    assert lines == [f"{i} before" for i in range(1, len(lines) + 1)], lines
    # Same VM: its name, hostname and machine-id; its checkpoints stay until 'vm rm'.
    assert vm(vm_env, "exec", name, "--", "sh", "-c", "hostname; cat /etc/machine-id")["out"] == who
    assert sorted(os.listdir(vms / name / "checkpoints")) == ["s1"]
    assert [v["name"] for v in vm(vm_env, "ls", "--json") if v["running"]] == [name]


def test_a_vm_whose_root_is_in_use_forks_with_its_processes(vm_env: dict[str, str], counting_vm: str) -> None:
    name = counting_vm
    pid, n, _ = count(vm_env, name)
    forks = vm(vm_env, "fork", name, "--count", "2", "--json")
    names = [f["name"] for f in forks]
    try:
        assert names == [f"{name}-fork-0", f"{name}-fork-1"], forks
        ids, seeds = set(), set()
        for each in [name, *names]:  # the counter runs on in every one of them, from the fork on
            assert counting_on(vm_env, each, n)[::2] == (pid, "ok")
            vm(vm_env, "exec", each, "--", "sh", "-c", f"echo {each} > /root/own")
            out = vm(vm_env, "exec", each, "--", "sh", "-c", "hostname; cat /etc/machine-id; "
                     "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")["out"].split()
            assert out[0] == each, out
            ids.add(out[1])
            seeds.add(out[2])
        assert len(ids) == len(seeds) == 3
        for each in [name, *names]:  # each wrote its own root
            assert vm(vm_env, "exec", each, "--", "cat", "/root/own")["out"] == f"{each}\n"
        # The fork's checkpoint and its snapshot of the parent's volume are gone; the
        # children's volumes are theirs, removed with them.
        assert not [f for f in os.listdir(Path(vm_env["CUBEFS_VM_DIR"]) / name / "checkpoints")
                    if f.startswith(".")]
        snaps = json.loads(run_cubefs("snapshots", "counted", "--json", env=vm_env).stdout)
        assert not [s for s in snaps if s["snapshot"].startswith("fork-")], snaps
    finally:
        vm(vm_env, "rm", *names, check=False)
    volumes = {v["name"] for v in json.loads(run_cubefs("volume", "list", "--json", env=vm_env).stdout)}
    assert "counted" in volumes and not volumes & set(names), volumes
    assert vm(vm_env, "fork", name, "--count", "0", check=False)["code"] == 2


def test_a_fork_whose_child_fails_leaves_nothing(vm_env: dict[str, str], counting_vm: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The second child's restore fails (injected): the first, already running, is removed
    with its volume, and so are the second's volume, the checkpoint and the snapshot."""
    from vmm import checkpoint, vmsnap
    from vmm.vm import Vm

    for k, v in vm_env.items():
        monkeypatch.setenv(k, v)
    real, made = checkpoint.restore, []

    def restore(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if made:
            raise RuntimeError("injected: the second child does not start")
        made.append(real(name, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(checkpoint, "restore", restore)
    with pytest.raises(RuntimeError, match="injected"):
        vmsnap.fork(Vm(counting_vm), 2, "doomed")
    assert made and not made[0].alive and not made[0].dir.exists()
    assert not [d for d in os.listdir(vm_env["CUBEFS_VM_DIR"]) if d.startswith("doomed")]
    volumes = {v["name"] for v in json.loads(run_cubefs("volume", "list", "--json", env=vm_env).stdout)}
    assert not [v for v in volumes if v.startswith("doomed")], volumes
    snaps = json.loads(run_cubefs("snapshots", "counted", "--json", env=vm_env).stdout)
    assert not [s for s in snaps if s["snapshot"].startswith("fork-")], snaps
    assert not [f for f in os.listdir(Path(vm_env["CUBEFS_VM_DIR"]) / counting_vm / "checkpoints")
                if f.startswith(".")]
    assert count(vm_env, counting_vm)[2] == "ok"


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
