"""File operations as a user, in the root: a helper process per user.

The agent forks a helper that chroots into the root and drops to the user's ids;
the agent sends it requests and it answers, passing open file descriptors back
(SCM_RIGHTS) for reads, writes and inotify watches, which the agent then streams
itself.  So the kernel checks every permission as it would for the user's own
programs, symlinks resolve inside the root (never the agent's), and files and
directories it makes belong to the user, without the agent changing its own ids.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import struct

from vmm.guest.users import names

LEN = struct.Struct(">I")

ERRNO_CODES = {errno.ENOENT: "not_found", errno.EEXIST: "already_exists", errno.ENOTEMPTY: "already_exists",
               errno.EACCES: "permission_denied", errno.EPERM: "permission_denied",
               errno.EROFS: "permission_denied", errno.ENOTDIR: "failed_precondition",
               errno.EISDIR: "failed_precondition", errno.ENOSPC: "resource_exhausted",
               errno.EDQUOT: "resource_exhausted", errno.EMFILE: "resource_exhausted",
               errno.EINVAL: "invalid_argument", errno.ENAMETOOLONG: "invalid_argument",
               errno.ELOOP: "invalid_argument", errno.EXDEV: "failed_precondition"}


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def os_error(err: OSError, what: str) -> OpError:
    where = f" {err.filename}" if err.filename else ""
    return OpError(ERRNO_CODES.get(err.errno or 0, "internal"), f"{what}{where}: {err.strerror or err}")


def send_msg(sock: socket.socket, doc: dict, fds: list[int] = ()) -> None:  # type: ignore[assignment,type-arg]
    body = json.dumps(doc).encode()
    data = LEN.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 4)
        if not data:
            raise EOFError
        buf += data
        fds += got
    return buf


def recv_msg(sock: socket.socket) -> tuple[dict, list[int]]:  # type: ignore[type-arg]
    fds: list[int] = []
    (n,) = LEN.unpack(_recv_exact(sock, LEN.size, fds))
    return json.loads(_recv_exact(sock, n, fds)), fds


# -- in the helper (chrooted, as the user) --------------------------------------------

class Helper:
    def __init__(self, home: str) -> None:
        self.home = home
        self.owners: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def path(self, p: str) -> str:
        if not isinstance(p, str) or not p or "\0" in p:
            raise OpError("invalid_argument", f"bad path {p!r}")
        return os.path.normpath(os.path.join(self.home, p))

    def _names(self) -> None:
        self.owners, self.groups = names("/", "passwd"), names("/", "group")

    def entry(self, path: str, st: os.stat_result | None = None) -> dict:  # type: ignore[type-arg]
        st = st or os.lstat(path)
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
        return {"name": os.path.basename(path) or "/", "path": path, "type": kind, "size": st.st_size,
                "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "owner": self.owners.get(st.st_uid, str(st.st_uid)),
                "group": self.groups.get(st.st_gid, str(st.st_gid)), "mtime": st.st_mtime,
                "symlink_target": os.readlink(path) if kind == "symlink" else None}

    def handle(self, req: dict, fds: list[int]) -> tuple[dict, list[int]]:  # type: ignore[type-arg]
        op = req["op"]
        self._names()
        if op == "add_watch":
            return {"wd": _inotify().add(fds[0], self.path(req["path"]))}, []
        path = self.path(req["path"])
        if op == "stat":
            return {"entry": self.entry(path)}, []
        if op == "list":
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise OpError("failed_precondition", f"{path} is not a directory")
            out: list[dict] = []  # type: ignore[type-arg]
            self._walk(path, max(1, int(req.get("depth") or 1)), out)
            return {"entries": out}, []
        if op == "mkdir":
            try:
                os.makedirs(path, 0o755)
                return {"entry": self.entry(path), "created": True}, []
            except FileExistsError:
                if not os.path.isdir(path):
                    raise OpError("already_exists", f"{path} exists and is not a directory") from None
                return {"entry": self.entry(path), "created": False}, []
        if op == "move":
            dst = self.path(req["dst"])
            os.lstat(path)
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            os.rename(path, dst)
            return {"entry": self.entry(dst)}, []
        if op == "remove":
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return {}, []
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return {}, []
        if op == "open_read":
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OpError("failed_precondition", f"{path} is a directory")
            return {"size": st.st_size, "path": path}, [fd]
        if op == "open_write":
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, int(req.get("mode", 0o644)))
            os.fchmod(fd, int(req.get("mode", 0o644)))
            return {"path": path}, [fd]
        if op == "watch":
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise OpError("failed_precondition", f"{path} is not a directory")
            ino = _inotify()
            fd = ino.new()
            wds = {ino.add(fd, path): ""}
            if req.get("recursive"):
                for top, dirs, _files in os.walk(path):
                    for d in dirs:
                        full = os.path.join(top, d)
                        if not os.path.islink(full):
                            wds[ino.add(fd, full)] = os.path.relpath(full, path)
            return {"path": path, "wds": {str(k): v for k, v in wds.items()}}, [fd]
        raise OpError("invalid_argument", f"unknown file operation {op!r}")

    def _walk(self, path: str, depth: int, out: list[dict]) -> None:  # type: ignore[type-arg]
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            try:
                e = self.entry(full)
            except FileNotFoundError:
                continue  # gone while we looked
            out.append(e)
            if e["type"] == "dir" and depth > 1:
                try:
                    self._walk(full, depth - 1, out)
                except PermissionError:
                    pass


class _Inotify:
    IN_MASK = 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # MODIFY ATTRIB MOVED_* CREATE DELETE*

    def __init__(self) -> None:
        import ctypes  # only for watches: the agent starts without it
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.ctypes = ctypes

    def new(self) -> int:
        fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            e = self.ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(fd)

    def add(self, fd: int, path: str) -> int:
        wd = self.libc.inotify_add_watch(fd, os.fsencode(path), self.IN_MASK)
        if wd < 0:
            e = self.ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return int(wd)


_INO: list[_Inotify] = []


def _inotify() -> _Inotify:
    if not _INO:
        _INO.append(_Inotify())
    return _INO[0]


def serve(sock: socket.socket, root: str, uid: int, gid: int, groups: list[int], home: str) -> None:
    """The helper's life: enter the root as the user, answer until the agent hangs up."""
    _inotify()  # ctypes and libc, loaded while the agent's files are still in reach
    os.chroot(root)
    os.chdir("/")
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    os.umask(0o022)
    helper = Helper(home)
    while True:
        try:
            req, fds = recv_msg(sock)
        except (EOFError, OSError):
            return
        out: list[int] = []
        try:
            doc, out = helper.handle(req, fds)
        except OpError as err:
            doc = {"error": {"code": err.code, "message": str(err)}}
        except OSError as err:
            e = os_error(err, str(req.get("op")))
            doc = {"error": {"code": e.code, "message": str(e)}}
        except Exception as err:
            doc = {"error": {"code": "internal", "message": f"{req.get('op')}: {err!r}"}}
        for fd in fds:
            os.close(fd)
        doc["nfds"] = len(out)
        send_msg(sock, doc, out)
        for fd in out:
            os.close(fd)
