"""Running a command in a micro-VM under QEMU, its root over virtio-fs.

The first step of the VM layer: boot the kernel and initramfs of
tools/make_vm_kernel.py with a vhost-user-fs device on ``fs_socket`` (any
vhost-user-fs backend: QEMU's virtiofsd as the reference, ours to come),
run one command, and read its exit code and output from the console, where
the guest's /init writes them base64-encoded between ``CUBEFS-*`` markers
(a serial console mangles line ends; base64 does not care).  Guest RAM is a
shared memfd, which every vhost-user backend needs to reach the rings.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cubefs.errors import CubefsError


class VmError(CubefsError):
    pass


@dataclass
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float
    console: str


def qemu_argv(kernel_dir: Path, fs_socket: str, cmdline: str, memory_mb: int, accel: str) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
    return [
        qemu, "-machine", f"q35,accel={accel}", "-cpu", "max", "-m", f"{memory_mb}M", "-nographic", "-no-reboot",
        "-net", "none", "-kernel", str(kernel_dir / "vmlinuz"), "-initrd", str(kernel_dir / "initrd.gz"),
        "-append", cmdline,
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=rootfs,path={fs_socket}", "-device", "vhost-user-fs-pci,chardev=rootfs,tag=rootfs",
    ]


def run_once(kernel_dir: Path, fs_socket: str, command: str, *, memory_mb: int = 512, accel: str = "tcg",
             read_only: bool = False, timeout: float = 180.0) -> RunResult:
    """Boot, run ``command`` (a shell command line) in the guest's root, power off."""
    run = base64.b64encode(command.encode()).decode()
    cmdline = f"console=ttyS0 quiet loglevel=0 panic=-1 cubefs.run={run}" + (" cubefs.ro=1" if read_only else "")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(qemu_argv(kernel_dir, fs_socket, cmdline, memory_mb, accel), capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VmError(f"the VM did not finish in {timeout:.0f} s") from None
    console = proc.stdout.decode(errors="replace")
    fields = {}
    for line in console.replace("\r", "").splitlines():
        key, _, value = line.partition(" ")
        if key.startswith("CUBEFS-"):
            fields[key] = value.strip()
    if "CUBEFS-EXIT" not in fields:
        tail = " | ".join(console.replace("\r", "").splitlines()[-5:])
        why = fields.get("CUBEFS-ERROR") or proc.stderr.decode(errors="replace").strip()[-300:] or tail
        raise VmError(f"the VM ended without running the command: {why}")
    return RunResult(int(fields["CUBEFS-EXIT"]), base64.b64decode(fields.get("CUBEFS-STDOUT", "")),
                     base64.b64decode(fields.get("CUBEFS-STDERR", "")), time.monotonic() - t0, console)
