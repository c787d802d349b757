"""Processes the agent starts: chrooted into the root, as a user, with pipes or a PTY;
their output streamed to every attached host channel under its credit.

Backpressure: a process's output fd is read only while every attached consumer has
credit left, so a host that stops reading stops the process (its pipe fills) and
nothing piles up in the agent; other processes and streams go on.  With no consumer
attached (all detached, or the host went away) output is read and dropped, as envd
does, so the process never blocks on a host that is not there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
from collections import deque
from typing import TYPE_CHECKING, Any

from vmm.guest import proto
from vmm.guest.fsops import OpError
from vmm.guest.users import User

if TYPE_CHECKING:
    from vmm.guest.agent import Agent

TIOCSWINSZ = 0x5414
TIOCSCTTY = 0x540E
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class RootError(subprocess.SubprocessError):
    """The root could not be entered (not mounted)."""


def spawn_in_root(root: str, user: User, argv: list[str], env: dict[str, str], cwd: str,
                  **fds: Any) -> subprocess.Popen[bytes]:
    """``argv`` started in ``root`` as ``user`` in ``cwd`` by vfork and exec.

    A ``preexec_fn`` (chroot, setuid in the child) makes Python fork: under TCG the fork of the
    agent and the child's Python until exec cost ~20 ms of guest CPU per command (a /bin/true
    from a 14 MB Python: fork 16 + 27 ms parent + child, vfork 7 + 16, in a guest).  So the
    agent itself enters the root and takes the user's ids for the instant of the spawn -- as
    its *real and effective* ids, keeping 0 as the saved ids, so it can take root back --
    and the child, made by vfork, inherits both: its exec makes all its ids the user's (the
    saved ids follow the effective ones), so it holds nothing of root's.  The agent is
    single-threaded: nothing else runs while it is in the root.  Meanwhile the user's processes
    may signal it (its real uid is theirs): as the guest's PID 1 it gets only the signals it
    handles, and those it handles do nothing (``Agent.__init__``).  The working directory is
    entered in the child as the user (as envd's Go does: chdir after setuid), so a missing
    one fails the spawn with an OSError whose filename is ``cwd``."""
    top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    groups = os.getgroups()
    try:
        try:
            os.chroot(root)
        except OSError as err:
            raise RootError(f"cannot enter the root {root}: {err.strerror}") from None
        try:
            os.setgroups(user.groups)
            os.setresgid(user.gid, user.gid, 0)
            os.setresuid(user.uid, user.uid, 0)
            return subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True, **fds)
        finally:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)
            os.setgroups(groups)
    finally:
        os.fchdir(top)
        os.chroot(".")
        os.fchdir(here)
        os.close(top)
        os.close(here)


class Consumer:
    """One host channel receiving a process's output."""

    def __init__(self, proc: Proc, chan: int, credit: int) -> None:
        self.proc, self.chan, self.credit = proc, chan, credit

    def on_credit(self, n: int) -> None:
        self.credit += n
        self.proc.update()

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        self.proc.consumers.pop(self.chan, None)
        self.proc.update()


class Proc:
    def __init__(self, agent: Agent, argv: list[str], env: dict[str, str], cwd: str, user: User,
                 pty: tuple[int, int] | None, stdin: bool, tag: str | None) -> None:
        self.agent, self.loop = agent, agent.loop
        self.argv, self.env, self.cwd, self.user, self.tag = argv, env, cwd, user, tag
        self.pty = pty is not None
        self.consumers: dict[int, Consumer] = {}
        self.outputs: dict[int, int] = {}  # fd -> frame type
        self.stdin_fd: int | None = None
        self.inbox: deque[tuple[memoryview, int]] = deque()  # (data, request channel) to write
        self.close_stdin_after = False
        self.status: int | None = None
        root = agent.root

        def enter() -> None:  # in the child, before exec: into the root, as the user
            os.chroot(root)
            os.chdir(cwd)
            if self.pty:
                fcntl.ioctl(0, TIOCSCTTY, 0)
            os.setgroups(user.groups)
            os.setgid(user.gid)
            os.setuid(user.uid)

        if pty is not None:  # a controlling terminal needs code in the child: a fork
            master, slave = os.openpty()
            set_winsize(master, *pty)
            try:
                self.popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                              preexec_fn=enter, start_new_session=True)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            self.outputs[master] = proto.DATA
            self.stdin_fd = master
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            try:  # a bigger pipe: fewer, larger reads of a chatty process (what the agent pays per read under TCG)
                fcntl.fcntl(out_r, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (subprocess.DEVNULL, -1)
            try:
                self.popen = spawn_in_root(root, user, argv, env, cwd, stdin=in_r, stdout=out_w, stderr=err_w)
            except BaseException:
                for fd in (out_r, err_r, in_w):
                    if fd >= 0:
                        os.close(fd)
                raise
            finally:
                for fd in (out_w, err_w, in_r):
                    if fd >= 0:
                        os.close(fd)
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.set_blocking(fd, False)
            self.outputs = {out_r: proto.DATA, err_r: proto.DATA2}
            self.stdin_fd = in_w if stdin else None
        self.pid = self.popen.pid

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "tag": self.tag, "argv": self.argv, "env": self.env, "cwd": self.cwd,
                "pty": self.pty, "user": self.user.name}

    # -- output --------------------------------------------------------------------
    def allowance(self) -> int:
        if not self.consumers:
            return proto.CHUNK
        return min(proto.CHUNK, *(c.credit for c in self.consumers.values()))

    def update(self) -> None:
        """Read the outputs while every consumer has credit; finish once all is read."""
        ok = self.allowance() > 0
        for fd in list(self.outputs):
            self.loop.reader(fd, (lambda fd=fd: self._readable(fd)) if ok else None)
            if ok and self.status is not None:
                self.loop.call_soon(lambda fd=fd: self._readable(fd))
        self._maybe_end()

    def _readable(self, fd: int) -> None:
        if fd not in self.outputs:
            return
        n = self.allowance()
        if n <= 0:
            self.update()
            return
        try:
            data = os.read(fd, n)
        except BlockingIOError:
            if self.status is not None:  # exited, and nothing more is there: a grandchild may hold it open
                self._close_output(fd)
            return
        except OSError as err:  # EIO: a PTY whose other side is gone
            if err.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._close_output(fd)
            return
        kind = self.outputs[fd]
        for c in list(self.consumers.values()):
            c.credit -= len(data)
            self.agent.send(c.chan, kind, data)
        if self.allowance() <= 0:
            self.update()
        elif self.status is not None:
            self.loop.call_soon(lambda: self._readable(fd))

    def _close_output(self, fd: int) -> None:
        self.loop.forget(fd)
        del self.outputs[fd]
        if fd == self.stdin_fd:
            self.stdin_fd = None
            self._fail_inbox("the process's terminal closed")
        os.close(fd)
        self._maybe_end()

    def exited(self, status: int) -> None:
        self.status = status
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.update()

    def end_doc(self) -> dict[str, Any]:
        assert self.status is not None
        if os.WIFSIGNALED(self.status):
            return {"exit_code": -1, "signal": os.WTERMSIG(self.status)}
        return {"exit_code": os.WEXITSTATUS(self.status), "signal": None}

    def _maybe_end(self) -> None:
        if self.status is None or self.outputs or self.pid not in self.agent.procs:
            return
        end = self.end_doc()
        for c in list(self.consumers.values()):
            self.agent.end(c.chan, end)
        self.consumers.clear()
        self._close_stdin()
        self._fail_inbox("the process ended")
        del self.agent.procs[self.pid]

    # -- input ---------------------------------------------------------------------
    def write(self, data: bytes, chan: int) -> None:
        if self.stdin_fd is None or self.close_stdin_after:
            raise OpError("failed_precondition", f"process {self.pid} has no open stdin "
                                                 "(start it with stdin=True or a pty)")
        self.inbox.append((memoryview(data), chan))
        self.loop.writer(self.stdin_fd, self._writable)

    def close_stdin(self) -> None:
        if self.pty:
            return  # a terminal's input ends with ^D, which is the caller's to send
        self.close_stdin_after = True
        if not self.inbox:
            self._close_stdin()

    def _writable(self) -> None:
        fd = self.stdin_fd
        while self.inbox and fd is not None:
            data, chan = self.inbox[0]
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                return
            except OSError as err:  # EPIPE: it closed its stdin
                self.agent.reply_error(chan, "failed_precondition", f"process {self.pid}: stdin: {err.strerror}")
                self.inbox.popleft()
                continue
            if n == len(data):
                self.inbox.popleft()
                self.agent.reply(chan, {})
            else:
                self.inbox[0] = (data[n:], chan)
        if fd is not None:
            self.loop.writer(fd, None)
        if self.close_stdin_after:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None and not self.pty:
            self.loop.forget(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def _fail_inbox(self, why: str) -> None:
        while self.inbox:
            _data, chan = self.inbox.popleft()
            self.agent.reply_error(chan, "failed_precondition", f"process {self.pid}: {why}")

    # -- control -------------------------------------------------------------------
    def signal(self, signo: int, group: bool = False) -> None:
        try:
            if group:
                os.killpg(self.pid, signo)
            else:
                os.kill(self.pid, signo)
        except ProcessLookupError:
            pass  # exited, not yet reaped: its end is on its way
        except ValueError as err:
            raise OpError("invalid_argument", f"signal {signo}: {err}") from None

    def resize(self, cols: int, rows: int) -> None:
        if not self.pty or self.stdin_fd is None:
            raise OpError("failed_precondition", f"process {self.pid} has no terminal")
        set_winsize(self.stdin_fd, cols, rows)  # the kernel sends SIGWINCH to its foreground group
