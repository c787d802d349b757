"""``cubefs commit`` of a VM's disk without a VM: an ext4 made on the host with ``mkfs.ext4 -d``
(into a file, never mounted) holding an overlay's upper directory, put into a block volume whose
lower image is recorded.  A user checks the committed image has exactly base + upper under
overlayfs's rules (whiteouts delete, an opaque directory replaces, xattrs, owners, modes,
symlinks and hard links kept), that files the guest never touched were not read, and that a
damaged disk is refused in one line, leaving no clone, mount or process behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, run_cubefs

MiB = 1 << 20


def tree(root: Path) -> dict[str, tuple]:  # type: ignore[type-arg]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = "/" + str(p.relative_to(root))
            names = os.listxattr(p, follow_symlinks=False)
            xattrs = sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in names)
            if p.is_symlink():
                what = ("link", os.readlink(p))
            elif p.is_file():
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest()[:12], st.st_nlink)
            elif p.is_dir():
                what = ("dir",)
            else:
                what = ("other", st.st_rdev)
            out[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, what, tuple(xattrs))
    return out


def make_base(src: Path) -> None:
    (src / "etc").mkdir(parents=True)
    (src / "etc/keep").write_text("kept\n")
    (src / "etc/gone").write_text("whited out\n")
    (src / "etc/changed").write_text("old\n")
    (src / "opq").mkdir()
    (src / "opq/old").write_text("hidden by an opaque dir\n")
    (src / "merged").mkdir()
    (src / "merged/base-file").write_text("b\n")
    (src / "lib").mkdir()
    for i in range(20):
        (src / f"lib/m{i}.py").write_text(f"x = {i}\n" * 100)
    (src / "hl1").write_text("linked\n")
    os.link(src / "hl1", src / "hl2")


def make_disk(workdir: Path, size: int) -> Path:
    """The ext4 a guest's overlay would leave: upper/ (with its whiteouts and opaque dir) and work/."""
    d = workdir / "disk-src"
    up = d / "upper"
    (up / "etc").mkdir(parents=True)
    (d / "work").mkdir()
    os.mknod(up / "etc/gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    (up / "etc/changed").write_text("new\n")
    (up / "etc/new.conf").write_text("n\n")
    os.setxattr(up / "etc/new.conf", "user.k", b"v")
    os.link(up / "etc/new.conf", up / "etc/new-link")
    (up / "opq").mkdir()
    os.setxattr(up / "opq", "trusted.overlay.opaque", b"y")
    (up / "opq/only").write_text("only\n")
    (up / "merged").mkdir()
    (up / "merged/upper-file").write_text("u\n")
    (up / "private").mkdir(mode=0o700)
    os.chown(up / "private", 1234, 5678)
    os.symlink("../../../../../etc/shadow", up / "escape")  # data, never followed
    os.symlink("loop", up / "loop")
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "256", "-d", str(d), str(img)], check=True)
    return img


def expected(base: Path, workdir: Path) -> Path:
    """The merged tree built by hand on the host: what the guest saw."""
    m = workdir / "expected"
    subprocess.run(["cp", "-a", str(base), str(m)], check=True)
    (m / "etc/gone").unlink()
    (m / "etc/changed").write_text("new\n")
    (m / "etc/new.conf").write_text("n\n")
    os.setxattr(m / "etc/new.conf", "user.k", b"v")
    os.link(m / "etc/new.conf", m / "etc/new-link")
    (m / "opq/old").unlink()
    (m / "opq/only").write_text("only\n")
    (m / "merged/upper-file").write_text("u\n")
    (m / "private").mkdir(mode=0o700)
    os.chown(m / "private", 1234, 5678)
    os.symlink("../../../../../etc/shadow", m / "escape")
    os.symlink("loop", m / "loop")
    return m


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"CUBEFS_VOLUME_DIR": str(tmp_path / "volumes"), "CUBEFS_STORE": f"file://{tmp_path / 'store'}",
            "CUBEFS_CACHE_DIR": str(tmp_path / "cache")}


def put_disk(env: dict[str, str], img: Path, name: str, lower: str | None) -> None:
    from cubefs.cow.index import VolumeIndex
    from cubefs.volume.blk import import_disk, resolve_image, set_lower

    index = VolumeIndex(env["CUBEFS_VOLUME_DIR"])
    try:
        import_disk(index, name, str(img))
        if lower:
            set_lower(index, name, resolve_image(lower, env["CUBEFS_STORE"], None))
        index.snapshot(name, "s1")
        index.sync()
    finally:
        index.close()


