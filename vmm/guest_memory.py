"""Guest RAM as a vhost-user backend reaches it.

QEMU's memory table gives, per region, a file descriptor, the guest-physical
address and QEMU's own virtual address.  Where QEMU maps the region *shared*
(a memfd, a ``share=on`` file) we map the descriptor too and read and write
guest memory directly.  Where QEMU maps it *privately* — a clone of a VM
template maps the template's RAM file copy-on-write, so that clones share its
pages until they write them — the file holds the template, not the guest:
then we read and write in QEMU's address space with process_vm_readv/writev
(which needs the right to ptrace QEMU: root, or the same user without Yama
restrictions).  Which is which is read from ``/proc/<QEMU>/maps``.

Every access goes through a :class:`Span`, a range checked against the
table when it is made, so an address from the guest never reaches memory
outside the region it names.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any


class RingError(Exception):
    """A guest address or ring that cannot be used."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                    ctypes.c_ulong]
    _fn.restype = ctypes.c_ssize_t


class Span:
    """A checked range of guest memory."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple[int, ...]:
        return fmt.unpack(self.read(offset, fmt.size))

    def pack(self, fmt: struct.Struct, offset: int, *values: int) -> None:
        self.write(offset, fmt.pack(*values))


class MappedSpan(Span):
    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        return bytes(self.view[offset : len(self.view) if n is None else offset + n])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.view[offset : offset + len(data)] = data

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple[int, ...]:
        return fmt.unpack_from(self.view, offset)

    def pack(self, fmt: struct.Struct, offset: int, *values: int) -> None:
        fmt.pack_into(self.view, offset, *values)


class RemoteSpan(Span):
    __slots__ = ("addr", "pid", "size")

    def __init__(self, pid: int, addr: int, size: int) -> None:
        self.pid = pid
        self.addr = addr
        self.size = size

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        n = self.size - offset if n is None else n
        buf = ctypes.create_string_buffer(n)
        _vm_copy(_libc.process_vm_readv, self.pid, ctypes.addressof(buf), n, [(self.addr + offset, n)], "read")
        return buf.raw

    def write(self, offset: int, data: bytes | memoryview) -> None:
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
        _vm_copy(_libc.process_vm_writev, self.pid, ctypes.addressof(buf), len(data),
                 [(self.addr + offset, len(data))], "write")


IOV_MAX = 1024


def _remote(spans: list[Span]) -> list[RemoteSpan]:
    """``spans`` if all are in QEMU's address space (one call moves them all), else []."""
    remote = [sp for sp in spans if isinstance(sp, RemoteSpan)]
    return remote if remote and len(remote) == len(spans) <= IOV_MAX else []


def gather(spans: list[Span]) -> bytes:
    """The bytes of ``spans`` in order: one process_vm_readv for spans in QEMU's
    address space (a descriptor chain is one request)."""
    remote = _remote(spans)
    if remote:
        n = sum(sp.size for sp in remote)
        buf = ctypes.create_string_buffer(n)
        _vm_copy(_libc.process_vm_readv, remote[0].pid, ctypes.addressof(buf), n,
                 [(sp.addr, sp.size) for sp in remote], "read")
        return buf.raw
    return b"".join(sp.read() for sp in spans)


def scatter(parts: list[bytes | memoryview], spans: list[Span]) -> int:
    """Copy ``parts`` into ``spans`` in order (one process_vm_writev for spans in
    QEMU's address space); bytes written.  RingError if they do not fit."""
    total = sum(len(memoryview(x).cast("B")) for x in parts)
    if total > sum(len(sp) for sp in spans):
        raise RingError("the reply does not fit the request's writable buffers")
    remote = _remote(spans)
    if remote:
        data = b"".join(parts)
        targets, left = [], total
        for sp in remote:
            if left == 0:
                break
            targets.append((sp.addr, min(sp.size, left)))
            left -= targets[-1][1]
        buf = (ctypes.c_char * total).from_buffer_copy(data)
        _vm_copy(_libc.process_vm_writev, remote[0].pid, ctypes.addressof(buf), total, targets, "write")
        return total
    written, bi, boff = 0, 0, 0
    for part in parts:
        src = memoryview(part).cast("B")
        while len(src):
            dst = spans[bi]
            n = min(len(src), len(dst) - boff)
            dst.write(boff, src[:n])
            src, boff, written = src[n:], boff + n, written + n
            if boff == len(dst):
                bi, boff = bi + 1, 0
    return written


