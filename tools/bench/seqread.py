#!/usr/bin/env python3
"""Sequential read throughput through a cubefs mount from a warm disk cache (issue 3).

Floor: >= 300 MB/s, reported with its ratio to reading the same file from the
native disk in the same run.  What one run does, as root:

1. write a ``--size`` file (64 KiB blocks, half random and half text: it
   compresses about 2x, like binaries) and ``cubefs build`` it into a local
   store (the embedded default kind);
2. mount it on an empty cache and read it once (this fills the disk cache),
   unmount;
3. ``--repeat`` times: drop the page cache, remount over the warm disk cache,
   read the file start to end in 1 MiB reads, unmount; and, interleaved,
   drop the page cache and read the source file on the native disk.

Prints medians, the spread and the ratio; ``--json`` for the raw figures.

    sudo .venv/bin/python tools/bench/seqread.py --size 1G --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR_MB_S = 300.0
BLOCK = 1 << 20


def cubefs(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> tuple[float, int]:
    """Seconds to read ``path`` sequentially in 1 MiB reads, and the bytes read."""
    buf = bytearray(BLOCK)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - t0, total


def make_file(path: Path, size: int) -> None:
    text = (b"the quick brown fox jumps over the lazy dog; " * 800)[: 32 * 1024]
    with open(path, "wb") as f:
        for _ in range(size // (64 * 1024)):
            f.write(os.urandom(32 * 1024))
            f.write(text)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="file size (default 1G)")
    ap.add_argument("--repeat", type=int, default=5, help="samples (default 5)")
    ap.add_argument("--mount-args", default="", help="extra 'cubefs mount' options")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="cubefs-seqread-", dir="/var/tmp"))
    mnt = work / "mnt"
    mnt.mkdir()
    store = f"file://{work / 'store'}"
    mount_argv = ["mount", "seq:1", str(mnt), "--store", store, "--cache-dir", str(work / "cache"),
                  "--cache-size", str(4 * size), *args.mount_args.split()]
    try:
        (work / "src").mkdir()
        make_file(work / "src" / "big.bin", size)
        build = json.loads(cubefs("build", str(work / "src"), "--tag", "seq:1", "--store", store, "--json").stdout)
        print(f"built {size / 1e6:.0f} MB into {build['stored_bytes'] / 1e6:.0f} MB stored", file=sys.stderr)
        cubefs(*mount_argv)
        cold_s, _ = read_all(mnt / "big.bin")
        cubefs("umount", str(mnt))
        print(f"cold read (store -> disk cache): {size / 1e6 / cold_s:.0f} MB/s", file=sys.stderr)
        lazy, native = [], []
        for i in range(args.repeat):
            drop_caches()
            dt, n = read_all(work / "src" / "big.bin")
            native.append(n / 1e6 / dt)
            drop_caches()
            cubefs(*mount_argv)
            try:
                dt, n = read_all(mnt / "big.bin")
            finally:
                cubefs("umount", str(mnt))
            assert n == size
            lazy.append(n / 1e6 / dt)
            print(f"sample {i + 1}: mount {lazy[-1]:.0f} MB/s, native disk {native[-1]:.0f} MB/s", file=sys.stderr)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {"size": size, "mount_mb_s": lazy, "native_mb_s": native,
              "median_mount_mb_s": statistics.median(lazy), "median_native_mb_s": statistics.median(native)}
    result["ratio"] = result["median_mount_mb_s"] / result["median_native_mb_s"]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    m, nat = result["median_mount_mb_s"], result["median_native_mb_s"]
    print(f"{'measurement':44} {'MB/s':>8}  range")
    print(f"{'sequential read, mount, warm disk cache':44} {m:8.0f}  {min(lazy):.0f}-{max(lazy):.0f}")
    print(f"{'sequential read, native disk':44} {nat:8.0f}  {min(native):.0f}-{max(native):.0f}")
    print(f"{'ratio mount / native':44} {result['ratio']:8.2f}")
    print(f"floor >= {FLOOR_MB_S:.0f} MB/s: {'ok' if m >= FLOOR_MB_S else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
