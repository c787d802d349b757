"""FUSE passthrough of an image's files that are whole on the node (issue 18).

All real: a built image in a ``file://`` store, ``cubefs mount`` on /dev/fuse of
this 6.18 kernel (CONFIG_FUSE_PASSTHROUGH), reads by a child process.  The one
fault injected beside it: ``CUBEFS_PASSTHROUGH=0``, a mount that must then
serve every read itself, as on a kernel without passthrough."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mounted, run_cubefs, stop_mount_server

from cubefs.cache.files import files_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="passthrough needs root (CAP_SYS_ADMIN)")

BIG = 3 * 1024 * 1024 + 12345  # several chunks, verified inline (<= 4 MiB)
OTHER = 1_500_000


def _content(n: int, seed: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest() * 64
        i += 1
    return bytes(out[:n])


@pytest.fixture
def image(tmp_path: Path, local_store: str) -> tuple[str, dict[str, bytes]]:
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    files = {"lib/big.bin": _content(BIG, 1), "lib/mod.py": b"x = 1\n" * 500, "lib/other.bin": _content(OTHER, 2),
             "lib/small.bin": _content(70000, 3)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_cubefs("build", str(src), "--tag", "pt:1", "--store", local_store)
    return "pt:1", files


def _read(path: Path) -> bytes:
    """Read in a child process (an open and reads as any program makes them)."""
    code = f"import sys; sys.stdout.buffer.write(open({str(path)!r}, 'rb').read())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    return res.stdout


def _wait_copies(cache: Path, n: int) -> list[Path]:
    deadline = time.monotonic() + 30
    while True:
        copies = [p for p in Path(files_dir(str(cache))).rglob("*")
                  if p.is_file() and not p.name.startswith(".tmp-") and not p.name.endswith(".ok")]
        if len(copies) >= n or time.monotonic() > deadline:
            return copies
        time.sleep(0.1)


Image = tuple[str, dict[str, bytes]]


def test_passthrough_reads_the_local_copy(tmp_path: Path, local_store: str, image: Image) -> None:
    ref, files = image
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, local_store, cache, "--passthrough") as m:
        first = _read(mnt / "lib/big.bin")  # through the daemon; read to its end: a copy is written
        assert first == files["lib/big.bin"]
        copies = _wait_copies(cache, 1)
        assert len(copies) == 1
        reads_before = m.stats()["requests"].get("read", 0)
        second = _read(mnt / "lib/big.bin")
        assert second == first  # identical bytes by both paths
        st = m.stats()
        pt = st["passthrough"]
        assert pt["state"] == "passthrough", pt
        assert pt["passthrough_opens"] >= 1 and pt["materialized_files"] == 1 and pt["materialized_bytes"] == BIG
        assert st["requests"].get("read", 0) == reads_before  # the kernel read the copy itself
        shown = run_cubefs("stats", str(mnt)).stdout
        assert "passthrough  passthrough: " in shown
        for _ in range(2):  # a small file stays on the daemon path: no copy, no passthrough open
            assert _read(mnt / "lib/small.bin") == files["lib/small.bin"]
        time.sleep(0.5)
        assert len(_wait_copies(cache, 0)) == 1 and m.stats()["passthrough"]["passthrough_opens"] == 1
    for _ in range(2):  # a new daemon, the copy on the node: no read reaches it (a use keeps the mark valid)
        with mounted(ref, mnt, local_store, cache, "--passthrough") as m:
            assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
            st = m.stats()
            assert st["passthrough"]["passthrough_opens"] == 1 and st["requests"].get("read", 0) == 0, st
    # private, to its owner only, in private directories
    copy = copies[0]
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    for d in (copy.parent, Path(files_dir(str(cache)))):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert copy.read_bytes() == files["lib/big.bin"]


def test_tampered_copy_is_not_served(tmp_path: Path, local_store: str, image: Image) -> None:
    ref, files = image
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, local_store, cache, "--passthrough"):
        _read(mnt / "lib/big.bin")
        (copy,) = _wait_copies(cache, 1)
    data = bytearray(copy.read_bytes())
    data[1000] ^= 0xFF
    copy.write_bytes(bytes(data))
    with mounted(ref, mnt, local_store, cache, "--passthrough") as m:  # a new daemon: it has never verified the copy
        assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        pt = m.stats()["passthrough"]
        assert pt["verify_failures"] == 1 and pt["passthrough_opens"] == 0, pt
        assert m.stats()["requests"].get("read", 0) > 0  # served by the daemon
        (again,) = _wait_copies(cache, 1)  # ...and written again from the chunks
        deadline = time.monotonic() + 30
        while m.stats()["passthrough"]["materialized_files"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert again.read_bytes() == files["lib/big.bin"]
        assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        assert m.stats()["passthrough"]["passthrough_opens"] == 1


def test_an_open_in_cached_mode_keeps_its_inode_cached(tmp_path: Path, local_store: str, image: Image) -> None:
    """The kernel fails (EIO) a passthrough open of an inode open in cached mode: a file
    copied while a program holds it open is passed through only once it is closed."""
    ref, files = image
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, local_store, tmp_path / "cache", "--passthrough") as m:
        with open(mnt / "lib/other.bin", "rb") as held:
            assert held.read() == files["lib/other.bin"]
            _wait_copies(tmp_path / "cache", 1)
            assert _read(mnt / "lib/other.bin") == files["lib/other.bin"]  # cached mode again, no EIO
            assert m.stats()["passthrough"]["passthrough_opens"] == 0
        assert _read(mnt / "lib/other.bin") == files["lib/other.bin"]
        assert m.stats()["passthrough"]["passthrough_opens"] == 1


def test_trim_and_clear_remove_copies(tmp_path: Path, local_store: str, image: Image) -> None:
    ref, _files = image
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, local_store, cache, "--passthrough"):
        _read(mnt / "lib/big.bin")
        _read(mnt / "lib/other.bin")
        assert len(_wait_copies(cache, 2)) == 2
    # a trim to 4 MiB keeps copies within half of it: the older 3 MiB one goes, the 1.5 MB one stays
    run_cubefs("cache", "trim", "--to", "4M", "--cache-dir", str(cache))
    left = _wait_copies(cache, 0)
    assert [c.stat().st_size for c in left] == [OTHER]
    run_cubefs("cache", "clear", "--cache-dir", str(cache))
    assert not Path(files_dir(str(cache))).exists() or not list(Path(files_dir(str(cache))).rglob("*"))


def test_auto_declines_an_image_without_a_big_file(tmp_path: Path, local_store: str, image: Image) -> None:
    """By default (auto) passthrough is negotiated only for an image holding a file of 64 MiB
    or more: this one's are smaller, so "no open" is kept, every read goes through the daemon,
    no copies; --no-passthrough: none at all."""
    ref, files = image
    cache = tmp_path / "cache"
    for opts in ((), ("--no-passthrough",)):
        with mounted(ref, tmp_path / "mnt", local_store, cache, *opts) as m:
            for _ in range(2):
                assert _read(tmp_path / "mnt/lib/big.bin") == files["lib/big.bin"]
            st = m.stats()
            assert st["requests"].get("open", 0) <= 1 and st["requests"]["read"] > 0
            if opts:
                assert st["passthrough"] is None
                assert "passthrough" not in run_cubefs("stats", str(tmp_path / "mnt")).stdout
            else:
                assert st["passthrough"]["state"] == "off: auto: no file of 64 MiB or more in the image"
        assert not Path(files_dir(str(cache))).exists()


def test_auto_negotiates_for_an_image_with_a_big_file(tmp_path: Path, local_store: str) -> None:
    """A 64 MiB file (zeros but its last chunk: cheap to build and store) makes the default mount
    negotiate passthrough; read whole through the daemon once, it is read from its copy after."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(64 * 1024 * 1024 - 4096) + _content(4096, 7)
    (src / "weights.bin").write_bytes(data)
    run_cubefs("build", str(src), "--tag", "big:1", "--store", local_store)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    with mounted("big:1", mnt, local_store, cache) as m:
        assert _read(mnt / "weights.bin") == data
        assert len(_wait_copies(cache, 1)) == 1
        reads = m.stats()["requests"].get("read", 0)
        assert _read(mnt / "weights.bin") == data
        st = m.stats()
        assert st["passthrough"]["state"] == "passthrough" and st["passthrough"]["passthrough_opens"] == 1, st
        assert st["requests"].get("read", 0) == reads


