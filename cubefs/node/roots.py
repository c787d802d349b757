"""Root hosts: one process per image serves every VM root (volume) over that image.

A mount daemon per VM root (cubefs.node.mount) repeats, per VM, what is the
same for every sandbox of a template: the image's manifest, inode table and
chunk map, the memory tier, the disk cache's LMDB map, the store session,
the interpreter's own objects.  Measured 2026-12-06 with 4 idle sandboxes:
22 MB PSS per daemon, a quarter of a sandbox's host memory.  A *root host*
holds that once (an :class:`~cubefs.node.mount.ImageParts`) and adds, per
mount, only what is the mount's own: a VolumeFS, a vhost-user-fs transport on
the VM's socket, a control socket and a registry entry.

``cubefs mount --volume V SOCKET --transport virtiofs --shared`` asks the
node's mount server, which sends the request to the host for the key (store
URL, S3 endpoint, cache dir, volume dir, digest of V's base image), forking
one when none runs.  The request goes over a SOCK_SEQPACKET link with the
client's connection attached (SCM_RIGHTS): the host answers the client
itself ("ready" or "error CODE MESSAGE", as a daemon does), so the server
never waits on a host.

Lifetimes, all decided by the mount server, which is single-threaded and so
never races a host: it counts the mounts it sent to each host, less those the
host reports ended; a host with none for ``HOST_IDLE_EXIT`` seconds is told to
exit and forgotten in the same step, so no request can reach it after that.  A
host whose link to the server breaks (the server stopped or upgraded itself in
place) takes no new mount and exits when its last one ends.  A host that dies
is seen by the server as the link's end: it starts a new host for the next
mount and removes the registry entries of the dead host's mounts.

Invariants in the host (one trio loop serves every mount):

* One :class:`~cubefs.cow.index.VolumeIndex` per volume directory, shared by
  that directory's mounts and closed with the last of them: LMDB allows one
  environment per file per process.
* Each writable mount holds its volume's lock (cubefs.cow.lock) as a daemon
  does; ``flock`` conflicts between two opens in one process too, so two
  mounts of one volume fail in a host just as in two daemons.
* A mount that ends (its QEMU went away, or it was dropped) is synced and
  closed in a worker thread, its lock released, its registry entry removed,
  and only then reported ended to the server.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cubefs.errors import EXIT_ERROR, CubefsError, NotFoundError, UsageError
from cubefs.node import control

log = logging.getLogger(__name__)

# A host with no mount for this long exits.  Long enough that a template's next sandbox
# (pools refill right after a kill; bursts come in waves) finds the host and its warm
# memory tier; short enough that an image nobody uses any more gives its ~20 MB back
# within a minute.  Starting a host costs ~0.1 s more than adding a mount to one.
HOST_IDLE_EXIT = 60.0
DROP_WAIT = 10.0  # seconds a stopping VM's shared mount may take to end by itself (QEMU gone)
FD = struct.Struct("i")


def wants_host(args: dict[str, Any]) -> bool:
    return bool(args.get("shared"))


# -- the mount server's side -------------------------------------------------------------

@dataclass
class HostLink:
    """A root host as the mount server sees it."""

    key: str
    pid: int
    sock: socket.socket
    label: str
    mounts: dict[int, str] = field(default_factory=dict)  # sent, not yet reported ended: id -> mountpoint
    idle_since: float = field(default_factory=time.monotonic)
    next_id: int = 1

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        try:  # the link's end, if the host is gone and its pid already reused
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False


def host_key(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key of a shared mount's host and what a new host needs to know of its image."""
    args = request["args"]
    volume_dir = os.path.abspath(str(args.get("volume_dir") or ""))
    volume = str(args.get("volume") or "")
    if not volume or args.get("transport") != "virtiofs":
        raise UsageError("--shared serves volumes over virtio-fs (--volume NAME SOCKET --transport virtiofs)")
    base = _volume_base(volume_dir, volume.partition("@")[0])
    image = {"ref": base[0], "digest": base[1], "store": args.get("store") or base[2],
             "s3_endpoint": args.get("s3_endpoint") or base[3]} if base else {}
    parts = [image.get("store") or "", image.get("s3_endpoint") or "", request["cache_dir"], volume_dir,
             image.get("digest") or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16], image


