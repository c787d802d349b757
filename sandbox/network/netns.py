"""Network namespaces, veth pairs and taps: made with ``ip``, entered per thread (setns).

A sandbox's namespace ``NAME`` holds ``veth0`` (its end of the pair into the node's
namespace, where the other end is ``cfhN``) and ``tap0``, the guest's NIC.  QEMU is not
started in the namespace: the tap is opened by a thread that has entered it and the file
descriptor is handed to QEMU (``-netdev tap,fd=N``), so QEMU, its sockets and its files stay
where every other VM's are.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cubefs.errors import CubefsError

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")  # where ``ip netns`` keeps named namespaces
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(CubefsError):
    pass


def ip(*args: str, batch: str | None = None, netns: str | None = None) -> None:
    """``ip [-n NETNS] ARGS`` (or ``-batch -`` of ``batch``); NetnsError with ip's own message."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-batch", "-"] if batch is not None else args)]
    res = subprocess.run(argv, input=batch, capture_output=True, text=True)
    if res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread that has entered namespace ``name`` (the caller's own thread
    never changes namespace: setns is per thread, and this thread ends with ``fn``)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise NetnsError(f"entering network namespace {name}: {os.strerror(e)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    t = threading.Thread(target=target, name=f"netns {name}")
    t.start()
    t.join()
    if "error" in box:
        err = box["error"]
        if isinstance(err, FileNotFoundError):
            raise NetnsError(f"network namespace {name} does not exist") from None
        raise err  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def open_tap(name: str) -> int:
    """Attach to the tap ``name`` of the calling thread's namespace: a file descriptor for
    QEMU.  Multi-queue, so a rollback's new QEMU attaches while the old one is still going."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                                               | IFF_MULTI_QUEUE))
    except OSError as err:
        os.close(fd)
        raise NetnsError(f"opening tap {name}: {os.strerror(err.errno or errno.EIO)}") from None
    return fd


def write_sysctl(key: str, value: str) -> None:
    """A net sysctl of the calling thread's namespace (``/proc/sys/net`` shows the opener's)."""
    Path("/proc/sys", *key.split(".")).write_text(value + "\n")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def names(prefix: str) -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else []


def remove(name: str) -> None:
    """Remove namespace ``name``: its veth pair and tap go with it.  Nothing if it is gone."""
    if exists(name):
        try:
            ip("netns", "del", name)
        except NetnsError:
            if exists(name):
                raise
