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

Per run and target, timed inside the guest, caches dropped first, every input
held in guest RAM (the guest's /dev, a tmpfs) so only the target is measured:

* ``untar``: a tar of the host's /usr/lib/python3.11 unpacked, then ``sync``;
* ``pip``: ``pip install --no-index --find-links`` of numpy + pandas from a
  wheel directory (``pip download numpy pandas pip`` on the host; the image
  has no pip, so pip runs from its own wheel: ``python3 pip.whl/pip``) into
  ``--target`` on the target, then ``sync``;
* ``clone``: the image has no git, so what a ``git clone`` of a local
  repository of 2,000 files writes is copied: a repository made on the host
  (2,000 files in 100 directories, one commit), cloned there, and the clone
  (checkout + .git) ``cp -a``'d onto the target, then ``sync``;
* ``sqlite``: 10,000 inserts in transactions of 100 (python3's sqlite3, its
  defaults: a rollback journal, ``synchronous=FULL``);
* ``seqwrite``: ``dd`` of ``--write-size`` with ``conv=fsync``.

Prints medians of ``--runs`` and the ratios (a)/(c), (b)/(c).

**Snapshots under load** (first, before the timed runs): while the guest
untars and then writes ``--write-size`` on (a), this process takes an index
snapshot of the disk's volume every ``--snap-every`` seconds
(``VolumeIndex.snapshot``, the call ``cubefs snapshot`` makes) and reports
p50/p99/max of how long each took; one snapshot from the middle of the write is
cloned, exported and checked with ``e2fsck`` after its journal is replayed, as
tests/test_vm_blk_root.py does.

    .venv/bin/python tools/bench/vm_disk_root.py --runs 3 --wheels DIR
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
import threading
import time
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


SQLITE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("create table t (id integer primary key, name text, value real, body blob)")
db.commit()
for tx in range(100):
    with db:
        db.executemany("insert into t (name, value, body) values (?, ?, ?)",
                       ((f"row-{tx}-{i}", tx * 100 + i, bytes(200)) for i in range(100)))
db.close()
"""

WORKLOADS = ("untar", "pip", "clone", "sqlite", "seqwrite")


def repo_tar(files: int = 2000) -> bytes:
    """A git clone of a local repository of ``files`` files (source-like text, 100 directories, one
    commit), made and cloned on the host, as a tar: what ``git clone`` writes, for a guest without git."""
    with tempfile.TemporaryDirectory(prefix="vm-disk-repo-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "clone"
        for i in range(files):
            f = src / f"pkg{i % 100:02d}" / f"mod{i:04d}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(20 + i % 200)))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", str(src)], check=True)
        subprocess.run([*git, "-C", str(src), "add", "."], check=True)
        subprocess.run([*git, "-C", str(src), "commit", "-qm", "2,000 files"], check=True)
        subprocess.run([*git, "clone", "-q", "--no-local", str(src), str(dst)], check=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(dst, arcname="repo")
        return buf.getvalue()


def wheel_dir(given: str | None, work: Path) -> Path:
    """numpy, pandas, their dependencies and pip itself as wheels: ``--wheels`` or downloaded now."""
    if given:
        return Path(given)
    out = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(out),
                    "numpy", "pandas", "pip"], check=True)
    return out


def script(what: str, at: str, write_mb: int, pip: str = "pip.whl") -> str:
    return {
        "untar": f"tar -C {at} -xf /dev/py.tar && sync",
        "pip": f"python3 /dev/wheels/{pip}/pip install -q --no-index --no-cache-dir --root-user-action=ignore "
               f"--disable-pip-version-check --find-links /dev/wheels --target {at}/site numpy pandas && sync",
        "clone": f"cp -a /dev/repo {at}/repo && sync",
        "sqlite": f"python3 /dev/sqlite_bench.py {at}/bench.db",
        "seqwrite": f"dd if=/dev/zero of={at}/big bs=1M count={write_mb} conv=fsync 2>/dev/null",
    }[what]


def snapshots_under_load(agent: Agent, vdir: str, volume: str, every: float, write_mb: int) -> dict[str, object]:
    """Index snapshots of ``volume`` every ``every`` s while the guest untars then writes on (a)."""
    from cubefs.cow.index import VolumeIndex

    took: list[float] = []
    names: list[str] = []
    stop = threading.Event()
    index = VolumeIndex(vdir)

    def snapper() -> None:
        while not stop.wait(every):
            name = f"load-{len(names)}"
            t0 = time.perf_counter()
            index.snapshot(volume, name)
            took.append(time.perf_counter() - t0)
            names.append(name)

    agent.run("rm -rf /root/bench; mkdir -p /root/bench; sync", timeout=600)
    thread = threading.Thread(target=snapper, daemon=True)
    thread.start()
    try:
        t_untar = timed(agent, script("untar", "/root/bench", write_mb))
        marker = len(names)
        t_write = timed(agent, script("seqwrite", "/root/bench", write_mb))
        middle = names[(marker + len(names)) // 2] if len(names) > marker else names[-1]
    finally:
        stop.set()
        thread.join()
        index.close()
    agent.run("rm -rf /root/bench; sync", timeout=600)
    # One of them, taken mid-write with the guest running: an ext4 that needs only its journal replayed.
    img = Path(vdir).parent / "snap.img"
    cubefs("clone", f"{volume}@{middle}", "--prefix", "check", "--volume-dir", vdir)
    cubefs("volume", "export", "check-0", str(img), "--volume-dir", vdir)
    replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(img)], capture_output=True, text=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    ls = subprocess.run(["debugfs", "-R", "ls -l /upper/root/bench", str(img)], capture_output=True, text=True)
    img.unlink()
    ms = sorted(t * 1000 for t in took)
    return {"count": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "max_ms": ms[-1], "untar_s": t_untar, "seqwrite_s": t_write, "checked": middle,
            "journal_replay_rc": replay.returncode, "e2fsck_rc": fsck.returncode,
            "e2fsck": fsck.stdout.strip().splitlines()[-1:], "upper_bench": ls.stdout.split()[-12:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-size", default="3G")
    ap.add_argument("--write-size", default="1G")
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    ap.add_argument("--wheels", default=None, help="a directory of wheels: numpy, pandas, their dependencies, pip "
                    "(default: pip download them into the work directory)")
    ap.add_argument("--snap-every", type=float, default=0.1, help="seconds between snapshots under load (0: none)")
    ap.add_argument("--dir", default=None, help="host directory for volumes and the raw file (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here after every sample")
    args = ap.parse_args()
    disk_size, write_mb = parse_size(args.disk_size), parse_size(args.write_size) >> 20
    workloads = [w for w in args.workloads.split(",") if w]
    if set(workloads) - set(WORKLOADS):
        ap.error(f"--workloads: unknown {sorted(set(workloads) - set(WORKLOADS))}")
    kernel = make_kernel(Path(DEFAULT))
    tar = _python_tar()
    with tempfile.TemporaryDirectory(prefix="vm-disk-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        wheels = wheel_dir(args.wheels, work) if "pip" in workloads else None
        repo = repo_tar() if "clone" in workloads else None
        pip_whl = next(wheels.glob("pip-*.whl")).name if wheels is not None else ""
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
        results: dict[str, dict[str, list[float]]] = {k: {w: [] for w in workloads} for k in places}
        snaps: dict[str, object] = {}

        def save() -> None:
            if args.out:
                Path(args.out).write_text(json.dumps({"results": results, "snapshots": snaps}, indent=1))

        try:
            with Agent(m.agent_path, "vm-disk-bench") as agent:
                agent.connect(900)
                agent.mount(False, disk=True)
                agent.put("/dev/py.tar", tar)
                agent.put("/dev/sqlite_bench.py", SQLITE.encode())
                if repo is not None:
                    agent.put("/dev/repo.tar", repo)
                    agent.run("tar -C /dev -xf /dev/repo.tar && rm /dev/repo.tar", timeout=600)
                if wheels is not None:
                    agent.run("mkdir -p /dev/wheels", timeout=60)
                    for whl in sorted(wheels.glob("*.whl")):
                        agent.put(f"/dev/wheels/{whl.name}", whl.read_bytes())
                res = agent.run("cat /sys/block/vda/serial; echo; mkdir -p /mnt-b /mnt-c && "
                                "mount -t virtiofs vol /mnt-b && mkfs.ext4 -q /dev/vdb && "
                                "mount -t ext4 /dev/vdb /mnt-c", timeout=600)
                if res.exit_code or not res.stdout.startswith(b"disk"):
                    raise RuntimeError(f"guest setup: {res.stdout!r} {res.stderr.decode(errors='replace')}")
                if args.snap_every > 0:
                    snaps.update(snapshots_under_load(agent, vdir, "disk", args.snap_every, write_mb))
                    print(f"snapshots under load: {json.dumps(snaps)}", file=sys.stderr, flush=True)
                    save()
                for run in range(args.runs):
                    for name, at in places.items():
                        for what in workloads:
                            agent.run(f"rm -rf {at}; mkdir -p {at}; sync", timeout=600)
                            results[name][what].append(timed(agent, script(what, at, write_mb, pip_whl)))
                            print(f"run {run + 1} {name}: {what} {results[name][what][-1]:.2f} s",
                                  file=sys.stderr, flush=True)
                            save()
                        agent.run(f"rm -rf {at}; sync", timeout=600)
                agent.run("rm -rf /root/bench /mnt-b/bench /mnt-c/bench; umount /mnt-b /mnt-c; sync", timeout=600)
                stats = json.loads(cubefs("stats", str(work / "blk.sock"), "--json"))
                agent.poweroff()
        finally:
            m.stop()
            for sock in ("blk.sock", "root.sock", "vol.sock"):
                subprocess.run([sys.executable, "-m", "cubefs", "umount", str(work / sock)], capture_output=True)
            stop_mount_server(work / "serve.sock")
        labels = {"untar": "untar py3.11 + sync", "pip": "pip install numpy pandas", "clone": "clone of 2,000 files",
                  "sqlite": "sqlite 10,000 inserts / 100", "seqwrite": f"dd {write_mb} MiB + fsync"}
        print(f"\n{'':30} {'(a) overlay on blk':>18} {'(b) virtio-fs vol':>18} {'(c) virtio-blk raw':>18} "
              f"{'(a)/(c)':>8} {'(b)/(c)':>8}")
        for what in workloads:
            a, b, c = (statistics.median(results[k][what]) for k in ("a", "b", "c"))
            print(f"{labels[what]:30} {a:16.2f} s {b:16.2f} s {c:16.2f} s {a / c:8.2f} {b / c:8.2f}")
        if snaps:
            print(f"snapshots under load: {snaps['count']}, p50 {snaps['p50_ms']:.2f} ms, "
                  f"p99 {snaps['p99_ms']:.2f} ms, max {snaps['max_ms']:.2f} ms; "
                  f"{snaps['checked']} e2fsck -fn rc {snaps['e2fsck_rc']}")
        print(json.dumps({"results": results, "snapshots": snaps, "blk_requests": stats.get("requests")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
