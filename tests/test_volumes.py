"""Copy-on-write volumes on real FUSE mounts: writes over a lazy image, snapshots,
rollback, clones, and what survives a daemon killed with SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import mount_volume, run_cubefs, unmount


class Volumes:
    """One volume directory, one store, one cache: the CLI as a user drives it."""

    def __init__(self, tmp: Path, store: str) -> None:
        self.dir = tmp / "volumes"
        self.store = store
        self.cache = tmp / "cache"
        self.tmp = tmp

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cubefs(*args, "--volume-dir", str(self.dir), check=check)

    def mount(self, name: str, mnt: Path | None = None) -> Path:
        return mount_volume(name, mnt or self.tmp / f"mnt-{name}", self.dir, self.cache)

    def umount(self, mnt: Path) -> None:
        unmount(mnt)


@pytest.fixture
def image(tmp_path: Path, local_store: str) -> Path:
    """A small image with a big random file, a hard-linked pair and a subdirectory."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(300_000))
    (src / "small").write_text("image text\n")
    os.link(src / "small", src / "hl")
    (src / "sub" / "f").write_text("in sub\n")
    os.symlink("small", src / "link")
    run_cubefs("build", str(src), "--tag", "base:1", "--store", local_store)
    return src


@pytest.fixture
def vols(tmp_path: Path, local_store: str, image: Path) -> Volumes:
    v = Volumes(tmp_path, local_store)
    v.cli("volume", "create", "vol", "--from", "base:1", "--store", local_store)
    return v


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """What a user would compare: every name's type, mode, owner, size, link count,
    content hash, link target and xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = sorted((k, os.getxattr(p, k, follow_symlinks=False))
                            for k in os.listxattr(p, follow_symlinks=False))
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                             st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                                             st.st_nlink if not stat.S_ISDIR(st.st_mode) else None, content,
                                             tuple(xattrs))
    return out


def test_writes_over_the_image_read_back_and_survive_a_remount(vols: Volumes, image: Path) -> None:
    mnt = vols.mount("vol")
    try:
        assert (mnt / "big").read_bytes() == (image / "big").read_bytes()  # lazily from the image
        expect = bytearray((image / "big").read_bytes())
        with open(mnt / "big", "r+b") as f:  # a partial write into the middle of an image block
            f.seek(100_000)
            f.write(b"X" * 10)
        expect[100_000:100_010] = b"X" * 10
        assert (mnt / "big").read_bytes() == expect
        os.truncate(mnt / "big", 70_000)  # shrink, then grow: the cut-off bytes must come back as zeros
        os.truncate(mnt / "big", 200_000)
        expect = expect[:70_000] + bytes(130_000)
        assert (mnt / "big").read_bytes() == expect
        with open(mnt / "small", "a") as f:  # O_APPEND on an image file, seen through its hard link
            f.write("more\n")
        assert (mnt / "hl").read_text() == "image text\nmore\n"
        assert os.stat(mnt / "hl").st_nlink == 2
        with open(mnt / "sparse", "wb") as f:  # a hole in the middle of a new file
            f.write(b"head")
            f.seek(5_000_000)
            f.write(b"tail")
        data = (mnt / "sparse").read_bytes()
        assert len(data) == 5_000_004 and data[:4] == b"head" and data[-4:] == b"tail" and not any(data[4:-4])
        os.rename(mnt / "sub" / "f", mnt / "g")
        os.rmdir(mnt / "sub")
        (mnt / "d" / "e").mkdir(parents=True)
        os.rename(mnt / "d", mnt / "d2")  # a directory, with its subtree
        (mnt / "d2" / "e" / "x").write_bytes(b"deep")
        os.replace(mnt / "g", mnt / "small")  # rename over an existing file
        os.chmod(mnt / "big", 0o600)
        os.chown(mnt / "big", 1234, 5678)
        os.utime(mnt / "big", ns=(1_000_000_000_123, 2_000_000_000_456))
        os.setxattr(mnt / "big", "user.note", b"kept")
        os.mkfifo(mnt / "fifo")
        os.symlink("/etc/passwd", mnt / "abs")
        st = os.statvfs(mnt)
        assert st.f_bavail > 0 and st.f_namemax == 255
        fd = os.open(mnt / "big", os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        before = tree_state(mnt)
        assert before["big"][1:4] == (0o600, 1234, 5678)
        assert os.stat(mnt / "big").st_mtime_ns == 2_000_000_000_456
        assert sorted(os.listdir(mnt)) == ["abs", "big", "d2", "fifo", "hl", "link", "small", "sparse"]
    finally:
        vols.umount(mnt)
    mnt = vols.mount("vol")
    try:
        assert tree_state(mnt) == before
        assert (mnt / "small").read_text() == "in sub\n"
    finally:
        vols.umount(mnt)


def test_unlinked_file_stays_readable_while_open(vols: Volumes) -> None:
    mnt = vols.mount("vol")
    try:
        with open(mnt / "tmp", "w+b") as f:
            f.write(b"still here")
            f.flush()
            os.unlink(mnt / "tmp")
            assert not (mnt / "tmp").exists()
            f.seek(0)
            assert f.read() == b"still here"
            f.write(b" and more")
            f.seek(0)
            assert f.read() == b"still here and more"
        with open(mnt / "big", "rb") as f:  # an image file, unlinked while open
            head = f.read(1000)
            os.unlink(mnt / "big")
            f.seek(0)
            assert f.read(1000) == head
    finally:
        vols.umount(mnt)


def test_errors_match_what_posix_says(vols: Volumes) -> None:
    mnt = vols.mount("vol")
    try:
        import errno

        def err(fn: object, *a: object) -> int:
            try:
                fn(*a)  # type: ignore[operator]
            except OSError as e:
                return e.errno or 0
            return 0

        assert err(os.mkdir, mnt / "sub") == errno.EEXIST
        assert err(os.rmdir, mnt / "sub") == errno.ENOTEMPTY
        assert err(os.rmdir, mnt / "small") == errno.ENOTDIR
        assert err(os.unlink, mnt / "sub") == errno.EISDIR
        assert err(os.unlink, mnt / "nope") == errno.ENOENT
        assert err(os.link, mnt / "sub", mnt / "sub2") == errno.EPERM
        assert err(os.rename, mnt / "small", mnt / "sub") == errno.EISDIR
        assert err(os.rename, mnt / "sub", mnt / "small") == errno.ENOTDIR
        assert err(os.open, mnt / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        assert err(os.getxattr, mnt / "small", "user.none") == errno.ENODATA
        assert err(os.rename, mnt / "sub", mnt / "sub" / "inside") == errno.EINVAL
    finally:
        vols.umount(mnt)


def test_snapshot_during_writes_then_rollback_shows_exactly_the_snapshot(vols: Volumes) -> None:
    """A writer creates numbered files (each written in many pieces) while a snapshot is
    taken from another process; a clone of the snapshot and the rolled-back volume must
    show the same tree, and it must be a state the writer passed through."""
    mnt = vols.mount("vol")
    stop = threading.Event()
    piece = os.urandom(64 * 1024)

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with open(mnt / f"w{i:05d}", "wb") as f:
                for _ in range(8):
                    f.write(piece)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1.0)
        vols.cli("snapshot", "vol", "--name", "mid")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    try:
        vols.cli("clone", "vol@mid", "--count", "1", "--prefix", "check")
        check = vols.mount("check-0")
        try:
            expected = tree_state(check)
        finally:
            vols.umount(check)
        written = sorted(n for n in expected if n.startswith("w"))
        assert written, "the snapshot caught no writes"
        full = hashlib.sha256(piece * 8).hexdigest()
        # Every file but the last is complete; the last is whole pieces of one.
        assert all(expected[n][6] == full for n in written[:-1])
        assert expected[written[-1]][4] % len(piece) == 0
        assert len(tree_state(mnt)) > len(expected)  # the volume went on past the snapshot
        res = json.loads(vols.cli("rollback", "vol", "mid", "--json").stdout)
        assert res["seconds"] < 1.0
        assert tree_state(mnt) == expected  # through the same mount: the kernel's caches were dropped
    finally:
        vols.umount(mnt)


def test_open_file_across_a_rollback(vols: Volumes) -> None:
    """Open files keep their inode: it reads the snapshot's version of the file; a file
    created after the snapshot is gone (ENOENT)."""
    mnt = vols.mount("vol")
    try:
        (mnt / "kept").write_bytes(b"version 1")
        vols.cli("snapshot", "vol", "--name", "s")
        (mnt / "kept").write_bytes(b"version 2, longer")
        f = open(mnt / "kept", "rb")
        g = open(mnt / "later", "w+b")
        g.write(b"new")
        g.flush()
        assert f.read() == b"version 2, longer"
        vols.cli("rollback", "vol", "s")
        f.seek(0)
        assert f.read() == b"version 1"
        with pytest.raises(OSError) as e:
            g.seek(0)
            g.read()
            os.fstat(g.fileno())
        assert e.value.errno in (2, 116)  # ENOENT or ESTALE
        f.close()
        g.close()
        assert not (mnt / "later").exists()
    finally:
        vols.umount(mnt)


def test_a_hundred_clones_diverge_independently(vols: Volumes) -> None:
    mnt = vols.mount("vol")
    try:
        (mnt / "state").write_text("base")
        vols.cli("snapshot", "vol", "--name", "s")
    finally:
        vols.umount(mnt)
    res = json.loads(vols.cli("clone", "vol@s", "--count", "100", "--prefix", "c", "--json").stdout)
    assert len(res["volumes"]) == 100 and res["seconds"] < 1.0
    listed = {v["name"] for v in json.loads(vols.cli("volume", "list", "--json").stdout)}
    assert {f"c-{i}" for i in range(100)} <= listed
    mounts = [vols.mount(f"c-{i}") for i in (0, 42, 99)]  # mounted at once
    try:
        for i, m in zip((0, 42, 99), mounts):
            assert (m / "state").read_text() == "base"
            (m / "state").write_text(f"clone {i}")
            (m / f"only-{i}").write_text("x")
        for i, m in zip((0, 42, 99), mounts):
            assert (m / "state").read_text() == f"clone {i}"
            assert sorted(p.name for p in m.glob("only-*")) == [f"only-{i}"]
    finally:
        for m in mounts:
            vols.umount(m)
    mnt = vols.mount("vol")  # the source volume never saw any of it
    try:
        assert (mnt / "state").read_text() == "base" and not list(mnt.glob("only-*"))
    finally:
        vols.umount(mnt)


def test_sigkill_loses_nothing_fsynced_or_snapshotted(vols: Volumes) -> None:
    mnt = vols.mount("vol")
    pid = json.loads(run_cubefs("stats", str(mnt), "--json").stdout)["pid"]
    data = os.urandom(3_000_000)
    with open(mnt / "synced", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    (mnt / "snapped").write_text("in the snapshot")
    vols.cli("snapshot", "vol", "--name", "before-kill")
    (mnt / "after").write_text("written, not synced")
    held = open(mnt / "unlinked-but-open", "wb")  # an orphan the killed daemon cannot drop
    held.write(os.urandom(1_000_000))
    held.flush()
    orphan = os.fstat(held.fileno()).st_ino
    os.unlink(mnt / "unlinked-but-open")
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    held.close()
    vols.umount(mnt)
    assert not os.path.ismount(mnt)
    mnt = vols.mount("vol")  # the lock died with the daemon; the new one drops the orphan's blocks
    from cubefs.cow.index import VolumeIndex

    index = VolumeIndex(str(vols.dir))
    with index.read() as txn:
        assert not index.has_blocks(txn, index.volume(txn, "vol").layer, orphan)
    index.close()
    try:
        assert (mnt / "synced").read_bytes() == data
        assert (mnt / "snapped").read_text() == "in the snapshot"
        # Every completed operation is committed, synced or not: a killed process loses none.
        assert (mnt / "after").read_text() == "written, not synced"
        tree_state(mnt)  # every name resolves and every file reads
    finally:
        vols.umount(mnt)
    snaps = [s["snapshot"] for s in json.loads(vols.cli("snapshots", "vol", "--json").stdout)]
    assert snaps == ["before-kill"]


def test_volume_commands_fail_clearly(vols: Volumes, local_store: str) -> None:
    res = vols.cli("volume", "create", "x", "--from", "nope:1", "--store", local_store, check=False)
    assert res.returncode == 3 and "nope:1 not found" in res.stderr
    res = vols.cli("volume", "create", "vol", "--from", "base:1", "--store", local_store, check=False)
    assert res.returncode == 2 and "already exists" in res.stderr
    res = vols.cli("volume", "create", "../evil", check=False)
    assert res.returncode == 2 and "invalid volume" in res.stderr
    res = vols.cli("rollback", "vol", "never", check=False)
    assert res.returncode == 3 and "no snapshot never" in res.stderr
    res = vols.cli("clone", "vol", "--prefix", "p", check=False)
    assert res.returncode == 2 and "VOLUME@SNAPSHOT" in res.stderr
    mnt = vols.mount("vol")
    try:
        other = vols.tmp / "other"
        other.mkdir()
        res = run_cubefs("mount", "--volume", "vol", str(other), "--volume-dir", str(vols.dir), "--cache-dir",
                         str(vols.cache), check=False)
        assert res.returncode != 0 and f"already mounted at {mnt}" in res.stderr
        res = vols.cli("volume", "rm", "vol", check=False)
        assert res.returncode == 2 and "unmount it first" in res.stderr
    finally:
        vols.umount(mnt)
    res = run_cubefs("mount", "--volume", "ghost", str(mnt), "--volume-dir", str(vols.dir), check=False)
    assert res.returncode == 3 and "volume ghost not found" in res.stderr


def test_empty_volume(tmp_path: Path) -> None:
    v = Volumes(tmp_path, "")
    v.cli("volume", "create", "blank")
    mnt = v.mount("blank")
    try:
        assert os.listdir(mnt) == []
        (mnt / "a").write_text("first file")
        assert os.stat(mnt).st_nlink == 2
        (mnt / "dir").mkdir()
        assert os.stat(mnt).st_nlink == 3
    finally:
        v.umount(mnt)


def test_posix_sweep_matches_ext4(vols: Volumes, tmp_path: Path) -> None:
    """The same ~130 operations, on the volume and on a local ext4 directory: the same
    results and the same errno values, line for line (tests/posix_sweep.py)."""
    from posix_sweep import sweep

    native = tmp_path / "native"
    native.mkdir()
    assert subprocess.run(["stat", "-f", "-c", "%T", str(native)], capture_output=True,
                          text=True).stdout.strip() in ("ext2/ext3", "ext4")
    cwd = os.getcwd()
    mnt = vols.mount("vol")
    try:
        (mnt / "sweep").mkdir()
        on_ext4 = sweep(str(native))
        on_volume = sweep(str(mnt / "sweep"))
    finally:
        os.chdir(cwd)
        vols.umount(mnt)
    assert len(on_ext4) > 120
    assert [(a, b) for a, b in zip(on_ext4, on_volume) if a != b] == []
    assert len(on_volume) == len(on_ext4)


def _make_deb(tmp: Path) -> Path:
    pkg = tmp / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "share" / "cubefs-demo").mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: cubefs-demo\nVersion: 1.0\nArchitecture: all\nMaintainer: cubefs <dev@cubefs.invalid>\n"
        "Description: a package the volume tests install\n")
    postinst = pkg / "DEBIAN" / "postinst"
    postinst.write_text("#!/bin/sh\nset -e\necho installed > /var/lib/cubefs-demo.state\n")
    postinst.chmod(0o755)
    for i in range(40):
        (pkg / "usr" / "share" / "cubefs-demo" / f"f{i}").write_bytes(os.urandom(20_000))
    tool = pkg / "usr" / "bin" / "cubefs-demo"
    tool.write_text("#!/bin/sh\necho demo ran\n")
    tool.chmod(0o755)
    deb = tmp / "cubefs-demo.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True)
    return deb


def test_real_workloads_on_a_debian_volume(rootfs: Path, tmp_path: Path, local_store: str) -> None:
    """apt-get installs a local .deb (dpkg: renames, fsyncs, hard links), git commits and
    gcs, SQLite takes concurrent writes in WAL and rollback-journal modes, tar unpacks
    a big tarball; afterwards everything checks out, and still does after a remount."""
    import sqlite3

    run_cubefs("build", str(rootfs), "--tag", "debian:12", "--store", local_store, timeout=600)
    vols = Volumes(tmp_path, local_store)
    vols.cli("volume", "create", "deb", "--from", "debian:12", "--store", local_store)
    deb = _make_deb(tmp_path)
    tarball = tmp_path / "usr-lib.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(rootfs), "usr/lib"], check=True)
    mnt = vols.mount("deb")
    try:
        (mnt / "tmp" / deb.name).write_bytes(deb.read_bytes())
        res = subprocess.run(["chroot", str(mnt), "apt-get", "install", "-y", f"/tmp/{deb.name}"],
                             capture_output=True, text=True, timeout=300,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
        assert res.returncode == 0, res.stdout + res.stderr
        for check in (["dpkg", "--verify", "cubefs-demo"], ["dpkg", "--audit"]):
            res = subprocess.run(["chroot", str(mnt), *check], capture_output=True, text=True)
            assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
        assert subprocess.run(["chroot", str(mnt), "cubefs-demo"], capture_output=True,
                              text=True).stdout == "demo ran\n"
        assert (mnt / "var" / "lib" / "cubefs-demo.state").read_text() == "installed\n"

        repo = mnt / "root" / "repo"
        git = ["git", "-C", str(repo), "-c", "user.email=t@cubefs.invalid", "-c", "user.name=t"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["cp", "-r", str(Path(__file__).parent), str(repo / "tests")], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "first"], check=True)
        for i in range(5):
            with open(repo / "tests" / "conftest.py", "a") as f:
                f.write(f"# change {i}\n")
            subprocess.run([*git, "commit", "-qam", f"change {i}"], check=True)
        subprocess.run([*git, "gc", "-q"], check=True)
        subprocess.run([*git, "fsck", "--full", "--strict"], check=True, capture_output=True)
        log = subprocess.run([*git, "log", "--oneline"], capture_output=True, text=True, check=True).stdout
        assert len(log.splitlines()) == 6

        for mode in ("wal", "delete"):
            db = mnt / "root" / f"load-{mode}.db"
            con = sqlite3.connect(db)
            con.execute(f"pragma journal_mode={mode}")
            con.execute("create table t(id integer primary key, who int, v blob)")
            con.commit()
            con.close()

            def load(who: int, db: Path = db) -> None:
                c = sqlite3.connect(db, timeout=60)
                for _ in range(60):
                    with c:
                        c.execute("insert into t(who, v) values (?, ?)", (who, os.urandom(300)))
                c.close()

            threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            con = sqlite3.connect(db)
            assert con.execute("pragma integrity_check").fetchone() == ("ok",)
            assert con.execute("select who, count(*) from t group by who").fetchall() == [(w, 60) for w in range(4)]
            con.close()

        native = tmp_path / "native-untar"
        native.mkdir()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(native)], check=True)
        (mnt / "root" / "untar").mkdir()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(mnt / "root" / "untar")], check=True)
        assert tree_state(mnt / "root" / "untar") == tree_state(native)
        before = tree_state(mnt / "root")
    finally:
        vols.umount(mnt)
    mnt = vols.mount("deb")
    try:
        assert tree_state(mnt / "root") == before
        res = subprocess.run(["chroot", str(mnt), "dpkg", "--verify", "cubefs-demo"], capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout == ""
    finally:
        vols.umount(mnt)


def test_commit_pushes_the_snapshot_as_an_image(vols: Volumes, local_store: str, image: Path) -> None:
    mnt = vols.mount("vol")
    try:
        (mnt / "new").write_bytes(os.urandom(200_000))
        with open(mnt / "big", "r+b") as f:
            f.write(b"changed head")
        os.unlink(mnt / "sub" / "f")
        os.setxattr(mnt / "small", "user.k", b"v")
        res = json.loads(vols.cli("commit", "vol", "--tag", "base:2", "--cache-dir", str(vols.cache),
                                  "--json").stdout)
        (mnt / "after-commit").write_text("not in the image")
    finally:
        vols.umount(mnt)
    assert res["ref"] == "base:2" and res["snapshot"].startswith("commit-")
    assert res["files_reused"] >= 1  # 'hl'/'small' content unchanged: not read again
    snap = vols.tmp / "snap"
    snap.mkdir()
    run_cubefs("mount", "--volume", f"vol@{res['snapshot']}", str(snap), "--volume-dir", str(vols.dir),
               "--cache-dir", str(vols.cache))
    img = vols.tmp / "img"
    img.mkdir()
    run_cubefs("mount", "base:2", str(img), "--store", local_store, "--cache-dir", str(vols.cache))
    try:
        assert tree_state(img) == tree_state(snap)  # the image is exactly the snapshot
        assert not (img / "after-commit").exists() and not (img / "sub" / "f").exists()
        with pytest.raises(OSError) as e:  # a snapshot mounts read-only
            (snap / "new").write_text("x")
        assert e.value.errno == 30  # EROFS
    finally:
        vols.umount(img)
        vols.umount(snap)
    again = json.loads(vols.cli("commit", f"vol@{res['snapshot']}", "--tag", "base:3", "--cache-dir",
                                str(vols.cache), "--json").stdout)
    assert again["image"] == res["image"] and again["new_chunks"] == 0


def _depth(vols: Volumes, volume: str) -> int:
    from cubefs.cow.index import VolumeIndex

    index = VolumeIndex(str(vols.dir))
    try:
        with index.read() as txn:
            return len(index.chain(txn, index.volume(txn, volume).layer))
    finally:
        index.close()


def test_long_snapshot_chains_are_flattened_without_changing_anything(vols: Volumes) -> None:
    """40 snapshots, each after a change (writes, truncations, renames, deletes): the
    mounted daemon keeps the chain short; every state stays exactly as it was."""
    mnt = vols.mount("vol")
    states = {}
    try:
        for i in range(40):
            with open(mnt / "big", "r+b") as f:
                f.seek(i * 7000)
                f.write(bytes([i]) * 5000)
            if i % 5 == 0:
                os.truncate(mnt / "big", 300_000 - i * 1000)
            (mnt / f"step-{i}").write_text(str(i))
            if i % 3 == 0 and i:
                os.unlink(mnt / f"step-{i - 1}")
            if i == 20:
                os.rename(mnt / "sub", mnt / "sub-moved")
            vols.cli("snapshot", "vol", "--name", f"s{i}")
            if i in (0, 19, 39):
                states[i] = tree_state(mnt)
        deadline = time.monotonic() + 30
        while _depth(vols, "vol") > 17:  # the daemon flattens every 5 s
            assert time.monotonic() < deadline, f"chain still {_depth(vols, 'vol')} deep"
            time.sleep(0.5)
        assert tree_state(mnt) == states[39]
    finally:
        vols.umount(mnt)
    for i in (0, 19, 39):  # the snapshots still show their own states
        snap = vols.tmp / f"snap-{i}"
        snap.mkdir()
        run_cubefs("mount", "--volume", f"vol@s{i}", str(snap), "--volume-dir", str(vols.dir), "--cache-dir",
                   str(vols.cache))
        try:
            assert tree_state(snap) == states[i]
        finally:
            vols.umount(snap)
    mnt = vols.mount("vol")
    try:
        assert tree_state(mnt) == states[39]
    finally:
        vols.umount(mnt)


def test_gc_frees_what_nothing_refers_to(vols: Volumes) -> None:
    mnt = vols.mount("vol")
    try:
        (mnt / "keep").write_bytes(b"k" * 100_000)
        vols.cli("snapshot", "vol", "--name", "clean")
        (mnt / "junk").write_bytes(os.urandom(8_000_000))
        vols.cli("rollback", "vol", "clean")
        assert not (mnt / "junk").exists()
        # Mounted: the daemon lets go of its data file when gc asks, and the junk's blocks
        # in it are given back while 'keep' stays readable.
        st = json.loads(vols.cli("volume", "gc", "--json").stdout)
        assert st["layers_deleted"] >= 1 and st["bytes_reclaimed"] >= 8_000_000
        assert (mnt / "keep").read_bytes() == b"k" * 100_000
        (mnt / "more").write_bytes(b"m" * 70_000)  # and it writes on, into a new file
        assert (mnt / "more").read_bytes() == b"m" * 70_000
    finally:
        vols.umount(mnt)
    vols.cli("snapshot", "rm", "vol@clean")
    vols.cli("volume", "rm", "vol")
    st = json.loads(vols.cli("volume", "gc", "--json").stdout)
    assert st["files_deleted"] >= 1 and st["live_bytes"] == 0
    assert not list((vols.dir / "data").iterdir())