def leftovers(env: dict[str, str]) -> list[str]:
    vols = json.loads(run_cubefs("volume", "list", "--json", env=env).stdout)
    mounts = Path("/proc/mounts").read_text()
    return [v["name"] for v in vols if v["name"].startswith("cubefs-diskread-")] + \
        [ln for ln in mounts.splitlines() if "cubefs-disk" in ln and "fuse" in ln]


def test_commit_of_a_disk_is_the_image_with_the_upper_laid_over(env: dict[str, str], tmp_path: Path) -> None:
    base = tmp_path / "base"
    make_base(base)
    run_cubefs("build", str(base), "--tag", "base:1", env=env)
    img = make_disk(tmp_path, 64 * MiB)
    put_disk(env, img, "d", "base:1")
    res = run_cubefs("commit", "d@s1", "--tag", "app:2", "--json", env=env, timeout=300)
    out = json.loads(res.stdout)
    # The base's files the upper left alone (20 modules, keep, base-file, the hard link) were not read.
    assert out["files_reused"] == 23, out
    with Mount("app:2", tmp_path / "mnt", env["CUBEFS_STORE"], tmp_path / "cache") as m:
        got = tree(m.mountpoint)
    want = tree(expected(base, tmp_path))
    assert got == want
    assert got["/etc/new.conf"][3][2] == 2 and got["/hl1"][3][2] == 2
    assert not leftovers(env)
    # A host-side mount of the disk says why not and what instead; --raw shows the disk file.
    (tmp_path / "view").mkdir()
    res = run_cubefs("mount", "--volume", "d@s1", str(tmp_path / "view"), env=env, check=False)
    assert res.returncode != 0 and "cubefs commit d@s1" in res.stderr and "--raw" in res.stderr, res
    assert res.stderr.count("\n") == 1 and not os.path.ismount(tmp_path / "view"), res
    run_cubefs("mount", "--volume", "d@s1", str(tmp_path / "view"), "--raw", env=env)
    try:
        assert os.listdir(tmp_path / "view") == ["disk"]
        assert (tmp_path / "view/disk").stat().st_size == 64 * MiB
    finally:
        run_cubefs("umount", str(tmp_path / "view"), env=env)


