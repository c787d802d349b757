#!/usr/bin/env python3
"""Host memory of VM roots: one root host per image (``cubefs mount --shared``) against a
daemon per root (issue 14, density).

The test rootfs (Debian bookworm + python3) is built into a temporary store and
``--mounts`` volumes are made over it.  Each is served over vhost-user-fs to a fake
front-end (tests/test_vhost_user.py's FakeGuest: "QEMU" and the guest driver in this
process, 1 MiB of guest RAM in a memfd) that does what a starting Python does to its
root: INIT, then a LOOKUP of every path component and a READ (64 KiB) of each of
``--files`` modules of /usr/lib/python3.11.  Measured after the workload, PSS from
/proc/PID/smaps_rollup (pages shared between processes split among them):

* **daemons**: ``--mounts`` roots, a forked daemon each: the sum of their PSS;
* **shared**: the root host's PSS with 1, 5 and ``--mounts`` roots mounted ``--shared``.

    .venv/bin/python tools/bench/shared_roots.py --mounts 10 --files 100

Needs root (vhost-user, like every VM root) and the test rootfs.  It runs its own mount
server in a temporary directory and stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_vhost_user import FakeGuest  # noqa: E402

from cubefs.fuse import protocol as p  # noqa: E402

ROOTFS = Path(os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs"))


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def cubefs(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def mount(tmp: Path, volume: str, shared: bool) -> tuple[Path, int]:
    sock = tmp / f"{volume}.sock"
    cubefs("mount", "--volume", volume, str(sock), "--transport", "virtiofs", *(["--shared"] if shared else []))
    return sock, int(json.loads(cubefs("stats", str(sock), "--json"))["pid"])


def workload(sock: Path, files: list[str]) -> FakeGuest:
    """What a Python start-up does to its root, roughly: lookups down the path, reads."""
    g = FakeGuest(str(sock))
    g.setup()
    g.ok(p.INIT, 0, p.INIT_IN.pack(7, 31, 1 << 20, 0))
    lib = 1
    for part in (b"usr", b"lib", b"python3.11"):
        lib = g.lookup(lib, part)
    for name in files:
        g.read(g.lookup(lib, name.encode()), 65536)
    return g


def wait_gone(pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pids.discard(pid)
        time.sleep(0.05)


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--mounts", type=int, default=10)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shared-roots-"))
    os.environ.update({"CUBEFS_SERVER": str(tmp / "serve.sock"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
                       "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_VOLUME_DIR": str(tmp / "vols"),
                       "CUBEFS_ROOT_HOST_IDLE": "1"})
    files = sorted(n for n in os.listdir(ROOTFS / "usr/lib/python3.11")
                   if n.endswith(".py") and not (ROOTFS / "usr/lib/python3.11" / n).is_symlink())[: a.files]
    started: set[int] = set()
    guests: list[FakeGuest] = []
    result: dict[str, object] = {"mounts": a.mounts, "files": len(files)}
    try:
        cubefs("build", str(ROOTFS), "--tag", "debian:12")
        names = [f"v{i}" for i in range(a.mounts)]
        for v in names:
            cubefs("volume", "create", v, "--from", "debian:12")
        # A daemon per root.
        pids = []
        for v in names:
            sock, pid = mount(tmp, v, shared=False)
            started.add(pid)
            pids.append(pid)
            guests.append(workload(sock, files))
        per = [pss_kib(pid) for pid in pids]
        result["daemons_pss_kib"] = per
        print(f"{a.mounts} daemons: PSS {sum(per) / 1024:.1f} MiB in all, {sum(per) / len(per) / 1024:.1f} MiB each")
        for g in guests:
            g.conn.close()
        guests.clear()
        wait_gone(set(pids))
        # One root host, mounts added.
        host = 0
        shared: dict[int, int] = {}
        for i, v in enumerate(names, 1):
            sock, host = mount(tmp, v, shared=True)
            started.add(host)
            guests.append(workload(sock, files))
            if i in (1, 5, a.mounts):
                shared[i] = pss_kib(host)
                print(f"root host with {i:2d} mounts: PSS {shared[i] / 1024:.1f} MiB")
        result["host_pss_kib"] = shared
        n = a.mounts
        saved = sum(per) - shared[n]
        print(f"{n} roots: {sum(per) / 1024:.1f} MiB as daemons, {shared[n] / 1024:.1f} MiB in one host "
              f"({saved / 1024:.1f} MiB less; {(shared[n] - shared[1]) / (n - 1) / 1024:.2f} MiB per added mount)")
    finally:
        for g in guests:
            g.conn.close()
        wait_gone(set(started), 10)
        lock = tmp / "serve.sock.lock"
        if lock.exists() and lock.read_text().strip():
            try:
                os.kill(int(lock.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", str(tmp)])
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
