"""One root host per image serves every VM root over it (``cubefs mount --shared``).

The front-ends are the fake QEMU of test_vhost_user.py (guest RAM in a memfd, the
rings laid out by hand), against the real mount server and host processes; then
two real QEMU VMs restored from one template on two volumes of one host."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cubefs
from test_vhost_user import FakeGuest

from cubefs.fuse import protocol as p
from cubefs.node import control
from vmm.machine import wait_gone


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A mount server of this test's own (started by the first mount), whose root hosts
    exit 1 s after their last mount; stopped, with any host left, at the end."""
    sock = tmp_path / "serve.sock"
    monkeypatch.setenv("CUBEFS_SERVER", str(sock))
    monkeypatch.setenv("CUBEFS_ROOT_HOST_IDLE", "1")
    yield sock
    lock = Path(f"{sock}.lock")
    if lock.exists() and lock.read_text().strip():
        _kill(int(lock.read_text()))
    for log in (tmp_path / "cache" / "logs").glob("roots-*.log"):
        for line in log.read_text().splitlines():
            if "serving" in line and "pid " in line:
                _kill(int(line.split("pid ")[1].split(")")[0]))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _gone(pid: int, timeout: float = 30) -> None:
    assert wait_gone(pid, timeout), f"process {pid} did not end"


