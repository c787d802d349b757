"""Guest RAM in a snapshot: only the pages that differ from the template.

A sandbox restored from a VM template maps the template's RAM file
*privately*: a page the guest never wrote is the template's page, in the page
cache once for every sandbox; a page it wrote is a private copy.  The kernel
tells the two apart: ``/proc/PID/pagemap`` marks a private copy "present"
(or "swapped") and not "file-page".  Reading that for 256 MiB of RAM takes
~9 ms (65,536 entries).

QEMU cannot be told to leave such RAM out of a migration (``x-ignore-shared``
skips only ``share=on`` files, and QEMU 10's CPR modes refuse private RAM),
so a snapshot lets QEMU write RAM with its ``mapped-ram`` format (each page
at a fixed offset of the file, a bitmap of which pages are there) while the
guest runs, pauses it only at the switch-over (``pause-before-switchover``:
~16-25 ms measured here under TCG for a 256 MiB guest), and then *trims* the
file to the pages the guest had written at that instant: bits of template
pages are cleared (``mark``) and their data dropped (``reclaim``: the kept
pages copied into a sparse file that replaces QEMU's); a written page that
happens to be zero keeps its bit (mapped-ram leaves zero pages out, but here
"absent" means "the template's", not "zero").  Loading a trimmed file into
a QEMU that maps the same template privately reads only the set pages; every
other page is the template's, shared in the page cache.

The format is QEMU's (docs/devel/migration/mapped-ram.rst): after a RAM
block's name and length, a big-endian header (u32 version 1, u64 page size,
u64 bitmap offset, u64 pages offset); the bitmap is host-endian longs, bit
*i* for page *i*; page *i* is at ``pages_offset + i * page_size``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from cubefs.errors import CubefsError

PAGE = 4096
_HEADER = struct.Struct(">IQQQ")
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class MemSnapError(CubefsError):
    """A snapshot's RAM file is not what this module writes or reads."""


