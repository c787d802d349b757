"""A VM saved with its root attached and restored on a clone of its volume (QEMU 10, our
vhost-user-fs back-end handing its state over): memory and disk at one instant, so a guest
process goes on where it was, with the files it holds open, an unlinked one among them.

One boot.  QEMU is driven through QMP directly (the integrator builds snapshot, rollback and
fork on the same steps in vmm/); the back-ends run with ``-vv`` so that their logs show
the vhost-user messages QEMU sends while it saves and loads (printed at the end)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cubefs

from vmm.agent import Agent
from vmm.machine import Machine, MachineSpec, Ram

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")

# Runs in the guest: a file open for writing, a file unlinked and kept open (read and
# written each round), a counter only in RAM.  Each round appends "n held-n-readback".
GUEST_PROGRAM = r"""
import os, sys, time
os.makedirs("/work", exist_ok=True)
log = open("/work/log", "a", buffering=1)
held = open("/work/held", "w+")
os.unlink("/work/held")
n = 0
with open("/work/pid", "w") as f:
    f.write(str(os.getpid()))
while True:
    n += 1
    held.seek(0)
    held.write(f"held-{n:08d}")
    held.flush()
    held.seek(0)
    log.write(f"{n} {held.read()}\n")
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def kernel() -> Path:
    return make_kernel(Path(DEFAULT))


def _serve(volume: str, sock: Path, vols: Path, store: str, cache: Path) -> int:
    """The volume's virtio-fs back-end (with debug logs): its pid."""
    run_cubefs("-vv", "mount", "--volume", volume, str(sock), "--transport", "virtiofs", "--volume-dir", str(vols),
               "--store", store, "--cache-dir", str(cache))
    return int(json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"])


def _wait(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


def _migration_done(m: Machine) -> bool:
    info = m.qmp.execute("query-migrate")
    assert info.get("status") != "failed", f"migration failed: {info.get('error-desc')}; {m.log_tail()}"
    return info.get("status") == "completed"


def _messages(log: str) -> list[str]:
    return re.findall(r"vhost-user: ([A-Z_]+)", log)


def _rounds(text: str) -> list[tuple[int, str]]:
    out = []
    for line in text.splitlines():
        n, held = line.split()
        out.append((int(n), held))
    return out


def test_a_vm_saved_with_its_root_attached_goes_on_after_a_restore(kernel: Path, rootfs: Path, tmp_path: Path,
                                                                    local_store: str) -> None:
    vols, cache_a, cache_b = tmp_path / "vols", tmp_path / "cache-a", tmp_path / "cache-b"  # a log each
    run_cubefs("build", str(rootfs), "--tag", "debian:12", "--store", local_store)
    run_cubefs("volume", "create", "v", "--from", "debian:12", "--store", local_store, "--volume-dir", str(vols))
    spec = MachineSpec(kernel, memory_mb=256, accel="tcg")
    sock_a, sock_b, state = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "vm.state"
    pid_a = _serve("v", sock_a, vols, local_store, cache_a)
    a = Machine(tmp_path / "vm-a", spec, Ram(), fs_socket=str(sock_a))
    b: Machine | None = None
    pid_b = 0
    try:
        a.start()
        with Agent(a.agent_path, "vm-a") as agent:
            agent.connect(180)
            agent.mount(read_only=False)
            agent.run("cat > /run-me.py", stdin=GUEST_PROGRAM.encode())
            res = agent.run("setsid python3 /run-me.py </dev/null >/dev/null 2>&1 & sleep 1.5; cat /work/pid")
            assert res.exit_code == 0, res.stderr
            guest_pid = int(res.stdout)
            before = _rounds(agent.run("cat /work/log").stdout.decode())
            assert before and before[-1][1] == f"held-{before[-1][0]:08d}"

        # The instant: the guest stops (the back-end answers what it had in flight first),
        # the volume is snapshotted, the VM's state (RAM, devices, our back-end's) saved.
        a.qmp.execute("stop")
        snap = json.loads(run_cubefs("snapshot", "v", "--sync", "--json", "--volume-dir", str(vols)).stdout)["snapshot"]
        a.qmp.execute("migrate", uri=f"file:{state}")
        _wait("saving the VM", lambda: _migration_done(a), 120)
        a.stop()
        _wait("back-end A to end with its VM", lambda: not _alive(pid_a), 30)

        # Elsewhere: a clone of that snapshot, a new back-end on it, a new QEMU loading the state.
        made = json.loads(run_cubefs("clone", f"v@{snap}", "--count", "1", "--prefix", "w", "--json",
                                     "--volume-dir", str(vols)).stdout)["volumes"]
        pid_b = _serve(made[0], sock_b, vols, local_store, cache_b)
        b = Machine(tmp_path / "vm-b", spec, Ram(), fs_socket=str(sock_b), incoming=True)
        b.start()
        t0 = time.monotonic()
        b.qmp.execute("migrate-incoming", uri=f"file:{state}")
        _wait("loading the VM", lambda: b.qmp.execute("query-status").get("status") != "inmigrate", 120)
        _migration_done(b)
        b.qmp.execute("cont")
        loaded = time.monotonic() - t0
        with Agent(b.agent_path, "vm-b") as agent:
            agent.connect(60)
            time.sleep(1.0)  # a few more rounds
            assert agent.run(f"kill -0 {guest_pid}").exit_code == 0  # the same process, not a new one
            after = _rounds(agent.run("cat /work/log").stdout.decode())
            extra = agent.run("echo more >> /work/log-2 && cat /work/log-2")
            assert extra.stdout == b"more\n"
        # The log on the clone is exactly the rounds before the save, then the ones after it:
        # the counter went on from RAM, its file offset matched the disk, nothing lost or twice.
        assert [n for n, _ in after] == list(range(1, len(after) + 1))
        assert len(after) > len(before) + 3
        assert all(held == f"held-{n:08d}" for n, held in after)  # the unlinked file read back each round
        stats_b = json.loads(run_cubefs("stats", str(sock_b), "--json").stdout)
        assert stats_b["requests"].get("write", 0) > 0 and "init" not in {k.lower() for k in stats_b["requests"]}
        log_b = _log_of(cache_b)
        assert "device state loaded" in log_b
        print(f"\nsave then load: {len(before)} rounds before, {len(after)} after; load+cont {loaded:.2f} s")
        print("source back-end (stop, migrate):", " ".join(_tail_from_stop(_messages(_log_of(cache_a)))))
        print("destination back-end (start, migrate-incoming, cont):", " ".join(_messages(log_b)))
    finally:
        for m in (a, b):
            if m is not None:
                m.stop()
        for pid in (pid_a, pid_b):
            if pid and _alive(pid):
                os.kill(pid, 15)
                _wait("a back-end to end", lambda p=pid: not _alive(p), 30)  # type: ignore[misc]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _log_of(cache: Path) -> str:
    return "".join(f.read_text() for f in sorted((cache / "logs").glob("mount-*.log")))


def _tail_from_stop(names: list[str]) -> list[str]:
    """The messages from ``stop`` on: the ring disables just before the first GET_VRING_BASE."""
    if "GET_VRING_BASE" not in names:
        return names
    first = names.index("GET_VRING_BASE")
    while first > 0 and names[first - 1] == "SET_VRING_ENABLE":
        first -= 1
    return names[first:]
