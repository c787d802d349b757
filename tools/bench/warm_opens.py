#!/usr/bin/env python3
"""Warm and on-the-node runs of one of issue 18's trees, with and without FUSE passthrough,
and the FUSE requests a warm run sends the daemon (the isatty ioctls, OPEN/RELEASE).

Builds TREE once into a ``file://`` store under WORKDIR, then for each mode (``off``:
a plain mount; ``on``: ``cubefs mount --passthrough``), each with its own mount
server and an empty cache: mount, run CMD in a chroot twice (cold, then a warm run
that lets the copies finish), 7 warm runs timed (median) with the requests they
sent; then 3 times: unmount, drop caches, remount on the kept cache (``cubefs mount``
timed, and the daemon's ``mount_phases`` from ``cubefs stats``), one run timed, with the
requests the mount served.  The same command in TREE itself first: caches dropped
(3 runs) and warm (7).  As root::

    .venv/bin/python tools/bench/warm_opens.py /var/tmp/cubefs-bench/deb-numpy "import numpy" /var/tmp/wo
    .venv/bin/python tools/bench/warm_opens.py TREE CMD WORKDIR on,off     # another order
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")


def cubefs(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([PY, "-m", "cubefs", *args], check=True, capture_output=True, text=True, env=env,
                          cwd=ROOT).stdout


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(mnt: str, cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(["chroot", mnt, "python3", "-c", cmd], check=True)
    return time.perf_counter() - t


def measure(base: Path, store: str, cmd: str, mode: str, env0: dict[str, str]) -> dict[str, Any]:
    env = dict(env0, CUBEFS_SERVER=str(base / f"{mode}.sock"))
    opts = ["--passthrough"] if mode == "on" else []
    cache, mnt = base / f"cache-{mode}", str(base / f"mnt-{mode}")
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(mnt, exist_ok=True)
    mount = ["mount", "img:1", mnt, "--store", store, "--cache-dir", str(cache), *opts]
    try:
        cubefs(*mount, env=env)
        run(mnt, cmd)
        run(mnt, cmd)
        time.sleep(1)
        before = json.loads(cubefs("stats", mnt, "--json", env=env))["requests"]
        warm = [run(mnt, cmd) for _ in range(7)]
        after = json.loads(cubefs("stats", mnt, "--json", env=env))["requests"]
        cubefs("umount", mnt, env=env)
        node, remount, phases, node_requests, last = [], [], [], [], {}
        for _ in range(3):
            drop_caches()
            t = time.perf_counter()
            cubefs(*mount, env=env)
            remount.append(time.perf_counter() - t)
            node.append(run(mnt, cmd))
            last = json.loads(cubefs("stats", mnt, "--json", env=env))
            phases.append(last.get("mount_phases"))
            node_requests.append(last["requests"])
            cubefs("umount", mnt, env=env)
        # The same through the mount server from a running process (the sandbox service's
        # path: cubefs.cli.mount_through_server), so no interpreter starts for the mount.
        from cubefs.cli import mount_through_server

        os.environ["CUBEFS_SERVER"] = env["CUBEFS_SERVER"]
        served, served_node = [], []
        for _ in range(3):
            drop_caches()
            t = time.perf_counter()
            assert mount_through_server(mount[1:])
            served.append(time.perf_counter() - t)
            served_node.append(run(mnt, cmd))
            cubefs("umount", mnt, env=env)
    finally:
        subprocess.run([PY, "-m", "cubefs", "umount", mnt], capture_output=True, env=env, cwd=ROOT)
        lock = base / f"{mode}.sock.lock"
        if lock.exists() and lock.read_text().strip():
            try:
                os.kill(int(lock.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
    per_run = {k: (after.get(k, 0) - before.get(k, 0)) / len(warm) for k in after}
    return {"warm_median_s": statistics.median(warm), "warm_s": warm,
            "requests_per_warm_run": {k: v for k, v in per_run.items() if v},
            "on_node_median_s": statistics.median(node), "on_node_s": node,
            "remount_median_s": statistics.median(remount), "remount_s": remount,
            "on_node_total_median_s": statistics.median(a + b for a, b in zip(remount, node)),
            "remount_in_process_median_s": statistics.median(served), "remount_in_process_s": served,
            "on_node_after_in_process_s": served_node,
            "mount_phases_ms": phases, "on_node_requests": node_requests[-1],
            "on_node_request_seconds": last.get("request_seconds"),
            "on_node_store_gets": last.get("store_requests", {}).get("gets"),
            "on_node_reads": last["requests"].get("read", 0), "passthrough": last.get("passthrough")}


def native(tree: str, cmd: str) -> dict[str, Any]:
    """The same command in the extracted tree: caches dropped (3 runs), then warm (7 runs)."""
    dropped = []
    for _ in range(3):
        drop_caches()
        dropped.append(run(tree, cmd))
    run(tree, cmd)
    warm = [run(tree, cmd) for _ in range(7)]
    return {"dropped_median_s": statistics.median(dropped), "dropped_s": dropped,
            "warm_median_s": statistics.median(warm), "warm_s": warm}


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    tree, cmd, base = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["off", "on"]
    env0 = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    store = f"file://{base / 'store'}"
    if not (base / "built").exists():
        base.mkdir(parents=True, exist_ok=True)
        cubefs("build", tree, "--tag", "img:1", "--store", store, env=env0)
        (base / "built").touch()
    out: dict[str, Any] = {"native": native(tree, cmd)}
    out.update({mode: measure(base, store, cmd, mode, env0) for mode in modes})
    for mode in modes:  # issue 18's floor: remount + run <= 1.5x the tree with caches dropped
        m, nat = out[mode], out["native"]["dropped_median_s"]
        m["on_node_ratio_cli"] = round(m["on_node_total_median_s"] / nat, 2)
        m["on_node_ratio_in_process"] = round(statistics.median(
            a + b for a, b in zip(m["remount_in_process_s"], m["on_node_after_in_process_s"])) / nat, 2)
    out["load"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
