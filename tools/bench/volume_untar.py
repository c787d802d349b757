#!/usr/bin/env python3
"""Untar onto a mounted volume vs the native disk (issue 16, part 3): floor <= 5x.

What one run does, as root: packs ``--source`` (default /usr/lib/python3.11)
into a tar in a fresh work directory, creates an empty volume there, mounts
it through the real CLI, and then ``--runs`` times, interleaved, untars it
with GNU tar into a new directory of the native disk (the work directory's
filesystem) and into a new directory of the volume, each after a ``sync`` so
that neither pays for the other's writeback.  Neither side fsyncs, as tar
does not: both measure what an untar waits for.  It reports the median of
each, the ratio of the medians (the floor), and the FUSE requests the last
volume untar made, by operation (``cubefs stats``), which is where its time
goes: every request is a round trip through the daemon (docs/design.md, "The
host floor").  With ``--writeback-cache`` what is left is 8.8 requests an
entry, each the kernel's own (LOOKUP, the directory's GETATTR, MKNOD, two
GETXATTRs of ``security.capability``, one WRITE, tar's three SETATTRs); the
kernel's SETATTR of its times after a file's write went in session 12 (new
inodes stamped on the kernel's tick: cubefs/volume/fs.py, ``tick_ns``).

    sudo .venv/bin/python tools/bench/volume_untar.py --runs 5 --json-out untar.json
    sudo .venv/bin/python tools/bench/volume_untar.py --runs 1 --profile daemon.prof   # the daemon's profile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

FLOOR = 5.0


def cubefs(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def log(msg: str) -> None:
    print(f"[volume_untar] {msg}", file=sys.stderr, flush=True)


def untar(tar: Path, into: Path) -> tuple[float, float]:
    """(wall seconds, tar's CPU seconds)."""
    into.mkdir()
    subprocess.run(["sync"], check=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-C", str(into), "-xf", str(tar)], check=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process: the daemon's cost, which a loaded machine (this one
    runs other people's VMs) inflates far less than the wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests(mnt: Path) -> tuple[dict[str, int], dict[str, float]]:
    """(requests by operation, seconds the daemon spent on them: read to answer written)."""
    stats = json.loads(cubefs("stats", str(mnt), "--json").stdout)
    return dict(stats["requests"]), dict(stats.get("request_seconds") or {})


def mount_profiled(mount_args: list[str], mnt: Path, out: Path) -> subprocess.Popen[bytes]:
    """The daemon in the foreground under cProfile (``--profile``): where its CPU per request
    goes, transport included, which the in-process harness (volume_ops.py) leaves out."""
    proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "cubefs", *mount_args,
                             "--foreground"], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the profiled daemon did not mount {mnt} (exit {proc.poll()})")
        time.sleep(0.05)
    return proc


def run(work: Path, source: Path, runs: int, writeback: bool = False, profile: Path | None = None) -> dict[str, Any]:
    tar = work / "source.tar"
    with tarfile.open(tar, "w") as t:
        t.add(source, arcname=source.name)
    entries = sum(1 for _ in tarfile.open(tar))
    voldir, mnt, native = work / "volumes", work / "mnt", work / "native"
    mnt.mkdir()
    native.mkdir()
    cubefs("volume", "create", "untar", "--volume-dir", str(voldir))
    mount_args = ["mount", "--volume", "untar", str(mnt), "--volume-dir", str(voldir), "--cache-dir",
                  str(work / "cache"), "--no-server", *(["--writeback-cache"] if writeback else [])]
    profiled = mount_profiled(mount_args, mnt, profile) if profile else None
    if profiled is None:
        cubefs(*mount_args)
    times: dict[str, list[float]] = {"native": [], "volume": []}
    cpu: dict[str, list[float]] = {"tar_native": [], "tar_volume": [], "daemon": []}
    spent: dict[str, int] = {}
    busy: dict[str, float] = {}
    pid = int(json.loads(cubefs("stats", str(mnt), "--json").stdout)["pid"])
    try:
        for i in range(runs):
            wall, tar_cpu = untar(tar, native / f"x{i}")
            times["native"].append(wall)
            cpu["tar_native"].append(tar_cpu)
            (before, busy0), daemon0 = requests(mnt), cpu_seconds(pid)
            wall, tar_cpu = untar(tar, mnt / f"x{i}")
            times["volume"].append(wall)
            cpu["tar_volume"].append(tar_cpu)
            # What the kernel still holds dirty (--writeback-cache) is the daemon's work too: counted,
            # outside the untar's time (the native side's writeback is not timed either).
            subprocess.run(["sync", "-f", str(mnt)], check=True)
            cpu["daemon"].append(cpu_seconds(pid) - daemon0)
            after, busy1 = requests(mnt)
            spent = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
            busy = {op: s - busy0.get(op, 0.0) for op, s in busy1.items() if op in spent}
            log(f"run {i + 1}: native {times['native'][-1]:.3f} s, volume {times['volume'][-1]:.3f} s "
                f"(tar CPU {tar_cpu:.2f} s, daemon CPU {cpu['daemon'][-1]:.2f} s), {sum(spent.values())} requests")
        check = subprocess.run(["diff", "-r", "--no-dereference", str(native / "x0"), str(mnt / "x0")],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"the volume's copy differs: {check.stdout[:500]}{check.stderr[:500]}")
    finally:
        res = subprocess.run([sys.executable, "-m", "cubefs", "umount", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        if profiled is not None:
            try:
                profiled.wait(timeout=30)  # cProfile writes its file as the daemon exits
            except subprocess.TimeoutExpired:
                profiled.kill()
                profiled.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"source": str(source), "writeback_cache": writeback, "entries": entries, "bytes": tar.stat().st_size,
            "runs": runs,
            "seconds": times, "cpu_seconds": cpu, "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "load_average": os.getloadavg()[0], "median_native_s": med["native"], "median_volume_s": med["volume"],
            "ratio": med["volume"] / med["native"], "floor": FLOOR,
            # The fastest runs: other people's I/O only ever slows a run, and the native untar
            # swings most (0.09-1.6 s in one session), which can make the medians' ratio "ok".
            "ratio_fastest": min(times["volume"]) / min(times["native"]),
            "requests_last_run": dict(sorted(spent.items())),
            # the daemon's time per request of the last run, by operation (handler + answer's write)
            "us_per_request_last_run": {op: round(busy[op] / spent[op] * 1e6, 1) for op in sorted(busy)},
            "busy_s_last_run": round(sum(busy.values()), 3),
            "requests_per_entry": sum(spent.values()) / max(entries, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/usr/lib/python3.11"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--writeback-cache", action="store_true", help="mount the volume with --writeback-cache")
    ap.add_argument("--profile", type=Path, default=None, metavar="FILE",
                    help="run the daemon under cProfile, its stats to FILE; prints the top 25 (its CPU is then ~2x)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cubefs-untar-", dir="/var/tmp"))
    try:
        result = run(work, args.source, args.runs, args.writeback_cache, args.profile)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = result["ratio"] <= FLOOR
    print(f"untar of {result['source']} ({result['entries']} entries, {result['bytes'] / 1e6:.1f} MB), "
          f"median of {result['runs']}{', --writeback-cache' if args.writeback_cache else ''}:")
    print(f"  native {result['median_native_s']:.3f} s, volume {result['median_volume_s']:.3f} s: "
          f"{result['ratio']:.2f}x (floor <= {FLOOR:g}x) {'ok' if ok else 'FAIL'}")
    print(f"  fastest runs: native {min(result['seconds']['native']):.3f} s, volume "
          f"{min(result['seconds']['volume']):.3f} s: {result['ratio_fastest']:.2f}x")
    c = result["median_cpu_s"]
    print(f"  CPU: tar {c['tar_native']:.2f} s native, {c['tar_volume']:.2f} s on the volume; "
          f"daemon {c['daemon']:.2f} s (load average {result['load_average']:.1f})")
    print(f"  requests (last run): {result['requests_per_entry']:.1f} per entry: {result['requests_last_run']}")
    print(f"  daemon time per request (last run, read to answer written; {result['busy_s_last_run']:.3f} s "
          f"in all), us: {result['us_per_request_last_run']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    if args.profile:
        import pstats

        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