def _volume_base(volume_dir: str, volume: str) -> list[Any] | None:
    """The volume's base image record, read without a VolumeIndex (whose open writes): the
    mount server opens the environment read-only for this one read and closes it before it
    forks anything."""
    import lmdb
    import msgpack

    from cubefs.cow.index import Volume

    path = os.path.join(volume_dir, "index.lmdb")
    if not os.path.exists(path):
        raise NotFoundError(f"volume {volume} not found: no volume index in {volume_dir}")
    env = lmdb.open(path, readonly=True, max_dbs=16, max_readers=1024)
    try:
        db = env.open_db(b"volumes", create=False)
        with env.begin() as txn:
            raw = txn.get(volume.encode(), db=db)
    finally:
        env.close()
    if raw is None:
        raise NotFoundError(f"volume {volume} not found in {volume_dir}")
    Volume.decode(volume, raw)  # the format check a daemon would make
    base = msgpack.unpackb(raw)["base"]
    return list(base) if base else None


def send_mount(hosts: dict[str, HostLink], request: dict[str, Any], conn: socket.socket,
               spawn: Callable[[str, dict[str, Any]], HostLink]) -> HostLink:
    """Hand the shared mount ``request`` (its client on ``conn``) to its host, started with
    ``spawn(key, image)`` when none runs or the one known is dead."""
    key, image = host_key(request)
    host = hosts.get(key)
    if host is not None and not host.alive():
        host_gone(hosts, host)
        host = None
    for attempt in (1, 2):
        if host is None:
            host = spawn(key, image)
            hosts[key] = host
        mid = host.next_id
        host.next_id += 1
        message = json.dumps({"op": "mount", "id": mid, "request": request}).encode()
        try:
            _send(host.sock, message, conn.fileno())
        except OSError as err:  # it died since: the next one takes the mount
            log.warning("root host %d (%s) does not take mounts (%s)", host.pid, host.label, err)
            host_gone(hosts, host)
            host = None
            if attempt == 2:
                raise CubefsError(f"no root host for {host_key(request)[0]} takes the mount: {err}") from None
            continue
        host.mounts[mid] = request["mountpoint"]
        return host
    raise AssertionError("unreachable")


def _send(sock: socket.socket, message: bytes, fd: int) -> None:
    """Send on the (non-blocking) link; a host still loading its image fills the buffer only
    after ~100 requests, and one that takes none for 5 s counts as dead."""
    import select

    try:
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, FD.pack(fd))])
    except BlockingIOError:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        if not poller.poll(5000):
            raise TimeoutError("its link stays full") from None
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, FD.pack(fd))])


def host_said(hosts: dict[str, HostLink], host: HostLink) -> bool:
    """Read what ``host`` reported; False when its link ended (the host is gone)."""
    try:
        data = host.sock.recv(65536)
    except BlockingIOError:
        return True
    except OSError:
        data = b""
    if not data:
        host_gone(hosts, host)
        return False
    with contextlib.suppress(ValueError, KeyError):
        msg = json.loads(data)
        if msg["op"] == "ended":
            host.mounts.pop(int(msg["id"]), None)
            if not host.mounts:
                host.idle_since = time.monotonic()
    return True


def host_gone(hosts: dict[str, HostLink], host: HostLink) -> None:
    """Forget a dead host; its mounts' registry entries go (their VMs lost their roots with it)."""
    if hosts.get(host.key) is host:
        del hosts[host.key]
    host.sock.close()
    if host.mounts:
        log.error("root host %d of %s died: %d VM roots served by it are gone (%s)", host.pid, host.label,
                  len(host.mounts), ", ".join(sorted(host.mounts.values())))
    for mid, mp in host.mounts.items():
        with contextlib.suppress(CubefsError, OSError, ValueError):
            shared = control.read_registry(mp).get("shared") or {}
            if shared.get("host_pid") == host.pid and shared.get("mount") == mid:
                control.remove_registry(mp)
    host.mounts.clear()


def retire_idle(hosts: dict[str, HostLink], idle_exit: float = HOST_IDLE_EXIT) -> None:
    """Tell hosts without a mount for ``idle_exit`` seconds to exit, and forget them."""
    now = time.monotonic()
    for host in [h for h in hosts.values() if not h.mounts and now - h.idle_since > idle_exit]:
        log.info("root host %d (%s) has had no mount for %.0f s: it exits", host.pid, host.label, idle_exit)
        with contextlib.suppress(OSError):
            host.sock.send(b'{"op": "exit"}')
        host.sock.close()
        del hosts[host.key]


def host_idle_exit() -> float:
    return float(os.environ.get("CUBEFS_ROOT_HOST_IDLE", HOST_IDLE_EXIT))


# -- the host ------------------------------------------------------------------------------

