"""Page-cache stores after a LOOKUP (cubefs/fuse/server.py, ``FuseServer._queue_store``; opt-in,
``CUBEFS_FUSE_STORE=1``, as is a session's longer first poll, ``CUBEFS_FUSE_START_SPIN_US``): a
remount with a hot file pushes a looked-up file's start into the kernel's page cache, so its
first READs send no request; a stored page is what the file holds; a file the hot file does
not hold, and a remount without a hot file, get no store; an idle mount does not spin."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest
from conftest import mounted, run_cubefs
from test_fuse_poll import _cpu_seconds
from test_hotfile import _hot_files, _wait_for_hot

from cubefs.cache.hot import hot_dir
from cubefs.fuse.server import STORE_MAX


def _tree(root: Path) -> dict[str, bytes]:
    """Files of odd sizes (a page's tail, one page, one past STORE_MAX) in a few directories."""
    sizes = [1, 4095, 4096, 4097, 12_345, 70_001, 300_000, STORE_MAX + 5000]
    files = {f"d{i % 2}/f{i}": os.urandom(n) for i, n in enumerate(sizes)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _stores(m: mounted) -> int:
    return int(m.stats()["fuse_path"]["page_stores"])


def _wait_stores(m: mounted, n: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := _stores(m)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _reads(m: mounted) -> int:
    return int(m.stats()["requests"].get("read", 0))


def test_a_remount_stores_a_looked_up_files_start_and_every_byte_is_right(tmp_path: Path, local_store: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBEFS_FUSE_STORE", "1")
    src = tmp_path / "src"
    files = _tree(src)
    (src / "cold").write_bytes(os.urandom(50_000))  # never read at the first start: not in the hot file
    run_cubefs("build", str(src), "--tag", "st:1", "--store", local_store)
    cache = tmp_path / "cache"
    with mounted("st:1", tmp_path / "mnt", local_store, cache) as m:  # records; keeps the hot file
        for rel, data in files.items():
            assert (m.mountpoint / rel).read_bytes() == data
        _wait_for_hot(cache)

    with mounted("st:1", tmp_path / "mnt", local_store, cache) as m:
        time.sleep(0.5)  # the hot file is opened (and advised) as the mount goes live
        assert m.stats()["tiers"].get("hot", {}).get("chunks", 0) > 0
        # A file the hot file does not hold: looked up, nothing stored; read, every byte right.
        os.stat(m.mountpoint / "cold")
        time.sleep(0.3)
        assert _stores(m) == 0
        assert (m.mountpoint / "cold").read_bytes() == (src / "cold").read_bytes()
        for rel in files:
            os.stat(m.mountpoint / rel)  # the LOOKUPs (and their stores)
        assert _wait_stores(m, len(files)) == len(files), m.stats()["fuse_path"]
        reads = _reads(m)
        small = {rel: data for rel, data in files.items() if len(data) <= STORE_MAX}
        for rel, data in small.items():  # from the stored pages: no READ
            with open(m.mountpoint / rel, "rb") as f:
                assert f.read() == data, rel
        assert _reads(m) == reads, "a stored file's read still went to the daemon"
        big = next(rel for rel, data in files.items() if len(data) > STORE_MAX)
        with open(m.mountpoint / big, "rb") as f:  # its first STORE_MAX stored, the rest read
            assert f.read() == files[big]
        assert _reads(m) > reads
        with open(m.mountpoint / "d1/f5", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == files["d1/f5"]

    # Not asked for: no store (the default).
    monkeypatch.delenv("CUBEFS_FUSE_STORE")
    with mounted("st:1", tmp_path / "mnt", local_store, cache) as m:
        time.sleep(0.5)
        for rel, data in files.items():
            os.stat(m.mountpoint / rel)
            assert (m.mountpoint / rel).read_bytes() == data
        assert _stores(m) == 0
    monkeypatch.setenv("CUBEFS_FUSE_STORE", "1")

    # A remount without a hot file: no store, every byte right, as before.
    for name in _hot_files(cache):
        os.unlink(Path(hot_dir(str(cache))) / name)
    with mounted("st:1", tmp_path / "mnt", local_store, cache) as m:
        time.sleep(0.5)
        assert "hot" not in m.stats()["tiers"]
        for rel, data in files.items():
            os.stat(m.mountpoint / rel)
            assert (m.mountpoint / rel).read_bytes() == data
        assert _stores(m) == 0 and _reads(m) >= len(files)


def test_an_idle_image_mount_does_not_spin_after_its_start(tmp_path: Path, local_store: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The serve loop polls longer in a session's first seconds if asked (kernel.start_spin_seconds);
    a mount that went quiet right after its first requests still sleeps."""
    monkeypatch.setenv("CUBEFS_FUSE_START_SPIN_US", "2000")
    src = tmp_path / "src"
    files = _tree(src)
    run_cubefs("build", str(src), "--tag", "idle:1", "--store", local_store)
    with mounted("idle:1", tmp_path / "mnt", local_store, tmp_path / "cache", "--no-prefetch") as m:
        for rel, data in files.items():  # requests inside the start-up window
            assert (m.mountpoint / rel).read_bytes() == data
        pid = m.stats()["pid"]
        before = _cpu_seconds(pid)
        time.sleep(2.0)
        idle = _cpu_seconds(pid) - before
        assert idle < 0.1, f"an idle daemon used {idle:.2f} s of CPU in 2 s"
