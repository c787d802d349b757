#!/usr/bin/env python3
"""A VM's disk: cubefs's block volume over vhost-user-blk vs QEMU's own virtio-blk on a raw file (issue 16).

One TCG VM (q35, the Debian test root over virtio-fs, read-only) gets two
disks of ``--disk-size``: (a) ``/dev/vda``, a cubefs block volume served by
``cubefs mount --volume NAME SOCKET --transport vhost-user-blk``; (c)
``/dev/vdb``, QEMU's virtio-blk on a sparse raw image file in the same host
directory.  Both get a fresh ext4 (``mkfs.ext4``) and are mounted in the
guest; then, per run and disk, timed inside the guest:

* ``seqwrite``: ``dd`` of ``--write-size`` from /dev/zero with ``conv=fsync``;
* ``untar``: a tar of the host's ``/usr/lib/python3.11`` (held in guest RAM)
  unpacked, then ``sync``.

Caches are dropped between samples, files of the previous run removed
first.  Prints medians of ``--runs`` and the ratio (a)/(c).

    sudo .venv/bin/python tools/bench/blk_disk.py --runs 3

The guest kernel's initramfs has no virtio_blk or ext4 modules (its root is
virtio-fs): they are taken from the same Debian kernel package
(``guest_modules``) and loaded through the agent with ``finit_module``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from make_vm_kernel import DEFAULT, make_kernel

from cubefs.humanize import parse_size
from vmm.agent import Agent
from vmm.machine import Machine, MachineSpec, Ram

# Loaded in this order (each after what it depends on); crc32c_generic because ext4 and jbd2
# ask the crypto API for "crc32c" at mount time and the guest has no modprobe to load it then.
MODULES = ("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4", "virtio_blk")
BLK_CHARDEV = "blk0"


def guest_modules(kernel: Path) -> dict[str, bytes]:
    """The .ko files of ``MODULES`` for the guest kernel in ``kernel`` (its ``version``),
    from Debian's package of that kernel, kept in ``kernel``'s parent once fetched."""
    version = (kernel / "version").read_text().strip()
    cache = kernel.parent / f"modules-{version}"
    if not all((cache / f"{m}.ko").exists() for m in MODULES):
        with tempfile.TemporaryDirectory(prefix="cubefs-mods-") as tmp:
            work = Path(tmp)
            work.chmod(0o755)  # apt-get download fetches as the _apt user where it can
            subprocess.run(["apt-get", "download", f"linux-image-{version}"], cwd=work, check=True,
                           capture_output=True)
            deb = next(work.glob("linux-image-*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
            found = {p.stem: p for p in (work / "x" / "lib" / "modules" / version).rglob("*.ko")}
            tmp_cache = cache.parent / (cache.name + ".tmp")
            tmp_cache.mkdir(parents=True, exist_ok=True)
            for m in MODULES:
                (tmp_cache / f"{m}.ko").write_bytes(found[m].read_bytes())
            os.rename(tmp_cache, cache)
    return {m: (cache / f"{m}.ko").read_bytes() for m in MODULES}


LOAD = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    if libc.syscall(313, fd, b"", 0) != 0 and ctypes.get_errno() != errno.EEXIST:  # finit_module
        sys.exit(f"{path}: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
"""


def load_modules(agent: Agent, modules: dict[str, bytes]) -> None:
    """Put the modules in the guest's /dev (a tmpfs: the root is read-only) and load them."""
    paths = []
    for name, data in modules.items():
        agent.put(f"/dev/{name}.ko", data)
        paths.append(f"/dev/{name}.ko")
    agent.put("/dev/load_modules.py", LOAD.encode())
    res = agent.run(f"python3 /dev/load_modules.py {' '.join(paths)} && rm -f {' '.join(paths)}", timeout=120)
    if res.exit_code != 0:
        raise RuntimeError(f"loading the guest's block modules failed: {res.stderr.decode(errors='replace')}")


