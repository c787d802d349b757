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
pages are cleared and their data punched out (a hole); a written page that
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

import array
import ctypes
import os
import struct
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
    # bit 63 present, 62 swapped, 61 file-page or shared-anonymous
    entries = array.array("Q")
    entries.frombytes(raw)
    return bytes(1 if e >> 62 and not (e >> 61) & 1 else 0 for e in entries)


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
    become holes with their bits cleared.  Returns the pages kept."""
    lay = layout(path, block)
    if len(written) < lay.pages:
        raise MemSnapError(f"{path}: {lay.pages} pages in the file, {len(written)} in the page map")
    nbytes = (lay.pages + 7) // 8
    keep = _pack_bits(written[: lay.pages])
    fd = os.open(path, os.O_RDWR)
    try:
        had = os.pread(fd, nbytes, lay.bitmap_offset)
        # runs of pages that are in the file but are the template's: holes.  Byte by byte, since
        # most bytes are zero: 8 ms for 256 MiB, where shifting one 65,536-bit integer per run
        # took 0.4 s
        start = -1
        for i, (h, k) in enumerate(zip(had, keep, strict=True)):
            drop = h & ~k
            if (drop == 0xFF and start >= 0) or (drop == 0 and start < 0):
                continue  # a run goes on, or no run: nothing changes in this byte
            for bit in range(8):
                page = i * 8 + bit
                if drop >> bit & 1:
                    if start < 0:
                        start = page
                elif start >= 0:
                    _fallocate(fd, _PUNCH, lay.pages_offset + start * PAGE, (page - start) * PAGE)
                    start = -1
        if start >= 0:
            _fallocate(fd, _PUNCH, lay.pages_offset + start * PAGE, (nbytes * 8 - start) * PAGE)
        os.pwrite(fd, keep, lay.bitmap_offset)
    finally:
        os.close(fd)
    return sum(written[: lay.pages])


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
    bits = int("".join("1" if f else "0" for f in reversed(flags)) or "0", 2)
    return bits.to_bytes((len(flags) + 7) // 8, "little")