@dataclass
class _Mount:
    mid: int
    mountpoint: str
    opts: Any  # MountOptions
    fs: Any  # VolumeFS
    transport: Any
    directory: str
    lock: Any  # VolumeLock | None
    scope: Any = None  # trio.CancelScope of its tasks


class RootHost:
    """The process that serves every mount of one key (see the module's docstring)."""

    def __init__(self, opts: Any, link: socket.socket, key: str, image: dict[str, Any]) -> None:
        self.opts = opts  # the first mount's: cache sizes, timeouts, read-ahead of the host
        self.link = link
        self.key = key
        self.image = image
        self.parts: Any = None
        self.store: Any = None
        self.indexes: dict[str, list[Any]] = {}  # volume dir -> [VolumeIndex, mounts using it]
        self.mounts: dict[int, _Mount] = {}
        self.started = process_start(os.getpid())
        self.leaving = False  # the server said exit, or the link ended: no new mount
        self.done: Any = None

    def run(self) -> int:
        import trio

        from cubefs.node.mount import open_image
        from cubefs.remote import RetryPolicy, store_session

        self.done = trio.Event()
        if not self.image:  # an empty volume: no image to serve
            trio.run(self._main)
            return 0
        from cubefs.format.manifest import Manifest

        name, _, tag = str(self.image["ref"]).rpartition(":")
        policy = RetryPolicy(attempts=self.opts.store_attempts, timeout=self.opts.store_timeout, max_backoff=1.0)
        try:
            with store_session(self.image["store"], self.image["s3_endpoint"], policy=policy) as (loop, store):
                self.store = store
                self.parts = open_image(self.opts, loop, store, Manifest(name, tag, self.image["digest"], ""))
                try:
                    trio.run(self._main)
                finally:
                    self.parts.close()
        except CubefsError as err:
            self._refuse_waiting(f"error {err.exit_code} {err}")
            raise
        except Exception as err:
            self._refuse_waiting(f"error {EXIT_ERROR} {type(err).__name__}: {err}")
            raise
        return 0

    def _refuse_waiting(self, answer: str) -> None:
        """The image cannot be served: every mount waiting on the link gets ``answer``."""
        self.link.setblocking(False)
        while True:
            try:
                got = _receive(self.link)
            except BlockingIOError:
                return
            if got is None:
                return
            _msg, fd = got
            if fd >= 0:
                _notify(fd, answer)

    async def _main(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.parts is not None:
                self.parts.source.start(nursery)
                if self.parts.trace and self.opts.prefetch:
                    nursery.start_soon(self.parts.source.prefetch, self.parts.image_fs.chunk_refs(self.parts.trace))
            token = trio.lowlevel.current_trio_token()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_a: token.run_sync_soon(self._stop_all))
            nursery.start_soon(self._listen)
            log.info("root host %s (pid %d) serving %s", self.key, os.getpid(),
                     self.parts.ref if self.parts is not None else "empty volumes")
            await self.done.wait()
            nursery.cancel_scope.cancel()
        for d in list(self.indexes):
            self.indexes.pop(d)[0].close()

    def _stop_all(self) -> None:
        self.leaving = True
        for m in list(self.mounts.values()):
            self._drop(m)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.leaving and not self.mounts:
            self.done.set()

    async def _listen(self) -> None:
        import trio

        self.link.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(self.link)
            try:
                got = _receive(self.link)
            except BlockingIOError:
                continue
            if got is None:
                log.info("the mount server's link ended: no new mounts; exiting after the last of %d",
                         len(self.mounts))
                self.leaving = True
                self._maybe_done()
                return
            msg, fd = got
            if msg.get("op") == "exit":
                log.info("no mount for a while: exiting")
                self.leaving = True
                self._maybe_done()
                return
            if msg.get("op") == "mount" and fd >= 0:
                self.nursery.start_soon(self._serve_mount, int(msg["id"]), msg["request"], fd)
            elif fd >= 0:
                os.close(fd)

    async def _serve_mount(self, mid: int, request: dict[str, Any], notify_fd: int) -> None:
        import trio

        try:
            m = self._open(mid, request)
        except CubefsError as err:
            log.warning("mount %d at %s refused: %s", mid, request.get("mountpoint"), err)
            _notify(notify_fd, f"error {err.exit_code} {err}")
            self._ended(mid)
            return
        except Exception as err:
            log.exception("mount %d at %s failed", mid, request.get("mountpoint"))
            _notify(notify_fd, f"error {EXIT_ERROR} {type(err).__name__}: {err}")
            self._ended(mid)
            return
        try:
            async with trio.open_nursery() as nursery:
                m.scope = nursery.cancel_scope
                actions = {"/mount/drop": self._drop_action(m)}
                from cubefs.node.mount import volume_actions

                actions.update(volume_actions(m.opts, self.indexes[m.directory][0], m.fs, m.transport))
                await nursery.start(control.serve_control, control.socket_path(m.mountpoint),
                                    lambda: self._stats(m), actions)
                if m.fs.writable:
                    from cubefs.node.mount import SYNC_INTERVAL

                    nursery.start_soon(m.fs.sync_every, SYNC_INTERVAL)
                _notify(notify_fd, "ready")
                notify_fd = -1
                log.info("mount %d: volume %s on %s (%d mounts)", mid, m.opts.volume, m.mountpoint, len(self.mounts))
                await m.transport.serve()
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("mount %d at %s failed", mid, m.mountpoint)
        finally:
            if notify_fd >= 0:
                _notify(notify_fd, f"error {EXIT_ERROR} the root host could not serve {m.mountpoint}; see its log")
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_fs, m)
            self._close(m)

    def _open(self, mid: int, request: dict[str, Any]) -> _Mount:
        """Everything a daemon has per mount, but the image: lock, VolumeFS, transport, registry."""
        from cubefs.cow.index import VolumeIndex
        from cubefs.cow.lock import VolumeLock
        from cubefs.node.mount import MountOptions, _transport
        from cubefs.volume.fs import VolumeFS

        args = argparse.Namespace(**request["args"])
        mp = str(request["mountpoint"])
        opts = MountOptions.from_args(args, mp, request["cache_dir"])
        directory = os.path.abspath(opts.volume_dir)
        volume, _, snapshot = str(opts.volume).partition("@")
        if directory not in self.indexes:
            self.indexes[directory] = [VolumeIndex(directory), 0]
        entry = self.indexes[directory]
        entry[1] += 1
        index = entry[0]
        lock = fs = None
        try:
            lock = VolumeLock.take(index, volume, mp) if not snapshot else None
            with index.read() as txn:
                base = index.volume(txn, volume).base
                if snapshot:
                    index.get_snapshot(txn, volume, snapshot)
            if (base.digest if base else "") != (self.image.get("digest") or ""):
                raise CubefsError(f"volume {volume} is over another image than this root host's")
            image_fs = self.parts.image_fs if self.parts is not None else None
            fs = VolumeFS(index, volume, image_fs, f"volume {opts.volume}", snapshot or None)
            transport = _transport(opts.transport, fs, mp, f"cubefs:volume:{opts.volume}", opts.allow_other)
            transport.mount()
        except BaseException:
            if fs is not None:
                fs.close()
            if lock is not None:
                lock.release()
            self._unref(directory)
            raise
        m = _Mount(mid, mp, opts, fs, transport, directory, lock)
        self.mounts[mid] = m
        control.write_registry(mp, {
            "mountpoint": mp, "pid": os.getpid(), "image": self.image.get("ref"), "volume": opts.volume,
            "transport": opts.transport, "store": self.store.url if self.store is not None else None,
            "socket": control.socket_path(mp),
            "shared": {"host": self.key, "host_pid": os.getpid(), "host_start": self.started, "mount": mid},
        })
        return m

    def _close_fs(self, m: _Mount) -> None:
        """In a worker thread: what the guest wrote made durable, the volume closed and unlocked."""
        try:
            m.transport.close()
            if m.fs.writable:
                m.fs._sync(m.fs.files.take_dirty())
            m.fs.close()
        except Exception:
            log.exception("closing mount %d at %s", m.mid, m.mountpoint)
        finally:
            if m.lock is not None:
                m.lock.release()

    def _close(self, m: _Mount) -> None:
        self.mounts.pop(m.mid, None)
        self._unref(m.directory)
        shared = {}
        with contextlib.suppress(CubefsError, OSError, ValueError):
            shared = control.read_registry(m.mountpoint).get("shared") or {}
        if shared.get("host_pid") == os.getpid() and shared.get("mount") == m.mid:
            control.remove_registry(m.mountpoint)
        log.info("mount %d: %s ended (%d mounts left)", m.mid, m.mountpoint, len(self.mounts))
        self._ended(m.mid)

    def _unref(self, directory: str) -> None:
        entry = self.indexes.get(directory)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.indexes[directory]
                entry[0].close()

    def _ended(self, mid: int) -> None:
        with contextlib.suppress(OSError):  # a server that is gone needs no report
            self.link.send(json.dumps({"op": "ended", "id": mid}).encode())
        self._maybe_done()

    def _drop(self, m: _Mount) -> None:
        """End a mount from here: a connected VM's connection is shut (its serve loop ends
        cleanly, guest RAM unmapped), else its tasks are cancelled."""
        if m.transport.conn is not None:
            m.transport.stop()
        elif m.scope is not None:
            m.scope.cancel()

    def _drop_action(self, m: _Mount) -> Callable[[str], Any]:
        async def drop(_arg: str) -> dict[str, Any]:
            log.info("mount %d: %s dropped on request", m.mid, m.mountpoint)
            self._drop(m)
            return {"mountpoint": m.mountpoint, "dropped": True}

        return drop

    def _stats(self, m: _Mount) -> dict[str, Any]:
        from cubefs.node.mount import mount_stats

        stats = mount_stats(m.opts, m.mountpoint, m.fs, m.transport, self.parts, self.store,
                            self.indexes[m.directory][0])
        stats["shared"] = {"host": self.key, "host_pid": os.getpid(), "mount": m.mid, "mounts": len(self.mounts)}
        return stats


