"""The cubefs guest agent (docs/vm-agent.md): one single-threaded event loop serving the
host over one byte stream of frames, plus the processes it starts and a file helper
per user.

In a guest it is what the initramfs's /init execs (Debian's python3.11, shipped in
the initramfs by tools/make_vm_kernel.py): it serves the virtio-serial port named
``cubefs.agent`` and runs everything in the root mounted at /newroot, so the image
needs nothing of ours and the root can be unmounted and swapped under it.  In host
mode (``--socket PATH --root DIR``, as root) the same program serves a unix socket
(mode 0600) and runs everything in DIR: fast tests of all above the agent, no VM.

Sessions: the host opens one with a HELLO carrying a fresh nonce.  A HELLO with a
new nonce (a restarted host service, a clone of a template reconnecting) drops the
previous session's streams but keeps its processes, which a new session can attach to.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from vmm.guest import fsops, proto, system, users
from vmm.guest.fsops import OpError
from vmm.guest.loop import Loop
from vmm.guest.procs import Consumer, Proc
from vmm.guest.streams import FileRead, FileWrite, Stream, Tcp, Watch

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HelperCb = Callable[[dict[str, Any], list[int]], None]
RX_PAGE = 4096       # what one virtio-serial receive buffer holds (the driver's PAGE_SIZE buffers)
RX_IOVECS = 64       # receive buffers taken per readv
TX_PIECE = 32 << 10  # the most a virtio-serial port takes per write
TX_IOVECS = 64       # iovecs per writev (IOV_MAX is 1024)


class HelperConn:
    """The agent's end of one user's file helper (vmm/guest/fsops.py)."""

    def __init__(self, agent: Agent, user: users.User) -> None:
        self.agent, self.user = agent, user
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_DFL)
                keep = {0, 1, 2, theirs.fileno()}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        try:
                            os.close(int(name))
                        except OSError:
                            pass
                fsops.serve(theirs, agent.root, user.uid, user.gid, user.groups, user.home)
            except BaseException:
                code = 1
            os._exit(code)
        theirs.close()
        self.pid, self.sock = pid, mine
        self.pending: deque[HelperCb] = deque()
        self.buf = bytearray()
        self.fds: deque[int] = deque()
        agent.loop.reader(mine.fileno(), self.readable)

    def call(self, req: dict[str, Any], cb: HelperCb, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        self.pending.append(cb)
        try:
            fsops.send_msg(self.sock, req, list(fds))
        except OSError:
            self.close()

    def readable(self) -> None:
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            self.close()
            return
        self.buf += data
        while len(self.buf) >= fsops.LEN.size:
            (n,) = fsops.LEN.unpack_from(self.buf)
            if len(self.buf) < fsops.LEN.size + n:
                break
            doc = json.loads(bytes(self.buf[fsops.LEN.size:fsops.LEN.size + n]))
            del self.buf[:fsops.LEN.size + n]
            got = [self.fds.popleft() for _ in range(int(doc.pop("nfds", 0)))]
            cb = self.pending.popleft()
            cb(doc, got)

    def close(self) -> None:
        if self.agent.helpers.get(self.user.name) is self:
            del self.agent.helpers[self.user.name]
        self.agent.loop.forget(self.sock.fileno())
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        while self.pending:
            self.pending.popleft()({"error": {"code": "internal", "message": "the file helper died"}}, [])


class Agent:
    def __init__(self, root: str, listen: str | None) -> None:
        self.root, self.host_mode = root, listen is not None
        self.loop = Loop()
        self.procs: dict[int, Proc] = {}
        self.chans: dict[int, Consumer | Stream] = {}  # streams of this session, by channel
        self.open: set[int] = set()                     # channels of this session still owed an answer
        self.helpers: dict[str, HelperConn] = {}
        self.users: dict[str, tuple[tuple[tuple[int, int, int], ...], users.User]] = {}  # see user()
        self.defaults: dict[str, Any] = {"user": "root", "env": {}, "workdir": None}
        self.nonce: bytes | None = None
        self.parser = proto.Parser()
        self.tx: deque[memoryview] = deque()  # frames' pieces, unwritten: no copies, no shifting
        self.tx_bytes = 0
        rx_buf = bytearray(RX_PAGE * RX_IOVECS)
        self.rx_view = memoryview(rx_buf)
        self.rx_iov = [self.rx_view[i:i + RX_PAGE] for i in range(0, len(rx_buf), RX_PAGE)]
        self.fd: int | None = None  # the host connection (port or accepted socket)
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sigpipe = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # For the instant of a spawn the agent's real uid is the sandbox user's (procs.spawn_in_root),
        # and kill(2) then lets that user's processes signal it.  As the guest's PID 1 it receives
        # only signals it handles: SIGCHLD (a no-op) and Python's SIGINT, whose KeyboardInterrupt
        # would end the agent and panic the guest -- so SIGINT is a no-op too (a handler, not
        # SIG_IGN, which the spawned commands would inherit).  Host mode (tests) is not PID 1.
        signal.signal(signal.SIGINT, lambda *_: None)
        self.loop.reader(r, self._reap)
        if listen is not None:
            if os.path.exists(listen):
                os.unlink(listen)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # only its owner (root) may drive the agent
            try:
                self.listener.bind(listen)
            finally:
                os.umask(old)
            self.listener.listen(4)
            self.listener.setblocking(False)
            self.loop.reader(self.listener.fileno(), self._accept)
        else:
            self.port = system.find_port()
            self.fd = os.open(self.port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._poll_port()

    # -- the host connection -----------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        self._disconnected()
        conn.setblocking(False)
        self.conn, self.fd = conn, conn.fileno()
        self.loop.reader(self.fd, self._readable)

    def _poll_port(self) -> None:
        """A virtio-serial port reads end-of-file while no host is connected: look again soon."""
        assert self.fd is not None
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            self.loop.reader(self.fd, self._readable)  # a host is there
            return
        if data:
            self._received(data)
            self.loop.reader(self.fd, self._readable)
            return
        self.loop.call_later(0.05, self._poll_port)

    def _readable(self) -> None:
        """Read all there is, many port buffers per syscall.

        A virtio-serial port hands out one 4 KiB buffer per ``read``, but it has no
        ``read_iter``, so the kernel serves ``readv`` one read per iovec until one comes
        back short: ``RX_IOVECS`` page-sized iovecs take that many buffers in one
        syscall (a 64 MiB file write: ~400 readv of ~165 KB in ~60 wakeups, not 16,000
        reads).  The bytes go straight from the receive buffer into the frame parser's."""
        assert self.fd is not None
        got = gone = False
        for _ in range(64):
            try:
                n = os.readv(self.fd, self.rx_iov)
            except BlockingIOError:
                break
            except OSError:
                n = 0
            if not n:
                gone = True
                break
            self.parser.add(self.rx_view[:n])
            got = True
            if n < RX_PAGE:  # a short buffer: most likely all there was
                break
        if got:
            self._received(b"")
        if gone:
            self._disconnected()

    def _disconnected(self) -> None:
        """The host went away: its session's streams go (processes stay)."""
        self._end_session()
        self.nonce = None
        self.parser.reset()
        self.tx.clear()
        self.tx_bytes = 0
        if self.fd is None:
            return
        self.loop.forget(self.fd)
        if self.conn is not None:
            self.conn.close()
            self.conn, self.fd = None, None
        else:
            self.loop.call_later(0.05, self._poll_port)

    def send_raw(self, *pieces: bytes) -> None:
        if self.fd is None or self.nonce is None:
            return
        idle = not self.tx
        for p in pieces:
            if p:
                self.tx.append(memoryview(p))
                self.tx_bytes += len(p)
        if idle:
            self._flush()

    def send(self, chan: int, kind: int, payload: bytes = b"") -> None:
        self.send_raw(proto.HEADER.pack(chan, kind, len(payload)), payload)

    def _flush(self) -> None:
        """Write what is queued in as few syscalls as it takes.

        A virtio-serial port takes at most 32 KiB per ``write`` and, lacking
        ``write_iter``, serves ``writev`` one iovec at a time until one is short: so the
        queue goes out as iovecs of at most ``TX_PIECE`` bytes, many per syscall (a
        128 KiB frame was five syscalls; 64 MiB of stdout now takes ~500)."""
        fd = self.fd
        while self.tx and fd is not None:
            iov: list[memoryview] = []
            for piece in self.tx:
                while piece and len(iov) < TX_IOVECS:
                    iov.append(piece[:TX_PIECE])
                    piece = piece[TX_PIECE:]
                if len(iov) >= TX_IOVECS:
                    break
            try:
                n = os.writev(fd, iov)
            except BlockingIOError:
                break
            except OSError:
                self._disconnected()
                return
            self.tx_bytes -= n
            while n:
                head = self.tx[0]
                if n >= len(head):
                    n -= len(head)
                    self.tx.popleft()
                else:
                    self.tx[0] = head[n:]
                    n = 0
        if fd is not None:
            self.loop.writer(fd, self._flush if self.tx else None)

    # -- frames --------------------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        for chan, kind, payload in self.parser.feed(data):
            if kind == proto.HELLO:
                self._hello(payload)
            elif self.nonce is None:
                continue  # frames of a session that is over
            elif kind == proto.REQ:
                self.open.add(chan)
                try:
                    doc, tail = proto.split(payload)
                    self.request(chan, doc, tail)
                except OpError as err:
                    self.reply_error(chan, err.code, str(err))
                except (ValueError, KeyError, TypeError) as err:
                    self.reply_error(chan, "invalid_argument", f"malformed request: {err!r}")
            elif kind == proto.CREDIT and chan in self.chans:
                self.chans[chan].on_credit(struct.unpack(">I", payload)[0])
            elif kind == proto.DATA and chan in self.chans:
                self.chans[chan].on_data(payload)
            elif kind == proto.EOF and chan in self.chans:
                self.chans[chan].on_eof()
            elif kind == proto.CLOSE:
                self.open.discard(chan)
                stream = self.chans.pop(chan, None)
                if stream is not None:
                    stream.on_close()

    def _hello(self, payload: bytes) -> None:
        nonce = payload[len(proto.MAGIC):len(proto.MAGIC) + 16]
        if len(nonce) != 16:
            return
        if nonce != self.nonce:
            self._end_session()
            self.nonce = nonce
        info = {"version": 1, "mode": "host" if self.host_mode else "guest", "processes": len(self.procs)}
        self.send(0, proto.HELLO, proto.MAGIC + nonce + json.dumps(info).encode())

    def _end_session(self) -> None:
        for stream in list(self.chans.values()):
            stream.on_close()
        self.chans.clear()
        self.open.clear()

    def reply(self, chan: int, doc: dict[str, Any], keep: bool = False) -> None:
        if chan in self.open:
            self.send_raw(proto.jframe(chan, proto.REPLY, doc))
            if not keep:
                self.open.discard(chan)

    def reply_error(self, chan: int, code: str, message: str) -> None:
        self.chans.pop(chan, None)
        self.reply(chan, {"error": {"code": code, "message": message}})

    def end(self, chan: int, doc: dict[str, Any]) -> None:
        self.chans.pop(chan, None)
        if chan in self.open:
            self.send_raw(proto.jframe(chan, proto.END, doc))
            self.open.discard(chan)

    def stream(self, chan: int, obj: Consumer | Stream, doc: dict[str, Any]) -> None:
        """Answer ``chan`` and keep it open as a stream (unless the host already gave up on it)."""
        if chan not in self.open:
            obj.on_close()
            return
        self.chans[chan] = obj
        self.reply(chan, doc, keep=True)

    # -- children --------------------------------------------------------------------------
    def _reap(self) -> None:
        try:
            while os.read(self.sigpipe, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.procs:
                self.procs[pid].exited(status)

    # -- users and helpers ------------------------------------------------------------------
    def _users_key(self) -> tuple[tuple[int, int, int], ...]:
        """What the root's user database is now: /etc/passwd's and /etc/group's identity and time."""
        key = []
        for name in ("etc/passwd", "etc/group"):
            try:
                st = os.stat(os.path.join(self.root, name))
                key.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                key.append((0, 0, 0))
        return tuple(key)

    def user(self, name: str | None) -> users.User:
        """The root's user ``name`` (the default user if none), looked up once while /etc/passwd and
        /etc/group stay as they were: reading both on a virtio-fs root for every command cost the
        agent 14-20 ms of guest CPU per spawn under TCG (two stats cost a fraction of it)."""
        name = name or self.defaults["user"]

        def find() -> users.User:
            found = users.lookup(self.root, name)
            if found is None and name == self.defaults["user"]:
                found = users.ensure(self.root, name)
            if found is None:
                raise OpError("invalid_argument", f"no user {name!r} in the root's /etc/passwd")
            return found

        return self._cached_user(name, find)

    def _cached_user(self, name: str, find: Callable[[], users.User]) -> users.User:
        """``name``'s entry as last found while /etc/passwd and /etc/group are unchanged, else
        ``find()``'s (kept under the files' state after it: it may have added the user)."""
        cached = self.users.get(name)
        if cached is not None and cached[0] == self._users_key():
            return cached[1]
        found = find()
        self.users[name] = (self._users_key(), found)
        return found

    def helper_call(self, user: str | users.User | None, req: dict[str, Any], cb: HelperCb,
                    fds: list[int] = ()) -> None:  # type: ignore[assignment]
        u = user if isinstance(user, users.User) else self.user(user)
        h = self.helpers.get(u.name)
        if h is None or (h.user.uid, h.user.gid, h.user.groups) != (u.uid, u.gid, u.groups):
            if h is not None:
                h.close()
            h = self.helpers[u.name] = HelperConn(self, u)
        h.call(req, cb, fds)

    def _forwarded(self, chan: int, user: str | None, req: dict[str, Any]) -> None:
        """A file operation answered by the user's helper as it is."""
        def done(doc: dict[str, Any], _fds: list[int]) -> None:
            if "error" in doc:
                self.reply_error(chan, doc["error"]["code"], doc["error"]["message"])
            else:
                self.reply(chan, doc)

        self.helper_call(user, req, done)

    def stop_helpers(self) -> None:
        """Stop the file helpers (and forget the users: the root is being swapped)."""
        for h in list(self.helpers.values()):
            h.close()
        self.users.clear()

    # -- requests ---------------------------------------------------------------------------
    def request(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        op = doc["op"]
        handler = getattr(self, "op_" + str(op), None)
        if handler is None:
            raise OpError("invalid_argument", f"unknown operation {op!r}")
        out = handler(chan, doc, tail)
        if out is not None:
            self.reply(chan, out)

    def op_ping(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        return {}

    def op_mount(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        self.stop_helpers()
        if not self.host_mode:
            try:
                system.mount(bool(doc.get("read_only", True)), bool(doc.get("disk", False)))
            except system.SystemError_ as err:
                raise OpError("unavailable", str(err)) from None
        return {}

    def op_umount(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        self.stop_helpers()  # they live in the root
        if not self.host_mode:
            try:
                system.umount()
            except system.SystemError_ as err:
                raise OpError("failed_precondition", str(err)) from None
        return {}

    def op_freshen(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        if not self.host_mode:
            now = doc.get("now")
            system.freshen(tail, str(doc["hostname"]), str(doc["machine_id"]),
                           float(now) if isinstance(now, int | float) else None)
        return {}

    def op_set_defaults(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        name = str(doc.get("user") or "user")
        try:  # made if missing; a pooled sandbox's create finds it known (see user())
            user = self._cached_user(name, lambda: users.ensure(self.root, name))
        except users.UserError as err:
            raise OpError("invalid_argument", str(err)) from None
        self.defaults = {"user": user.name, "env": dict(doc.get("env") or {}), "workdir": doc.get("workdir")}
        return {"user": user.name, "uid": user.uid, "home": user.home}

    def op_poweroff(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self.reply(chan, {})
        self._flush()
        if self.host_mode:
            self.loop.running = False
        else:
            system.poweroff()

    def op_processes(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        return {"processes": [p.info() for p in self.procs.values() if p.status is None]}

    def _proc(self, doc: dict[str, Any]) -> Proc:
        if doc.get("pid") is not None:
            p = self.procs.get(int(doc["pid"]))
        else:
            p = next((p for p in self.procs.values() if doc.get("tag") and p.tag == doc["tag"]), None)
        if p is None or (p.status is not None and not p.outputs):
            what = f"pid {doc['pid']}" if doc.get("pid") is not None else f"tag {doc.get('tag')!r}"
            raise OpError("not_found", f"no process with {what} (it ended, or the agent did not start it)")
        return p

    def op_spawn(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        """Start a process.  Without a terminal it is started at once (vfork in the root, its
        working directory entered by the child as the user: procs.spawn_in_root); with one the
        child is forked, and the user's file helper checks the working directory first."""
        argv = [str(a) for a in doc["argv"]]
        if not argv or not argv[0]:
            raise OpError("invalid_argument", "spawn: empty argv")
        user = self.user(doc.get("user"))
        asked = doc.get("cwd") or self.defaults["workdir"]
        cwd = os.path.normpath(os.path.join(user.home, asked)) if asked else user.home
        pty = doc.get("pty")
        if not pty:
            self._spawn(chan, doc, argv, user, cwd, asked)
            return

        def checked(st: dict[str, Any], _fds: list[int]) -> None:
            where = cwd
            if "error" in st or st["entry"]["type"] != "dir":
                if asked:
                    self.reply_error(chan, "not_found" if "error" in st else "failed_precondition",
                                     f"spawn {argv[0]}: working directory {cwd}: "
                                     f"{st['error']['message'] if 'error' in st else 'not a directory'}")
                    return
                where = "/"  # no home: the root's top
            self._spawn(chan, doc, argv, user, where, asked)

        self.helper_call(user, {"op": "stat", "path": cwd}, checked)

    def _spawn(self, chan: int, doc: dict[str, Any], argv: list[str], user: users.User, where: str,
               asked: str | None) -> None:
        pty = doc.get("pty")
        env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name,
               "SHELL": user.shell, **({"TERM": "xterm-256color"} if pty else {}),
               **self.defaults["env"], **{str(k): str(v) for k, v in (doc.get("env") or {}).items()}}
        try:
            proc = Proc(self, argv, env, where, user, (int(pty[0]), int(pty[1])) if pty else None,
                        bool(doc.get("stdin")), doc.get("tag"))
        except OSError as err:
            if err.filename == where and not pty and where != "/":  # the child could not enter it
                if not asked:
                    self._spawn(chan, doc, argv, user, "/", asked)  # no home: the root's top
                    return
                code = ("failed_precondition" if isinstance(err, NotADirectoryError) else
                        "permission_denied" if isinstance(err, PermissionError) else "not_found")
                self.reply_error(chan, code, f"spawn {argv[0]}: working directory {where}: {err.strerror}")
            elif isinstance(err, FileNotFoundError):
                self.reply_error(chan, "not_found", f"spawn: no program {argv[0]!r} in the root (PATH {env['PATH']})")
            elif isinstance(err, PermissionError):
                self.reply_error(chan, "permission_denied", f"spawn {argv[0]}: {err.strerror}")
            else:
                self.reply_error(chan, "internal", f"spawn {argv[0]}: {err}")
            return
        except subprocess.SubprocessError as err:
            self.reply_error(chan, "internal", f"spawn {argv[0]}: {err}")
            return
        self.procs[proc.pid] = proc
        self._consume(chan, proc, doc)

    def _consume(self, chan: int, proc: Proc, doc: dict[str, Any]) -> None:
        c = Consumer(proc, chan, int(doc.get("window") or proto.WINDOW))
        if chan in self.open:
            proc.consumers[chan] = c
        self.stream(chan, c, {"pid": proc.pid, "tag": proc.tag, "pty": proc.pty})
        proc.update()

    def op_attach(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._consume(chan, self._proc(doc), doc)

    def op_input(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._proc(doc).write(tail, chan)  # answered once written

    def op_close_stdin(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        self._proc(doc).close_stdin()
        return {}

    def op_signal(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        self._proc(doc).signal(int(doc["signo"]), bool(doc.get("group")))
        return {}

    def op_resize(self, chan: int, doc: dict[str, Any], tail: bytes) -> dict[str, Any]:
        self._proc(doc).resize(int(doc["cols"]), int(doc["rows"]))
        return {}

    def op_stat(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._forwarded(chan, doc.get("user"), {"op": "stat", "path": doc["path"]})

    def op_list(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._forwarded(chan, doc.get("user"), {"op": "list", "path": doc["path"], "depth": doc.get("depth", 1)})

    def op_mkdir(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._forwarded(chan, doc.get("user"), {"op": "mkdir", "path": doc["path"]})

    def op_move(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._forwarded(chan, doc.get("user"), {"op": "move", "path": doc["src"], "dst": doc["dst"]})

    def op_remove(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        self._forwarded(chan, doc.get("user"), {"op": "remove", "path": doc["path"]})

    def op_read(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        def opened(res: dict[str, Any], fds: list[int]) -> None:
            if "error" in res:
                self.reply_error(chan, res["error"]["code"], res["error"]["message"])
                return
            self.stream(chan, FileRead(self, chan, int(doc.get("window") or proto.WINDOW), fds[0], res["path"]),
                        {"size": res["size"], "path": res["path"]})

        self.helper_call(doc.get("user"), {"op": "open_read", "path": doc["path"]}, opened)

    def op_write(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        user = self.user(doc.get("user"))

        def opened(res: dict[str, Any], fds: list[int]) -> None:
            if "error" in res:
                self.reply_error(chan, res["error"]["code"], res["error"]["message"])
                return
            w = FileWrite(self, chan, fds[0], res["path"], user.name)
            self.stream(chan, w, {"path": res["path"], "window": proto.WINDOW})
            if tail:  # a small file travels in the request
                w.on_data(tail)

        self.helper_call(user, {"op": "open_write", "path": doc["path"], "mode": int(doc.get("mode", 0o644))},
                         opened)

    def op_watch(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        user = self.user(doc.get("user"))

        def opened(res: dict[str, Any], fds: list[int]) -> None:
            if "error" in res:
                self.reply_error(chan, res["error"]["code"], res["error"]["message"])
                return
            wds = {int(k): v for k, v in res["wds"].items()}
            self.stream(chan, Watch(self, chan, int(doc.get("window") or proto.WINDOW), fds[0], res["path"], wds,
                                    bool(doc.get("recursive")), user.name), {"path": res["path"]})

        self.helper_call(user, {"op": "watch", "path": doc["path"], "recursive": bool(doc.get("recursive"))},
                         opened)

    def op_tcp(self, chan: int, doc: dict[str, Any], tail: bytes) -> None:
        try:
            t = Tcp(self, chan, int(doc.get("window") or proto.WINDOW), str(doc.get("host") or "127.0.0.1"),
                    int(doc["port"]))
        except OSError as err:
            raise OpError("unavailable", f"connect to port {doc['port']} in the guest: {err.strerror}") from None
        self.chans[chan] = t  # answered once connected


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cubefs-agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", help="host mode: serve this unix socket instead of the virtio-serial port")
    ap.add_argument("--root", help="host mode: the root to run processes and file operations in")
    args = ap.parse_args(argv)
    if (args.socket is None) != (args.root is None):
        ap.error("--socket and --root go together (host mode)")
    agent = Agent(os.path.abspath(args.root) if args.root else system.NEWROOT, args.socket)
    print("CUBEFS-READY", flush=True)
    agent.loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
