#!/usr/bin/env python3
"""The FUSE transport's own cost: one round trip through a volume daemon, nearly no work.

Why (issue 16, the host floor): an untar onto a volume is ~10 requests a file, each a
round trip tar waits for.  This separates the round trip from the handlers' work:
``--calls`` TCGETS ioctls on a file of a freshly mounted empty volume, each answered
ENOTTY inline by the daemon (``FuseServer._ioctl``), timed one by one in a child
process.  ``--pin`` runs the caller and the daemon on given CPUs (``same``: both on the
last CPU; ``apart``: the first and the last), which is what FUSE over io_uring would
give (a queue per CPU, served on the caller's CPU); ``--spin-us`` sets the daemon's
poll after a request (``CUBEFS_FUSE_SPIN_US``; 0: off); ``--uring`` serves the mount over
FUSE over io_uring (``CUBEFS_FUSE_URING=1``; the kernel's ``enable_uring`` must be Y, and the
run fails if the daemon's ``cubefs stats`` says it took /dev/fuse).  Prints percentiles of the
round trip (p10 is what an unloaded machine gives: this one is shared) and the
daemon's CPU per call.

    sudo .venv/bin/python tools/bench/fuse_roundtrip.py [--spin-us 0] [--pin same|apart] [--uring] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

CALLER = textwrap.dedent("""
    import fcntl, json, os, sys, termios, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    lat = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter_ns()
        try:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        except OSError:
            pass
        lat.append(time.perf_counter_ns() - t)
    print(json.dumps(lat))
""")


def cubefs(*args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(work: Path, calls: int, spin_us: float | None, pin: str | None, ring: bool = False) -> dict[str, Any]:
    mnt = work / "mnt"
    mnt.mkdir()
    cubefs("volume", "create", "rt", "--volume-dir", str(work / "volumes"))
    env = dict(os.environ)
    if spin_us is not None:
        env["CUBEFS_FUSE_SPIN_US"] = str(spin_us)
    env["CUBEFS_FUSE_URING"] = "1" if ring else "0"
    cubefs("mount", "--volume", "rt", str(mnt), "--volume-dir", str(work / "volumes"), "--cache-dir",
           str(work / "cache"), "--no-server", env=env)
    try:
        stats = json.loads(cubefs("stats", str(mnt), "--json"))
        pid = int(stats["pid"])
        (mnt / "f").write_bytes(b"x")  # INIT is answered (and the ring set up) by the first request
        path = json.loads(cubefs("stats", str(mnt), "--json"))["fuse_path"]
        if ring and path["path"] != "io_uring":
            raise RuntimeError(f"the daemon serves /dev/fuse, not the ring: {path}")
        cpus = sorted(os.sched_getaffinity(0))
        caller_cpu = None
        if pin:
            daemon_cpu, caller_cpu = (cpus[-1], cpus[-1]) if pin == "same" else (cpus[0], cpus[-1])
            for task in os.listdir(f"/proc/{pid}/task"):  # every thread of the daemon
                os.sched_setaffinity(int(task), {daemon_cpu})
        cpu0 = cpu_seconds(pid)
        out = subprocess.run([sys.executable, "-c", CALLER, str(mnt / "f"), str(calls)], capture_output=True,
                             text=True, check=True,
                             preexec_fn=(lambda: os.sched_setaffinity(0, {caller_cpu})) if caller_cpu is not None
                             else None)
        daemon_cpu_s = cpu_seconds(pid) - cpu0
    finally:
        subprocess.run([sys.executable, "-m", "cubefs", "umount", str(mnt)], capture_output=True, cwd=ROOT)
    lat = sorted(json.loads(out.stdout))

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * q))] / 1000, 1)

    return {"calls": calls, "spin_us": spin_us, "pin": pin, "path": path["path"], "load_average": os.getloadavg()[0],
            "round_trip_us": {"p10": pct(0.10), "p50": pct(0.50), "p90": pct(0.90)},
            "daemon_cpu_us_per_call": round(daemon_cpu_s / calls * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--spin-us", type=float, default=None, help="the daemon's CUBEFS_FUSE_SPIN_US (default: its own)")
    ap.add_argument("--pin", choices=("same", "apart"), default=None, help="pin the caller and the daemon")
    ap.add_argument("--uring", action="store_true", help="FUSE over io_uring (CUBEFS_FUSE_URING=1)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cubefs-rt-", dir="/var/tmp"))
    try:
        result = run(work, args.calls, args.spin_us, args.pin, args.uring)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rt = result["round_trip_us"]
    print(f"{result['calls']} TCGETS round trips (spin {args.spin_us if args.spin_us is not None else 'default'} us, "
          f"pin {args.pin or 'none'}, {result['path']}): p10 {rt['p10']} us, p50 {rt['p50']} us, p90 {rt['p90']} us; "
          f"daemon CPU {result['daemon_cpu_us_per_call']} us a call (load average {result['load_average']:.1f})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
