#!/usr/bin/env python3
"""File reads in a micro-VM over virtio-fs: cubefs's backend vs QEMU's C virtiofsd (issue 6).

Same tree for all: a directory with one ``--size`` file (half random, half
text) next to the Debian test root filesystem's python3, built into a local
cubefs store.  Each sample starts a VM (q35, TCG here) whose root is served
by ``cubefs mount IMAGE SOCKET --transport virtiofs`` (lazily, from an empty
cache: the cold case a VM meets) in a booted VM and in a clone of a template
(whose RAM the backend reaches through QEMU's address space, not a shared
mapping), or by virtiofsd on the directory, and times ``dd`` of the file in
the guest.  Prints medians and ratios.

    sudo .venv/bin/python tools/bench/vm_read.py --size 256M --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from make_vm_kernel import DEFAULT, make_kernel

from cubefs.humanize import parse_size
from vmm.machine import MachineSpec
from vmm.qemu import run_once

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DD = "dd if=/data/blob of=/dev/null bs=1M 2>&1 | tail -1"


def cubefs(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def rate(dd_line: str) -> float:
    """MB/s from dd's summary line."""
    m = re.search(r"([\d.]+) s, ([\d.]+) ([kMG]?B)/s", dd_line)
    if not m:
        raise RuntimeError(f"cannot read dd's output: {dd_line!r}")
    return float(m[2]) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3, "B": 1e-6}[m[3]]


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", type=Path, default=Path("/var/tmp/cubefs-test/rootfs"))
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/cubefs-bench"))
    args = ap.parse_args()
    kernel = make_kernel(Path(DEFAULT))
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmread-", dir=args.workdir))
    os.environ.update({"CUBEFS_VM_DIR": str(work / "vm"), "CUBEFS_TEMPLATE_DIR": str(work / "templates")})
    from vmm import vm

    try:
        tree = work / "tree"
        # cp -a, not copytree: the tree has device nodes (copytree would read /dev/zero forever)
        subprocess.run(["cp", "-a", str(args.rootfs), str(tree)], check=True)
        (tree / "data").mkdir()
        size = parse_size(args.size)
        with open(tree / "data" / "blob", "wb") as f:
            for i in range(size // (1 << 20)):
                block = os.urandom(1 << 19) + ((b"cubefs %08d\n" % i) * 40000)[: 1 << 19]
                f.write(block)
        store = f"file://{work / 'store'}"
        cubefs("build", str(tree), "--tag", "vmread:1", "--store", store)
        spec = MachineSpec(kernel, 512, 1, "tcg")
        vm.Template.create("bench", spec)
        kinds = ("cubefs", "cubefs-clone", "virtiofsd")
        results: dict[str, list[float]] = {k: [] for k in kinds}
        totals: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(args.repeat):
            for backend in kinds:
                sock = work / f"{backend}-{i}.sock"
                if backend == "cubefs-clone":
                    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
                    v = vm.Vm.start(f"clone-{i}", vm.Root(image="vmread:1", store=store,
                                                          cache_dir=str(work / f"cache-clone-{i}")),
                                    spec, template="bench")
                    try:
                        out = v.exec(DD, timeout=600)
                    finally:
                        v.destroy()
                    results[backend].append(rate(out.stdout.decode()))
                    totals[backend].append(out.seconds)
                    print(f"[vm_read] {backend} sample {i + 1}: {results[backend][-1]:.1f} MB/s, dd "
                          f"{out.seconds:.1f} s", file=sys.stderr, flush=True)
                    continue
                if backend == "cubefs":
                    cubefs("mount", "vmread:1", str(sock), "--transport", "virtiofs", "--store", store,
                           "--cache-dir", str(work / f"cache-{i}"))
                    proc = None
                else:
                    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={tree}",
                                             "-o", "cache=auto"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    wait_for(sock)
                subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
                res = run_once(kernel, str(sock), DD, read_only=True, timeout=600)
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
                results[backend].append(rate(res.stdout.decode()))
                totals[backend].append(res.seconds)
                print(f"[vm_read] {backend} sample {i + 1}: {results[backend][-1]:.1f} MB/s, dd "
                      f"{res.seconds:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"file read in a TCG guest over virtio-fs, {args.size}, {args.repeat} samples (medians)")
    names = {"cubefs": "cubefs backend, booted VM", "cubefs-clone": "cubefs backend, template clone",
             "virtiofsd": "QEMU virtiofsd (C)"}
    for k in kinds:
        print(f"  {names[k]:32} {med[k]:8.1f} MB/s   dd {statistics.median(totals[k]):.1f} s   "
              f"ratio to virtiofsd {med[k] / med['virtiofsd']:.2f}")
    print(json.dumps({f"{k}_mb_s": v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
