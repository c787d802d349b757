"""Space comes back on volumes (real FUSE mounts, the real CLI): churn, snapshots removed,
a full filesystem, SIGKILL in the middle of a compaction, and compaction racing snapshots,
clones and rollbacks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3_ENV, run_cubefs

MiB = 1 << 20


class Vol:
    """One volume directory, as a user drives it from the shell."""

    def __init__(self, tmp: Path, directory: Path | None = None) -> None:
        self.tmp = tmp
        self.dir = directory or tmp / "volumes"

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cubefs(*args, "--volume-dir", str(self.dir), env=env)

    def gc(self) -> dict[str, int]:
        return dict(json.loads(self.cli("volume", "gc", "--json").stdout))

    def mount(self, name: str, env: dict[str, str] | None = None) -> Path:
        mnt = self.tmp / f"mnt-{name.replace('@', '-')}"
        mnt.mkdir(exist_ok=True)
        run_cubefs("mount", "--volume", name, str(mnt), "--volume-dir", str(self.dir), timeout=120, env=env)
        assert os.path.ismount(mnt)
        return mnt

    def umount(self, mnt: Path) -> None:
        if run_cubefs("umount", str(mnt), check=False, timeout=60).returncode != 0 and os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)

    def data_du(self) -> int:
        """What the volume's data files occupy on disk (du, not their apparent size)."""
        return sum(p.stat().st_blocks * 512 for p in (self.dir / "data").iterdir())

    def dir_du(self) -> int:
        return sum(p.lstat().st_blocks * 512 for p in self.dir.rglob("*"))


def digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Vol]:
    v = Vol(tmp_path)
    v.cli("volume", "create", "v")
    yield v


def test_churn_then_gc_leaves_at_most_twice_the_live_data(vol: Vol) -> None:
    keep = os.urandom(4 * MiB)
    mnt = vol.mount("v")
    try:
        write(mnt / "keep", keep)
        for _ in range(20):
            write(mnt / "churn", os.urandom(10 * MiB))
            os.unlink(mnt / "churn")
        before = vol.data_du()
        assert before >= 150 * MiB  # today's main keeps all of it: 20 x 10 MB written
        st = vol.gc()  # mounted: goes through the daemon's control socket for its data file
        after = vol.data_du()
        assert after <= 2 * len(keep), (before, after, st)
        assert st["bytes_reclaimed"] >= before - after - MiB and st["live_bytes"] == len(keep)
        assert (mnt / "keep").read_bytes() == keep
        write(mnt / "after", b"x" * 300_000)  # the daemon writes on, into a new data file
        stats = json.loads(run_cubefs("stats", str(mnt), "--json").stdout)
        assert set(stats["volume"]["compaction"]) >= {"passes", "files_compacted", "bytes_reclaimed"}
    finally:
        vol.umount(mnt)
    mnt = vol.mount("v")
    try:
        assert (mnt / "keep").read_bytes() == keep and (mnt / "after").read_bytes() == b"x" * 300_000
    finally:
        vol.umount(mnt)
    # The whole directory, index included, stays within twice the live data plus the index.
    assert vol.dir_du() <= 2 * (len(keep) + 300_000) + 4 * MiB


def test_background_compaction_of_a_mounted_volume(vol: Vol) -> None:
    """Nobody runs gc: the daemon gives the space back itself, and counts it in its stats."""
    keep = os.urandom(MiB)
    mnt = vol.mount("v", env={"CUBEFS_COMPACT_INTERVAL": "1"})
    try:
        write(mnt / "keep", keep)
        for _ in range(3):
            write(mnt / "churn", os.urandom(10 * MiB))
            os.unlink(mnt / "churn")
        deadline = time.monotonic() + 30
        while vol.data_du() > 4 * MiB and time.monotonic() < deadline:
            time.sleep(0.5)
        assert vol.data_du() <= 4 * MiB
        c = json.loads(run_cubefs("stats", str(mnt), "--json").stdout)["volume"]["compaction"]
        assert c["passes"] >= 1 and c["rolls"] >= 1 and c["bytes_reclaimed"] >= 20 * MiB
        assert (mnt / "keep").read_bytes() == keep
    finally:
        vol.umount(mnt)


