"""A POSIX conformance sweep: the same operations on two directory trees, as a list
of observable outcomes (values and errno names) to compare side by side.

Run it on a cubefs volume and on ext4: every line must match.  What POSIX
leaves to the filesystem is not recorded: directory sizes and st_blocks,
readdir order (listings are sorted), and where SEEK_HOLE finds a hole.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sweep(root: str) -> list[str]:
    out: list[str] = []
    os.chmod(root, 0o755)  # the unprivileged part must be able to enter it
    os.chdir(root)

    def do(label: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except OSError as e:
            out.append(f"{label}: {errno.errorcode.get(e.errno or 0, e.errno)}")
            return None
        out.append(f"{label}: ok {value!r}" if value is not None else f"{label}: ok")
        return value

    def st(path: str, what: str = "mode size nlink") -> str:
        s = os.lstat(path)
        fields = {"mode": oct(s.st_mode), "size": s.st_size if not stat.S_ISDIR(s.st_mode) else "-",
                  "nlink": s.st_nlink, "uid": s.st_uid, "gid": s.st_gid}
        return " ".join(f"{k}={fields[k]}" for k in what.split())

    def rd(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    # creating
    do("create", lambda: os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644)))
    do("create excl existing", lambda: os.open("f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    do("open missing", lambda: os.open("missing", os.O_RDONLY))
    do("open dir for write", lambda: os.open(".", os.O_WRONLY))
    do("open file as dir", lambda: os.open("f", os.O_RDONLY | os.O_DIRECTORY))
    do("mkdir", lambda: os.mkdir("d", 0o755))
    do("mkdir existing", lambda: os.mkdir("d"))
    do("mkdir over file", lambda: os.mkdir("f"))
    do("mkdir in missing", lambda: os.mkdir("nope/x"))
    do("mkdir under file", lambda: os.mkdir("f/x"))
    do("mkdir long name", lambda: os.mkdir("n" * 256))
    do("mkdir 255", lambda: os.mkdir("n" * 255))
    do("st d", lambda: st("d"))
    do("st .", lambda: st("."))
    do("symlink", lambda: os.symlink("f", "s"))
    do("symlink existing", lambda: os.symlink("x", "s"))
    do("readlink", lambda: os.readlink("s"))
    do("readlink file", lambda: os.readlink("f"))
    do("dangling symlink", lambda: os.symlink("/nonexistent/target", "dang"))
    do("stat dangling", lambda: os.stat("dang"))
    do("mkfifo", lambda: os.mkfifo("fifo", 0o600))
    do("st fifo", lambda: st("fifo"))
    do("mknod chr", lambda: os.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    do("rdev", lambda: (os.major(os.lstat("null").st_rdev), os.minor(os.lstat("null").st_rdev)))
    # data
    fd = os.open("f", os.O_RDWR)
    do("write", lambda: os.write(fd, b"hello world"))
    do("pwrite past end", lambda: os.pwrite(fd, b"!", 20))
    do("size", lambda: os.fstat(fd).st_size)
    do("pread hole", lambda: os.pread(fd, 30, 0))
    do("lseek end", lambda: os.lseek(fd, 0, os.SEEK_END))
    do("lseek data past end", lambda: os.lseek(fd, 100, os.SEEK_DATA))
    do("ftruncate shrink", lambda: os.ftruncate(fd, 5))
    do("ftruncate grow", lambda: os.ftruncate(fd, 8))
    do("read after truncates", lambda: os.pread(fd, 20, 0))
    do("fsync", lambda: os.fsync(fd))
    do("fdatasync", lambda: os.fdatasync(fd))
    os.close(fd)
    fd = os.open("f", os.O_WRONLY | os.O_APPEND)
    do("append", lambda: os.write(fd, b"++"))
    do("pwrite with O_APPEND appends (Linux)", lambda: os.pwrite(fd, b"@@", 0))
    os.close(fd)
    do("content", lambda: rd("f"))
    fd = os.open("f", os.O_RDONLY)
    do("write read-only fd", lambda: os.write(fd, b"x"))
    do("ftruncate read-only fd", lambda: os.ftruncate(fd, 0))
    os.close(fd)
    do("truncate path", lambda: os.truncate("f", 3))
    do("truncate dir", lambda: os.truncate("d", 0))
    do("O_TRUNC", lambda: os.close(os.open("f", os.O_WRONLY | os.O_TRUNC)))
    do("size after O_TRUNC", lambda: os.stat("f").st_size)
    do("big sparse write", lambda: (os.truncate("f", 0), _pwrite("f", b"end", 10_000_000))[1])
    do("sparse middle", lambda: _pread("f", 16, 5_000_000))
    do("sparse size", lambda: os.stat("f").st_size)
    do("fallocate keep size", lambda: _fallocate("f", 1, 0, 20_000_000))
    do("size after keep-size fallocate", lambda: os.stat("f").st_size)
    do("fallocate grow", lambda: _fallocate("f", 0, 0, 12_000_000))
    do("size after fallocate", lambda: os.stat("f").st_size)
    do("punch hole", lambda: (_pwrite("f", b"x" * 100, 100), _fallocate("f", 3, 120, 50))[1])
    do("after punch", lambda: _pread("f", 100, 100))
    # links
    do("link", lambda: os.link("f", "f2"))
    do("nlink after link", lambda: st("f", "nlink"))
    do("link existing", lambda: os.link("f", "f2"))
    do("link dir", lambda: os.link("d", "d2"))
    do("link missing", lambda: os.link("missing", "m2"))
    do("unlink link", lambda: os.unlink("f2"))
    do("nlink after unlink", lambda: st("f", "nlink"))
    # renames
    do("mkdir e", lambda: os.mkdir("e"))
    do("file into dir", lambda: os.close(os.open("e/g", os.O_CREAT | os.O_WRONLY, 0o600)))
    do("nlink d, e", lambda: (st("d", "nlink"), st("e", "nlink")))
    do("rename file over file", lambda: (_write("h", b"H"), os.rename("h", "e/g"))[1])
    do("renamed content", lambda: rd("e/g"))
    do("rename file over dir", lambda: os.rename("e/g", "d"))
    do("rename dir over file", lambda: os.rename("d", "e/g"))
    do("rename dir over nonempty dir", lambda: os.rename("d", "e"))
    do("rename dir into itself", lambda: os.rename("e", "e/sub"))
    do("rename dir over empty dir", lambda: (os.mkdir("d3"), os.rename("d3", "d"))[1])
    do("rename dir to other parent", lambda: os.rename("d", "e/d"))
    do("nlink e after move", lambda: st("e", "nlink"))
    do("nlink . after move", lambda: st(".", "nlink"))
    do("rename missing", lambda: os.rename("missing", "x"))
    do("rename to same", lambda: os.rename("f", "f"))
    do("rename hardlink onto itself", lambda: (os.link("f", "f3"), os.rename("f", "f3"))[1])
    do("both names stay", lambda: (os.path.exists("f"), os.path.exists("f3")))
    do("unlink f3", lambda: os.unlink("f3"))
    do("noreplace existing", lambda: renameat2("e/g", "f", RENAME_NOREPLACE))
    do("noreplace free", lambda: renameat2("e/g", "g2", RENAME_NOREPLACE))
    do("exchange", lambda: renameat2("g2", "e", RENAME_EXCHANGE))
    do("after exchange", lambda: (st("g2", "mode"), st("e", "mode")))
    do("exchange back", lambda: renameat2("g2", "e", RENAME_EXCHANGE))
    do("exchange missing", lambda: renameat2("g2", "missing", RENAME_EXCHANGE))
    # removing
    do("unlink dir", lambda: os.unlink("e"))
    do("rmdir file", lambda: os.rmdir("f"))
    do("rmdir nonempty", lambda: os.rmdir("e"))
    do("rmdir missing", lambda: os.rmdir("missing"))
    do("rmdir dot", lambda: os.rmdir("e/d/."))
    do("rmdir empty", lambda: os.rmdir("e/d"))
    do("unlink missing", lambda: os.unlink("missing"))
    do("unlink symlink keeps target", lambda: (os.unlink("s"), os.path.exists("f"))[1])
    # attributes
    do("chmod", lambda: (os.chmod("f", 0o4751), st("f", "mode"))[1])
    do("write clears setuid", lambda: (_pwrite("f", b"z", 0), st("f", "mode"))[1])
    do("chown", lambda: (os.chown("f", 1000, 1000), st("f", "uid gid"))[1])
    do("chown symlink itself", lambda: (os.lchown("dang", 1001, 1001), st("dang", "uid gid"))[1])
    do("utime", lambda: (os.utime("f", ns=(1_000_000_123, 2_000_000_456)),
                         os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns)[1:])
    do("utime before 1970", lambda: (os.utime("f", ns=(-10**9, -2 * 10**9)), os.stat("f").st_mtime_ns)[1])
    before = os.stat("f")
    do("chmod changes ctime not mtime", lambda: (os.chmod("f", 0o600), os.stat("f").st_mtime_ns == before.st_mtime_ns,
                                                  os.stat("f").st_ctime_ns >= before.st_ctime_ns)[1:])
    # xattrs
    do("setxattr", lambda: os.setxattr("f", "user.a", b"1"))
    do("setxattr create existing", lambda: os.setxattr("f", "user.a", b"2", os.XATTR_CREATE))
    do("setxattr replace missing", lambda: os.setxattr("f", "user.b", b"2", os.XATTR_REPLACE))
    do("setxattr replace", lambda: os.setxattr("f", "user.a", b"3", os.XATTR_REPLACE))
    do("getxattr", lambda: os.getxattr("f", "user.a"))
    do("getxattr missing", lambda: os.getxattr("f", "user.zz"))
    do("empty value", lambda: (os.setxattr("f", "user.empty", b""), os.getxattr("f", "user.empty"))[1])
    do("listxattr", lambda: sorted(os.listxattr("f")))
    do("removexattr", lambda: os.removexattr("f", "user.a"))
    do("removexattr missing", lambda: os.removexattr("f", "user.a"))
    do("xattr on dir", lambda: (os.setxattr("e", "user.d", b"dir"), os.getxattr("e", "user.d"))[1])
    # listing
    do("listing", lambda: sorted(os.listdir(".")))
    do("listing e", lambda: sorted(os.listdir("e")))
    do("scandir types", lambda: sorted((e.name, e.is_dir(follow_symlinks=False), e.is_symlink())
                                        for e in os.scandir(".")))
    # as an unprivileged user (in a child, which can drop root for good)
    do("sticky dir", lambda: (os.mkdir("tmp"), os.chmod("tmp", 0o1777), st("tmp", "mode"))[2])
    do("setgid dir", lambda: (os.mkdir("sg"), os.chown("sg", 0, 4321), os.chmod("sg", 0o2775))[0])
    do("file in setgid dir", lambda: (_write("sg/x", b""), st("sg/x", "gid"))[1])
    do("dir in setgid dir", lambda: (os.mkdir("sg/sub"), st("sg/sub", "mode gid"))[1])
    do("root's file in sticky dir", lambda: _write("tmp/roots", b"r"))
    out.extend(_as_user(1000, [
        ("create in root dir", lambda: _write("by-user", b"")),
        ("create in sticky dir", lambda: _write("tmp/mine", b"m")),
        ("unlink other's in sticky dir", lambda: os.unlink("tmp/roots")),
        ("unlink own in sticky dir", lambda: os.unlink("tmp/mine")),
        ("chmod root's file", lambda: os.chmod("f", 0o777)),
        ("read 0600 file", lambda: rd("f")),
        ("chown to self", lambda: os.chown("tmp", 1000, 1000)),
        ("utime root's file", lambda: os.utime("f")),
    ]))
    return out


def _as_user(uid: int, ops: list[tuple[str, Callable[[], Any]]]) -> list[str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            lines = []
            for label, fn in ops:
                try:
                    fn()
                    lines.append(f"user {label}: ok")
                except OSError as e:
                    lines.append(f"user {label}: {errno.errorcode.get(e.errno or 0, e.errno)}")
            os.write(w, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode().splitlines()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _pwrite(path: str, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _pread(path: str, n: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _fallocate(path: str, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)
