#!/usr/bin/env python3
"""A VM's writes three ways, inside one TCG VM (issue 16, step 2): where should a guest's root write?

One VM, booted with the project's machine (vmm/machine.py) and a root on a disk
(``--disk``: the image over virtio-fs under an overlay whose upper is an ext4
on a cubefs block volume over vhost-user-blk), plus two more devices the
benchmark adds:

* (a) the overlay root itself: files written under ``/root/bench``;
* (b) today's virtio-fs volume root: a volume over the same image, served by
  ``cubefs mount --volume V SOCK --transport virtiofs``, mounted at ``/mnt-b``;
* (c) QEMU's own virtio-blk on a sparse raw file in the same host directory,
  ``mkfs.ext4``'d in the guest, mounted at ``/mnt-c``: the baseline.

Per run and target, timed inside the guest, caches dropped first: ``untar``
(a tar of the host's /usr/lib/python3.11, held in guest RAM, unpacked, then
``sync``) and ``seqwrite`` (``dd`` of ``--write-size`` with ``conv=fsync``).
Prints medians of ``--runs`` and the ratios (a)/(c), (b)/(c).

    .venv/bin/python tools/bench/vm_disk_root.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from blk_disk import _python_tar, cubefs, stop_mount_server, timed
from make_vm_kernel import DEFAULT, make_kernel

from cubefs.humanize import parse_size
from vmm.agent import Agent
from vmm.machine import Machine, MachineSpec, Ram
from vmm.vm import Root


class BenchMachine(Machine):
    """The project's machine with a disk, plus (b) a second virtio-fs device (tag ``vol``) and
    (c) QEMU's virtio-blk on a raw file, each on a root port of its own after the disk's (so the
    guest finds the cubefs disk as /dev/vda and the raw one as /dev/vdb)."""

    def __init__(self, *args: object, vol_socket: str, raw: str, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.vol_socket, self.raw = vol_socket, raw

    def argv(self) -> list[str]:
        return [*super().argv(),
                "-device", "pcie-root-port,id=rawport,chassis=3", "-device", "pcie-root-port,id=volport,chassis=4",
                "-drive", f"file={self.raw},if=none,id=rawdisk,format=raw,cache=writeback",
                "-device", "virtio-blk-pci,drive=rawdisk,num-queues=1,id=rawdev,bus=rawport",
                "-chardev", f"socket,id=vol,path={self.vol_socket}",
                "-device", "vhost-user-fs-pci,chardev=vol,tag=vol,id=voldev,bus=volport"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-size", default="1G")
    ap.add_argument("--write-size", default="256M")
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--dir", default=None, help="host directory for volumes and the raw file (default: a temp dir)")
    args = ap.parse_args()
    disk_size, write_mb = parse_size(args.disk_size), parse_size(args.write_size) >> 20
    kernel = make_kernel(Path(DEFAULT))
    tar = _python_tar()
    with tempfile.TemporaryDirectory(prefix="vm-disk-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        os.environ["CUBEFS_SERVER"] = str(work / "serve.sock")  # a mount server of our own, stopped at the end
        store, cache, vdir = f"file://{work / 'store'}", str(work / "cache"), str(work / "volumes")
        rootfs = os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs")
        cubefs("build", rootfs, "--tag", "debian:12", "--store", store)
        root = Root("debian:12", store=store, cache_dir=cache, volume_dir=vdir).own_disk("disk", disk_size)
        root.serve(work / "root.sock", work / "blk.sock")
        cubefs("volume", "create", "vol", "--from", "debian:12", "--store", store, "--volume-dir", vdir)
        cubefs("mount", "--volume", "vol", str(work / "vol.sock"), "--transport", "virtiofs", "--store", store,
               "--volume-dir", vdir, "--cache-dir", cache)
        raw = work / "raw.img"
        with open(raw, "wb") as f:
            f.truncate(disk_size)
        m = BenchMachine(work / "vm", MachineSpec(kernel, args.memory, 1, "tcg"), Ram(),
                         fs_socket=str(work / "root.sock"), blk_socket=str(work / "blk.sock"),
                         vol_socket=str(work / "vol.sock"), raw=str(raw))
        m.start()
        places = {"a": "/root/bench", "b": "/mnt-b/bench", "c": "/mnt-c/bench"}
        results: dict[str, dict[str, list[float]]] = {k: {"seqwrite": [], "untar": []} for k in places}
        try:
            with Agent(m.agent_path, "vm-disk-bench") as agent:
                agent.connect(900)
                agent.mount(False, disk=True)
                agent.put("/dev/py.tar", tar)
                res = agent.run("cat /sys/block/vda/serial; echo; mkdir -p /mnt-b /mnt-c && "
                                "mount -t virtiofs vol /mnt-b && mkfs.ext4 -q /dev/vdb && "
                                "mount -t ext4 /dev/vdb /mnt-c", timeout=600)
                if res.exit_code or not res.stdout.startswith(b"disk"):
                    raise RuntimeError(f"guest setup: {res.stdout!r} {res.stderr.decode(errors='replace')}")
                for run in range(args.runs):
                    for name, at in places.items():
                        agent.run(f"rm -rf {at}; mkdir -p {at}; sync", timeout=600)
                        results[name]["seqwrite"].append(timed(
                            agent, f"dd if=/dev/zero of={at}/big bs=1M count={write_mb} conv=fsync 2>/dev/null"))
                        agent.run(f"rm -f {at}/big; sync", timeout=600)
                        results[name]["untar"].append(timed(agent, f"tar -C {at} -xf /dev/py.tar && sync"))
                        print(f"run {run + 1} {name}: seqwrite {results[name]['seqwrite'][-1]:.2f} s, "
                              f"untar {results[name]['untar'][-1]:.2f} s", file=sys.stderr, flush=True)
                agent.run("rm -rf /root/bench /mnt-b/bench /mnt-c/bench; umount /mnt-b /mnt-c; sync", timeout=600)
                stats = json.loads(cubefs("stats", str(work / "blk.sock"), "--json"))
                agent.poweroff()
        finally:
            m.stop()
            for sock in ("blk.sock", "root.sock", "vol.sock"):
                subprocess.run([sys.executable, "-m", "cubefs", "umount", str(work / sock)], capture_output=True)
            stop_mount_server(work / "serve.sock")
        print(f"\n{'':30} {'(a) overlay on blk':>18} {'(b) virtio-fs vol':>18} {'(c) virtio-blk raw':>18} "
              f"{'(a)/(c)':>8} {'(b)/(c)':>8}")
        for what in ("untar", "seqwrite"):
            a, b, c = (statistics.median(results[k][what]) for k in ("a", "b", "c"))
            label = f"{what} ({write_mb} MiB + fsync)" if what == "seqwrite" else "untar py3.11 + sync"
            print(f"{label:30} {a:16.2f} s {b:16.2f} s {c:16.2f} s {a / c:8.2f} {b / c:8.2f}")
        print(json.dumps({"results": results, "blk_requests": stats.get("requests")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