class DiskMachine(Machine):
    """The project's machine plus a vhost-user-blk disk on ``blk_socket`` and, optionally, QEMU's own
    virtio-blk on a raw file (``raw``), in that order (/dev/vda, /dev/vdb)."""

    def __init__(self, *args: object, blk_socket: str, raw: str | None = None, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        # not Machine's own blk_socket (a disk on its blkport): this disk sits on pcie.0, before the raw one
        self.disk_socket = blk_socket
        self.raw = raw

    def argv(self) -> list[str]:
        argv = super().argv()
        argv += ["-chardev", f"socket,id={BLK_CHARDEV},path={self.disk_socket}",
                 "-device", f"vhost-user-blk-pci,chardev={BLK_CHARDEV},num-queues=1,id=blk0dev"]
        if self.raw:
            argv += ["-drive", f"file={self.raw},if=none,id=rawdisk,format=raw,cache=writeback",
                     "-device", "virtio-blk-pci,drive=rawdisk,num-queues=1,id=rawdev"]
        return argv


def cubefs(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def stop_mount_server(sock: Path) -> None:
    """The mount server our first mount started (its pid is in the socket's lock file)."""
    lock = Path(f"{sock}.lock")
    if lock.exists() and lock.read_text().strip():
        try:
            os.kill(int(lock.read_text()), 15)
        except ProcessLookupError:
            pass


def _python_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/usr/lib/python3.11", arcname="python3.11")
    return buf.getvalue()


def timed(agent: Agent, script: str) -> float:
    """Seconds the guest measured for ``script`` (caches dropped first)."""
    res = agent.run("sync; echo 3 > /proc/sys/vm/drop_caches; t0=$(date +%s%N); " + script
                    + " || exit 9; t1=$(date +%s%N); echo $((t1 - t0))", timeout=1200)
    if res.exit_code != 0:
        raise RuntimeError(f"guest: {script}: {res.stderr.decode(errors='replace')[-500:]}")
    return int(res.stdout.split()[-1]) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-size", default="1G")
    ap.add_argument("--write-size", default="256M")
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--dir", default=None, help="host directory for the volume and the raw file (default: a temp dir)")
    args = ap.parse_args()
    disk_size, write_mb = parse_size(args.disk_size), parse_size(args.write_size) >> 20
    kernel = make_kernel(Path(DEFAULT))
    modules = guest_modules(kernel)
    tar = _python_tar()
    with tempfile.TemporaryDirectory(prefix="blk-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        os.environ["CUBEFS_SERVER"] = str(work / "serve.sock")  # a mount server of our own, stopped at the end
        store, cache, vdir = f"file://{work / 'store'}", str(work / "cache"), str(work / "volumes")
        rootfs = os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs")
        cubefs("build", rootfs, "--tag", "debian:12", "--store", store)
        cubefs("mount", "debian:12", str(work / "root.sock"), "--transport", "virtiofs", "--store", store,
               "--cache-dir", cache)
        cubefs("volume", "create", "disk", "--block", str(disk_size), "--volume-dir", vdir)
        cubefs("mount", "--volume", "disk", str(work / "blk.sock"), "--transport", "vhost-user-blk",
               "--volume-dir", vdir, "--cache-dir", cache)
        raw = work / "raw.img"
        with open(raw, "wb") as f:
            f.truncate(disk_size)
        m = DiskMachine(work / "vm", MachineSpec(kernel, args.memory, 1, "tcg"), Ram(),
                        fs_socket=str(work / "root.sock"), blk_socket=str(work / "blk.sock"), raw=str(raw))
        m.start()
        stats: dict[str, object] = {}
        results: dict[str, dict[str, list[float]]] = {"a": {"seqwrite": [], "untar": []},
                                                      "c": {"seqwrite": [], "untar": []}}
        try:
            with Agent(m.agent_path, "blk-bench") as agent:
                agent.connect(900)
                agent.mount(True)
                load_modules(agent, modules)
                agent.put("/dev/py.tar", tar)
                for dev, name in (("vda", "a"), ("vdb", "c")):
                    res = agent.run(f"mkfs.ext4 -q /dev/{dev} && mkdir -p /dev/mnt-{name} && "
                                    f"mount -t ext4 /dev/{dev} /dev/mnt-{name}", timeout=600)
                    if res.exit_code:
                        raise RuntimeError(res.stderr.decode(errors="replace"))
                for run in range(args.runs):
                    for name in ("a", "c"):
                        mnt = f"/dev/mnt-{name}"
                        agent.run(f"rm -rf {mnt}/big {mnt}/py; sync", timeout=600)
                        results[name]["seqwrite"].append(timed(
                            agent, f"dd if=/dev/zero of={mnt}/big bs=1M count={write_mb} conv=fsync 2>/dev/null"))
                        results[name]["untar"].append(timed(
                            agent, f"mkdir {mnt}/py && tar -C {mnt}/py -xf /dev/py.tar && sync"))
                        print(f"run {run + 1} {name}: seqwrite {results[name]['seqwrite'][-1]:.2f} s, "
                              f"untar {results[name]['untar'][-1]:.2f} s", file=sys.stderr, flush=True)
                agent.run("umount /dev/mnt-a /dev/mnt-c", timeout=120)
                stats = json.loads(cubefs("stats", str(work / "blk.sock"), "--json"))
                agent.poweroff()
        finally:
            m.stop()
            subprocess.run([sys.executable, "-m", "cubefs", "umount", str(work / "blk.sock")], capture_output=True)
            subprocess.run([sys.executable, "-m", "cubefs", "umount", str(work / "root.sock")], capture_output=True)
            stop_mount_server(work / "serve.sock")
        print(f"\n{'':10} {'(a) cubefs blk':>16} {'(c) virtio-blk raw':>20} {'(a)/(c)':>8}")
        for what in ("seqwrite", "untar"):
            a, c = statistics.median(results["a"][what]), statistics.median(results["c"][what])
            label = f"{what} ({write_mb} MiB + fsync)" if what == "seqwrite" else "untar py3.11 + sync"
            print(f"{label:28} {a:8.2f} s {c:14.2f} s {a / c:8.2f}")
        print(json.dumps({"results": results, "blk_requests": stats.get("requests")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
