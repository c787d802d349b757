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

``--compare 'NAME=MOUNT ARGS;NAME=...'`` measures several mount modes in the same run,
each with its own disk cache (filled by its own first read), every sample reading the
native file and each mode in turn (the order rotates each sample): the machine's load
and the native disk's spread (a virtio disk with the host's cache: 0.7-2.6 GB/s from
one sample to the next) are shared by the modes compared, and the ratio is also
taken sample by sample.  A mode whose cache holds a passthrough copy of the file
(``cubefs/cache/files.py``) also reads that copy directly, page cache dropped
(``copy``: the local disk's speed for the copy's own layout, without FUSE).

    sudo .venv/bin/python tools/bench/seqread.py --size 1G --repeat 5
    sudo .venv/bin/python tools/bench/seqread.py --repeat 5 --compare 'default=;passthrough=--passthrough'
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


def copies(cache: Path) -> list[Path]:
    """The passthrough copies in a disk cache (cubefs.cache.files: <cache>/files/<k[:2]>/<k>)."""
    top = cache / "files"
    return [p for p in top.rglob("*") if p.is_file() and not p.name.startswith(".") and "." not in p.name] \
        if top.is_dir() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="file size (default 1G)")
    ap.add_argument("--repeat", type=int, default=5, help="samples (default 5)")
    ap.add_argument("--mount-args", default="", help="extra 'cubefs mount' options")
    ap.add_argument("--compare", default="", help="'NAME=MOUNT ARGS;NAME=...': several modes, alternated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    modes = {k: v.split() for k, v in (x.split("=", 1) for x in args.compare.split(";") if x)} \
        or {"mount": args.mount_args.split()}
    work = Path(tempfile.mkdtemp(prefix="cubefs-seqread-", dir="/var/tmp"))
    # a mount server of its own: the node's (/run/cubefs/serve.sock) may serve others' mounts, and one
    # started from this tree would be restarted by anyone's run from another
    os.environ["CUBEFS_SERVER"] = str(work / "serve.sock")
    mnt = work / "mnt"
    mnt.mkdir()
    store = f"file://{work / 'store'}"

    def argv(mode: str) -> list[str]:
        return ["mount", "seq:1", str(mnt), "--store", store, "--cache-dir", str(work / f"cache-{mode}"),
                "--cache-size", str(4 * size), *modes[mode]]

    def through(mode: str) -> float:
        cubefs(*argv(mode))
        try:
            dt, n = read_all(mnt / "big.bin")
        finally:
            cubefs("umount", str(mnt))
        assert n == size
        return n / 1e6 / dt

    rates: dict[str, list[float]] = {"native": [], **{m: [] for m in modes}}
    try:
        (work / "src").mkdir()
        make_file(work / "src" / "big.bin", size)
        build = json.loads(cubefs("build", str(work / "src"), "--tag", "seq:1", "--store", store, "--json").stdout)
        print(f"built {size / 1e6:.0f} MB into {build['stored_bytes'] / 1e6:.0f} MB stored", file=sys.stderr)
        for mode in modes:
            cold = through(mode)
            print(f"{mode}: cold read (store -> disk cache): {cold:.0f} MB/s", file=sys.stderr)
        order = ["native", *modes]
        for i in range(args.repeat):
            k = i % len(order)
            for mode in order[k:] + order[:k]:
                drop_caches()
                if mode == "native":
                    dt, n = read_all(work / "src" / "big.bin")
                    rates["native"].append(n / 1e6 / dt)
                else:
                    rates[mode].append(through(mode))
                    for c in copies(work / f"cache-{mode}")[:1]:  # the copy itself, without FUSE
                        drop_caches()
                        dt, n = read_all(c)
                        rates.setdefault(f"{mode} copy", []).append(n / 1e6 / dt)
            print(f"sample {i + 1}: " + ", ".join(f"{m} {r[-1]:.0f}" for m, r in rates.items()) + " MB/s",
                  file=sys.stderr)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        from cubefs.node.mount_server import stop_server  # its own stop request, not a pid

        stop_server(str(work / "serve.sock"))
        shutil.rmtree(work, ignore_errors=True)
    nat = rates["native"]
    result: dict[str, object] = {"size": size, "load": os.getloadavg(), "mb_s": rates,
                                 "median_mb_s": {m: statistics.median(r) for m, r in rates.items()}}
    ratios = {m: {"of_medians": statistics.median(r) / statistics.median(nat),
                  "median_of_samples": statistics.median(a / b for a, b in zip(r, nat, strict=False))}
              for m, r in rates.items() if m != "native"}
    result["ratio"] = ratios
    if list(modes) == ["mount"]:  # the single-mode figures, as before --compare
        result.update(mount_mb_s=rates["mount"], native_mb_s=nat, median_mount_mb_s=statistics.median(rates["mount"]),
                      median_native_mb_s=statistics.median(nat))
        result["ratio"] = ratios["mount"]["of_medians"]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'measurement':44} {'MB/s':>8}  range         x native (medians; median of samples)")
    for m, r in rates.items():
        what = "sequential read, native disk" if m == "native" else f"{m}, warm disk cache"
        extra = "" if m == "native" else f"  {ratios[m]['of_medians']:.2f}; {ratios[m]['median_of_samples']:.2f}"
        print(f"{what:44} {statistics.median(r):8.0f}  {min(r):.0f}-{max(r):.0f}{extra}")
    worst = min(statistics.median(rates[m]) for m in modes)
    print(f"floor >= {FLOOR_MB_S:.0f} MB/s: {'ok' if worst >= FLOOR_MB_S else 'FAIL'}; load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
