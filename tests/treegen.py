"""A tree with every awkward case an image must carry, and a comparison of two trees.

The comparison records what a user would check with ``os.lstat``,
``os.listxattr``, ``os.readlink`` and the file contents, keyed by path, so
two trees can be compared field by field.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

NS = 1_000_000_000
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep, VFS_CAP_REVISION_2
BIG_SPARSE = 3 * 1024**3


def make_tree(root: Path, big_sparse: bool = True) -> None:
    """Make the awkward tree at ``root`` (which must not exist)."""
    root.mkdir()
    rng = hashlib.sha256(b"cubefs-treegen")

    def data(n: int) -> bytes:
        out = bytearray()
        seed = rng.digest()
        i = 0
        while len(out) < n:
            out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
            i += 1
        return bytes(out[:n])

    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello cubefs\n")
    (root / "random-5m.bin").write_bytes(data(5 * 1024 * 1024 + 123))
    (root / "text.log").write_bytes(b"line of a log file that compresses well\n" * 20000)
    # Hard links: 2 and 3 names, across directories.
    (root / "links").mkdir()
    (root / "links" / "a").write_bytes(b"linked content\n")
    os.link(root / "links" / "a", root / "links" / "b")
    (root / "links" / "sub").mkdir()
    os.link(root / "links" / "a", root / "links" / "sub" / "c")
    (root / "links" / "pair1").write_bytes(data(70000))
    os.link(root / "links" / "pair1", root / "links" / "pair2")
    # Symlinks: relative, dangling, absolute (pointing out of the tree), to a directory.
    os.symlink("small.txt", root / "sym-rel")
    os.symlink("does/not/exist", root / "sym-dangling")
    os.symlink("/etc/passwd", root / "sym-abs")
    os.symlink("links", root / "sym-dir")
    # Special files.
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "chardev", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    # Sparse files: a hole in the middle, and (optionally) a multi-GiB one.
    with open(root / "sparse-small", "wb") as f:
        f.write(b"head" * 1000)
        f.seek(1024 * 1024)
        f.write(b"tail" * 1000)
    if big_sparse:
        with open(root / "sparse-3g", "wb") as f:
            f.seek(1024**3)
            f.write(data(100000))
            f.truncate(BIG_SPARSE)
    # Modes: setuid, setgid, sticky, odd permissions and owners.
    suid = root / "setuid-bin"
    suid.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(suid, 0o4755)
    sgid = root / "setgid-dir"
    sgid.mkdir()
    os.chmod(sgid, 0o2775)
    sticky = root / "sticky-tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    odd = root / "odd-owner"
    odd.write_bytes(b"owned by 1234:5678\n")
    os.chown(odd, 1234, 5678)
    os.chmod(odd, 0o604)
    os.lchown(root / "sym-rel", 4321, 8765)
    # Xattrs: user.*, security.capability, a binary value, one on a directory.
    cap = root / "ping-like"
    cap.write_bytes(b"\x7fELF pretend\n")
    os.setxattr(cap, "security.capability", CAPABILITY)
    os.setxattr(root / "small.txt", "user.mime_type", b"text/plain")
    os.setxattr(root / "small.txt", "user.binary", bytes(range(256)))
    os.setxattr(root / "links", "user.dir-attr", b"on a directory")
    # Names: non-UTF-8, 255 bytes, spaces and newlines, deep paths.
    names = root / "names"
    names.mkdir()
    (names / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"not utf-8\n")
    (names / os.fsdecode(b"\xff\xfe\xfd")).write_bytes(b"raw bytes\n")
    (names / ("n" * 255)).write_bytes(b"longest name\n")
    (names / "with space\nand newline").write_bytes(b"odd\n")
    (names / "ünïcødé-名前").write_bytes(b"unicode\n")
    deep = root / "deep"
    for i in range(60):
        deep = deep / f"level-{i:02d}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_bytes(b"deep down\n")
    # Many identical files: dedup must store their content once.
    same = root / "same"
    same.mkdir()
    blob = data(100_000)
    for i in range(100):
        (same / f"copy-{i:03d}").write_bytes(blob)
    # Exact nanosecond times, set last (children first so directory times stick).
    stamp = 1_700_000_000 * NS + 123_456_789
    for n, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root, topdown=False))):
        for name in [*filenames, *dirnames]:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(stamp + n * NS + 111, stamp + n * NS + 222), follow_symlinks=False)
        os.utime(dirpath, ns=(stamp - NS + 333, stamp - NS + 444), follow_symlinks=False)


def _xattrs(path: bytes) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def snapshot(root: Path, times: tuple[str, ...] = ("mtime", "atime", "ctime"), contents: bool = True) -> dict:  # type: ignore[type-arg]
    """Everything a user sees of ``root``, keyed by relative path (bytes)."""
    base = os.fsencode(root)
    out: dict[bytes, dict[str, object]] = {}
    inode_groups: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted([b"", *dirnames, *filenames]) if dirpath == base else sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            rec: dict[str, object] = {
                "mode": oct(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
                "xattrs": _xattrs(path),
            }
            for t in times:
                rec[t] = getattr(st, f"st_{t}_ns")
            if stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                if contents:
                    rec["sha256"] = _digest(path)
                if st.st_nlink > 1:  # hard-link group: first path that has this inode
                    rec["link_group"] = inode_groups.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(path)
                rec["size"] = st.st_size
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISDIR(st.st_mode):
                rec["entries"] = sorted(os.listdir(path))
            out[rel] = rec
    return out


def diff(expected: dict, actual: dict, limit: int = 20) -> list[str]:  # type: ignore[type-arg]
    """Human-readable differences, at most ``limit`` lines."""
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"missing in mount: {path!r}")
        elif path not in expected:
            problems.append(f"extra in mount: {path!r}")
        else:
            for key in sorted(set(expected[path]) | set(actual[path])):
                e, a = expected[path].get(key), actual[path].get(key)
                if e != a:
                    problems.append(f"{path!r}: {key}: expected {e!r:.100}, got {a!r:.100}")
        if len(problems) >= limit:
            break
    return problems
