"""The vhost-user-fs backend against a hostile guest: descriptors outside guest memory,
descriptor loops, garbage FUSE requests.  A guest kernel never sends these, so this
side plays QEMU and the guest driver itself (a memfd as guest RAM, the rings laid out
by hand) beside the real-QEMU boot in test_vm.py; the backend is the real daemon."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cubefs

from cubefs.fuse import protocol as p
from vmm.machine import wait_gone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "bench"))
from delayproxy import DelayProxy

RAM = 1 << 20
UVA = 0x7F00_0000_0000  # where "QEMU" has the RAM mapped: any value; the backend translates
QSIZE = 8
RINGS = {0: 0x1000, 1: 0x4000}  # per queue: desc table, then avail at +0x100, used at +0x200
DATA = 0x10000  # request and reply buffers from here


class FakeGuest:
    def __init__(self, sock: str, private: bool = False) -> None:
        """``private``: "QEMU" (this process) maps guest RAM copy-on-write, as a template's
        clone does; the backend must then reach it through our address space, since
        the file it is handed holds none of what we write."""
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, RAM)
        self.ram = mmap.mmap(self.memfd, RAM, flags=mmap.MAP_PRIVATE if private else mmap.MAP_SHARED)
        self.uva = ctypes.addressof(ctypes.c_char.from_buffer(self.ram)) if private else UVA
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(sock)
        self.kick = {q: os.eventfd(0) for q in RINGS}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in RINGS}
        self.avail_idx = {q: 0 for q in RINGS}
        self.used_seen = {q: 0 for q in RINGS}
        self.next_buf = DATA

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        msg = struct.pack("<III", request, 1, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.conn.sendmsg([msg], anc)

    def ask(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        return self._reply(request)

    def setup(self, protocol_features: int = 0) -> None:
        features = struct.unpack("<Q", self.ask(1))[0]
        assert features & (1 << 32)  # VERSION_1, without which QEMU refuses the device
        assert features & (1 << 26)  # VHOST_F_LOG_ALL, without which QEMU refuses to migrate
        self.send(2, struct.pack("<Q", (1 << 32) | (1 << 30)))
        offered = struct.unpack("<Q", self.ask(15))[0]
        assert offered & protocol_features == protocol_features
        self.send(16, struct.pack("<Q", protocol_features))
        self.send(3)
        uva = self.uva
        self.send(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, RAM, uva, 0), (self.memfd,))
        for q, base in RINGS.items():
            self.send(8, struct.pack("<II", q, QSIZE))
            self.send(10, struct.pack("<II", q, 0))
            self.send(9, struct.pack("<IIQQQQ", q, 0, uva + base, uva + base + 0x200, uva + base + 0x100, 0))
            self.send(12, struct.pack("<Q", q), (self.kick[q],))
            self.send(13, struct.pack("<Q", q), (self.call[q],))
            self.send(18, struct.pack("<II", q, 1))

    def buffer(self, data: bytes = b"", size: int = 0) -> tuple[int, int]:
        addr = self.next_buf
        self.ram[addr : addr + len(data)] = data
        self.next_buf += max(len(data), size) + 64
        return addr, max(len(data), size)

    def submit(self, descs: list[tuple[int, int, int, int]], q: int = 1) -> None:
        """Put a chain (addr, len, flags, next) at the start of the table and make it available."""
        base = RINGS[q]
        for i, (addr, length, flags, nxt) in enumerate(descs):
            struct.pack_into("<QIHH", self.ram, base + 16 * i, addr, length, flags, nxt)
        avail = base + 0x100
        struct.pack_into("<H", self.ram, avail + 4 + 2 * (self.avail_idx[q] % QSIZE), 0)
        self.avail_idx[q] += 1
        struct.pack_into("<H", self.ram, avail + 2, self.avail_idx[q])
        os.eventfd_write(self.kick[q], 1)

    def used(self, q: int = 1) -> tuple[int, int]:
        """Wait for the next used entry: (head, bytes written)."""
        used = RINGS[q] + 0x200
        deadline = time.monotonic() + 10
        while struct.unpack_from("<H", self.ram, used + 2)[0] == self.used_seen[q]:
            assert time.monotonic() < deadline, "the backend did not answer"
            if select.select([self.call[q]], [], [], 0.1)[0]:
                os.eventfd_read(self.call[q])  # the interrupt, acknowledged
        entry = struct.unpack_from("<II", self.ram, used + 4 + 8 * (self.used_seen[q] % QSIZE))
        self.used_seen[q] += 1
        return entry

    def fuse(self, opcode: int, nodeid: int, body: bytes, reply_room: int = 4096) -> tuple[int, bytes]:
        w_addr = self.put_request(opcode, nodeid, body, reply_room)
        _head, written = self.used()
        return written, bytes(self.ram[w_addr : w_addr + written])

    def put_request(self, opcode: int, nodeid: int, body: bytes, reply_room: int = 4096) -> int:
        """Make a FUSE request available (without waiting for it); where its reply goes."""
        if self.next_buf > RAM - 2 * (reply_room + 4096):
            self.next_buf = DATA  # every earlier request was answered: reuse the buffers
        req = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, 7, nodeid, 0, 0, 1, 0, 0) + body
        r_addr, r_len = self.buffer(req)
        w_addr, w_len = self.buffer(size=reply_room)
        self.submit([(r_addr, r_len, 1, 1), (w_addr, w_len, 2, 0)])
        return w_addr

    def ok(self, opcode: int, nodeid: int, body: bytes = b"", reply_room: int = 4096) -> bytes:
        """A request that must succeed: its reply's payload."""
        written, out = self.fuse(opcode, nodeid, body, reply_room)
        assert written >= p.OUT_HEADER.size, f"opcode {opcode}: no reply"
        error = struct.unpack_from("<i", out, 4)[0]
        assert error == 0, f"opcode {opcode} on {nodeid}: {os.strerror(-error)}"
        return out[p.OUT_HEADER.size :]

    def lookup(self, parent: int, name: bytes) -> int:
        return int(p.ENTRY_OUT.unpack_from(self.ok(p.LOOKUP, parent, name + b"\0"))[0])

    def read(self, ino: int, size: int = 4096) -> bytes:
        return self.ok(p.READ, ino, p.READ_IN.pack(0, 0, size, 0, 0, 0, 0), reply_room=size + 64)

    def stop_ring(self, q: int) -> int:
        """GET_VRING_BASE: the ring stops; the next available index."""
        index, base = struct.unpack("<II", self.ask(11, struct.pack("<II", q, 0)))
        assert index == q
        return base

    def save_state(self) -> tuple[bytes, int]:
        """SET_DEVICE_STATE_FD (save) with a pipe, read to EOF, CHECK_DEVICE_STATE: (state, check)."""
        r, w = os.pipe()
        self.send(42, struct.pack("<II", 0, 0), (w,))
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert struct.unpack("<Q", self._reply(42))[0] == 1 << 8  # our pipe, no fd of its own
            blob = f.read()
        return blob, struct.unpack("<Q", self.ask(43))[0]

    def load_state(self, blob: bytes) -> int:
        """SET_DEVICE_STATE_FD (load) with a pipe, the state written and closed: CHECK's answer."""
        r, w = os.pipe()
        self.send(42, struct.pack("<II", 1, 0), (r,))
        os.close(r)
        assert struct.unpack("<Q", self._reply(42))[0] == 1 << 8
        with os.fdopen(w, "wb") as f:
            f.write(blob)
        return int(struct.unpack("<Q", self.ask(43))[0])

    def _reply(self, request: int) -> bytes:
        head = self.conn.recv(12, socket.MSG_WAITALL)
        req, flags, size = struct.unpack("<III", head)
        assert req == request and flags == 0x5
        return self.conn.recv(size, socket.MSG_WAITALL)