_libc = ctypes.CDLL(None, use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ram_mapping(pid: int, ram_file: Path) -> tuple[int, int]:
    """QEMU's mapping of ``ram_file`` (the guest's RAM): start and end address."""
    target = str(ram_file)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n").removesuffix(" (deleted)") == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                return lo, hi
    raise MemSnapError(f"QEMU (pid {pid}) does not map {ram_file}")


def written_pages(pid: int, lo: int, hi: int) -> bytes:
    """One byte per guest page of QEMU's private mapping [lo, hi): 1 where the guest
    has its own copy (present or swapped, and not the file's page), else 0."""
    n = (hi - lo) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        raw = f.read(n * 8)
    if len(raw) != n * 8:
        raise MemSnapError(f"short read of QEMU's page map ({len(raw)} of {n * 8} bytes)")
    # bit 63 present, 62 swapped, 61 file-page or shared-anonymous: all in each little-endian
    # entry's last byte, mapped in C (a Python loop over the entries took ~10 ms at 256 MiB)
    if sys.byteorder != "little":
        raise MemSnapError("pagemap entries are read as little-endian: this host is not")
    return raw[7::8].translate(_OWN_COPY)


@dataclass
class Layout:
    pages: int
    bitmap_offset: int
    pages_offset: int


def layout(path: Path, block: str = "mem", pages: int | None = None) -> Layout:
    """Where ``block``'s bitmap and pages are in a mapped-ram file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    name = bytes([len(block)]) + block.encode()
    at = head.find(name)
    while at >= 0:
        length = struct.unpack_from(">Q", head, at + len(name))[0]
        # the header follows the length, or the length and the region's address (x-ignore-shared)
        for skip in (8, 16):
            off = at + len(name) + skip
            if off + _HEADER.size <= len(head):
                version, page_size, bitmap_offset, pages_offset = _HEADER.unpack_from(head, off)
                if version == 1 and page_size == PAGE and 0 < bitmap_offset < pages_offset:
                    return Layout(length // PAGE, bitmap_offset, pages_offset)
        at = head.find(name, at + 1)
    raise MemSnapError(f"{path}: no mapped-ram header for RAM block {block!r} (not a snapshot of ours?)")


def trim(path: Path, written: bytes, block: str = "mem") -> int:
    """Keep in the mapped-ram file ``path`` only the pages ``written`` marks; the rest
    become holes with their bits cleared.  Returns the pages kept.  :func:`mark`, then
    :func:`reclaim`."""
    had = mark(path, written, block)
    reclaim(path, written, had, block)
    return written[: layout(path, block).pages].count(1)


def mark(path: Path, written: bytes, block: str = "mem") -> bytes:
    """Set the file's bitmap to the pages ``written`` marks (one 8 KiB write at 256 MiB):
    from then on a load reads only those, the rest being the template's, so the file
    restores exactly what a trimmed one does.  Returns the bitmap QEMU wrote, for
    :func:`reclaim`."""
    lay = layout(path, block)
    if len(written) < lay.pages:
        raise MemSnapError(f"{path}: {lay.pages} pages in the file, {len(written)} in the page map")
    nbytes = (lay.pages + 7) // 8
    fd = os.open(path, os.O_RDWR)
    try:
        had = os.pread(fd, nbytes, lay.bitmap_offset)
        os.pwrite(fd, _pack_bits(bytes(written[: lay.pages]).translate(_ONE)), lay.bitmap_offset)
    finally:
        os.close(fd)
    return had


def reclaim(path: Path, written: bytes, had: bytes, block: str = "mem") -> None:
    """Free the space of the pages :func:`mark` left out (``had``: the bitmap QEMU wrote):
    the kept pages are *copied* into a new sparse file that replaces the old one, rather
    than the others punched out in place: ext4 writes a range's dirty pages back before
    it punches a hole there (``filemap_write_and_wait_range``), so punching ~3,000 runs
    out of the 120 MiB QEMU had just written wrote most of it to disk first (0.1-0.45 s,
    up to 5 s under load; 256 MiB guest, 35 MiB kept); the copy moves 35 MiB within the
    page cache and the old file is dropped unwritten.  Both files hold the same bitmap,
    kept pages and device state, so a restore reading either (or each of its multifd
    channels a different one, during the rename) loads the same guest."""
    lay = layout(path, block)
    flags = bytes(written[: lay.pages]).translate(_ONE)
    tmp = path.with_name(path.name + ".trim")
    src = os.open(path, os.O_RDONLY)
    try:
        # a page is copied if the guest wrote it and QEMU put it in the file (a written page QEMU
        # left out is zero: a hole, its bit set)
        had_flags = _unpack_bits(had, lay.pages)
        both = (int.from_bytes(had_flags, "little") & int.from_bytes(flags, "little")).to_bytes(lay.pages, "little")
        size = os.fstat(src).st_size
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _copy_data(src, dst, 0, lay.pages_offset)  # the stream's head: header, other blocks, the bitmap
            for run in re.finditer(rb"\x01+", both):
                _copy(src, dst, lay.pages_offset + run.start() * PAGE, (run.end() - run.start()) * PAGE)
            _copy_data(src, dst, lay.pages_offset + lay.pages * PAGE, size)  # the stream's tail: devices
            if os.fstat(dst).st_size < size:  # it ends in a hole
                os.ftruncate(dst, size)
        finally:
            os.close(dst)
        # atomically: a restore that opens the file meanwhile gets one or the other, both good
        # (ext4's auto_da_alloc starts writing the copy back here: ~0.2 s, off the API's path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)


def _copy(src: int, dst: int, offset: int, length: int) -> None:
    """``length`` bytes at ``offset`` of ``src`` to the same offset of ``dst``, in the kernel."""
    end = offset + length
    while offset < end:
        n = os.copy_file_range(src, dst, end - offset, offset, offset)
        if n <= 0:
            raise MemSnapError(f"short copy of the RAM file at {offset} ({end - offset} bytes left)")
        offset += n


def _copy_data(src: int, dst: int, start: int, end: int) -> None:
    """The data of ``src`` in [start, end) to ``dst``, holes left holes (SEEK_DATA/SEEK_HOLE)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole to the end of the file
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
        _copy(src, dst, data, hole - data)
        pos = hole


def self_contained(path: Path, block: str = "mem") -> Layout:
    """Make the mapped-ram file ``path`` a RAM image that QEMU maps rather than loads: its
    pages region *is* the guest's RAM (a page QEMU left out is zero, and a hole reads as zero),
    so a restore maps the file privately from ``pages_offset`` and every VM restored from it
    shares its pages in the page cache; the bitmap is cleared so that the load reads no page
    (reading would copy each one into a private page of its own)."""
    lay = layout(path, block)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes((lay.pages + 7) // 8), lay.bitmap_offset)
    finally:
        os.close(fd)
    return lay


def _pack_bits(flags: bytes) -> bytes:
    """One byte per page (0/1) -> a little-endian bitmap, 8 pages a byte."""
    bits = int(flags[::-1].translate(_DIGIT) or b"0", 2)
    return bits.to_bytes((len(flags) + 7) // 8, "little")


def _unpack_bits(bitmap: bytes, pages: int) -> bytes:
    """A little-endian bitmap -> one byte per page (0/1)."""
    return b"".join(_EXPAND[b] for b in bitmap)[:pages]


_ONE = bytes([0] + [1] * 255)  # any non-zero flag is 1
_DIGIT = bytes.maketrans(b"\x00\x01", b"01")
_EXPAND = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]
# pagemap's top byte: bit 63 present (0x80), 62 swapped (0x40), 61 file-page or shared (0x20)
_OWN_COPY = bytes(1 if b & 0xC0 and not b & 0x20 else 0 for b in range(256))