def test_data_deleted_after_a_snapshot_comes_back_when_the_snapshot_goes(vol: Vol) -> None:
    mnt = vol.mount("v")
    try:
        write(mnt / "keep", b"k" * MiB)
        write(mnt / "big", os.urandom(16 * MiB))
        vol.cli("snapshot", "v", "--name", "s1")
        os.unlink(mnt / "big")
        st = vol.gc()
        assert st["live_bytes"] >= 17 * MiB  # the snapshot still shows it
        vol.cli("snapshot", "rm", "v@s1")
        st = vol.gc()
        assert st["live_bytes"] == MiB and vol.data_du() <= 2 * MiB, st
        assert (mnt / "keep").read_bytes() == b"k" * MiB and not (mnt / "big").exists()
    finally:
        vol.umount(mnt)


def test_a_volume_that_filled_its_filesystem_works_again_after_rm_and_gc(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(small)], check=True)
    try:
        vol = Vol(tmp_path, small / "volumes")
        vol.cli("volume", "create", "v")
        mnt = vol.mount("v")
        try:
            keep = os.urandom(MiB)
            write(mnt / "keep", keep)
            with pytest.raises(OSError) as full, open(mnt / "fill", "wb") as f:
                for _ in range(100):
                    f.write(os.urandom(MiB))
                    f.flush()
                os.fsync(f.fileno())
            assert full.value.errno == errno.ENOSPC  # a full disk, not an I/O error
            os.unlink(mnt / "fill")
            vol.gc()
            write(mnt / "again", b"a" * 40 * MiB)
            assert (mnt / "again").read_bytes() == b"a" * 40 * MiB
            assert (mnt / "keep").read_bytes() == keep
        finally:
            vol.umount(mnt)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _snapshot_states(vol: Vol, names: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for name in names:
        mnt = vol.mount(name)
        try:
            out[name] = digests(mnt)
        finally:
            vol.umount(mnt)
    return out


def test_sigkill_during_compaction_loses_nothing(vol: Vol) -> None:
    mnt = vol.mount("v")
    try:
        for name in ("a", "b", "c"):
            write(mnt / name, os.urandom(3 * MiB))
        vol.cli("snapshot", "v", "--name", "s1")
        write(mnt / "junk", os.urandom(24 * MiB))
        os.unlink(mnt / "junk")
        with open(mnt / "c", "r+b") as f:  # overwrites after a snapshot: copy-on-write
            f.seek(MiB)
            f.write(os.urandom(MiB))
        os.unlink(mnt / "a")
        vol.cli("snapshot", "v", "--name", "s2")
        write(mnt / "d", os.urandom(2 * MiB))
    finally:
        vol.umount(mnt)
    names = ["v", "v@s1", "v@s2"]
    want = _snapshot_states(vol, names)
    killed_mid = 0
    for delay in (0.2, 0.5, 0.9, 1.4, 2.0, 2.7, 3.5):
        files_before = set(os.listdir(vol.dir / "data"))
        gc = subprocess.Popen([sys.executable, "-m", "cubefs", "volume", "gc", "--volume-dir", str(vol.dir)],
                              env={**os.environ, **S3_ENV, "CUBEFS_TEST_COMPACT_PAUSE": "0.3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if gc.poll() is None:
            gc.send_signal(signal.SIGKILL)
            killed_mid += set(os.listdir(vol.dir / "data")) != files_before
        gc.wait()
        assert _snapshot_states(vol, names) == want
    assert killed_mid >= 1  # some kill fell between the copy and the old file's removal
    st = vol.gc()
    assert _snapshot_states(vol, names) == want
    # What a killed compaction left (a copy nothing points at, an old file) is gone now.
    assert st["dead_bytes_left"] <= MiB and vol.data_du() <= st["live_bytes"] + MiB


def test_sigkill_of_a_daemon_compacting_in_the_background(vol: Vol) -> None:
    env = {"CUBEFS_COMPACT_INTERVAL": "1", "CUBEFS_TEST_COMPACT_PAUSE": "0.3"}
    mnt = vol.mount("v", env=env)
    daemon = json.loads(run_cubefs("stats", str(mnt), "--json").stdout)["pid"]
    data = {"keep": os.urandom(20 * MiB), "more": os.urandom(MiB)}
    try:
        write(mnt / "keep", data["keep"])
        vol.cli("snapshot", "v", "--name", "s1")
        write(mnt / "junk", os.urandom(40 * MiB))
        os.unlink(mnt / "junk")
        write(mnt / "more", data["more"])
        # The daemon lets its mostly dead file go, then copies 'keep' and 'more' out of it
        # into a second file, 4 MiB per step with a pause after each: kill it in there.
        deadline = time.monotonic() + 30
        while len(os.listdir(vol.dir / "data")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(os.listdir(vol.dir / "data")) == 2  # the copy and the old file: mid-compaction
        os.kill(daemon, signal.SIGKILL)
    finally:
        vol.umount(mnt)
    want = {name: hashlib.sha256(d).hexdigest() for name, d in data.items()}
    assert _snapshot_states(vol, ["v", "v@s1"]) == {"v": want, "v@s1": {"keep": want["keep"]}}
    st = vol.gc()
    assert _snapshot_states(vol, ["v", "v@s1"]) == {"v": want, "v@s1": {"keep": want["keep"]}}
    assert vol.data_du() <= st["live_bytes"] + MiB and st["live_bytes"] == 21 * MiB


def test_volume_dir_is_private_even_if_an_older_version_made_it(vol: Vol) -> None:
    mnt = vol.mount("v")
    try:
        write(mnt / "f", b"secret")
    finally:
        vol.umount(mnt)
    for p in [vol.dir, *vol.dir.rglob("*")]:  # as an older cubefs under umask 022 left them
        p.chmod(0o755 if p.is_dir() else 0o644)
    vol.cli("volume", "list")
    modes = {str(p.relative_to(vol.dir)): p.stat().st_mode & 0o777 for p in [vol.dir, *vol.dir.rglob("*")]}
    assert any(name.startswith("data/") for name in modes) and "index.lmdb/data.mdb" in modes
    assert all(m == (0o700 if (vol.dir / n).is_dir() else 0o600) for n, m in modes.items()), modes


def test_compaction_racing_snapshots_clones_and_rollbacks_keeps_every_snapshot_exact(vol: Vol) -> None:
    stop = threading.Event()
    errors: list[str] = []

    def collector() -> None:
        while not stop.is_set():
            res = run_cubefs("volume", "gc", "--json", "--volume-dir", str(vol.dir), check=False)
            if res.returncode != 0:
                errors.append(res.stderr)

    mnt = vol.mount("v")
    states: dict[str, dict[str, str]] = {}
    thread = threading.Thread(target=collector)
    thread.start()
    try:
        for i in range(8):
            write(mnt / f"f{i}", os.urandom(MiB * (1 + i % 3)))
            write(mnt / "junk", os.urandom(4 * MiB))
            os.unlink(mnt / "junk")
            if i and (mnt / f"f{i - 1}").exists():
                with open(mnt / f"f{i - 1}", "r+b") as f:
                    f.write(os.urandom(100_000))
            if i % 3 == 2:
                os.unlink(mnt / f"f{i - 2}")
            vol.cli("snapshot", "v", "--name", f"s{i}")
            states[f"v@s{i}"] = digests(mnt)
            if i % 2:
                vol.cli("clone", f"v@s{i}", "--prefix", f"c{i}")
                states[f"c{i}-0"] = states[f"v@s{i}"]
            if i == 5:
                vol.cli("rollback", "v", "s3")
                assert digests(mnt) == states["v@s3"]
        states["v"] = digests(mnt)
        vol.cli("snapshot", "rm", "v@s1")
        del states["v@s1"]
    finally:
        stop.set()
        thread.join()
        vol.umount(mnt)
    assert not errors
    vol.gc()
    assert _snapshot_states(vol, sorted(states)) == states
