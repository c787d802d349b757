"""Mounts outlive their daemon: kill -9 of a mount daemon is a stall, never an error.

Real FUSE mounts through this run's mount server (conftest), real kill -9.
Readers drop each file's pages after reading it (POSIX_FADV_DONTNEED), so
every read goes to the daemon, the one being killed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import S3_ENV, S3Server, cubefs_stats, mounted, run_cubefs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "bench"))
from delayproxy import DelayProxy

from cubefs.fuse import protocol as p
from cubefs.fuse.server import FuseServer
from cubefs.image.fs import FsError

FILES = 12
FILE_SIZE = 256 * 1024



def _wait_for_new_daemon(mnt: Path, old_pid: int, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = cubefs_stats(mnt)
            if stats["pid"] != old_pid:
                return stats
        except AssertionError:
            pass
        assert time.monotonic() < deadline, "no replacement daemon answers"
        time.sleep(0.1)


class Readers:
    """``n`` threads reading and checksumming files in a loop; every error is kept."""

    def __init__(self, mnt: Path, digests: dict[str, str], n: int = 4) -> None:
        self.mnt, self.digests = mnt, digests
        self.errors: list[str] = []
        self.reads = 0
        self.longest = 0.0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        names = sorted(self.digests)
        k = i
        while not self.stop.is_set():
            name = names[k % len(names)]
            k += 1
            t0 = time.monotonic()
            try:
                fd = os.open(self.mnt / name, os.O_RDONLY)
                try:
                    data = b""
                    while chunk := os.read(fd, 1 << 20):
                        data += chunk
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError as err:
                self.errors.append(f"{name}: {err}")
                continue
            self.longest = max(self.longest, time.monotonic() - t0)
            if hashlib.sha256(data).hexdigest() != self.digests[name]:
                self.errors.append(f"{name}: wrong bytes")
            self.reads += 1

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        # A request the dead daemon took and nobody answered would leave its reader hanging.
        assert not any(t.is_alive() for t in self.threads), "a reader hangs"


def _image(tmp_path: Path, store: str, tag: str) -> dict[str, str]:
    src = tmp_path / "src"
    src.mkdir()
    digests = {}
    for i in range(FILES):
        data = os.urandom(FILE_SIZE)
        (src / f"f{i:02d}").write_bytes(data)
        digests[f"f{i:02d}"] = hashlib.sha256(data).hexdigest()
    run_cubefs("build", str(src), "--tag", tag, "--store", store)
    return digests


def test_killed_image_daemon_is_replaced_under_readers(tmp_path: Path, local_store: str) -> None:
    digests = _image(tmp_path, local_store, "restart:1")
    mnt = tmp_path / "mnt"
    with mounted("restart:1", mnt, local_store, tmp_path / "cache"):
        first = cubefs_stats(mnt)
        assert first["restarts"] == 0
        with Readers(mnt, digests) as readers:
            time.sleep(1.0)
            before = readers.reads
            assert before > 0, readers.errors
            os.kill(first["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            second = _wait_for_new_daemon(mnt, first["pid"])
            replaced_in = time.monotonic() - killed_at
            at_replacement = readers.reads
            time.sleep(1.5)
        assert readers.errors == []
        assert readers.reads > at_replacement, "readers did not carry on after the replacement"
        assert second["restarts"] == 1
        assert cubefs_stats(mnt)["restarts"] == 1
        assert "restarts     1" in run_cubefs("stats", str(mnt)).stdout
        assert "cubefs_restarts_total{" in run_cubefs("stats", str(mnt), "--prometheus").stdout
        assert os.path.ismount(mnt)
        print(f"replacement answered {replaced_in:.2f} s after kill -9; longest read {readers.longest:.2f} s; "
              f"{readers.reads} reads")
        assert readers.longest < 5
        logs = "".join(p.read_text() for p in (tmp_path / "cache" / "logs").iterdir())
        assert "resumed the FUSE session" in logs
    assert not os.path.ismount(mnt)
    time.sleep(0.5)  # the daemon that unmounted is not replaced
    assert not os.path.ismount(mnt)


def test_killed_volume_daemon_loses_no_fsynced_write(tmp_path: Path, local_store: str) -> None:
    digests = _image(tmp_path, local_store, "vbase:1")
    vols = tmp_path / "volumes"
    run_cubefs("volume", "create", "vol", "--from", "vbase:1", "--store", local_store, "--volume-dir", str(vols))
    mnt = tmp_path / "vmnt"
    mnt.mkdir()
    run_cubefs("mount", "--volume", "vol", str(mnt), "--volume-dir", str(vols), "--cache-dir",
               str(tmp_path / "cache"), timeout=120)
    synced: dict[str, bytes] = {}  # name -> content whose fsync returned
    werrors: list[str] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            name = f"w{w}-{n % 8}"
            data = os.urandom(64 * 1024) + f"{w} {n}".encode()
            try:
                fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                werrors.append(f"{name}: {err}")
                continue
            synced[name] = data
            n += 1

    try:
        first = cubefs_stats(mnt)
        writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        with Readers(mnt, digests, n=2) as readers:
            for t in writers:
                t.start()
            time.sleep(1.0)
            os.kill(first["pid"], signal.SIGKILL)
            second = _wait_for_new_daemon(mnt, first["pid"])
            written_at_replacement = len(synced)
            time.sleep(1.5)
            stop.set()
            for t in writers:
                t.join(timeout=60)
        assert readers.errors == [] and werrors == []
        assert second["restarts"] == 1
        assert len(synced) >= written_at_replacement > 0
        for name, data in synced.items():
            assert (mnt / name).read_bytes() == data, f"{name}: an fsynced write was lost"
    finally:
        stop.set()
        res = run_cubefs("umount", str(mnt), check=False, timeout=60)
        if res.returncode != 0 and os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    # What was fsynced is in the volume for the next mount too.
    run_cubefs("mount", "--volume", "vol", str(mnt), "--volume-dir", str(vols), "--cache-dir",
               str(tmp_path / "cache"), timeout=120)
    try:
        for name, data in synced.items():
            assert (mnt / name).read_bytes() == data
    finally:
        run_cubefs("umount", str(mnt))


def test_upgrade_replaces_every_daemon_under_live_readers(tmp_path: Path, local_store: str) -> None:
    digests = _image(tmp_path, local_store, "upgrade:1")
    sock = tmp_path / "serve.sock"
    log = tmp_path / "serve.log"
    env = {"CUBEFS_SERVER": str(sock)}
    server = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--socket", str(sock)],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    mnts = [tmp_path / "m1", tmp_path / "m2"]
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for mnt in mnts:
            mnt.mkdir()
            run_cubefs("mount", "upgrade:1", str(mnt), "--store", local_store, "--cache-dir",
                       str(tmp_path / "cache"), env=env)
        # A volume too: its successor must find the volume lock released.
        vols = tmp_path / "volumes"
        run_cubefs("volume", "create", "uv", "--from", "upgrade:1", "--store", local_store, "--volume-dir", str(vols))
        vmnt = tmp_path / "vm"
        vmnt.mkdir()
        mnts.append(vmnt)
        run_cubefs("mount", "--volume", "uv", str(vmnt), "--volume-dir", str(vols), "--cache-dir",
                   str(tmp_path / "cache"), env=env)
        (vmnt / "before").write_bytes(b"written before the upgrade")
        before = {mnt: cubefs_stats(mnt)["pid"] for mnt in mnts}
        with Readers(mnts[0], digests, n=2) as r1, Readers(mnts[1], digests, n=2) as r2:
            time.sleep(0.5)
            res = run_cubefs("serve", "--upgrade", "--socket", str(sock), timeout=120)
            assert "3 mount daemons replaced" in res.stdout
            counts = (r1.reads, r2.reads)
            time.sleep(1.0)
        assert r1.errors == [] and r2.errors == []
        assert r1.reads > counts[0] and r2.reads > counts[1]
        for mnt in mnts:
            stats = cubefs_stats(mnt)
            assert stats["pid"] != before[mnt] and stats["restarts"] == 1
            assert os.path.ismount(mnt)
        assert (vmnt / "before").read_bytes() == b"written before the upgrade"
        (vmnt / "after").write_bytes(b"written after")
        assert (vmnt / "after").read_bytes() == b"written after"
        assert server.poll() is None  # the same process, now running the installed code
        text = log.read_text()
        assert "mount server upgraded in place: replacing 3 mount daemons" in text
        assert text.count("mount server listening") == 2
    finally:
        for mnt in mnts:
            if os.path.ismount(mnt):
                run_cubefs("umount", str(mnt), check=False)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert not sock.exists()


class _DoneBefore:
    """A volume on which every change asked for was already made (by a daemon that died
    before answering): the fault a replayed request meets."""

    writable = True

    def __init__(self) -> None:
        self.remembered: list[int] = []

    def create(self, *_a: object) -> int:
        raise FsError(errno.EEXIST)

    def unlink(self, *_a: object) -> None:
        raise FsError(errno.ENOENT)

    def lookup_ino(self, parent: int, name: bytes) -> int:
        assert (parent, name) == (1, b"new-file")
        return 7

    def getattr(self, ino: int) -> SimpleNamespace:
        return SimpleNamespace(atime_ns=0, mtime_ns=0, ctime_ns=0, size=3, blocks=1, mode=0o100644, nlink=1,
                               uid=0, gid=0, rdev=0)

    def remember(self, ino: int) -> None:
        self.remembered.append(ino)


def test_replayed_changes_are_answered_as_the_successes_they_were() -> None:
    fs = _DoneBefore()
    server = FuseServer(fs)
    server.resume({"minor": 31, "no_open": True, "no_opendir": True})

    def request(opcode: int, unique: int, body: bytes) -> bytes:
        return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 1, 0, 0) + body

    create = p.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o644, 0o022, 0) + b"new-file\0"
    # First sent: the name exists, as for any create of an existing name.
    out = server.handle(request(p.CREATE, 2, create))
    assert isinstance(out, bytes) and p.OUT_HEADER.unpack_from(out)[1] == -errno.EEXIST
    # Sent again after a restart: the dead daemon made it; the caller gets its file.
    out = server.handle(request(p.CREATE, 4 | p.UNIQUE_RESEND, create))
    assert isinstance(out, bytes)
    length, error, unique = p.OUT_HEADER.unpack_from(out)
    assert (error, unique) == (0, 4 | p.UNIQUE_RESEND)
    assert length == p.OUT_HEADER.size + p.ENTRY_OUT.size + p.ATTR.size + p.OPEN_OUT.size
    assert p.ENTRY_OUT.unpack_from(out, p.OUT_HEADER.size)[0] == 7 and fs.remembered == [7]
    out = server.handle(request(p.UNLINK, 6 | p.UNIQUE_RESEND, b"gone\0"))
    assert isinstance(out, bytes) and p.OUT_HEADER.unpack_from(out)[1] == 0
    out = server.handle(request(p.UNLINK, 8, b"gone\0"))
    assert isinstance(out, bytes) and p.OUT_HEADER.unpack_from(out)[1] == -errno.ENOENT


def test_a_read_in_flight_when_the_daemon_dies_is_answered_by_its_replacement(tmp_path: Path, s3: S3Server) -> None:
    """The dead daemon had read the request and was waiting on the store for it: only
    FUSE_NOTIFY_RESEND brings that request to the replacement (without it the reader
    would hang for good)."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(FILE_SIZE)
    (src / "slow").write_bytes(data)
    store = s3.store("restart-inflight")
    run_cubefs("build", str(src), "--tag", "inflight:1", "--store", store, "--s3-endpoint", s3.endpoint)
    host, port = s3.hostport
    mnt = tmp_path / "mnt"
    with DelayProxy(host, port, delay_ms=0) as proxy, mounted(
            "inflight:1", mnt, store, tmp_path / "cache", "--cache-size", "0", "--read-timeout", "30",
            s3_endpoint=proxy.endpoint):
        pid = cubefs_stats(mnt)["pid"]
        proxy.delay = 1.5  # every store request now takes 1.5 s
        got: list[bytes | BaseException] = []

        def read() -> None:
            try:
                got.append((mnt / "slow").read_bytes())
            except OSError as err:
                got.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.7)  # the daemon has the READ and waits for the store
        assert reader.is_alive()
        os.kill(pid, signal.SIGKILL)
        reader.join(timeout=20)
        assert not reader.is_alive(), "the read the dead daemon had taken was never answered"
        assert got == [data]
        assert cubefs_stats(mnt)["restarts"] == 1


def test_which_dead_daemons_are_replaced() -> None:
    """Older kernels (no FUSE_HAS_RESEND) keep today's behaviour, said why; so does a
    daemon that keeps dying; one that unmounted or never mounted is simply gone."""
    import socket as sk

    from cubefs.node.supervise import CRASH_LOOP, Supervised

    a, b = sk.socketpair()
    with a, b:
        m = Supervised({"mountpoint": "/mnt/x"}, a, 1, fuse_fd=-1)
        assert "before its mount was live" in m.replacement_allowed()
        m.fuse_fd = 99  # never closed here: the record is only asked
        m.session = {"minor": 31, "no_open": True, "no_opendir": True, "kernel_flags": 0}
        assert "no FUSE_NOTIFY_RESEND" in m.replacement_allowed()
        m.session["kernel_flags"] = p.HAS_RESEND
        assert m.replacement_allowed() == ""
        m.replaced_at = [time.monotonic()] * CRASH_LOOP[0]
        assert "died 5 times" in m.replacement_allowed()
        m.outcome = "unmounted"
        assert m.replacement_allowed() == "it unmounted"