def test_fallback_when_refused(tmp_path: Path, local_store: str, image: Image) -> None:
    """Mounts of a mount server started with CUBEFS_PASSTHROUGH=0 (its daemons inherit it)."""
    ref, files = image
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    sock = tmp_path / "serve.sock"
    env = {"CUBEFS_SERVER": str(sock), "CUBEFS_PASSTHROUGH": "0"}
    try:
        mnt.mkdir()
        run_cubefs("mount", ref, str(mnt), "--store", local_store, "--cache-dir", str(cache), "--passthrough", env=env,
                   timeout=120)
        for _ in range(3):
            assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        st = json.loads(run_cubefs("stats", str(mnt), "--json", env=env).stdout)
        assert st["passthrough"]["state"].startswith("off: disabled"), st["passthrough"]
        assert st["passthrough"]["passthrough_opens"] == 0
        assert st["requests"].get("open", 0) <= 1  # ENOSYS once: "no open" kept, the path of before
        assert st["requests"].get("read", 0) > 0
        time.sleep(0.5)  # a copy would be written in the background by now
        assert not [c for c in Path(files_dir(str(cache))).rglob("*") if c.is_file()]
    finally:
        run_cubefs("umount", str(mnt), check=False, env=env, timeout=60)
        stop_mount_server(sock)