def _receive(link: socket.socket) -> tuple[dict[str, Any], int] | None:
    """One message of the server and the descriptor it carries (-1: none); None at the link's end."""
    data, anc, _flags, _addr = link.recvmsg(1 << 20, socket.CMSG_SPACE(FD.size))
    fds = [FD.unpack_from(d, i)[0] for lvl, kind, d in anc if lvl == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for i in range(0, len(d) - len(d) % FD.size, FD.size)]
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    for fd in fds[1:]:
        os.close(fd)
    try:
        return dict(json.loads(data)), (fds[0] if fds else -1)
    except ValueError:
        log.warning("garbage on the mount server's link: %r", data[:80])
        for fd in fds[:1]:
            os.close(fd)
        return {}, -1


def _notify(fd: int, text: str) -> None:
    try:
        os.write(fd, (text + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def host_main(request: dict[str, Any], link_fd: int, key: str, image: dict[str, Any]) -> int:
    """In the forked host, once its stdio, environment and descriptors are set up."""
    from cubefs.node.mount import MountOptions

    args = argparse.Namespace(**request["args"])
    opts = MountOptions.from_args(args, request["mountpoint"], request["cache_dir"])
    # No hot packs on a host: its one image is read by every VM it serves, and the bound counts
    # every read (ten boots read ten times what one fetched), so it would not bound; not measured.
    opts.hot_pack = 0
    link = socket.socket(fileno=link_fd)
    try:
        return RootHost(opts, link, key, image).run()
    finally:
        link.close()


def log_path(cache_dir: str, key: str) -> str:
    logs = os.path.join(cache_dir, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    return os.path.join(logs, f"roots-{key}.log")


# -- a shared mount's end, as a VM's stop or 'cubefs umount' asks for it -------------------

def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if it is gone): a pid and this
    name one process, whatever reuses the pid later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def host_alive(shared: dict[str, Any]) -> bool:
    start = process_start(int(shared.get("host_pid", 0)))
    return start != 0 and start == int(shared.get("host_start", start))


def end_shared_mount(mountpoint: str, info: dict[str, Any], wait: float = DROP_WAIT, drop_now: bool = False) -> bool:
    """Wait for the shared mount in registry entry ``info`` to end (its host removes the entry
    when QEMU disconnects); if it does not within ``wait`` seconds, or ``drop_now``, ask the
    host to drop it.  Never signals the host: it serves other VMs.  A dead host's entry is
    removed at once.  True once the mount is gone."""
    shared = info.get("shared") or {}

    def gone() -> bool:
        try:
            now = control.read_registry(mountpoint).get("shared") or {}
        except NotFoundError:
            return True
        except (OSError, ValueError):
            return False
        return (now.get("host_pid"), now.get("mount")) != (shared.get("host_pid"), shared.get("mount"))

    def wait_gone(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not gone():
            if not host_alive(shared):
                control.remove_registry(mountpoint)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    if not drop_now and wait_gone(wait):
        return True
    try:
        control.call(mountpoint, "/mount/drop", timeout=5)
    except (CubefsError, OSError) as err:
        log.warning("cannot ask the root host %s to drop %s: %s", shared.get("host_pid"), mountpoint, err)
    if wait_gone(30):
        return True
    log.error("root host %s did not end the mount at %s; it serves other VMs, so it is left running",
              shared.get("host_pid"), mountpoint)
    return False
