#!/usr/bin/env python3
"""Warm runs of issue 18's bench images, native and through several mount modes, alternated.

Issue 18's warm floor: a command on a warm mount (same mount, page cache warm) takes
<= 1.1x the same command in the extracted tree.  A warm run is 20-500 ms and the
machine is shared, so one run says little: this runs the command in the tree and in
each mode's mount in turn, round after round (the order rotates every round, so no
mode always follows another), and reports medians, quartiles and the median of the
rounds' ratios to native (each round's runs saw the same load).

Per image (tools/bench/images.py: its tree and command): built once into a
``file://`` store under WORKDIR; one mount per mode (``--modes NAME=MOUNT ARGS;...``,
default ``off=`` and ``on=--passthrough``; with passthrough auto by default, ``off=`` is the default
mount, which declines it for these four images, and ``--no-passthrough`` the mount without it),
each with its own empty disk cache, all served by one mount server; the command run ``--warmup`` times in each (so every
copy a passthrough mount writes is written, and the page cache is warm), then
``--rounds`` rounds.  The FUSE requests the rounds sent each mount (``cubefs stats``)
are printed per run.  As root, from a frozen tree (docs: common rules)::

    .venv/bin/python tools/bench/warm_ab.py /var/tmp/warm deb-python deb-numpy --rounds 40
    .venv/bin/python tools/bench/warm_ab.py /var/tmp/warm py-pandas --modes 'off=;on=--passthrough' --json-out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from images import by_name  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"}


def run_in(root: str, cmd: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(["chroot", root, *cmd], capture_output=True, env=CHROOT_ENV, timeout=120)
    dt = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"chroot {root} {shlex.join(cmd)}: exit {res.returncode}: {res.stderr[-800:]!r}")
    return dt


class Modes:
    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env

    def cli(self, *args: str) -> str:
        return subprocess.run([PY, "-m", "cubefs", *args], check=True, capture_output=True, text=True,
                              env=self.env, cwd=ROOT).stdout

    def stats(self, mnt: str) -> dict[str, Any]:
        return json.loads(self.cli("stats", mnt, "--json"))


def quart(x: list[float]) -> str:
    q = statistics.quantiles(x, n=4) if len(x) >= 2 else [x[0]] * 3
    return f"med {q[1] * 1000:7.1f} ms  (q1 {q[0] * 1000:.1f}, q3 {q[2] * 1000:.1f}, min {min(x) * 1000:.1f})"


def bench_image(name: str, modes: dict[str, list[str]], m: Modes, rounds: int, warmup: int) -> dict[str, Any]:
    image = by_name(name)
    tree, cmd = str(image.path), shlex.split(image.cmd)
    base = m.work / name
    base.mkdir(parents=True, exist_ok=True)
    store = f"file://{base / 'store'}"
    if not (base / "built").exists():
        m.cli("build", tree, "--tag", "img:1", "--store", store)
        (base / "built").touch()
    mnts: dict[str, str] = {}
    times: dict[str, list[float]] = {"native": [], **{k: [] for k in modes}}
    out: dict[str, Any] = {"cmd": image.cmd}
    try:
        for mode, args in modes.items():
            mnt = str(base / f"mnt-{mode}")
            os.makedirs(mnt, exist_ok=True)
            subprocess.run([PY, "-m", "cubefs", "umount", mnt], capture_output=True, env=m.env, cwd=ROOT)
            cache = base / f"cache-{mode}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            m.cli("mount", "img:1", mnt, "--store", store, "--cache-dir", str(cache), *args)
            mnts[mode] = mnt
            for _ in range(warmup):
                run_in(mnt, cmd)
        time.sleep(1)  # copies being written finish
        for _ in range(warmup):
            run_in(tree, cmd)
            for mnt in mnts.values():
                run_in(mnt, cmd)
        before = {mode: m.stats(mnt)["requests"] for mode, mnt in mnts.items()}
        order = ["native", *modes]
        for i in range(rounds):
            k = i % len(order)
            for mode in order[k:] + order[:k]:
                times[mode].append(run_in(tree if mode == "native" else mnts[mode], cmd))
        for mode, mnt in mnts.items():
            st = m.stats(mnt)
            per = {k: round((v - before[mode].get(k, 0)) / rounds, 1) for k, v in st["requests"].items()}
            out[mode] = {"requests_per_run": {k: v for k, v in per.items() if v},
                         "passthrough": st.get("passthrough")}
    finally:
        for mnt in mnts.values():
            subprocess.run([PY, "-m", "cubefs", "umount", mnt], capture_output=True, env=m.env, cwd=ROOT)
    out["times"] = times
    nat = times["native"]
    out["summary"] = {mode: {"median_s": statistics.median(t),
                             "ratio_median_of_rounds": statistics.median(a / b for a, b in zip(t, nat, strict=True)),
                             "ratio_of_medians": statistics.median(t) / statistics.median(nat)}
                      for mode, t in times.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--modes", default="off=;on=--passthrough", help="NAME=MOUNT ARGS;NAME=... (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("warm_ab: run as root (chroot, FUSE mounts)")
    modes = {k: shlex.split(v) for k, v in (x.split("=", 1) for x in a.modes.split(";") if x)}
    a.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               CUBEFS_SERVER=str(a.workdir / "serve.sock"))
    m = Modes(a.workdir, env)
    results: dict[str, Any] = {"load_before": os.getloadavg(), "rev": str(ROOT)}
    try:
        for name in a.images:
            r = results[name] = bench_image(name, modes, m, a.rounds, a.warmup)
            print(f"{name}: {r['cmd']}  ({a.rounds} rounds, load {os.getloadavg()[0]:.2f})")
            for mode, t in r["times"].items():
                s = r["summary"][mode]
                extra = "" if mode == "native" else \
                    f"  x native: {s['ratio_median_of_rounds']:.3f} (rounds), {s['ratio_of_medians']:.3f} (medians)" \
                    f"  requests/run {r[mode]['requests_per_run']}"
                print(f"  {mode:8} {quart(t)}{extra}", flush=True)
    finally:
        from cubefs.node.mount_server import stop_server  # its own stop request, not a pid

        stop_server(env["CUBEFS_SERVER"])
    results["load_after"] = os.getloadavg()
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=1))
    print(f"load before {results['load_before']}, after {results['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