@pytest.mark.parametrize("private", [False, True], ids=["shared-ram", "private-ram"])
def test_a_hostile_guest_fails_its_own_requests_only(tmp_path: Path, local_store: str, private: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hi")
    run_cubefs("build", str(src), "--tag", "tiny:1", "--store", local_store)
    sock = tmp_path / "fs.sock"
    run_cubefs("mount", "tiny:1", str(sock), "--transport", "virtiofs", "--store", local_store, "--cache-dir",
               str(tmp_path / "cache"))
    pid = json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"]
    g = FakeGuest(str(sock), private)
    try:
        g.setup()
        written, out = g.fuse(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
        assert written == p.OUT_HEADER.size + p.INIT_OUT.size and struct.unpack_from("<i", out, 4)[0] == 0
        # A descriptor outside guest RAM: that request fails (length 0), nothing else.
        w_addr, w_len = g.buffer(size=256)
        g.submit([(0x4000_0000, 64, 1, 1), (w_addr, w_len, 2, 0)])
        assert g.used() == (0, 0)
        # A descriptor chain that loops on itself (NEXT, pointing at its own slot).
        r_addr, r_len = g.buffer(b"x" * 64)
        g.submit([(r_addr, r_len, 1, 0)])
        assert g.used() == (0, 0)
        # A request shorter than a FUSE header, and an opcode nobody knows.
        g.submit([(g.buffer(b"short!")[0], 6, 0, 0)])
        assert g.used()[1] == 0
        written, out = g.fuse(9999, 1, b"")
        assert written == p.OUT_HEADER.size and struct.unpack_from("<i", out, 4)[0] < 0
        # A reply that cannot fit: an error, or nothing; never a write past the buffer.
        written, out = g.fuse(p.GETATTR, 1, bytes(16), reply_room=8)
        assert written == 0
        # And the backend still serves this guest.
        written, out = g.fuse(p.GETATTR, 1, bytes(16))
        assert written == p.OUT_HEADER.size + p.ATTR_OUT.size + p.ATTR.size
        assert struct.unpack_from("<i", out, 4)[0] == 0
        os.kill(pid, 0)  # alive
    finally:
        g.conn.close()


DEVICE_STATE = (1 << 1) | (1 << 19)  # protocol features LOG_SHMFD, DEVICE_STATE


def _serve_volume(tmp_path: Path, store: str, sock: Path) -> int:
    """A cubefs daemon serving volume "v" on ``sock`` over vhost-user: its pid."""
    run_cubefs("mount", "--volume", "v", str(sock), "--transport", "virtiofs", "--volume-dir",
               str(tmp_path / "vols"), "--store", store, "--cache-dir", str(tmp_path / "cache"))
    return int(json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"])


def _gone(pid: int, timeout: float = 30) -> None:
    assert wait_gone(pid, timeout), f"daemon {pid} did not end"


def _daemon_log(tmp_path: Path) -> str:
    return "".join(f.read_text() for f in sorted((tmp_path / "cache" / "logs").glob("mount-*.log")))


def test_a_saved_session_goes_on_in_a_new_daemon(tmp_path: Path, local_store: str) -> None:
    """What QEMU does to save a VM with its root attached and restore it elsewhere: the rings
    stop, the back-end's state goes out through SET_DEVICE_STATE_FD, and a *new* daemon over
    the volume takes it in.  The guest sends no INIT there: the node IDs it holds keep
    working, among them a file it unlinked and keeps open, which neither daemon's start
    nor the load may purge."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the image\n")
    (src / "gone").write_text("unlinked, still open\n")
    run_cubefs("build", str(src), "--tag", "tiny:1", "--store", local_store)
    run_cubefs("volume", "create", "v", "--from", "tiny:1", "--store", local_store, "--volume-dir",
               str(tmp_path / "vols"))
    pid = _serve_volume(tmp_path, local_store, tmp_path / "a.sock")
    g = FakeGuest(str(tmp_path / "a.sock"))
    try:
        g.setup(DEVICE_STATE)
        g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
        hello, gone = g.lookup(1, b"hello"), g.lookup(1, b"gone")
        made = p.ENTRY_OUT.unpack_from(g.ok(p.CREATE, 1, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"new\0"))[0]
        data = b"written before the save\n"
        assert p.WRITE_OUT.unpack_from(g.ok(p.WRITE, made, p.WRITE_IN.pack(0, 0, len(data), 0, 0, 0, 0) + data))[0] \
            == len(data)
        g.ok(p.UNLINK, 1, b"gone\0")  # the guest still holds it: an orphan
        assert [g.stop_ring(q) for q in (0, 1)] == [0, g.avail_idx[1]]
        blob, check = g.save_state()
        assert check == 0
        state = json.loads(blob)
        assert state["format"] == "cubefs-virtiofs-state" and state["version"] == 1
        assert state["session"]["minor"] == 31 and [gone, 1] in state["fs"]["lookups"]
    finally:
        g.conn.close()
    _gone(pid)  # the daemon ends with its QEMU; the volume is free for the next one

    pid = _serve_volume(tmp_path, local_store, tmp_path / "b.sock")
    g = FakeGuest(str(tmp_path / "b.sock"))
    try:
        g.setup(DEVICE_STATE)
        # States that must not load: each fails its CHECK, changes nothing, and the daemon serves on.
        bad = {
            b"\x00garbage\xff" * 10: "not JSON",
            json.dumps({**state, "version": 99}).encode(): "state version 99",
            json.dumps({**state, "fs": {**state["fs"], "lookups": [[424242, 1]]}}).encode(): "inode 424242",
            json.dumps({**state, "fs": {**state["fs"], "kind": "image"}}).encode(): "serves a volume",
            blob[: len(blob) // 2]: "not JSON",
        }
        for text in bad:
            assert g.load_state(text) == 1
        os.kill(pid, 0)
        _written, out = g.fuse(p.GETATTR, hello, bytes(16))  # nothing was taken over: no session yet
        assert struct.unpack_from("<i", out, 4)[0] == -errno.EIO
        log = _daemon_log(tmp_path)
        for why in bad.values():
            assert why in log
        assert g.load_state(blob) == 0
        # No INIT: the guest goes on with what it held.
        assert g.read(hello) == b"hello from the image\n"
        assert g.read(made) == data
        assert g.read(gone) == b"unlinked, still open\n"
        assert p.ATTR.unpack_from(g.ok(p.GETATTR, gone, bytes(16)), p.ATTR_OUT.size)[10] == 0  # nlink
        more = b"and after the restore\n"
        g.ok(p.WRITE, made, p.WRITE_IN.pack(0, len(data), len(more), 0, 0, 0, 0) + more)
        assert g.read(made) == data + more
        # Its last FORGET drops the orphan, in the new daemon.
        assert g.fuse(p.FORGET, gone, p.FORGET_IN.pack(1))[0] == 0
        _written, out = g.fuse(p.GETATTR, gone, bytes(16))
        assert struct.unpack_from("<i", out, 4)[0] == -errno.ENOENT
    finally:
        g.conn.close()
    _gone(pid)


def test_a_ring_stops_only_after_its_requests_in_flight_are_answered(tmp_path: Path, s3: Any) -> None:
    """GET_VRING_BASE while a read waits for a slow store: the answer comes after the read's
    reply is in the used ring (QEMU saves guest RAM after it; a reply written later is lost
    and the guest's reader waits forever), and other messages are not held up meanwhile."""
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(200_000)
    (src / "slow").write_bytes(payload)
    store = s3.store("vhostslow", "img")
    run_cubefs("build", str(src), "--tag", "slow:1", "--store", store, "--s3-endpoint", s3.endpoint)
    host, port = s3.hostport
    sock = tmp_path / "fs.sock"
    with DelayProxy(host, port, delay_ms=0) as proxy:
        run_cubefs("mount", "slow:1", str(sock), "--transport", "virtiofs", "--store", store, "--s3-endpoint",
                   proxy.endpoint, "--cache-dir", str(tmp_path / "cache"), "--cache-size", "0")
        pid = int(json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"])
        g = FakeGuest(str(sock))
        try:
            g.setup(DEVICE_STATE)
            g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
            ino = g.lookup(1, b"slow")
            proxy.delay = 1.5  # seconds before the store sees each request
            w_addr = g.put_request(p.READ, ino, p.READ_IN.pack(0, 0, 65536, 0, 0, 0, 0), reply_room=65536 + 64)
            time.sleep(0.3)  # the daemon has taken it and waits for the store
            used, done = RINGS[1] + 0x200, g.used_seen[1]
            assert struct.unpack_from("<H", g.ram, used + 2)[0] == done, "the read did not wait for the store"
            t0 = time.monotonic()
            base = g.stop_ring(1)
            took = time.monotonic() - t0
            assert base == g.avail_idx[1] and struct.unpack_from("<H", g.ram, used + 2)[0] == done + 1  # it is in
            assert took > 0.5, f"GET_VRING_BASE answered in {took:.2f} s, before the read"
            _head, written = struct.unpack_from("<II", g.ram, used + 4 + 8 * (done % QSIZE))
            assert written == p.OUT_HEADER.size + 65536
            assert bytes(g.ram[w_addr + p.OUT_HEADER.size : w_addr + written]) == payload[:65536]
            assert "requests in flight were answered" in _daemon_log(tmp_path)
        finally:
            g.conn.close()
        _gone(pid)


def test_writes_to_guest_memory_are_logged_while_qemu_migrates(tmp_path: Path, local_store: str) -> None:
    """VHOST_F_LOG_ALL: while QEMU migrates a running VM it re-sends the pages a back-end
    wrote, so every reply and used-ring entry we write must mark its page in the dirty log
    QEMU maps for us (bit page % 8 of byte page // 8); without LOG_ALL acked, none."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hi")
    run_cubefs("build", str(src), "--tag", "tiny:1", "--store", local_store)
    sock = tmp_path / "fs.sock"
    run_cubefs("mount", "tiny:1", str(sock), "--transport", "virtiofs", "--store", local_store, "--cache-dir",
               str(tmp_path / "cache"))
    pid = json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"]
    g = FakeGuest(str(sock))
    log_fd = os.memfd_create("dirty-log")
    size = RAM // 4096 // 8
    os.ftruncate(log_fd, size)
    try:
        g.setup(DEVICE_STATE)
        g.send(6, struct.pack("<QQ", size, 0), (log_fd,))  # SET_LOG_BASE: a reply is due
        assert struct.unpack("<Q", g._reply(6))[0] == 0
        dirty = mmap.mmap(log_fd, size)
        g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
        assert not any(dirty[:]), "logged while QEMU did not ask"
        base, used = RINGS[1], RINGS[1] + 0x200
        g.send(2, struct.pack("<Q", (1 << 32) | (1 << 30) | (1 << 26)))  # LOG_ALL on
        g.send(9, struct.pack("<IIQQQQ", 1, 1, g.uva + base, g.uva + used, g.uva + base + 0x100, used))
        g.ask(1)  # GET_FEATURES: answered only after the two above (the loop is sequential, the kick is not)
        g.next_buf = DATA + 5 * 4096 + 100  # a reply buffer across pages 0x15 and 0x16
        w_addr = g.put_request(p.GETATTR, 1, bytes(16), reply_room=4096)
        g.used()
        reply_pages = {w_addr // 4096, (w_addr + p.OUT_HEADER.size + p.ATTR_OUT.size + p.ATTR.size - 1) // 4096}
        wanted = reply_pages | {used // 4096}
        deadline = time.monotonic() + 5  # a used entry's page is marked just after it is written
        while (marked := {i * 8 + b for i, byte in enumerate(dirty[:]) for b in range(8) if byte >> b & 1}) != wanted:
            assert time.monotonic() < deadline, f"marked {marked}, not {wanted}"
            time.sleep(0.01)
        dirty.close()
    finally:
        g.conn.close()
        os.close(log_fd)
    _gone(pid)
    assert "Error" not in _daemon_log(tmp_path)  # it ended cleanly, its mappings closed


def test_an_image_session_moves_to_a_daemon_of_the_same_image_only(tmp_path: Path, local_store: str) -> None:
    """An image's node IDs are its inode numbers: the state names the image, loads into a
    daemon serving the same one (no INIT, reads work), and fails into another."""
    for tag, text in (("one:1", "first image\n"), ("two:1", "second image, other inodes\n")):
        src = tmp_path / tag.replace(":", "-")
        src.mkdir()
        (src / "file").write_text(text)
        run_cubefs("build", str(src), "--tag", tag, "--store", local_store)

    def serve(tag: str, sock: Path) -> tuple[int, FakeGuest]:
        run_cubefs("mount", tag, str(sock), "--transport", "virtiofs", "--store", local_store, "--cache-dir",
                   str(tmp_path / "cache"))
        pid = int(json.loads(run_cubefs("stats", str(sock), "--json").stdout)["pid"])
        g = FakeGuest(str(sock))
        g.setup(DEVICE_STATE)
        return pid, g

    pid, g = serve("one:1", tmp_path / "a.sock")
    try:
        g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
        ino = g.lookup(1, b"file")
        g.stop_ring(1)
        blob, check = g.save_state()
        assert check == 0 and json.loads(blob)["fs"]["kind"] == "image"
    finally:
        g.conn.close()
    _gone(pid)
    pid, g = serve("two:1", tmp_path / "b.sock")
    try:
        assert g.load_state(blob) == 1
        assert "the saved state is for image" in _daemon_log(tmp_path)
    finally:
        g.conn.close()
    _gone(pid)
    pid, g = serve("one:1", tmp_path / "c.sock")
    try:
        assert g.load_state(blob) == 0
        assert g.read(ino) == b"first image\n"
    finally:
        g.conn.close()
    _gone(pid)
