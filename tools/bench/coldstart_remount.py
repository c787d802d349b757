#!/usr/bin/env python3
"""Remounts of an image already on the node, two versions of cubefs side by side (issue 18).

On a shared, loaded machine (2 cores, other sessions' VMs) one run of a remount varies
2-3x from the next, so a before/after comparison is made *alternating*: each round
remounts with A then B (then B then A), each after ``drop_caches``, so both see the
same load; the command in the tree itself (caches dropped) runs in every round too, and
the ratios are taken round by round.  A and B are frozen source trees (``git archive REV | tar -x -C DIR``, with
a ``.venv`` symlink to this checkout's), each with its own mount server, store
(WORKDIR/A/store, built once) and kept disk cache.

Per round and version: ``cubefs mount`` timed (the CLI process and the daemon the
mount server forks), the command run in the mount timed, ``cubefs stats`` read
(``mount_phases``, ``request_seconds``, store GETs), unmount; then the same remount
through the mount server from a running process (``cubefs.cli.mount_through_server``,
the sandbox service's path: no interpreter start), the command again (and the minor page
faults its daemon took meanwhile, from ``/proc``); then the
command in TREE itself, caches dropped.  At the end the same, warm.  As root::

    git archive 30c0719 | tar -x -C /var/tmp/before; ln -s $PWD/.venv /var/tmp/before/.venv
    git archive HEAD    | tar -x -C /var/tmp/after;  ln -s $PWD/.venv /var/tmp/after/.venv
    .venv/bin/python tools/bench/coldstart_remount.py /var/tmp/cubefs-bench/deb-python "import json" \\
        /var/tmp/remount --versions before=/var/tmp/before,after=/var/tmp/after --rounds 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HELPER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from cubefs.cli import mount_through_server
for line in sys.stdin:
    t = time.perf_counter()
    ok = mount_through_server(json.loads(line))
    print(json.dumps([ok, time.perf_counter() - t]), flush=True)
"""


OWN: list[str] = []  # --drop own: the paths whose pages are dropped instead of the whole machine's


def drop_caches() -> None:
    """The kernel's clean caches dropped: the whole machine's (``drop_caches``: every other
    session's too), or with ``--drop own`` only the pages of our own files (the tree, each
    version's disk cache and source): ``POSIX_FADV_DONTNEED`` on each, which keeps dentries
    and inodes (the tree's lookups then do not reach the disk)."""
    os.sync()
    if not OWN:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for top in OWN:
        for root, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if d != ".venv"]
            for name in names:
                try:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def daemon_faults(mnt: str) -> int | None:
    """Minor page faults so far of the daemon serving ``mnt``, all its threads (its pid from the
    mount's registry, /run/cubefs/mounts as root); None if it cannot be read.  A remounted
    daemon's faults were most of what its first requests paid over a steady one's (session 13)."""
    key = hashlib.sha256(os.path.abspath(mnt).encode()).hexdigest()[:16]
    try:
        pid = int(json.loads(Path(f"/run/cubefs/mounts/{key}.json").read_text())["pid"])
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[7])
        return total
    except (OSError, ValueError, KeyError):
        return None