def _vm_copy(fn: Any, pid: int, local_addr: int, n: int, remote: list[tuple[int, int]], what: str) -> None:
    """One process_vm_readv/writev between our buffer and QEMU's address space."""
    local = _Iovec(local_addr, n)
    iov = (_Iovec * len(remote))(*[_Iovec(addr, size) for addr, size in remote])
    got = fn(pid, ctypes.byref(local), 1, iov, len(remote), 0)
    if got != n:
        raise RingError(f"cannot {what} {n} bytes of guest memory in QEMU (pid {pid}): "
                        f"{os.strerror(ctypes.get_errno()) if got < 0 else 'short ' + what}")


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mm: mmap.mmap | None  # None: private in QEMU, reached through its address space
    view: memoryview | None
    base: int  # offset of the region's start in the mapping


def private_in(pid: int, uva: int, size: int) -> bool:
    """Whether QEMU (``pid``) maps [uva, uva+size) privately (copy-on-write)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                span, perms = line.split(maxsplit=2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= uva < hi:
                    return perms[3] == "p" and uva + size <= hi
    except (OSError, ValueError):
        pass
    return False


class GuestMemory:
    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.pid = 0  # QEMU's, when known (SO_PEERCRED)

    def replace(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        self.close()
        for (gpa, size, uva, offset), fd in zip(regions, fds):
            if self.pid and private_in(self.pid, uva, size):
                os.close(fd)
                self.regions.append(Region(gpa, size, uva, None, None, 0))
                continue
            mm = mmap.mmap(fd, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            self.regions.append(Region(gpa, size, uva, mm, memoryview(mm), offset))

    def _span(self, addr: int, length: int, by_uva: bool) -> Span:
        for r in self.regions:
            start = r.uva if by_uva else r.gpa
            if start <= addr and addr + length <= start + r.size:
                off = addr - start
                if r.view is None:
                    return RemoteSpan(self.pid, r.uva + off, length)
                return MappedSpan(r.view[r.base + off : r.base + off + length])
        raise RingError(f"address {addr:#x}+{length} is outside guest memory")

    def gpa(self, addr: int, length: int) -> Span:
        """Guest-physical [addr, addr+length): descriptors point there."""
        return self._span(addr, length, by_uva=False)

    def uva(self, addr: int, length: int) -> Span:
        """QEMU-virtual [addr, addr+length): ring addresses are given so."""
        return self._span(addr, length, by_uva=True)

    @property
    def private(self) -> bool:
        return any(r.view is None for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            if r.view is not None and r.mm is not None:
                r.view.release()
                r.mm.close()
        self.regions = []


LOG_PAGE = 0x1000  # VHOST_LOG_PAGE: one bit of the dirty log per 4 KiB of guest-physical memory


def _atomic_or() -> Any:
    """``__atomic_fetch_or_1`` from libatomic (a ``lock or`` on x86), or None without it."""
    try:
        fn = ctypes.CDLL("libatomic.so.1").__atomic_fetch_or_1
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    fn.restype = ctypes.c_uint8
    return fn


_fetch_or = _atomic_or()


class DirtyLog:
    """The dirty-page log QEMU hands over with ``SET_LOG_BASE`` (protocol feature LOG_SHMFD)
    while it migrates a running VM: a bitmap, bit ``page % 8`` of byte ``page // 8`` for
    guest-physical page ``page``, which QEMU reads and clears to resend the pages a
    back-end wrote.  The spec asks for atomic updates: QEMU clears 64 bits at a time with
    an exchange and may share one log among several vhost devices, so a plain
    read-modify-write of a byte could drop a bit another writer set between the two;
    libatomic's byte ``fetch_or`` is one locked instruction.  Marking is off the path of a
    paused VM (the only way we save one): QEMU enables logging only for a running one."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        try:
            self.mm = mmap.mmap(fd, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = size
        self.offset = offset
        self._bytes: Any = (ctypes.c_uint8 * (size + offset)).from_buffer(self.mm)
        self._base = ctypes.addressof(self._bytes) + offset
        self.marked = 0  # bits set, for tests and logs

    def mark(self, addr: int, length: int) -> bool:
        """Mark the pages of guest-physical [addr, addr+length) dirty; False (nothing marked)
        if the log does not cover them all."""
        if length <= 0:
            return True
        first, last = addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE
        if addr < 0 or last // 8 >= self.size:
            return False
        for page in range(first, last + 1):
            byte, bit = page // 8, 1 << (page % 8)
            if _fetch_or is not None:
                _fetch_or(self._base + byte, bit, 5)  # __ATOMIC_SEQ_CST
            else:
                self._bytes[self.offset + byte] |= bit
            self.marked += 1
        return True

    def close(self) -> None:
        self._bytes = None  # the ctypes view holds an export of the mapping, which close() refuses
        self.mm.close()
