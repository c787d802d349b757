"""The RAM file's trim (vmm/memsnap.py) on a mapped-ram file laid out as QEMU writes one.

The sandbox and VM snapshot tests trim QEMU's own files and restore from them; this one
checks page by page what a trim keeps, which a restored guest would only show as a wrong
byte somewhere in its memory."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from vmm import memsnap

P = memsnap.PAGE
PAGES = 4096  # a 16 MiB guest
BITMAP_AT, PAGES_AT = 0x1000, 0x100000
TAIL = b"the device state that follows the pages"


def page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * P


def qemu_file(path: Path, had: list[int]) -> int:
    """A mapped-ram file: stream head with block ``mem``'s header, its bitmap, its pages
    (those ``had`` marks; holes elsewhere), then the rest of the stream.  Returns the tail's offset."""
    head = b"\0" * 16 + bytes([3]) + b"mem" + struct.pack(">Q", PAGES * P) + \
        memsnap._HEADER.pack(1, P, BITMAP_AT, PAGES_AT)
    tail_at = PAGES_AT + PAGES * P + 5000
    with open(path, "wb") as f:
        f.write(head)
        f.seek(BITMAP_AT)
        f.write(memsnap._pack_bits(bytes(had)))
        for i, h in enumerate(had):
            if h:
                f.seek(PAGES_AT + i * P)
                f.write(page(i))
        f.seek(tail_at)
        f.write(TAIL)
    return tail_at


def test_a_trim_keeps_exactly_the_written_pages_and_the_rest_of_the_stream(tmp_path: Path) -> None:
    rng = random.Random(14)
    had = [1 if rng.random() < 0.5 else 0 for _ in range(PAGES)]
    # written by the guest: most in the file, a few not (zero pages QEMU left out)
    written = bytes(1 if (h and rng.random() < 0.3) or rng.random() < 0.02 else 0 for h in had)
    ram = tmp_path / "ram"
    tail_at = qemu_file(ram, had)
    size = ram.stat().st_size

    assert memsnap.trim(ram, written) == written.count(1)

    data = ram.read_bytes()
    assert len(data) == size and data[tail_at:] == TAIL
    assert memsnap._unpack_bits(data[BITMAP_AT:BITMAP_AT + PAGES // 8], PAGES) == written
    for i in range(PAGES):
        want = page(i) if had[i] and written[i] else bytes(P)  # a written page QEMU left out is zero
        assert data[PAGES_AT + i * P:PAGES_AT + (i + 1) * P] == want, f"page {i}"
    # the template's pages are holes now: what is allocated is about the kept pages
    kept = sum(1 for h, w in zip(had, written, strict=True) if h and w)
    assert ram.stat().st_blocks * 512 < (kept + 64) * P
    assert os.listdir(tmp_path) == ["ram"]  # no copy left behind
    assert (ram.stat().st_mode & 0o777) == 0o600


def test_a_trim_of_a_file_that_is_not_a_snapshot_is_refused_and_leaves_it(tmp_path: Path) -> None:
    other = tmp_path / "ram"
    other.write_bytes(b"not a mapped-ram stream" * 100)
    try:
        memsnap.trim(other, bytes(PAGES))
    except memsnap.MemSnapError as err:
        assert "no mapped-ram header" in str(err)
    else:
        raise AssertionError("a file without a mapped-ram header was trimmed")
    assert other.read_bytes() == b"not a mapped-ram stream" * 100
    assert os.listdir(tmp_path) == ["ram"]


def test_a_marked_file_loads_only_the_written_pages_before_its_space_is_reclaimed(tmp_path: Path) -> None:
    """What the sandbox service does (vmm/checkpoint.take(trim_later=True)): the bitmap first,
    at once (restores read it), the space after; the result is the trim's."""
    rng = random.Random(7)
    had = [1 if rng.random() < 0.5 else 0 for _ in range(PAGES)]
    written = bytes(1 if h and rng.random() < 0.3 else 0 for h in had)
    ram = tmp_path / "ram"
    qemu_file(ram, had)
    qemu_bitmap = memsnap.mark(ram, written)
    data = ram.read_bytes()
    assert memsnap._unpack_bits(qemu_bitmap, PAGES) == bytes(had)
    assert memsnap._unpack_bits(data[BITMAP_AT:BITMAP_AT + PAGES // 8], PAGES) == written
    memsnap.reclaim(ram, written, qemu_bitmap)
    after = ram.read_bytes()
    for i in range(PAGES):
        want = page(i) if had[i] and written[i] else bytes(P)
        assert after[PAGES_AT + i * P:PAGES_AT + (i + 1) * P] == want, f"page {i}"
    assert after[BITMAP_AT:BITMAP_AT + PAGES // 8] == data[BITMAP_AT:BITMAP_AT + PAGES // 8]
