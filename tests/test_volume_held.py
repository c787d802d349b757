"""What a volume daemon keeps for the kernel's sake (its inode records, the names the kernel
may cache, directory listings) follows what the kernel holds: it is let go with the kernel's
last FORGET, not kept for the life of the mount (VolumeFS.forget)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from conftest import new_volume_mounted, run_cubefs


def _held(mnt: Path) -> dict[str, int]:
    return json.loads(run_cubefs("stats", str(mnt), "--json").stdout)["volume"]["held"]


def test_what_the_daemon_keeps_goes_when_the_kernel_forgets_it(tmp_path: Path) -> None:
    with new_volume_mounted(tmp_path / "volumes", tmp_path / "mnt", tmp_path / "cache") as mnt:
        tree = mnt / "tree"
        tree.mkdir()
        for i in range(300):
            (tree / f"f{i}").write_bytes(b"x")
        for i in range(300):  # names that are not there: the kernel caches them too
            assert not (tree / f"missing{i}").exists()
        assert len(os.listdir(tree)) == 300
        full = _held(mnt)
        assert full["cached_inodes"] >= 300 and full["cached_names"] >= 600, full
        shutil.rmtree(tree)  # the kernel evicts the files and the directory, and FORGETs them
        deadline = time.monotonic() + 20
        while (held := _held(mnt))["cached_inodes"] > 20 or held["cached_names"] > 20:
            assert time.monotonic() < deadline, f"still held after the kernel let go: {held} (was {full})"
            time.sleep(0.2)
        assert held["cached_listings"] <= 1, held
        (mnt / "after").write_bytes(b"y")  # and the mount goes on
        assert (mnt / "after").read_bytes() == b"y" and os.listdir(mnt) == ["after"]