def test_backing_ids_are_closed_at_the_last_release(tmp_path: Path, local_store: str, image: Image) -> None:
    """The kernel holds a registered copy open until its backing id is closed: an id kept for
    the mount's life pinned a copy that eviction or 'cubefs cache clear' had removed.  Closed at
    the inode's last passthrough release, and the next open registers it again (no EIO)."""
    ref, files = image
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, local_store, cache, "--passthrough") as m:
        _read(mnt / "lib/big.bin")
        _wait_copies(cache, 1)
        with open(mnt / "lib/big.bin", "rb") as held:  # passthrough; a second open shares its id
            assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
            pt = m.stats()["passthrough"]
            assert pt["passthrough_opens"] == 2 and pt["backing_files"] == 1, pt
            assert held.read() == files["lib/big.bin"]
        deadline = time.monotonic() + 10  # RELEASE is sent asynchronously after the close
        while m.stats()["passthrough"]["backing_files"] and time.monotonic() < deadline:
            time.sleep(0.05)
        pt = m.stats()["passthrough"]
        assert pt["backing_files"] == 0 and pt["backing_closed"] == 1, pt
        for _i in range(3):  # registered afresh each time, right after the last release
            assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        reads = m.stats()["requests"].get("read", 0)
        run_cubefs("cache", "clear", "--cache-dir", str(cache))  # nothing holds the removed copy now
        assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]  # through the daemon again
        pt = m.stats()["passthrough"]
        assert pt["passthrough_opens"] == 5 and m.stats()["requests"].get("read", 0) > reads, pt


def test_a_live_writers_temporary_copy_survives_a_trim(tmp_path: Path) -> None:
    """Every FileStore (each daemon, each cache trim) removes the temporaries of writers that
    died, and only theirs: another live daemon's copy in progress is left alone."""
    from cubefs.cache.files import FileStore, trim_files

    cache = tmp_path / "cache"
    sub = Path(files_dir(str(cache))) / "ab"
    sub.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = sub / f".tmp-abcd.{os.getpid()}"
    gone = sub / f".tmp-abce.{dead.pid}"
    odd = sub / ".tmp-abcf"
    for f in (live, gone, odd):
        f.write_bytes(b"x")
    trim_files(str(cache), 1 << 30)  # what every cache trim does (cubefs.cache.disk.DiskCache.trim)
    assert live.exists() and not gone.exists() and not odd.exists()
    FileStore(str(cache), 1 << 30)  # what every daemon does
    assert live.exists()


def test_a_remount_does_not_prefetch_what_it_reads_from_copies(tmp_path: Path, local_store: str,
                                                                image: Image) -> None:
    """A remount prefetches its image's trace from the disk cache and has the kernel read its hot
    file; a file the kernel reads from its copy is left out of both (measured: a 1 GiB file's
    chunks paged in at every remount, on the disk the copy is read from).  The others are still
    prefetched."""
    ref, files = image
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    with mounted(ref, mnt, local_store, cache, "--passthrough"):
        assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        assert _read(mnt / "lib/small.bin") == files["lib/small.bin"]
        _wait_copies(cache, 1)
    # The hot file the mount kept at its end (read whole by the kernel at every remount) holds
    # the start-up's chunks but big.bin's: those are read from its copy.
    kept = [f.stat().st_size for f in (cache / "hot").rglob("*") if f.is_file()]
    assert kept and 0 < sum(kept) < BIG // 2, kept
    shutil.rmtree(cache / "hot")  # what a hot file holds is not prefetched: this shows the trace's filter
    with mounted(ref, mnt, local_store, cache, "--passthrough") as m:
        deadline = time.monotonic() + 30
        while not m.stats()["tiers"].get("prefetch", {}).get("done") and time.monotonic() < deadline:
            time.sleep(0.05)
        prefetched = m.stats()["tiers"]["prefetch"]["chunks"]
        assert prefetched == 1, m.stats()["tiers"]["prefetch"]  # small.bin's; with big.bin's 14 before: 15
        assert _read(mnt / "lib/big.bin") == files["lib/big.bin"]
        assert m.stats()["passthrough"]["passthrough_opens"] == 1
