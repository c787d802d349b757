"""What only the agent in a guest does: find its port, mount and unmount the root, take a
fresh identity after a restore, power off.  Busybox (the initramfs's) does the mounting."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time

NEWROOT = "/newroot"
EXTRAS = (("proc", "proc", "proc"), ("sysfs", "sys", "sys"), ("devtmpfs", "dev", "dev"))


class SystemError_(Exception):
    pass


def find_port(name: str = "cubefs.agent", wait: float = 10.0) -> str:
    deadline = time.monotonic() + wait
    while True:
        for p in glob.glob("/sys/class/virtio-ports/*/name"):
            try:
                with open(p) as f:
                    if f.read().strip() == name:
                        dev = "/dev/" + p.split("/")[-2]
                        if os.path.exists(dev):
                            return dev
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemError_(f"no virtio-serial port named {name}")
        time.sleep(0.05)


def mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def mount(read_only: bool) -> None:
    if NEWROOT not in mounts():
        err = ""
        for _ in range(100):  # a hot-added device takes a moment to probe
            res = _run("mount", "-t", "virtiofs", "-o", "ro" if read_only else "rw", "rootfs", NEWROOT)
            if res.returncode == 0:
                break
            err = res.stderr.strip()
            time.sleep(0.1)
        if NEWROOT not in mounts():
            raise SystemError_(f"cannot mount the root (virtio-fs tag rootfs): {err}")
    extras()


def extras() -> None:
    """What the root gets on top: proc, sys, dev, its machine-id."""
    have = mounts()
    for kind, src, at in EXTRAS:
        if f"{NEWROOT}/{at}" not in have and os.path.isdir(f"{NEWROOT}/{at}"):
            _run("mount", "-t", kind, src, f"{NEWROOT}/{at}")
    pts = f"{NEWROOT}/dev/pts"
    if f"{NEWROOT}/dev" in mounts() and pts not in have and os.path.isdir("/dev/pts"):
        _run("mount", "--bind", "/dev/pts", pts)  # the PTYs the agent opens, by name in the root too
    mid = f"{NEWROOT}/etc/machine-id"
    if os.path.exists("/run/cubefs/machine-id") and os.path.exists(mid) and mid not in have:
        _run("mount", "--bind", "/run/cubefs/machine-id", mid)


def umount() -> None:
    """All or nothing: a root still in use keeps everything it had."""
    if NEWROOT not in mounts():
        return
    os.sync()
    for m in (f"{NEWROOT}/etc/machine-id", f"{NEWROOT}/dev/pts", f"{NEWROOT}/dev", f"{NEWROOT}/sys", f"{NEWROOT}/proc"):
        if m in mounts():
            _run("umount", m)
    res = _run("umount", NEWROOT)
    if res.returncode != 0:
        extras()
        raise SystemError_(f"umount {NEWROOT}: {res.stderr.strip() or 'busy'}")


def freshen(seed: bytes, hostname: str, machine_id: str, now: float | None = None) -> None:
    """A restored guest wakes with its template's RNG state and wall clock (minutes or days
    behind): new randomness, names, and the host's time."""
    if now is not None:
        time.clock_settime(time.CLOCK_REALTIME, now)
    with open("/dev/urandom", "wb") as f:
        f.write(seed)
    socket.sethostname(hostname)
    os.makedirs("/run/cubefs", exist_ok=True)
    with open("/run/cubefs/machine-id", "w") as f:
        f.write(machine_id + "\n")
    if NEWROOT in mounts():
        extras()


def poweroff() -> None:
    try:
        umount()
    except SystemError_:
        pass
    os.sync()
    _run("poweroff", "-f")