def _wait(what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def volumes(tmp_path: Path, local_store: str) -> dict[str, str]:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("from the image\n")
    run_cubefs("build", str(src), "--tag", "tiny:1", "--store", local_store)
    for v in ("a", "b", "c"):
        run_cubefs("volume", "create", v, "--from", "tiny:1", "--store", local_store, "--volume-dir",
                   str(tmp_path / "vols"))
    return {"--volume-dir": str(tmp_path / "vols"), "--store": local_store, "--cache-dir": str(tmp_path / "cache")}


def _mount(opts: dict[str, str], volume: str, sock: Path, *extra: str, check: bool = True) -> dict:  # type: ignore[type-arg]
    flags = [a for kv in opts.items() for a in kv]
    res = run_cubefs("mount", "--volume", volume, str(sock), "--transport", "virtiofs", *flags, *extra, check=check)
    if not check:
        return {"code": res.returncode, "err": res.stderr}
    return json.loads(run_cubefs("stats", str(sock), "--json").stdout)  # type: ignore[no-any-return]


def _guest(sock: Path) -> FakeGuest:
    g = FakeGuest(str(sock))
    g.setup()
    g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
    return g


def _write(g: FakeGuest, name: bytes, data: bytes) -> int:
    create = p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + name + b"\0"
    made = int(p.ENTRY_OUT.unpack_from(g.ok(p.CREATE, 1, create))[0])
    assert p.WRITE_OUT.unpack_from(g.ok(p.WRITE, made, p.WRITE_IN.pack(0, 0, len(data), 0, 0, 0, 0) + data))[0] \
        == len(data)
    return made


def _missing(g: FakeGuest, name: bytes) -> bool:
    """No such name in the root: ENOENT, or the negative entry (node ID 0) the kernel caches."""
    _written, out = g.fuse(p.LOOKUP, 1, name + b"\0")
    error = struct.unpack_from("<i", out, 4)[0]
    return bool(error == -errno.ENOENT or (error == 0 and p.ENTRY_OUT.unpack_from(out, p.OUT_HEADER.size)[0] == 0))


def _motd(g: FakeGuest) -> bytes:
    return g.read(g.lookup(g.lookup(1, b"etc"), b"motd"))


def test_one_host_serves_two_volumes_and_each_mount_ends_alone(tmp_path: Path, server: Path,
                                                               volumes: dict[str, str]) -> None:
    a, b = _mount(volumes, "a", tmp_path / "a.sock", "--shared"), _mount(volumes, "b", tmp_path / "b.sock", "--shared")
    host = a["pid"]
    assert b["pid"] == host and a["shared"]["mount"] != b["shared"]["mount"] and b["shared"]["mounts"] == 2
    regs = [control.read_registry(str(tmp_path / s)) for s in ("a.sock", "b.sock")]
    assert [r["pid"] for r in regs] == [host, host] and regs[0]["shared"]["mount"] != regs[1]["shared"]["mount"]
    # The volume lock still keeps a second writer off a volume the host serves, shared or not.
    for extra in (("--shared",), ()):
        again = _mount(volumes, "a", tmp_path / "a2.sock", *extra, check=False)
        assert again["code"] != 0 and "already mounted" in again["err"], again
    ga, gb = _guest(tmp_path / "a.sock"), _guest(tmp_path / "b.sock")
    try:
        _write(ga, b"mine", b"written in a\n")
        made_b = _write(gb, b"mine", b"written in b\n")
        _write(gb, b"only-b", b"b's alone\n")
        assert ga.read(ga.lookup(1, b"mine")) == b"written in a\n"
        assert gb.read(made_b) == b"written in b\n"
        assert _missing(ga, b"only-b") and _motd(ga) == _motd(gb) == b"from the image\n"
        # One front-end goes: its mount ends (entry gone, volume synced and unlocked), the other serves on.
        ga.conn.close()
        _wait("a's registry entry gone", lambda: not os.path.exists(control.registry_path(str(tmp_path / "a.sock"))))
        assert not os.path.exists(control.socket_path(str(tmp_path / "a.sock")))
        os.kill(host, 0)
        assert gb.read(made_b) == b"written in b\n" and _motd(gb) == b"from the image\n"
        again = _mount(volumes, "a", tmp_path / "a2.sock")  # a daemon of its own takes volume a now
        assert again["pid"] != host and "shared" not in again
        g2 = _guest(tmp_path / "a2.sock")
        try:
            assert g2.read(g2.lookup(1, b"mine")) == b"written in a\n" and _missing(g2, b"only-b")
        finally:
            g2.conn.close()
        _gone(again["pid"])
        assert json.loads(run_cubefs("stats", str(tmp_path / "b.sock"), "--json").stdout)["shared"]["mounts"] == 1
    finally:
        ga.conn.close()
        gb.conn.close()
    # The last one left: the host exits (after CUBEFS_ROOT_HOST_IDLE, 1 s here).
    _wait("b's registry entry gone", lambda: not os.path.exists(control.registry_path(str(tmp_path / "b.sock"))))
    _gone(host, 60)
    log = "".join(f.read_text() for f in (tmp_path / "cache" / "logs").glob("roots-*.log"))
    assert "Traceback" not in log and "no mount for a while: exiting" in log


def test_a_killed_host_is_replaced_for_the_next_mount(tmp_path: Path, server: Path, volumes: dict[str, str]) -> None:
    first = _mount(volumes, "a", tmp_path / "a.sock", "--shared")
    _mount(volumes, "b", tmp_path / "b.sock", "--shared")
    ga = _guest(tmp_path / "a.sock")
    _write(ga, b"kept", b"synced before the kill\n")
    ga.conn.close()
    _wait("a's mount ended", lambda: not os.path.exists(control.registry_path(str(tmp_path / "a.sock"))))
    os.kill(first["pid"], signal.SIGKILL)
    _gone(first["pid"])
    # Its mount's entry does not make 'stats' or 'umount' hang, and the server removes it.
    stats = run_cubefs("stats", str(tmp_path / "b.sock"), check=False, timeout=30)
    assert stats.returncode != 0
    run_cubefs("umount", str(tmp_path / "b.sock"), check=False, timeout=30)
    _wait("the dead host's entries gone", lambda: not os.path.exists(control.registry_path(str(tmp_path / "b.sock"))))
    # The next mount gets a new host, which works; the volumes the dead host held are free.
    new = _mount(volumes, "b", tmp_path / "b2.sock", "--shared")
    again = _mount(volumes, "a", tmp_path / "a2.sock", "--shared")
    assert new["pid"] == again["pid"] != first["pid"]
    g, gb = _guest(tmp_path / "a2.sock"), _guest(tmp_path / "b2.sock")
    try:
        assert g.read(g.lookup(1, b"kept")) == b"synced before the kill\n"
        assert _motd(gb) == b"from the image\n"
    finally:
        g.conn.close()
        gb.conn.close()
    _gone(new["pid"], 60)


def test_shared_needs_a_volume_over_virtiofs(tmp_path: Path, volumes: dict[str, str]) -> None:
    for extra in (("--transport", "vhost-user-blk"), ("--foreground",), ("--no-server",)):
        res = run_cubefs("mount", "--volume", "a", str(tmp_path / "x.sock"), "--shared", *extra,
                         *[a for kv in volumes.items() for a in kv], check=False)
        assert res.returncode == 2 and "--shared mounts a volume" in res.stderr, res.stderr


def test_two_vms_from_one_template_run_on_one_root_host(tmp_path: Path, rootfs: Path, server: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real QEMU: two VMs restored from one template, each on its own volume, both roots
    served by one host; destroying one VM ends its mount only, the other runs on."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_vm_kernel import DEFAULT, make_kernel

    from vmm.machine import MachineSpec
    from vmm.vm import Root, Vm

    env = {"CUBEFS_VM_DIR": str(tmp_path / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp_path / "templates"),
           "CUBEFS_VOLUME_DIR": str(tmp_path / "vols"), "CUBEFS_STORE": f"file://{tmp_path / 'store'}",
           "CUBEFS_CACHE_DIR": str(tmp_path / "cache"), "CUBEFS_VM_KERNEL": str(make_kernel(Path(DEFAULT)))}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run_cubefs("build", str(rootfs), "--tag", "debian:12")
    run_cubefs("vm", "template", "create", "base", "--accel", "tcg")
    spec = MachineSpec(Path(env["CUBEFS_VM_KERNEL"]), 512, 1, "tcg")
    vms: list[Vm] = []
    try:
        for name in ("one", "two"):
            run_cubefs("volume", "create", name, "--from", "debian:12")
            root = Root(volume=name, store=env["CUBEFS_STORE"], cache_dir=env["CUBEFS_CACHE_DIR"],
                        volume_dir=env["CUBEFS_VOLUME_DIR"], shared=True)
            vms.append(Vm.start(name, root, spec, template="base"))
        one, two = vms
        entries = [control.read_registry(str(v.fs_socket)) for v in vms]
        host = entries[0]["pid"]
        assert entries[1]["pid"] == host and entries[0]["shared"]["mount"] != entries[1]["shared"]["mount"]
        for v in vms:
            done = v.exec(["python3", "-c", f"open('/root/who', 'w').write('{v.name}'); print(6 * 7)"])
            assert (done.exit_code, done.stdout) == (0, b"42\n"), done
        assert one.exec(["cat", "/root/who"]).stdout == b"one" and two.exec(["cat", "/root/who"]).stdout == b"two"
        one.destroy()
        assert not os.path.exists(control.registry_path(str(one.fs_socket)))
        os.kill(host, 0)  # the host serves on
        done = two.exec(["python3", "-c", "import json; print(open('/root/who').read())"])
        assert (done.exit_code, done.stdout) == (0, b"two\n"), done
        log = "".join(f.read_text() for f in (tmp_path / "cache" / "logs").glob("roots-*.log"))
        assert "dropped on request" not in log  # its mount ended with its QEMU, as a daemon would
    finally:
        for v in vms:
            v.destroy()
    _gone(host, 60)  # no mount left: the host exits