def test_a_damaged_disk_and_a_disk_without_an_image_are_refused_in_one_line(env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    base = tmp_path / "base"
    make_base(base)
    run_cubefs("build", str(base), "--tag", "base:1", env=env)
    img = make_disk(tmp_path, 64 * MiB)
    with open(img, "r+b") as f:  # the superblock and the group descriptors: zeros
        f.seek(1024)
        f.write(bytes(8192))
    put_disk(env, img, "bad", "base:1")
    res = run_cubefs("commit", "bad@s1", "--tag", "app:3", env=env, check=False, timeout=300)
    assert res.returncode != 0 and "not a sound ext4" in res.stderr and res.stderr.count("\n") == 1, res
    assert "Traceback" not in res.stderr
    assert not leftovers(env)
    # The snapshot itself was never written: its bytes are what was put there.
    back = tmp_path / "back.img"
    run_cubefs("volume", "export", "bad@s1", str(back), env=env)
    assert back.read_bytes() == img.read_bytes()


def test_the_walk_is_bounded_whatever_the_guest_left(tmp_path: Path) -> None:
    """What a guest can make the host do: entries and apparent bytes past the bounds are refused
    with one line; a symlink is never followed (a loop is data)."""
    from cubefs.errors import BadInputError
    from cubefs.volume.diskread import Merge

    class NoIngest:
        def add_file(self, *_a: object) -> None:
            raise AssertionError("nothing is read before the walk is done")

    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    for i in range(10):
        (up / f"d/f{i}").write_text("x")
    os.symlink("loop", up / "loop")
    os.symlink(str(tmp_path), up / "d/out")
    with pytest.raises(BadInputError, match="over 5 entries"):
        Merge(None, {}, 64 * MiB, max_entries=5).apply_upper(str(up), NoIngest(), lambda _f, _b: None)  # type: ignore[arg-type]
    with open(up / "sparse", "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of nothing on a 64 MiB disk
    with pytest.raises(BadInputError, match="sparse files"):
        Merge(None, {}, 64 * MiB).apply_upper(str(up), NoIngest(), lambda _f, _b: None)  # type: ignore[arg-type]
    (up / "sparse").unlink()
    merge = Merge(None, {}, 64 * MiB)
    queued: list[bytes] = []
    merge.apply_upper(str(up), type("I", (), {"add_file": lambda _s, p, *_a: queued.append(p)})(),  # type: ignore[arg-type]
                      lambda _f, _b: None)
    assert merge.root.children is not None
    assert merge.root.children[b"loop"].target == b"loop"
    assert merge.root.children[b"d"].children[b"out"].target == os.fsencode(tmp_path)  # type: ignore[index]
    assert len(queued) == 10


def test_the_disk_image_record_cannot_be_forged(env: dict[str, str], tmp_path: Path) -> None:
    """``trusted.cubefs.lower`` names a store ``cubefs commit`` reads with the host's credentials:
    a user of a volume's mount (or a guest with a volume root) can neither set, remove nor see
    it, and a record on anything but a block volume (written before this rule) is refused before
    any store is asked."""
    import errno

    from cubefs.cow.index import ROOT_INO, VolumeIndex
    from cubefs.volume.blk import LOWER_XATTR

    run_cubefs("volume", "create", "plain", env=env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cubefs("mount", "--volume", "plain", str(mnt), env=env)
    try:
        (mnt / "disk").write_bytes(bytes(4096))  # a disk by name, inode and size...
        (mnt / "etc").mkdir()  # ...in a guest's root
        forged = json.dumps({"ref": "x:1", "digest": "0" * 64, "store": "s3://attacker/x", "s3_endpoint": None})
        for name in ("trusted.cubefs.lower", "trusted.cubefs.other"):
            with pytest.raises(OSError) as err:
                os.setxattr(mnt, name, forged.encode())
            assert err.value.errno == errno.EPERM
            with pytest.raises(OSError) as err:
                os.removexattr(mnt, name)
            assert err.value.errno == errno.EPERM
        os.setxattr(mnt, "trusted.other", b"1")  # the rest of trusted.* is the user's as before
        assert os.getxattr(mnt, "trusted.other") == b"1"
    finally:
        run_cubefs("umount", str(mnt), env=env)
    index = VolumeIndex(env["CUBEFS_VOLUME_DIR"])
    try:  # a record that got there anyway (before this rule): hidden from the mount, refused by commit
        with index.write() as txn:
            vol = index.volume(txn, "plain")
            root = index.get_inode(txn, vol.layer, ROOT_INO)
            if root is None:
                root = next(r for at in index.chain(txn, vol.layer) if (r := index.get_inode(txn, at, ROOT_INO)))
            root = root.copy()
            root.xattrs[LOWER_XATTR] = forged.encode()
            index.put_inode(txn, vol.layer, ROOT_INO, root)
        index.sync()
    finally:
        index.close()
    run_cubefs("mount", "--volume", "plain", str(mnt), "--raw", env=env)
    try:
        assert "trusted.cubefs.lower" not in os.listxattr(mnt)
        with pytest.raises(OSError) as err:
            os.getxattr(mnt, "trusted.cubefs.lower")
        assert err.value.errno == errno.ENODATA
    finally:
        run_cubefs("umount", str(mnt), env=env)
    res = run_cubefs("commit", "plain", "--tag", "stolen:1", env=env, check=False, timeout=120)
    assert res.returncode != 0 and "not a block volume" in res.stderr and res.stderr.count("\n") == 1, res
    assert "attacker" not in res.stderr and "Traceback" not in res.stderr


def test_xattrs_and_symlinks_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest's xattrs (shared blocks, 64 KiB ea_inode values) and symlink targets are held in
    memory: capped per file (count, bytes) and counted against the walk's bytes, refused in one
    line naming the file, before the next file's are read."""
    from cubefs.errors import BadInputError
    from cubefs.volume import diskread
    from cubefs.volume.diskread import Merge

    def walk(up: Path, **kw: int) -> Merge:
        m = Merge(None, {}, 64 * MiB, **kw)
        m.apply_upper(str(up), type("I", (), {"add_file": lambda *_a: None})(), lambda _f, _b: None)  # type: ignore[arg-type]
        return m

    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    (up / "d/many").write_text("x")
    for i in range(diskread.MAX_XATTRS + 1):
        os.setxattr(up / "d/many", f"user.k{i}", b"v")
    with pytest.raises(BadInputError, match=r"^/d/many on the disk has 129 xattrs, over 128; refused$"):
        walk(up)
    (up / "d/many").unlink()
    (up / "d/big").write_text("x")
    for i in range(3):
        os.setxattr(up / "d/big", f"user.b{i}", bytes(1000))
    monkeypatch.setattr(diskread, "MAX_XATTR_BYTES", 2500)
    with pytest.raises(BadInputError, match=r"^/d/big on the disk has over 2 KiB of xattrs; refused$"):
        walk(up)
    monkeypatch.undo()
    m = walk(up)  # within the caps: kept, and counted
    assert m.root.children[b"d"].children[b"big"].xattrs[0] == (b"user.b0", bytes(1000))  # type: ignore[index]
    assert m.nbytes == 1 + 3 * (7 + 1000 + diskread.XATTR_OVERHEAD)
    with pytest.raises(BadInputError, match=r"xattrs and symlinks add up to over 3,000 bytes.*refused at /d/big$"):
        walk(up, max_bytes=3000)
    (up / "d/big").unlink()
    os.symlink("t" * 2000, up / "long")
    with pytest.raises(BadInputError, match=r"refused at /long$"):
        walk(up, max_bytes=1500)


def _fuse2fs_of(root: str) -> int:
    """The pid of the fuse2fs serving ``root`` (it is handed the stub directory beside it)."""
    stub = os.fsencode(os.path.join(os.path.dirname(root), "stub"))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"fuse2fs") and stub in argv:
            return int(pid)
    raise AssertionError(f"no fuse2fs serves {root}")


def test_the_tools_are_confined_and_a_wedged_fuse2fs_is_killed(env: dict[str, str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """fuse2fs parses the guest's ext4 as nobody, no capabilities, no_new_privs; its mount is
    ro,nosuid,nodev,noexec and root's alone; stopped (a wedged fuse2fs), it is killed at the
    deadline and the walk fails in one line instead of hanging; nothing is left behind."""
    import signal
    import time

    from cubefs.cow.index import VolumeIndex
    from cubefs.errors import BadInputError
    from cubefs.volume import diskread

    base = tmp_path / "base"
    make_base(base)
    run_cubefs("build", str(base), "--tag", "base:1", env=env)
    put_disk(env, make_disk(tmp_path, 64 * MiB), "d", "base:1")
    monkeypatch.setattr(diskread, "WALK_TIMEOUT", 8.0)
    index = VolumeIndex(env["CUBEFS_VOLUME_DIR"])
    try:
        with pytest.raises(BadInputError, match=r"^the disk of d@s1: fuse2fs did not finish within 8 s; refused$"), \
                diskread.disk_tree(index, "d", "s1", env["CUBEFS_CACHE_DIR"]) as (root, _size):
            started = time.monotonic()
            pid = _fuse2fs_of(root)
            status = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in ln)
            assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
            assert status["Groups"].strip() == "" and status["NoNewPrivs"].strip() == "1"
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
            (line,) = [ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {root} " in ln]
            opts = line.split()[3].split(",")
            assert {"ro", "nosuid", "nodev", "noexec", "user_id=0"} <= set(opts) and "allow_other" not in opts
            assert sorted(os.listdir(root)) == ["lost+found", "upper", "work"]
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", root],
                                   capture_output=True, text=True)
            assert other.returncode != 0  # nobody else reads the guest's files
            os.kill(pid, signal.SIGSTOP)
            os.listdir(os.path.join(root, "upper", "etc"))
        assert time.monotonic() - started < 20
    finally:
        index.close()
    assert not leftovers(env)
    assert not [d for d in os.listdir("/tmp") if d.startswith(f"cubefs-ext4-{os.getpid()}-")]


def test_what_a_killed_commit_left_is_swept_by_the_next(env: dict[str, str], tmp_path: Path) -> None:

    base = tmp_path / "base"
    make_base(base)
    run_cubefs("build", str(base), "--tag", "base:1", env=env)
    put_disk(env, make_disk(tmp_path, 64 * MiB), "d", "base:1")
    code = ("import sys, time\nfrom cubefs.cow.index import VolumeIndex\nfrom cubefs.volume.diskread import disk_tree\n"
            f"with disk_tree(VolumeIndex({env['CUBEFS_VOLUME_DIR']!r}), 'd', 's1', {env['CUBEFS_CACHE_DIR']!r}) as r:\n"
            "    print(r[0], flush=True)\n    time.sleep(300)\n")
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
    try:
        assert reader.stdout is not None
        root = reader.stdout.readline().strip()
        fuse2fs = _fuse2fs_of(root)
    finally:
        reader.kill()  # as a commit killed halfway
        reader.wait()
    mine = [x for x in leftovers(env) if f"-{reader.pid}-" in x]
    assert len(mine) == 3, mine  # the clone, its mount, fuse2fs's mount
    run_cubefs("commit", "d@s1", "--tag", "app:9", env=env, timeout=300)
    assert not [x for x in leftovers(env) if f"-{reader.pid}-" in x] and not os.path.exists(os.path.dirname(root))
    for _ in range(50):
        if not os.path.exists(f"/proc/{fuse2fs}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{fuse2fs}")  # it ended with its mount
