"""Micro-VMs under QEMU (TCG here) with their root over virtio-fs: the boot path,
served by our own vhost-user-fs backend (QEMU's C virtiofsd, once the reference
backend, left QEMU in 8.0; Debian 12 packages no other)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from vmm.qemu import run_once

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel


@pytest.fixture(scope="session")
def kernel() -> Path:
    return make_kernel(Path(DEFAULT))


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
    res = run_once(kernel, str(sock), "python3 -c 'import json; print(42)'; echo to-stderr >&2; exit 3")
    assert res.stdout == b"42\n" and res.stderr == b"to-stderr\n" and res.exit_code == 3, res.console[-2000:]
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