def run(root: str, cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(["chroot", root, "python3", "-c", cmd], check=True)
    return time.perf_counter() - t


class Version:
    def __init__(self, name: str, root: str, work: Path, tree: str) -> None:
        self.name, self.root = name, root
        base = work / name
        base.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, CUBEFS_SERVER=str(base / "serve.sock"))
        self.mnt = str(base / "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        store = f"file://{base / 'store'}"
        if not (base / "built").exists():
            self.cli("build", tree, "--tag", "img:1", "--store", store)
            (base / "built").touch()
        self.args = ["img:1", self.mnt, "--store", store, "--cache-dir", str(base / "cache")]
        self.helper = subprocess.Popen([f"{root}/.venv/bin/python", "-c", HELPER, root], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=self.env, cwd=root)
        self.res: dict[str, list[Any]] = {k: [] for k in ("cli", "run", "inproc", "run_inproc", "phases",
                                                          "request_seconds", "requests", "gets")}

    def cli(self, *args: str) -> str:
        return subprocess.run([f"{self.root}/.venv/bin/python", "-m", "cubefs", *args], check=True,
                              capture_output=True, text=True, env=self.env, cwd=self.root).stdout

    def round(self, cmd: str) -> None:
        r = self.res
        drop_caches()
        t = time.perf_counter()
        self.cli("mount", *self.args)
        r["cli"].append(time.perf_counter() - t)
        r["run"].append(run(self.mnt, cmd))
        st = json.loads(self.cli("stats", self.mnt, "--json"))
        r["phases"].append(st.get("mount_phases"))
        r["request_seconds"].append(st.get("request_seconds"))
        r["requests"].append(st["requests"])
        r["gets"].append(st["store_requests"]["gets"])
        r.setdefault("cpu", []).append(st.get("cpu_since_ready"))
        self.cli("umount", self.mnt)
        drop_caches()
        assert self.helper.stdin is not None and self.helper.stdout is not None
        self.helper.stdin.write(json.dumps(self.args) + "\n")
        self.helper.stdin.flush()
        ok, sec = json.loads(self.helper.stdout.readline())
        assert ok, "mount through the server failed"
        r["inproc"].append(sec)
        before = daemon_faults(self.mnt)
        r["run_inproc"].append(run(self.mnt, cmd))
        after = daemon_faults(self.mnt)
        r.setdefault("faults", []).append(after - before if before is not None and after is not None else None)
        self.cli("umount", self.mnt)

    def close(self) -> None:
        if self.helper.stdin is not None:
            self.helper.stdin.close()
        self.helper.wait()
        subprocess.run([f"{self.root}/.venv/bin/python", "-m", "cubefs", "umount", self.mnt], capture_output=True,
                       env=self.env, cwd=self.root)
        lock = Path(f"{self.env['CUBEFS_SERVER']}.lock")
        if lock.exists() and lock.read_text().strip():
            try:
                os.kill(int(lock.read_text()), 15)
            except ProcessLookupError:
                pass


def summary(x: list[float]) -> str:
    s = sorted(x)
    return f"min {s[0]:.3f} med {statistics.median(s):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree")
    ap.add_argument("cmd", help="python3 -c CMD, in the tree")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--versions", required=True, help="NAME=DIR,NAME=DIR")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--drop", choices=("all", "own"), default="all",
                    help="drop the whole machine's page cache, dentries and inodes (default), or only our files' pages")
    a = ap.parse_args()
    versions = [Version(n, d, a.workdir, a.tree) for n, d in (v.split("=", 1) for v in a.versions.split(","))]
    if a.drop == "own":
        OWN[:] = [a.tree, *(str(a.workdir / v.name / "cache") for v in versions), *(v.root for v in versions)]
    try:
        for v in versions:  # the kept cache: a first start, then a warm run
            v.cli("mount", *v.args)
            run(v.mnt, a.cmd)
            run(v.mnt, a.cmd)
            time.sleep(1)
            v.cli("umount", v.mnt)
        native: dict[str, list[float]] = {"dropped": [], "warm": []}
        for i in range(a.rounds):
            for v in (versions if i % 2 == 0 else versions[::-1]):
                v.round(a.cmd)
            drop_caches()  # the tree in every round too: under the same load as the remounts beside it
            native["dropped"].append(run(a.tree, a.cmd))
        run(a.tree, a.cmd)
        native["warm"] = [run(a.tree, a.cmd) for _ in range(a.rounds)]
    finally:
        for v in versions:
            v.close()
    out: dict[str, Any] = {v.name: v.res for v in versions}
    out["native"], out["load"], out["drop"] = native, os.getloadavg(), a.drop
    if a.json_out:
        a.json_out.write_text(json.dumps(out, indent=1))
    print(f"native: caches dropped {summary(native['dropped'])}, warm {summary(native['warm'])}")
    nat = native["dropped"]
    for v in versions:
        r = v.res
        cli_ratio = statistics.median((x + y) / n for x, y, n in zip(r["cli"], r["run"], nat))
        inproc_ratio = statistics.median((x + y) / n for x, y, n in zip(r["inproc"], r["run_inproc"], nat))
        print(f"{v.name}: on the node / native, median of the rounds' ratios: cubefs mount + run {cli_ratio:.2f}x, "
              f"in process + run {inproc_ratio:.2f}x (the floor: 1.5x)")
        print(f"{v.name}: cubefs mount {summary(r['cli'])} | run {summary(r['run'])} | mount+run "
              f"{summary([x + y for x, y in zip(r['cli'], r['run'])])} | in process {summary(r['inproc'])} | "
              f"in process+run {summary([x + y for x, y in zip(r['inproc'], r['run_inproc'])])} | "
              f"store GETs at the end {r['gets'][-1]}")
        if r["phases"][0]:
            keys = list(r["phases"][0])
            med = {k: round(statistics.median(p[k] for p in r["phases"]), 1) for k in keys}
            print("   mount phases, median ms:", med)
        if r["request_seconds"][0]:
            keys = list(r["request_seconds"][0])
            print("   run, ms in the daemon by operation (median):",
                  {k: round(statistics.median(p.get(k, 0) for p in r["request_seconds"]) * 1000, 1) for k in keys})
        print("   run, requests:", r["requests"][-1])
        faults = [f for f in r.get("faults", []) if f is not None]
        if faults:
            print(f"   the daemon's minor page faults in the run (in process), median: {statistics.median(faults):.0f}")
        if r.get("cpu") and None not in r["cpu"]:
            print(f"   the daemon's CPU from ready to the run's end, median ms: "
                  f"{statistics.median(r['cpu']) * 1000:.1f}")
    if len(versions) >= 2:  # each later version against the first, round by round (same load)
        first = versions[0].res
        base = [x + y for x, y in zip(first["inproc"], first["run_inproc"])]
        for v in versions[1:]:
            mine = [x + y for x, y in zip(v.res["inproc"], v.res["run_inproc"])]
            print(f"{v.name} against {versions[0].name}, in process + run: median of the rounds' ratios "
                  f"{statistics.median(m / b for m, b in zip(mine, base)):.3f}, faster in "
                  f"{sum(m < b for m, b in zip(mine, base))} of {len(base)} rounds")
    print(f"load {out['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
