#!/usr/bin/env python3
"""The daemon's own cost of an untar onto a volume, in process, without the kernel.

Why: on this shared 2-core machine a real untar's wall time swings 5x with the
neighbours' load, and even the daemon's CPU from /proc includes the transport
(read/write on /dev/fuse, the trio loop).  This feeds :class:`FuseServer` the
request mix the kernel sends for an untar, as traced on Linux 6.18 (design.md,
"The host floor": per file LOOKUP, the directory's GETATTR, MKNOD (CREATE answers ENOSYS), a GETXATTR
of ``security.capability`` before the first write, the WRITEs of tar's 10 KiB
``write(2)``s as the page cache cuts them, SETATTR of the times, a GETXATTR
before the chown, SETATTR of owner, of mode (no RELEASE: no OPEN); with
``--writeback-cache`` one WRITE of the whole file, and with ``--times-flush``
the kernel's SETATTR of its times before tar's, which a file stamped on the
kernel's tick no longer makes) over a real volume index in a temporary directory,
and reports CPU per request and per file; ``--profile`` prints the top of a
cProfile of the handlers.

    .venv/bin/python tools/bench/volume_ops.py --source /usr/lib/python3.11 [--writeback-cache] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import errno
import json
import os
import pstats
import stat
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cubefs.cow.index import Inode, VolumeIndex
from cubefs.fuse import protocol as p
from cubefs.fuse.server import FuseServer
from cubefs.volume.fs import VolumeFS

TAR_WRITE = 10240  # GNU tar's record size: its write(2)s of a file's data
PAGE = 4096
CAP = b"security.capability\0"
MAX_WRITE = 1 << 20  # what INIT lets the kernel send in one WRITE
WRITE_CACHE = 1  # fuse_write_in.write_flags: a page-cache writeback


class Feeder:
    """Builds requests as the kernel does and hands them to the server."""

    def __init__(self, server: FuseServer, writeback: bool = False, times_flush: bool = False) -> None:
        self.server = server
        self.writeback = writeback  # the mix of a --writeback-cache mount
        self.times_flush = times_flush  # and the kernel's SETATTR of its times after each file's write
        self.unique = 0
        self.ops: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()  # CPU seconds by operation
        self.archive = 0  # position in the tar archive: where tar's write(2)s are cut

    def send(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        self.unique += 2
        msg = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        name = p.OPCODE_NAMES.get(opcode, str(opcode))
        self.ops[name] += 1
        t0 = time.process_time()
        out = self.server.handle(msg)
        self.cpu[name] += time.process_time() - t0
        if not isinstance(out, bytes | list):
            raise RuntimeError(f"{p.OPCODE_NAMES.get(opcode)} did not answer at once: {out!r}")
        return out if isinstance(out, bytes) else b"".join(out)

    def entry(self, opcode: int, nodeid: int, body: bytes) -> int:
        out = self.send(opcode, nodeid, body)
        _len, error, _u = p.OUT_HEADER.unpack_from(out)
        if error:
            raise OSError(-error, os.strerror(-error))
        return int(p.ENTRY_OUT.unpack_from(out, p.OUT_HEADER.size)[0])

    def init(self) -> None:
        flags = 0xFFFFFFFF
        self.send(p.INIT, 0, p.INIT_IN.pack(p.KERNEL_MAJOR, p.MAX_MINOR, 1 << 20, flags) + bytes(48))

    def lookup_missing(self, parent: int, name: bytes) -> None:
        out = self.send(p.LOOKUP, parent, name + b"\0")  # a negative entry (node 0) or ENOENT
        error = p.OUT_HEADER.unpack_from(out)[1]
        assert error == -errno.ENOENT or (not error and not p.ENTRY_OUT.unpack_from(out, p.OUT_HEADER.size)[0])

    def setattrs(self, ino: int, st: os.stat_result, regular: bool = False) -> None:
        """tar's utimensat (atime omitted), fchown and fchmod, as traced: the kernel asks for
        ``security.capability`` before a file's chown; a writeback mount adds CTIME to each."""
        z = (0,) * 16
        ctime = 1024 if self.writeback and regular else 0
        b = list(z)
        b[0] = 32 | ctime
        b[6], b[9] = int(st.st_mtime), st.st_mtime_ns % 10**9
        self.send(p.SETATTR, ino, p.SETATTR_IN.pack(*b))
        if regular:
            self.send(p.GETXATTR, ino, p.GETXATTR_IN.pack(0, 0) + CAP)
        b = list(z)
        b[0], b[13], b[14] = 2 | 4 | (2048 if regular else 0) | ctime, st.st_uid, st.st_gid
        self.send(p.SETATTR, ino, p.SETATTR_IN.pack(*b))
        b = list(z)
        b[0], b[11] = 1 | ctime, stat.S_IMODE(st.st_mode)
        self.send(p.SETATTR, ino, p.SETATTR_IN.pack(*b))

    def file(self, parent: int, name: bytes, data: bytes, st: os.stat_result) -> None:
        self.lookup_missing(parent, name)
        self.send(p.GETATTR, parent, bytes(16))
        # MKNOD, not CREATE: the daemon answers CREATE with ENOSYS once (FuseServer.mknod_creates),
        # and the kernel then opens without a request, so no RELEASE follows either
        ino = self.entry(p.MKNOD, parent, p.MKNOD_IN.pack(0o100600, 0, 0o22, 0) + name + b"\0")
        self.archive += 512  # the member's header
        if data:  # the first write(2) asks whether there are capabilities to drop
            self.send(p.GETXATTR, ino, p.GETXATTR_IN.pack(0, 0) + CAP)
        if self.writeback:  # the dirty pages at once, before the first SETATTR
            for lo in range(0, len(data), MAX_WRITE):
                piece = data[lo : lo + MAX_WRITE]
                self.send(p.WRITE, ino, p.WRITE_IN.pack(0, lo, len(piece), WRITE_CACHE, 0, 0, 0) + piece)
            # The kernel's SETATTR of the times its write(2) changed followed, until a new
            # inode was stamped on the kernel's tick (VolumeFS: tick_ns): a file written in
            # the tick it was made in leaves the kernel's inode clean (97 % of them, measured).
            if data and self.times_flush:
                b = [0] * 16
                b[0] = 32 | 64 | 1024
                b[6] = int(time.time())
                self.send(p.SETATTR, ino, p.SETATTR_IN.pack(*b))
        off = 0
        while off < len(data):  # tar writes what is left of the archive's current 10 KiB record
            n = min(len(data) - off, TAR_WRITE - self.archive % TAR_WRITE)
            piece = data[off : off + n]
            self.archive += n
            for lo, hi in _page_cut(off, len(piece)) if not self.writeback else ():
                self.send(p.WRITE, ino, p.WRITE_IN.pack(0, lo, hi - lo, 0, 0, 0, 0) + piece[lo - off : hi - off])
            off += n
        self.archive = -(-self.archive // 512) * 512
        self.setattrs(ino, st, regular=True)

    def mkdir(self, parent: int, name: bytes, st: os.stat_result) -> int:
        self.archive += 512
        self.lookup_missing(parent, name)
        self.send(p.GETATTR, parent, bytes(16))
        ino = self.entry(p.MKDIR, parent, p.MKDIR_IN.pack(0o700, 0o22) + name + b"\0")
        return ino


def _page_cut(offset: int, length: int) -> list[tuple[int, int]]:
    """How the page cache (no writeback cache) cuts one write(2): a batch ends after a page
    the write covers only partly (it is not up to date), so a write that starts inside
    a page sends that page's part alone."""
    end = offset + length
    out = []
    pos = offset
    while pos < end:
        page_end = (pos // PAGE + 1) * PAGE
        # a partial first page is a request of its own; whole pages and a partial last one go together
        hi = min(end, page_end) if pos % PAGE else end
        out.append((pos, hi))
        pos = hi
    return out


def untar_mix(feeder: Feeder, source: Path) -> int:
    """Replays an untar of ``source``; returns the number of entries."""
    dirs: dict[Path, int] = {}
    top = feeder.mkdir(p.ROOT_ID, source.name.encode(), os.stat(source))
    dirs[source] = top
    entries = 1
    for here, subdirs, files in os.walk(source):
        parent = dirs[Path(here)]
        for d in sorted(subdirs):
            path = Path(here) / d
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            dirs[path] = feeder.mkdir(parent, os.fsencode(d), st)
            entries += 1
        for f in sorted(files):
            path = Path(here) / f
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            feeder.file(parent, os.fsencode(f), path.read_bytes(), st)
            entries += 1
    for d, ino in dirs.items():  # tar sets directories' times at the end
        feeder.setattrs(ino, os.stat(d))
    return entries


def run(source: Path, profile: bool, writeback: bool = False, times_flush: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cubefs-ops-", dir="/var/tmp") as tmp:
        index = VolumeIndex(tmp)
        now = time.time_ns()
        index.create_volume("v", None, Inode(stat.S_IFDIR | 0o755, 0, 0, now, now, now, 0, 2), 2)
        fs = VolumeFS(index, "v", None, "v")
        feeder = Feeder(FuseServer(fs), writeback, times_flush)
        feeder.init()
        prof = cProfile.Profile() if profile else None
        c0 = time.process_time()
        if prof:
            prof.enable()
        entries = untar_mix(feeder, source)
        if prof:
            prof.disable()
        cpu = time.process_time() - c0
        fs.close()
        index.close()
    total = sum(feeder.ops.values()) - 1
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return {"source": str(source), "writeback_cache": writeback, "times_flush": times_flush,
            "entries": entries, "requests": total, "requests_by_op": dict(feeder.ops),
            "us_by_op": {op: round(feeder.cpu[op] / n * 1e6, 1) for op, n in feeder.ops.items()},
            "cpu_s": cpu, "us_per_request": cpu / total * 1e6, "us_per_entry": cpu / entries * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/usr/lib/python3.11"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--writeback-cache", action="store_true", help="the request mix of a --writeback-cache mount")
    ap.add_argument("--times-flush", action="store_true",
                    help="with --writeback-cache: the kernel's SETATTR of a file's times after its write, which "
                         "files stamped on the kernel's tick no longer send (session 12); the mix before")
    args = ap.parse_args()
    results = [run(args.source, args.profile and i == 0, args.writeback_cache, args.times_flush)
               for i in range(args.runs)]
    best = min(results, key=lambda r: r["cpu_s"])
    print(json.dumps({**best, "cpu_s_runs": [round(r["cpu_s"], 3) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
