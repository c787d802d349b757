"""Starting mount daemons: forked by ``cubefs mount`` itself, or by a warm mount server.

A mount daemon is one process per mount (a crash or a hung store costs one
mount, and pyfuse3, when chosen, keeps one FUSE session per process).
Starting one costs an interpreter start-up and the imports of trio and the
store client, ~0.5 s of a cold start that is only ~1 s in all.  So there are two ways to get one:

* **Local fork** (always works): ``cubefs mount`` forks; the child becomes the
  daemon; the parent waits on a pipe for ``ready`` or ``error CODE MESSAGE``.
* **Mount server** (``cubefs serve``): a long-running process that imported
  everything once and forks a daemon per request.  ``cubefs mount`` sends its
  arguments, working directory and store-related environment over a unix
  socket; the forked daemon answers on that same connection.  When no server
  answers, ``cubefs mount`` starts one (detached, exiting after
  ``AUTO_IDLE_EXIT`` seconds without requests) and mounts through it, the way
  Bazel or Gradle keep a warm server: the first mount on a node pays the
  start-up, every later one skips it.

A server only serves clients of the same code: each request carries a
fingerprint of the installed package (its version and the size and mtime of
every module), and a server that sees another answers ``stale`` and exits, so
an upgrade never mounts through the old code.  One server per socket: it holds
an exclusive ``flock`` on ``SOCKET.lock`` for its lifetime (daemons it forks
close their copy), so two mounts racing to start one end up sharing one.

Both fork from a process that runs no threads (the server runs no event loop
either), which is what makes ``fork`` safe here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cubefs.errors import EXIT_ERROR, EXIT_OK, CubefsError
from cubefs.node import control

if TYPE_CHECKING:  # the server's parts: imported where the server runs, never by a client
    # (``cubefs mount`` imports this module: roots and supervise were ~14 ms of its cold start)
    from cubefs.node import roots
    from cubefs.node.prepared import Prepared
    from cubefs.node.spare import Spares
    from cubefs.node.supervise import Supervised

log = logging.getLogger("cubefs")

READY_TIMEOUT = 300.0
AUTO_IDLE_EXIT = 900.0  # seconds an auto-started server waits for a request before it exits
SERVER_START_TIMEOUT = 30.0
# What a mount inherits from the caller's environment when a server forks it.
_ENV_PREFIXES = ("AWS_", "CUBEFS_", "XDG_")
_ENV_NAMES = ("HOME",)


def default_server_socket() -> str:
    return os.environ.get("CUBEFS_SERVER") or os.path.join(control.run_dir(), "serve.sock")


def code_fingerprint() -> str:
    """Identify the installed code cheaply (stat calls, no reads): ~1 ms."""
    import hashlib

    import cubefs

    root = os.path.dirname(os.path.abspath(cubefs.__file__))
    h = hashlib.sha256(cubefs.__version__.encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.relpath(dirpath, root)}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@functools.cache
def _running_fingerprint() -> str:
    """The fingerprint of the code a long-running caller (the sandbox service) runs: taken
    once, at its first mount.  Its modules are the ones it imported then, so after an
    upgrade it is an older client, which is what the server then sees.  A mount from such
    a process paid ~5 ms a time for the stat calls after the node's caches were dropped."""
    return code_fingerprint()


