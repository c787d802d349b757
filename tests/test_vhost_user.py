"""The vhost-user-fs backend against a hostile guest: descriptors outside guest memory,
descriptor loops, garbage FUSE requests.  A guest kernel never sends these, so this
side plays QEMU and the guest driver itself (a memfd as guest RAM, the rings laid out
by hand) beside the real-QEMU boot in test_vm.py; the backend is the real daemon."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import run_cubefs

from cubefs.fuse import protocol as p

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
        head = self.conn.recv(12, socket.MSG_WAITALL)
        req, flags, size = struct.unpack("<III", head)
        assert req == request and flags == 0x5
        return self.conn.recv(size, socket.MSG_WAITALL)

    def setup(self) -> None:
        features = struct.unpack("<Q", self.ask(1))[0]
        assert features & (1 << 32)  # VERSION_1, without which QEMU refuses the device
        self.send(2, struct.pack("<Q", (1 << 32) | (1 << 30)))
        self.ask(15)
        self.send(16, struct.pack("<Q", 0))
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
        req = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, 7, nodeid, 0, 0, 1, 0, 0) + body
        r_addr, r_len = self.buffer(req)
        w_addr, w_len = self.buffer(size=reply_room)
        self.submit([(r_addr, r_len, 1, 1), (w_addr, w_len, 2, 0)])
        _head, written = self.used()
        return written, bytes(self.ram[w_addr : w_addr + written])


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
