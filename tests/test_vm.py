"""Micro-VMs under QEMU (TCG here) with their root over virtio-fs: the boot path,
with QEMU's own virtiofsd as the reference backend."""

from __future__ import annotations

import json
import os
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


def test_a_vm_boots_from_a_cubefs_image_over_our_virtio_fs_backend(kernel: Path, rootfs: Path, tmp_path: Path,
                                                                   local_store: str) -> None:
    """No host FUSE mount in between: QEMU's vhost-user-fs device talks to the cubefs
    daemon, which serves the image lazily from the store, and python3 runs in the guest."""
    from conftest import run_cubefs

    run_cubefs("build", str(rootfs), "--tag", "debian:12", "--store", local_store)
    sock = tmp_path / "rootfs.sock"
    run_cubefs("mount", "debian:12", str(sock), "--transport", "virtiofs", "--store", local_store, "--cache-dir",
               str(tmp_path / "cache"))
    stats = json.loads(run_cubefs("stats", str(sock), "--json").stdout)
    res = run_once(kernel, str(sock), "python3 -c 'import json; print(42)'")
    assert res.exit_code == 0 and res.stdout == b"42\n", res.console[-2000:]
    deadline = time.monotonic() + 30
    while True:  # the daemon ends with the VM
        try:
            os.kill(stats["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the daemon outlived its VM"
        time.sleep(0.1)
    log = next((tmp_path / "cache" / "logs").glob("mount-*.log")).read_text()
    assert "QEMU connected" in log and "FUSE protocol 7.31" in log
