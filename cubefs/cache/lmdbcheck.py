"""Is an LMDB file safe to map?  Checked with ``pread``, never through a mapping.

LMDB reads its pages through a shared mapping of ``data.mdb``.  A page past
the end of the file is not an error there but a ``SIGBUS`` that kills the
process with no log line (measured: a cache file truncated to half its size
killed the mount daemon at its first read; a meta page whose last page
number was raised did the same at mount).  LMDB itself checks a page number
only against the meta page's ``last_pg``, so what must hold before a mapping
is touched is: both meta pages are meta pages of this LMDB version, agree on
the page size, and every page they can reach (up to ``last_pg``, and the two
B-tree roots) lies inside the file.  Anything LMDB can still trip on inside
the file (a damaged branch page) is an ordinary :class:`lmdb.Error`.

Layout (LMDB 0.9, 64-bit; ``mdb.c``): a page begins with a 16-byte header
(page number u64, pad u16, flags u16 at byte 10, ...); pages 0 and 1 are meta
pages (flag ``P_META``), whose ``MDB_meta`` follows the header: magic u32,
version u32, address u64, map size u64, two ``MDB_db`` of 48 bytes (the free
list's first field holds the page size; each ends with its root page
number), last page number u64, transaction id u64.
"""

from __future__ import annotations

import os
import struct
import time

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_META = 0x08
P_INVALID = (1 << 64) - 1  # the root of an empty tree
META_BYTES = 152


def _parse(raw: bytes) -> tuple[int, int, int, int, int, int, int, int]:
    """(flags, magic, version, psize, free root, main root, last page, txnid) of one meta page."""
    flags = struct.unpack_from("<H", raw, 10)[0]
    magic, version = struct.unpack_from("<II", raw, 16)
    psize = struct.unpack_from("<I", raw, 40)[0]
    free_root = struct.unpack_from("<Q", raw, 80)[0]
    main_root = struct.unpack_from("<Q", raw, 128)[0]
    last, txnid = struct.unpack_from("<QQ", raw, 136)
    return flags, magic, version, psize, free_root, main_root, last, txnid


def problem(fd: int) -> str | None:
    """What makes the open file ``fd`` (a ``data.mdb``) unsafe to map, or None.
    An empty file is fine: LMDB initialises it.  A failed check is read again
    once after a millisecond: another process may have been writing a meta page."""
    found = _problem(fd)
    if found is not None:
        time.sleep(0.001)
        found = _problem(fd)
    return found


def _problem(fd: int) -> str | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    first = os.pread(fd, META_BYTES, 0)
    if len(first) < META_BYTES:
        return f"the file is {size} bytes, shorter than a meta page"
    psize = _parse(first)[3]
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"meta page 0 names a page size of {psize}"
    second = os.pread(fd, META_BYTES, psize)
    if len(second) < META_BYTES:
        return f"the file is {size} bytes, shorter than its two meta pages"
    for n, raw in enumerate((first, second)):
        flags, magic, version, page_size, free_root, main_root, last, _txnid = _parse(raw)
        if not flags & P_META or magic != MAGIC or version != DATA_VERSION:
            return f"meta page {n} is not an LMDB {DATA_VERSION} meta page (magic {magic:#x}, version {version})"
        if page_size != psize:
            return f"meta pages disagree on the page size ({psize}, {page_size})"
        if (last + 1) * psize > size:
            return f"meta page {n} names page {last}, past the end of the file ({size} bytes)"
        for root in (free_root, main_root):
            if root != P_INVALID and root > last:
                return f"meta page {n} names root page {root}, past its last page {last}"
    return None
