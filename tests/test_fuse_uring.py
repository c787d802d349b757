"""FUSE over io_uring: real mounts whose requests come through ring entries (cubefs.fuse.uring).

Each test sets the kernel's switch (``/sys/module/fuse/parameters/enable_uring``) as it
needs and puts it back; they skip only where the kernel has no FUSE over io_uring (no
such parameter: built without CONFIG_FUSE_IO_URING) or the run is not root.  The switch
is global, but only a daemon that asks for the ring at INIT gets one: other mounts of
the machine are not touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3Server, cubefs_stats, mount_volume, mounted, run_cubefs, unmount

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "bench"))
from delayproxy import DelayProxy

PARAM = Path("/sys/module/fuse/parameters/enable_uring")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting and the kernel's switch need root"),
    pytest.mark.skipif(not PARAM.exists(), reason="this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING)"),
]


@pytest.fixture
def switch() -> Iterator[Path]:
    """The kernel's switch, on for the test, put back as it was."""
    before = PARAM.read_text().strip()
    PARAM.write_text("Y")
    try:
        yield PARAM
    finally:
        PARAM.write_text(before)



def _ring_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "io_uring" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return n


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: (mode, sha256 of its bytes or its link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        out[str(path.relative_to(root))] = (st.st_mode, what)
    return out


def _uncached(path: Path) -> bytes:
    """The file's bytes read from the daemon (its pages dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_a_volume_over_the_ring_reads_and_writes_right(tmp_path: Path, switch: Path) -> None:
    """Small and big writes and reads, an untar under kernel writeback (background
    writeback and readahead requests need ring entries too), a rename and an unlink,
    then an unmount that leaves no daemon and no ring behind."""
    vols = tmp_path / "volumes"
    run_cubefs("volume", "create", "v", "--volume-dir", str(vols))
    mnt = mount_volume("v", tmp_path / "mnt", vols, tmp_path / "cache", "--fuse-uring", "--writeback-cache")
    try:
        (mnt / "small").write_bytes(b"hello ring")
        big = os.urandom(24 * 1024 * 1024 + 12345)  # many 1 MiB requests, the last one short
        (mnt / "big").write_bytes(big)
        stats = cubefs_stats(mnt)
        assert stats["fuse_path"]["path"] == "io_uring", stats["fuse_path"]
        assert stats["fuse_path"]["queues"] == len(os.sched_getaffinity(0)) or stats["fuse_path"]["queues"] >= 1
        pid = int(stats["pid"])
        assert _ring_fds(pid) >= 1
        os.sync()
        assert _uncached(mnt / "small") == b"hello ring"
        assert _uncached(mnt / "big") == big
        # An untar: thousands of creates, setattrs and xattr looks, writes in the background
        src = Path("/usr/lib/python3.11/email")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(src, arcname="email")
        (tmp_path / "t.tar").write_bytes(buf.getvalue())
        subprocess.run(["tar", "-C", str(mnt), "-xf", str(tmp_path / "t.tar")], check=True)
        native = tmp_path / "native"
        native.mkdir()
        subprocess.run(["tar", "-C", str(native), "-xf", str(tmp_path / "t.tar")], check=True)
        os.sync()
        assert _tree(mnt / "email") == _tree(native / "email")
        os.rename(mnt / "small", mnt / "renamed")
        os.unlink(mnt / "big")
        assert sorted(os.listdir(mnt)) == ["email", "renamed"]
        after = cubefs_stats(mnt)
        assert after["requests"]["write"] > 24 and after["fuse_path"]["path"] == "io_uring"
        # What still comes through read(2) on /dev/fuse beside the ring: forgets (and interrupts)
        assert set(after["fuse_path"]["dev_requests"]) <= {"forget", "batch_forget", "interrupt"}, after["fuse_path"]
        assert "requests via io_uring" in run_cubefs("stats", str(mnt)).stdout
    finally:
        unmount(mnt)
    assert not os.path.ismount(mnt)
    assert _gone(pid), "the daemon outlived its mount"
    # What was written is in the volume for the next mount (over /dev/fuse this time).
    mount_volume("v", mnt, vols, tmp_path / "cache")
    try:
        assert (mnt / "renamed").read_bytes() == b"hello ring"
        assert _tree(mnt / "email") == _tree(native / "email")
        assert cubefs_stats(mnt)["fuse_path"]["path"] == "/dev/fuse"
    finally:
        unmount(mnt)


def test_an_image_read_that_waits_on_the_store_commits_through_the_ring(tmp_path: Path, s3: S3Server,
                                                                          switch: Path) -> None:
    """A read the daemon must fetch is answered later, from a task of its own, while the
    ring keeps serving other requests."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 7)
    (src / "slow").write_bytes(data)
    data2 = os.urandom(2 * 1024 * 1024)
    (src / "slow2").write_bytes(data2)  # read only by the interrupted reader: nothing of it cached
    (src / "other").write_bytes(b"other")
    store = s3.store("uring-later")
    run_cubefs("build", str(src), "--tag", "ring:1", "--store", store, "--s3-endpoint", s3.endpoint)
    host, port = s3.hostport
    mnt = tmp_path / "mnt"
    with DelayProxy(host, port, delay_ms=0) as proxy, mounted(
            "ring:1", mnt, store, tmp_path / "cache", "--cache-size", "0", "--fuse-uring",
            "--pack-readahead", "0", "--dir-prefetch", "0",  # slow2 is fetched only when read
            s3_endpoint=proxy.endpoint) as m:
        assert m.stats()["fuse_path"]["path"] == "io_uring"
        proxy.delay = 0.5
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append((mnt / "slow").read_bytes()))
        t0 = time.monotonic()
        reader.start()
        time.sleep(0.2)
        assert reader.is_alive()
        assert sorted(os.listdir(mnt)) == ["other", "slow", "slow2"]
        assert os.stat(mnt / "other").st_size == 5  # answered while the read waits
        reader.join(timeout=30)
        assert got == [data]
        assert time.monotonic() - t0 >= 0.5
        assert m.stats()["read_bytes"] >= len(data)
        # A signal to a reader waiting on a synchronous (O_DIRECT) READ: the kernel sends the
        # INTERRUPT through read(2) on /dev/fuse, not the ring; the read still gets its bytes.
        proc = subprocess.Popen([sys.executable, "-c", DIRECT_READER, str(mnt / "slow2")], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(0.2)  # in the READ, which waits 0.5 s on the store
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.strip() == hashlib.sha256(data2[1 << 20 :]).hexdigest().encode()
        assert m.stats()["fuse_path"]["dev_requests"].get("interrupt") == 1, m.stats()["fuse_path"]


DIRECT_READER = """
import hashlib, mmap, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
print("ready", flush=True)
got = os.preadv(fd, [buf], 1 << 20)
print(hashlib.sha256(buf[:got]).hexdigest())
"""


def test_the_fallback_when_the_kernel_does_not_offer_the_ring(tmp_path: Path, switch: Path) -> None:
    switch.write_text("N")
    vols = tmp_path / "volumes"
    run_cubefs("volume", "create", "v", "--volume-dir", str(vols))
    mnt = mount_volume("v", tmp_path / "mnt", vols, tmp_path / "cache", "--fuse-uring")
    try:
        (mnt / "f").write_bytes(b"over /dev/fuse")
        assert _uncached(mnt / "f") == b"over /dev/fuse"
        path = cubefs_stats(mnt)["fuse_path"]
        assert path["path"] == "/dev/fuse" and "enable_uring" in path["why"], path
        assert _ring_fds(int(cubefs_stats(mnt)["pid"])) == 0  # nothing of the ring kept
        assert "requests via /dev/fuse (the kernel does not offer it" in run_cubefs("stats", str(mnt)).stdout
    finally:
        unmount(mnt)


READER = """
import hashlib, json, os, sys, time
mnt, digests, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
names = sorted(digests)
n = 0
progress = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
while True:
    for name in names:
        fd = os.open(os.path.join(mnt, name), os.O_RDONLY)
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert hashlib.sha256(data).hexdigest() == digests[name], name
        n += 1
        os.pwrite(progress, b"%12d" % n, 0)  # in place: never seen empty
"""


def _reads(out: Path) -> int:
    try:
        return int(out.read_text() or 0)
    except (OSError, ValueError):
        return 0


def test_a_daemon_killed_under_readers_is_replaced_and_serves_the_ring(tmp_path: Path, local_store: str,
                                                                        switch: Path) -> None:
    """The replacement registers ring entries of its own (a session that took the ring
    keeps it) and serves new requests.  What it cannot do, on 6.18: answer the requests
    the dead daemon held in its ring entries (FUSE_NOTIFY_RESEND requeues /dev/fuse's
    only), so a reader caught in one stays blocked until it is killed, and a readahead
    caught keeps its pages locked: the same range read again blocks too; a request that
    reached an entry as the daemon died fails with ECANCELED -- why the ring is not the
    default (cubefs.fuse.kernel.uring_wanted).  Counted here; the readers die
    of SIGKILL and the mount then unmounts cleanly.  Measured over 17 runs: all readers
    carried on in 6, all waited for good in 5, and 1-3 of 4 failed with ECANCELED (a
    request the kernel put in an entry as the daemon died) in 6 -- over /dev/fuse a
    kill -9 is a stall, never an error (tests/test_daemon_restart.py)."""
    src = tmp_path / "src"
    src.mkdir()
    digests = {}
    for i in range(8):
        data = os.urandom(256 * 1024)
        (src / f"f{i}").write_bytes(data)
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    run_cubefs("build", str(src), "--tag", "ringkill:1", "--store", local_store)
    old = {k: v for k, v in digests.items() if k < "f4"}  # the readers under the kill
    later = {k: v for k, v in digests.items() if k >= "f4"}  # read only after the replacement
    mnt = tmp_path / "mnt"
    with mounted("ringkill:1", mnt, local_store, tmp_path / "cache", "--fuse-uring") as m:
        first = m.stats()
        assert first["fuse_path"]["path"] == "io_uring"
        outs = [tmp_path / f"reads{i}" for i in range(4)]
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(mnt), json.dumps(old), str(out)],
                                    stderr=subprocess.PIPE, text=True) for out in outs]
        fresh = tmp_path / "fresh"
        new = None
        try:
            time.sleep(1.0)
            assert all(_reads(out) > 0 for out in outs), [r.poll() for r in readers]
            os.kill(first["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                try:
                    second = m.stats()
                    if second["pid"] != first["pid"]:
                        break
                except AssertionError:
                    pass
                assert time.monotonic() < deadline, "no replacement daemon answers"
                time.sleep(0.1)
            assert second["restarts"] == 1 and second["fuse_path"]["path"] == "io_uring"
            at_replacement = [_reads(out) for out in outs]
            # A new reader of files nobody read under the kill: every byte right, through the new ring.
            new = subprocess.Popen([sys.executable, "-c", READER, str(mnt), json.dumps(later), str(fresh)])
            deadline = time.monotonic() + 20
            while _reads(fresh) < 3 * len(later):
                assert new.poll() is None, "the new reader failed"
                assert time.monotonic() < deadline, "the replacement does not serve new requests"
                time.sleep(0.1)
            assert os.statvfs(mnt).f_bsize > 0  # a request of another kind
            moving = [_reads(out) > n for out, n in zip(outs, at_replacement)]
            failed = [r.communicate()[1].strip().splitlines()[-1] for r in readers if r.poll() is not None]
            # Never wrong bytes; an error only as the kernel's ECANCELED of a request that reached
            # the dead daemon's ring as it died (its entry's task was gone).
            assert all("Errno 125" in line for line in failed), failed
            print(f"after the replacement: {sum(moving)} of {len(moving)} readers carry on, {len(failed)} failed "
                  f"with ECANCELED, the others wait on requests the dead daemon held in its ring entries")
        finally:
            for proc in [*readers, *([new] if new else [])]:
                proc.kill()
            for proc in [*readers, *([new] if new else [])]:
                proc.wait(timeout=30)  # a reader blocked on a lost request still dies of SIGKILL
        assert m.stats()["restarts"] == 1
    assert not os.path.ismount(mnt)


def test_an_upgrade_hands_a_ring_session_to_a_successor_that_registers_anew(tmp_path: Path, switch: Path) -> None:
    """``cubefs serve --upgrade``: the old daemon hands over, the successor (no INIT) finds
    the session took the ring and registers entries of its own; what was written before
    is there, and the successor reads and writes through the ring.  (Requests that land
    in the old daemon's entries after it stopped reaping are lost: design.md.)"""
    sock = tmp_path / "serve.sock"
    log = tmp_path / "serve.log"
    env = {"CUBEFS_SERVER": str(sock)}
    server = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--socket", str(sock)],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    vols = tmp_path / "volumes"
    mnt = tmp_path / "mnt"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        run_cubefs("volume", "create", "v", "--volume-dir", str(vols))
        mnt.mkdir()
        run_cubefs("mount", "--volume", "v", str(mnt), "--volume-dir", str(vols), "--cache-dir",
                   str(tmp_path / "cache"), "--fuse-uring", env=env)
        data = os.urandom(3 * 1024 * 1024)
        (mnt / "before").write_bytes(data)
        first = cubefs_stats(mnt, env=env)
        assert first["fuse_path"]["path"] == "io_uring"
        res = run_cubefs("serve", "--upgrade", "--socket", str(sock), timeout=120, env=env)
        assert "1 mount daemons replaced" in res.stdout or "1 mount daemon replaced" in res.stdout, res.stdout
        second = cubefs_stats(mnt, env=env)
        assert second["pid"] != first["pid"] and second["restarts"] == 1
        assert second["fuse_path"]["path"] == "io_uring", second["fuse_path"]
        assert _uncached(mnt / "before") == data
        (mnt / "after").write_bytes(b"written after")
        assert _uncached(mnt / "after") == b"written after"
        assert _gone(int(first["pid"]))
    finally:
        if os.path.ismount(mnt):
            run_cubefs("umount", str(mnt), check=False, env=env)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_ring_entries_lay_out_requests_and_refuse_a_reply_too_big() -> None:
    """The entry layout without a mount: a request the kernel would copy in (header, op
    header, payload) comes out as one /dev/fuse-shaped message; a reply is copied in front
    of its payload with its size; a reply larger than the entry's payload is answered EIO
    (it would run into the next entry's header); SQEs the kernel refuses (a bad fd) are
    all completed, none left behind for the next submit."""
    import struct

    from cubefs.fuse import protocol as p
    from cubefs.fuse import uring as u

    ring = u.FuseRing(-1, queues=1, per_queue=2, payload=8192)
    try:
        i, base = 1, 1 * ring.stride
        op_header, payload = b"H" * 16, b"p" * 100
        length = u.IN_HEADER_SIZE + len(op_header) + len(payload)
        ring.view[base : base + u.IN_HEADER_SIZE] = struct.pack("<IIQQIIII", length, 15, 77, 5, 0, 0, 0, 0)
        ring.view[base + u.OP_IN : base + u.OP_IN + 16] = op_header
        struct.pack_into("<I", ring.view, base + u.ENT_IN_OUT + 16, len(payload))
        ring.view[base + u.STAGE : base + u.STAGE + len(payload)] = payload
        msg = bytes(ring.request(i))
        assert msg == struct.pack("<IIQQIIII", length, 15, 77, 5, 0, 0, 0, 0) + op_header + payload
        assert ring.uniques[i] == 77

        ring.commit(i, [p.reply(77, b"abc"), b"defg"])  # the header as given: the kernel reads the size
        assert bytes(ring.view[base : base + 16]) == struct.pack("<IiQ", 16 + 3, 0, 77)
        assert struct.unpack_from("<I", ring.view, base + u.ENT_IN_OUT + 16)[0] == 7
        assert bytes(ring.view[base + u.STAGE : base + u.STAGE + 7]) == b"abcdefg"

        ring.commit(i, p.reply(77, b"x" * (ring.payload + 1)))
        assert bytes(ring.view[base : base + 16]) == p.error_reply(77, 5)  # EIO
        assert struct.unpack_from("<I", ring.view, base + u.ENT_IN_OUT + 16)[0] == 0
        assert bytes(ring.view[(i + 1) * ring.stride - 1 : (i + 1) * ring.stride]) == b"\0"

        assert ring.ring.submit() == 2  # both commits, on fd -1: each completes with -EBADF
        deadline = time.monotonic() + 5
        while ring.ring.ready() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [res for _i, res in ring.ring.reap()] == [-9, -9]
        assert ring.ring.submit() == 0 and ring.ring.pending == 0
    finally:
        ring.close()
