"""What only the agent in a guest does: find its port, mount and unmount the root, take a
fresh identity after a restore, power off.  Busybox (the initramfs's) does the mounting."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time

NEWROOT = "/newroot"
# a root on a disk (mount(disk=True)): the image, and the ext4 holding the upper and work directories
LOWER = "/run/cubefs/lower"
DISK = "/run/cubefs/disk"
DISK_DEV = "/dev/vda"
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


def mount(read_only: bool, disk: bool = False) -> None:
    """The root at /newroot: the virtio-fs tag ``rootfs``; with ``disk``, an overlay whose lower
    is that tag (read-only) and whose upper and work directories are on the ext4 on /dev/vda, so
    what the guest writes goes to its block disk and the image stays as it was."""
    if NEWROOT not in mounts():
        if disk:
            _mount_overlay()
        else:
            _mount_virtiofs(NEWROOT, "ro" if read_only else "rw")
    extras()


def _mount_virtiofs(at: str, mode: str) -> None:
    err = ""
    for _ in range(100):  # a hot-added device takes a moment to probe
        res = _run("mount", "-t", "virtiofs", "-o", mode, "rootfs", at)
        if res.returncode == 0:
            break
        err = res.stderr.strip()
        time.sleep(0.1)
    if at not in mounts():
        raise SystemError_(f"cannot mount the root (virtio-fs tag rootfs): {err}")


def _mount_overlay() -> None:
    os.makedirs(LOWER, exist_ok=True)
    os.makedirs(DISK, exist_ok=True)
    done: list[str] = []
    try:
        if LOWER not in mounts():
            _mount_virtiofs(LOWER, "ro")
            done.append(LOWER)
        if DISK not in mounts():
            for _ in range(100):  # a hot-added disk takes a moment to probe too
                if os.path.exists(DISK_DEV):
                    break
                time.sleep(0.1)
            # noinit_itable: the disk was made with lazy_itable_init and reads as zeros where not
            # written (a block volume), so the kernel has no inode tables to zero in the background
            res = _run("mount", "-t", "ext4", "-o", "noinit_itable", DISK_DEV, DISK)
            if res.returncode != 0:
                raise SystemError_(f"cannot mount the disk ({DISK_DEV}, ext4): {res.stderr.strip()}")
            done.append(DISK)
        os.makedirs(f"{DISK}/upper", exist_ok=True)
        os.makedirs(f"{DISK}/work", exist_ok=True)
        res = _run("mount", "-t", "overlay", "-o", f"lowerdir={LOWER},upperdir={DISK}/upper,workdir={DISK}/work",
                   "overlay", NEWROOT)
        if res.returncode != 0:
            raise SystemError_(f"cannot mount the overlay root: {res.stderr.strip()}")
    except BaseException:
        for m in reversed(done):
            _run("umount", m)
        raise


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
    for m in (DISK, LOWER):  # a root on a disk: what was under the overlay
        if m in mounts():
            _run("umount", m)


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
