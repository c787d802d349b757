"""Micro-VMs under QEMU (TCG here) with their root over virtio-fs: the boot path,
with QEMU's own virtiofsd as the reference backend."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm.qemu import run_once

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@pytest.fixture(scope="session")
def kernel() -> Path:
    return make_kernel(Path(DEFAULT))


@pytest.fixture
def virtiofsd(tmp_path: Path, rootfs: Path) -> Iterator[str]:
    """QEMU's C virtiofsd serving the test root filesystem: the reference backend."""
    sock = tmp_path / "vfs.sock"
    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={rootfs}", "-o", "cache=auto"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "virtiofsd.log", "wb"))
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "virtiofsd.log").read_text()
        time.sleep(0.05)
    yield str(sock)
    proc.terminate()
    proc.wait(timeout=30)


def test_a_vm_runs_python_from_its_virtio_fs_root(kernel: Path, virtiofsd: str) -> None:
    res = run_once(kernel, virtiofsd, "python3 -c 'import json; print(42)'; echo to-stderr >&2; exit 3",
                   read_only=True)
    assert res.stdout == b"42\n" and res.stderr == b"to-stderr\n" and res.exit_code == 3, res.console[-2000:]