def auto_server_wanted(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_server", False) and os.environ.get("CUBEFS_NO_SERVER", "") in ("", "0")


def _notifier(fd: int) -> Callable[[str], None]:
    def notify(msg: str) -> None:
        try:
            os.write(fd, (msg + "\n").encode())
            os.close(fd)
        except OSError:
            pass

    return notify


def serve_mount(args: argparse.Namespace, mp: str, cache_dir: str, notify: Callable[[str], None] | None,
                supervision: dict[str, Any] | None = None, prepared: Prepared | None = None) -> int:
    """Run the daemon in this process; errors before 'ready' also go to ``notify``.
    ``supervision``: the mount server's link (``fd``) and, for a replacement, ``resume``;
    ``prepared``: what a spare opened ahead (cubefs.node.spare)."""
    from cubefs.node.mount import MountOptions, run_daemon

    opts = MountOptions.from_args(args, mp, cache_dir, supervision)
    try:
        return run_daemon(opts, notify, prepared)
    except CubefsError as err:
        if notify:
            notify(f"error {err.exit_code} {err}")
        raise
    except Exception as err:
        if notify:
            notify(f"error {EXIT_ERROR} {type(err).__name__}: {err}")
        raise


def _log_path(cache_dir: str, mp: str) -> str:
    logs = os.path.join(cache_dir, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    os.chmod(logs, 0o700)  # logs name images and paths: private, also where an older version made it 0755
    return os.path.join(logs, f"mount-{control.mount_key(mp)}.log")


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(65536, os.sysconf("SC_OPEN_MAX")))


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.debug("descriptor limit left at %d: %s", soft, err)


def _become_daemon(args: argparse.Namespace, mp: str, cache_dir: str, notify_fd: int,
                   supervision: dict[str, Any] | None = None) -> int:
    """In a freshly forked child: own session, stdio to the log, serve until unmounted.
    ``notify_fd`` -1: nobody waits for the report (a replacement the server started)."""
    from cubefs.humanize import setup_logging

    os.setsid()
    # Keep nothing the caller had open (pipes a CI step may wait on for EOF) but the report
    # fd, the mount server's link and (a replacement) the mount's /dev/fuse.
    sup = supervision or {}
    _close_all_but({notify_fd, int(sup.get("fd", -1)), int((sup.get("resume") or {}).get("fd", -1))})
    _stdio_to(_log_path(cache_dir, mp))
    setup_logging(args.verbose, daemon=True)
    return _serve_logged(args, mp, cache_dir, notify_fd, supervision)


def _stdio_to(log_path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    logfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(devnull)
    os.close(logfd)


def _serve_logged(args: argparse.Namespace, mp: str, cache_dir: str, notify_fd: int,
                  supervision: dict[str, Any] | None, prepared: Prepared | None = None) -> int:
    try:
        return serve_mount(args, mp, cache_dir, _notifier(notify_fd) if notify_fd >= 0 else None, supervision,
                           prepared)
    except CubefsError as err:
        log.error("%s", err)
        return err.exit_code
    except BaseException:
        log.exception("mount daemon failed")
        return EXIT_ERROR


def _fork_daemon(args: argparse.Namespace, mp: str, cache_dir: str, notify_fd: int) -> int:
    """Fork; the child never returns.  Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = EXIT_ERROR
        try:
            code = _become_daemon(args, mp, cache_dir, notify_fd)
        finally:
            os._exit(code)
    return pid


def _await_ready(fd: int, alive: Callable[[], bool]) -> str:
    """Read the daemon's one-line report from ``fd``; '' if it died without one."""
    msg = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            msg += data
            if msg.endswith(b"\n"):
                break
        elif not alive():
            break
    return msg.decode(errors="replace").strip()


def _report(text: str, args: argparse.Namespace, mp: str, log_path: str, how: str) -> int:
    if text == "ready":
        log.info("mounted %s at %s (%s, log %s)", args.ref, mp, how, log_path)
        return EXIT_OK
    if text.startswith("error "):
        _, code, message = text.split(" ", 2)
        print(f"cubefs: {message}", file=sys.stderr)
        return int(code)
    print(f"cubefs: mount daemon exited before the mount was live; see {log_path}", file=sys.stderr)
    return EXIT_ERROR


def start_mount(args: argparse.Namespace, mp: str, cache_dir: str) -> int:
    """Start a detached daemon for ``args`` and return once the mount is live."""
    log_path = _log_path(cache_dir, mp)
    server = default_server_socket()
    if auto_server_wanted(args):
        fingerprint = code_fingerprint()
        text = _via_server(server, args, mp, cache_dir, fingerprint)
        if text in (None, "stale"):
            log.info("no mount server of this version on %s; starting one", server)
            if _start_server(server):
                text = _via_server(server, args, mp, cache_dir, fingerprint)
        if text not in (None, "stale"):
            return _report(text, args, mp, log_path, f"daemon forked by the mount server {server}")
        log.info("mount server %s does not answer; starting a daemon here", server)
    if getattr(args, "shared", False):  # --no-server and --foreground are refused with --shared
        log.warning("no mount server answers on %s: %s is served by a daemon of its own, not shared", server, mp)
    r, w = os.pipe()
    pid = _fork_daemon(args, mp, cache_dir, w)
    os.close(w)

    def alive() -> bool:
        return os.waitpid(pid, os.WNOHANG)[0] == 0

    text = _await_ready(r, alive)
    os.close(r)
    if text != "ready":
        try:  # reap the child (it exits after reporting an error) or kill a silent one
            os.waitpid(pid, 0) if text.startswith("error ") else os.kill(pid, signal.SIGKILL)
        except (ChildProcessError, ProcessLookupError):
            pass
    return _report(text, args, mp, log_path, f"daemon pid {pid}")


def mount_via_server(args: argparse.Namespace, mp: str, cache_dir: str) -> str | None:
    """The daemon's one-line report ("ready", "error CODE MESSAGE", or '' if it died) when the
    node's mount server (running this code) forked it; None if no such server answers."""
    text = _via_server(default_server_socket(), args, mp, cache_dir, _running_fingerprint())
    return None if text in (None, "stale") else text


def log_path_for(cache_dir: str, mp: str) -> str:
    return _log_path(cache_dir, mp)


def _start_server(path: str) -> bool:
    """Start a detached ``cubefs serve`` on ``path``; True once it accepts connections.

    Exec'd, not forked from here: the server must be a process of its own
    (own session, stdio to its log), and exec gives it a clean interpreter.
    """
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    log_path = path + ".log"
    pid = os.fork()
    if pid == 0:  # double fork: the server is nobody's child but init's
        try:
            os.setsid()
            if os.fork() == 0:
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.closerange(3, 65536)
                os.execv(sys.executable, [sys.executable, "-m", "cubefs", "serve", "--socket", path,
                                          "--idle-exit", str(AUTO_IDLE_EXIT)])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return True
        except OSError:
            time.sleep(0.01)
        finally:
            probe.close()
    log.warning("the mount server did not start in %.0f s; see %s", SERVER_START_TIMEOUT, log_path)
    return False


def _via_server(path: str, args: argparse.Namespace, mp: str, cache_dir: str, fingerprint: str) -> str | None:
    """Ask the mount server to fork the daemon; None if no server answers, 'stale' if it runs other code."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    request = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "mountpoint": mp,
               "cache_dir": cache_dir, "cwd": os.getcwd(), "env": env, "fingerprint": fingerprint}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
    except OSError:
        sock.close()
        return None
    try:
        return _await_ready(sock.fileno(), lambda: True)
    except (ConnectionResetError, BrokenPipeError):
        # the server was replaced under us (an upgrade in place execs it, and a connection it
        # had accepted dies with the old image): as if none answered, so the caller tries again
        return None
    finally:
        sock.close()


def run_mount_server(path: str, idle_exit: float | None = None) -> int:
    """Serve mount requests on ``path`` until SIGTERM/SIGINT, a stale client, or ``idle_exit`` seconds idle
    (never while it keeps mounts alive: see cubefs.node.supervise)."""
    fingerprint = code_fingerprint()  # before the imports: what the rest of this process will run
    # Everything a daemon imports, imported once here: a daemon forked after the node's caches
    # were dropped otherwise reads each module it lacks from disk (strace of a remount: these).
    import concurrent.futures.thread  # noqa: F401

    import lmdb._envid  # noqa: F401

    import cubefs.fuse.kernel
    import cubefs.image.autotrace
    import cubefs.image.catalog
    import cubefs.node.minihttp
    import cubefs.node.mount
    import cubefs.remote.local
    import cubefs.remote.s3
    from cubefs.node import roots, supervise

    # Before any thread runs: the daemons forked from here inherit this process's malloc arenas,
    # and a thread's that ran here would be handed to their threads (cubefs.fuse.kernel.keep_freed_heap).
    cubefs.fuse.kernel.keep_freed_heap()

    inherited = supervise.inherited_state()  # set when this process is an upgrade exec'd in place
    if inherited is None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _take_server_lock(lock_fd, path, wait=idle_exit is None):
            log.info("another mount server holds %s.lock; leaving it be", path)
            return EXIT_OK
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)  # who serves: for 'kill', tests and humans
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        os.chmod(path, 0o600)  # whoever can connect can mount as this user
        srv.listen(64)
        mounts: dict[int, Supervised] = {}  # by the fileno of the link to the daemon
        upgrade = supervise.Upgrade([], None)
    else:
        srv, lock_fd, mounts, upgrade = inherited
        log.info("mount server upgraded in place: replacing %d mount daemons one by one", len(upgrade.todo))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # daemons are reaped by the kernel
    _raise_fd_limit()  # it keeps two descriptors per mount
    from cubefs.node import spare

    spares = spare.Spares()  # daemons kept ready for the next mount of an image mounted here
    spare.rehearse(os.path.dirname(path))  # no thread outlives it: forking stays safe
    stopping = False

    def stop(*_a: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("mount server listening on %s (pid %d, code %s)", path, os.getpid(), fingerprint)
    idle_since = time.monotonic()
    hosts: dict[str, roots.HostLink] = {}  # root hosts of --shared mounts, by key (cubefs.node.roots)
    host_idle = roots.host_idle_exit()
    while not stopping:
        upgrade.step(mounts)
        roots.retire_idle(hosts, host_idle)
        next_spare = spares.step(lambda req: _spawn_spare(req, srv, lock_fd))
        # poll, not select: a node's hundreds of mounts hold descriptors past select's 1024
        poller = select.poll()
        links = {h.sock.fileno(): h for h in hosts.values()}
        kept = spares.fds()
        for fd in (srv.fileno(), *mounts, *links, *kept):
            poller.register(fd, select.POLLIN)
        try:
            ready = {fd for fd, _ev in poller.poll(max(1, min(500, int(next_spare * 1000) + 1)))}
        except InterruptedError:
            continue
        for fd in [f for f in links if f in ready]:  # before any new mount: a dead host takes none
            roots.host_said(hosts, links[fd])
        for fd in [f for f in kept if f in ready]:
            spares.heard(kept[fd])
        for key in [k for k in mounts if k in ready]:
            m = mounts.pop(key)
            if m.receive():
                mounts[key] = m
                continue
            successor = _daemon_gone(m, mounts, srv, lock_fd)
            upgrade.replaced(m, successor)
        if srv.fileno() not in ready:
            if idle_exit is not None and not mounts and not hosts and time.monotonic() - idle_since > idle_exit:
                log.info("no mount request for %.0f s; exiting", idle_exit)
                break
            continue
        idle_since = time.monotonic()
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        try:
            request = _read_request(conn)
        except (OSError, ValueError) as err:
            log.warning("bad mount request: %s", err)
            conn.close()
            continue
        if request is None:  # a client checking that we are up
            conn.close()
            continue
        if request.get("upgrade"):
            log.info("asked to upgrade: running the installed code in place of %s", fingerprint)
            supervise.exec_upgrade(path, idle_exit, srv, lock_fd, mounts, conn)  # returns only if exec failed
            conn.sendall(b"error cannot exec the new code; see the server's log\n")
            conn.close()
            continue
        if request.get("stop") or request.get("fingerprint") != fingerprint:
            why = "asked to stop" if request.get("stop") else f"a client runs other code ({request.get('fingerprint')})"
            conn.sendall(b"stale\n")
            conn.close()
            if mounts and not request.get("stop"):
                if code_fingerprint() != fingerprint:  # the installed code changed: become it, keep the mounts
                    log.info("%s; upgrading in place, keeping %d mounts", why, len(mounts))
                    supervise.exec_upgrade(path, idle_exit, srv, lock_fd, mounts, None)
                continue  # an older client: it mounts without us
            log.info("%s; exiting so that a current server takes over", why)
            break
        if roots.wants_host(request["args"]):
            _to_host(request, conn, hosts, srv, lock_fd)
            continue
        m = _mount(request, conn, mounts, spares, srv, lock_fd)
        conn.close()
    spares.close()  # each exits when its link closes
    for h in hosts.values():  # root hosts too; each exits after its last mount
        h.sock.close()
    for m in mounts.values():  # the daemons go on serving, unsupervised
        m.sock.close()
        if m.fuse_fd >= 0:
            os.close(m.fuse_fd)
    srv.close()
    try:  # ours to remove: nobody else binds it while we hold the lock
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(lock_fd)
    return EXIT_OK


def upgrade_server(path: str) -> int:
    """``cubefs serve --upgrade``: the running server execs the installed code and replaces
    every mount daemon with one of it, one at a time; returns once all are replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(b'{"upgrade": true, "args": {}, "mountpoint": ""}\n')
    except OSError as err:
        sock.close()
        raise CubefsError(f"no mount server answers on {path}: {err.strerror}") from None
    try:
        text = _await_ready(sock.fileno(), lambda: True)
    finally:
        sock.close()
    if not text.startswith("upgraded "):
        raise CubefsError(f"the mount server on {path} did not upgrade: {text or 'no answer'}")
    print(f"mount server on {path} runs this code; {text.split()[1]} mount daemons replaced")
    return EXIT_OK


def _mount(request: dict[str, Any], conn: socket.socket, mounts: dict[int, Supervised], spares: Spares,
           srv: socket.socket, lock_fd: int) -> Supervised:
    """A daemon for ``request``: the spare kept ready for it if there is one, else forked now;
    either way a spare for the next such mount is due (cubefs.node.spare)."""
    from cubefs.node.spare import request_key
    from cubefs.node.supervise import Supervised

    key = request_key(request)
    kept = spares.take(key)
    how = ""
    if kept is not None and spares.hand(kept, {**request, "accepted": time.monotonic()}, conn):
        m = Supervised(request, kept.sock, kept.pid)
        mounts[kept.sock.fileno()] = m
        how = " (a daemon kept ready)"
    else:
        m = _spawn(request, conn, mounts, srv, lock_fd)
    spares.want(key, request, lambda: m.image)
    log.info("forked mount daemon %d for %s at %s%s", m.pid, request["args"].get("ref"), request["mountpoint"], how)
    return m


def _spawn_spare(request: dict[str, Any], srv: socket.socket, lock_fd: int) -> tuple[socket.socket, int]:
    """Fork a spare for mounts like ``request``; its end of the link and its pid."""
    return _fork_linked(srv, lock_fd, lambda link_fd: _become_spare(request, link_fd))


def _fork_linked(srv: socket.socket, lock_fd: int, child: Callable[[int], int]) -> tuple[socket.socket, int]:
    """Fork a child of this server with a link back (a SEQPACKET socket pair): in the child,
    ``child(its end's fd)`` is its exit code; here, our end and the child's pid."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = EXIT_ERROR
        try:
            srv.close()
            os.close(lock_fd)  # the lock is the server's alone; a child must not keep it past the server
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            ours.close()
            code = child(theirs.detach())
        finally:
            os._exit(code)
    theirs.close()
    return ours, pid


def _become_spare(request: dict[str, Any], link_fd: int) -> int:
    """In the spare: prepare, wait for a request, then be its daemon (cubefs.node.spare).
    Its log is the server's until a request names the mount's."""
    from cubefs.humanize import setup_logging
    from cubefs.node import spare

    os.setsid()
    _close_all_but({link_fd})
    _adopt_client(request)
    setup_logging(int(request["args"].get("verbose") or 0), daemon=True)
    try:
        with spare.prepare(request, link_fd) as prepared:
            got = spare.wait_for_request(link_fd, prepared)
            if got is None:
                return EXIT_OK
            req, notify_fd = got  # its env and cwd are the spare's own (request_key holds them)
            _stdio_to(_log_path(req["cache_dir"], req["mountpoint"]))
            supervision = {"fd": link_fd, "resume": None, "accepted": req.get("accepted")}
            return _serve_logged(argparse.Namespace(**req["args"]), req["mountpoint"], req["cache_dir"], notify_fd,
                                 supervision, prepared)
    except BaseException:
        log.exception("spare for %s failed", request["args"].get("ref"))
        return EXIT_ERROR


def _spawn(request: dict[str, Any], conn: socket.socket | None, mounts: dict[int, Supervised],
           srv: socket.socket, lock_fd: int, resume: dict[str, Any] | None = None) -> Supervised:
    """Fork a daemon for ``request`` (answering on ``conn``, if a client waits) with a
    link back to this server; a replacement gets ``resume`` (see cubefs.node.supervise)."""
    accepted = time.monotonic()

    def child(link_fd: int) -> int:
        notify_fd = conn.detach() if conn is not None else -1
        return _server_child(request, notify_fd, {"fd": link_fd, "resume": resume, "accepted": accepted})

    ours, pid = _fork_linked(srv, lock_fd, child)
    from cubefs.node.supervise import Supervised

    m = Supervised(request, ours, pid)
    mounts[ours.fileno()] = m
    return m


def _to_host(request: dict[str, Any], conn: socket.socket, hosts: dict[str, roots.HostLink],
             srv: socket.socket, lock_fd: int) -> None:
    """A --shared mount: to the root host of its image, which answers the client on ``conn``."""
    from cubefs.node import roots

    def spawn(key: str, image: dict[str, Any]) -> roots.HostLink:
        return _spawn_host(request, key, image, srv, lock_fd)

    try:
        host = roots.send_mount(hosts, request, conn, spawn)
        log.info("mount of volume %s at %s sent to root host %d (%d mounts)", request["args"].get("volume"),
                 request["mountpoint"], host.pid, len(host.mounts))
    except CubefsError as err:
        with contextlib.suppress(OSError):
            conn.sendall(f"error {err.exit_code} {err}\n".encode())
    except Exception as err:  # a broken volume index, say: this request fails, the server goes on
        log.exception("cannot send the mount at %s to a root host", request["mountpoint"])
        with contextlib.suppress(OSError):
            conn.sendall(f"error {EXIT_ERROR} {type(err).__name__}: {err}\n".encode())
    finally:
        conn.close()


def _spawn_host(request: dict[str, Any], key: str, image: dict[str, Any], srv: socket.socket,
                lock_fd: int) -> roots.HostLink:
    """Fork the root host for ``key`` (see cubefs.node.roots); the request is sent to it after."""
    from cubefs.node import roots

    ours, pid = _fork_linked(srv, lock_fd, lambda link_fd: _become_host(request, link_fd, key, image))
    ours.setblocking(False)  # the server never waits on a host (see roots._send)
    label = f"{image.get('ref', 'empty volumes')} in {request['args'].get('volume_dir')}"
    log.info("forked root host %d for %s (key %s)", pid, label, key)
    return roots.HostLink(key, pid, ours, label)


def _become_host(request: dict[str, Any], link_fd: int, key: str, image: dict[str, Any]) -> int:
    from cubefs.humanize import setup_logging
    from cubefs.node import roots

    os.setsid()
    _close_all_but({link_fd})
    _stdio_to(roots.log_path(request["cache_dir"], key))
    _adopt_client(request)
    setup_logging(int(request["args"].get("verbose") or 0), daemon=True)
    try:
        return roots.host_main(request, link_fd, key, image)
    except CubefsError as err:
        log.error("%s", err)
        return err.exit_code
    except BaseException:
        log.exception("root host failed")
        return EXIT_ERROR


def _daemon_gone(m: Supervised, mounts: dict[int, Supervised], srv: socket.socket,
                 lock_fd: int) -> Supervised | None:
    """The daemon of ``m`` exited: done if it unmounted, else a replacement on the same
    /dev/fuse descriptor (see cubefs.node.supervise)."""
    m.sock.close()
    why_not = m.replacement_allowed()
    if why_not:
        if m.outcome != "unmounted" and m.fuse_fd >= 0:
            log.error("mount daemon %d of %s exited; not replacing it: %s", m.pid, m.mountpoint, why_not)
        m.close()
        return None
    how = "handed over" if m.outcome == "handover" else "died without unmounting"
    t0 = time.monotonic()
    resume = m.resume_info()
    new = _spawn(dict(m.request), None, mounts, srv, lock_fd, resume)
    new.fuse_fd, new.session, new.image = m.fuse_fd, m.session, m.image
    new.restarts = resume["restarts"]
    new.replaced_at = [*m.replaced_at, t0]
    log.warning("mount daemon %d of %s %s; replacement %d started on the same /dev/fuse (restart %d)",
                m.pid, m.mountpoint, how, new.pid, new.restarts)
    return new


def stop_server(path: str) -> bool:
    """Stop the mount server on ``path`` if one runs (it holds ``PATH.lock``), by its own stop
    request, and wait until it has let the lock go; True if one ran.  Never a signal to the pid
    the lock file names: after a server died that is whatever process has the number now (the
    benches' clean-up sent SIGTERM, as root, to it)."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if _take_server_lock(fd, path, wait=False):
            return False  # nobody held it
        return _take_server_lock(fd, path, wait=True)
    finally:
        os.close(fd)  # the lock goes with it


def _take_server_lock(lock_fd: int, path: str, wait: bool) -> bool:
    """Take the one-server lock; an explicit server (``wait``) first asks a running one to stop."""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if not wait:
            return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(b'{"stop": true, "args": {}, "mountpoint": ""}\n')
        sock.recv(64)
    except OSError:
        pass
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    raise CubefsError(f"another mount server holds {path}.lock and does not stop")


def _read_request(conn: socket.socket) -> dict[str, Any] | None:
    """The request on ``conn``; None if the client closed without sending anything."""
    conn.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        part = conn.recv(65536)
        if not part and not data:
            return None
        if not part:
            raise ValueError("connection closed before a complete request")
        data += part
        if len(data) > 1 << 20:
            raise ValueError("request too large")
    conn.settimeout(None)
    request = json.loads(data)
    if not isinstance(request, dict) or "args" not in request or "mountpoint" not in request:
        raise ValueError("not a mount request")
    return request


def _adopt_client(request: dict[str, Any]) -> None:
    # The client's store settings replace the server's; they must not mix (a
    # server's session token with a client's key, the server's default store...).
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES]:
        del os.environ[key]
    os.environ.update(request.get("env") or {})
    try:
        os.chdir(request.get("cwd") or "/")
    except OSError:
        os.chdir("/")


def _server_child(request: dict[str, Any], notify_fd: int, supervision: dict[str, Any]) -> int:
    _adopt_client(request)
    args = argparse.Namespace(**request["args"])
    return _become_daemon(args, request["mountpoint"], request["cache_dir"], notify_fd, supervision)
