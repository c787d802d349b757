#!/usr/bin/env python3
"""Creates through a cluster front vs straight to a node, and a burst spread over three nodes (issue 15).

Real parts only: a real etcd (one member, loopback), three ``cubefs sandbox serve --etcd``
nodes on this machine (each its own dirs, mount server and disk cache; one VM template
directory between them, so the VM template boots once), a front (``cubefs sandbox api``),
TCG micro-VMs, one ``file://`` store.

1. **What the front adds.**  ``--pairs`` times: a create through the front, then one
   straight to a node's own API, each killed after.  A node's answer carries
   ``Server-Timing: node;dur=MS`` (its own time, the create and its publishing to etcd), so
   *client time − node time* is what the path added — the front's decision, reservation
   transaction and forwarding, or for the direct create just HTTP — free of the VM's own
   variance (a cold create under TCG varies by hundreds of ms).  The difference of the two
   medians is the scheduler's added p50; likewise p99.
2. **A burst over three nodes.**  ``--burst`` creates sent at once through the front:
   client latency p50/p99 and how many landed on each node.

No pools (``--pool-size 0``): every create restores a VM, so the three nodes are equal
and nothing but the scheduler decides where a create goes.

    .venv/bin/python tools/bench/cluster_create.py --pairs 30 --burst 20 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

KEY = "e2b_" + "cd" * 20
ROOTFS = os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cubefs(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{url} exited:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up:\n{log.read_text()[-2000:]}")


def create(port: int) -> tuple[float, float, str]:
    """(client seconds, node seconds from Server-Timing, sandbox ID) of one create, killed after."""
    body = json.dumps({"templateID": "base", "timeout": 120}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/sandboxes", data=body, method="POST",
                                 headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as r:
        doc = json.loads(r.read())
        timing = r.headers.get("Server-Timing", "")
    took = time.monotonic() - t0
    node = float(timing.partition("dur=")[2] or "nan") / 1000
    sid = doc["sandboxID"]
    kill = urllib.request.Request(f"http://127.0.0.1:{port}/sandboxes/{sid}", method="DELETE",
                                  headers={"X-API-KEY": KEY})
    urllib.request.urlopen(kill, timeout=120).read()
    return took, node, sid


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        raise SystemExit("etcd is not installed (scripts/setup.sh installs etcd-server)")
    if not Path(ROOTFS).is_dir():
        raise SystemExit(f"no test rootfs at {ROOTFS} (tools/make_rootfs.py makes it)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from make_vm_kernel import DEFAULT, make_kernel

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cubefs-cluster-bench-"))
    try:
        client, peer = free_port(), free_port()
        etcd_log = tmp / "etcd.log"
        procs.append(subprocess.Popen(
            [etcd_bin, "--name", "b", "--data-dir", str(tmp / "etcd"), "--listen-client-urls",
             f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer}", "--initial-cluster", f"b=http://127.0.0.1:{peer}"],
            stdout=open(etcd_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        etcd = f"http://127.0.0.1:{client}"
        wait_up(f"{etcd}/health", procs[-1], etcd_log)
        shared = {**os.environ, "CUBEFS_TEMPLATE_DIR": str(tmp / "vm-templates"),
                  "CUBEFS_VM_KERNEL": str(make_kernel(Path(DEFAULT))), "CUBEFS_SANDBOX_API_KEY": KEY,
                  "CUBEFS_STORE": f"file://{tmp / 'store'}"}
        print("building the image and three nodes' templates...", file=sys.stderr, flush=True)
        cubefs(shared, "build", ROOTFS, "--tag", "debian:12")
        nodes: dict[str, int] = {}
        for name in ("n1", "n2", "n3"):
            d = tmp / name
            env = {**shared, "CUBEFS_VM_DIR": str(d / "vm"), "CUBEFS_VOLUME_DIR": str(d / "volumes"),
                   "CUBEFS_CACHE_DIR": str(d / "cache"), "CUBEFS_SANDBOX_DIR": str(d / "sandbox"),
                   "CUBEFS_SERVER": str(d / "serve.sock")}
            cubefs(env, "sandbox", "template", "create", "base", "--from", "debian:12")
            api, proxy = free_port(), free_port()
            log = d / "serve.log"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cubefs", "sandbox", "serve", "--etcd", etcd, "--node", name,
                 "--api-listen", f"127.0.0.1:{api}", "--proxy-listen", f"127.0.0.1:{proxy}", "--pool-size", "0"],
                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True))
            wait_up(f"http://127.0.0.1:{api}/health", procs[-1], log)
            nodes[name] = api
        front_api, front_proxy = free_port(), free_port()
        log = tmp / "front.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cubefs", "sandbox", "api", "--etcd", etcd, "--api-listen",
             f"127.0.0.1:{front_api}", "--proxy-listen", f"127.0.0.1:{front_proxy}"],
            env={**shared, "CUBEFS_SANDBOX_DIR": str(tmp / "front")}, stdout=open(log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True))
        wait_up(f"http://127.0.0.1:{front_api}/health", procs[-1], log)
        while get(f"http://127.0.0.1:{front_api}/health")["nodes"] < 3:
            time.sleep(0.1)

        print(f"{args.pairs} pairs: through the front, then straight to a node...", file=sys.stderr, flush=True)
        create(front_api)  # warm: connections, the first restore of each path
        create(nodes["n1"])
        front, direct = [], []
        names = list(nodes)
        for i in range(args.pairs):
            front.append(create(front_api))
            direct.append(create(nodes[names[i % 3]]))
        added_front = [(c - n) * 1000 for c, n, _ in front]
        added_direct = [(c - n) * 1000 for c, n, _ in direct]

        print(f"a burst of {args.burst} creates through the front...", file=sys.stderr, flush=True)
        per_node: dict[str, int] = {n: 0 for n in nodes}
        made: list[tuple[float, str]] = []

        def one(_: int) -> tuple[float, str]:
            body = json.dumps({"templateID": "base", "timeout": 300}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{front_api}/v2/sandboxes", data=body, method="POST",
                                         headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
            t0 = time.monotonic()
            with urllib.request.urlopen(req, timeout=600) as r:
                sid = json.loads(r.read())["sandboxID"]
            return time.monotonic() - t0, sid

        with ThreadPoolExecutor(args.burst) as pool:
            made = list(pool.map(one, range(args.burst)))
        for name, port in nodes.items():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/sandboxes", headers={"X-API-KEY": KEY})
            with urllib.request.urlopen(req, timeout=30) as r:
                per_node[name] = len(json.loads(r.read()))
        for _, sid in made:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{front_api}/sandboxes/{sid}",
                                                          method="DELETE", headers={"X-API-KEY": KEY}), timeout=120)
        burst = [t for t, _ in made]
        result = {
            "pairs": args.pairs,
            "front_client_ms_p50": statistics.median(c * 1000 for c, _, _ in front),
            "direct_client_ms_p50": statistics.median(c * 1000 for c, _, _ in direct),
            "front_path_ms_p50": statistics.median(added_front), "front_path_ms_p99": pct(added_front, 0.99),
            "direct_path_ms_p50": statistics.median(added_direct), "direct_path_ms_p99": pct(added_direct, 0.99),
            "added_ms_p50": statistics.median(added_front) - statistics.median(added_direct),
            "added_ms_p99": pct(added_front, 0.99) - pct(added_direct, 0.99),
            "burst": args.burst, "burst_s_p50": statistics.median(burst), "burst_s_p99": pct(burst, 0.99),
            "burst_per_node": per_node,
        }
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(f"create, client time (p50): through the front {result['front_client_ms_p50']:.0f} ms, "
                  f"straight to a node {result['direct_client_ms_p50']:.0f} ms")
            print(f"client time - node time: front path p50 {result['front_path_ms_p50']:.1f} ms "
                  f"p99 {result['front_path_ms_p99']:.1f} ms; direct p50 {result['direct_path_ms_p50']:.1f} ms "
                  f"p99 {result['direct_path_ms_p99']:.1f} ms")
            print(f"the scheduler adds: p50 {result['added_ms_p50']:.1f} ms, p99 {result['added_ms_p99']:.1f} ms "
                  "(floor: <= 10 ms p50)")
            print(f"burst of {args.burst} through the front: p50 {result['burst_s_p50']:.2f} s, "
                  f"p99 {result['burst_s_p99']:.2f} s; per node {per_node}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        for name in ("n1", "n2", "n3"):
            d = tmp / name
            if d.exists():
                subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"],
                               env={**os.environ, "CUBEFS_VM_DIR": str(d / "vm")}, capture_output=True)
            lock = d / "serve.sock.lock"  # the node's mount server (and its root hosts)
            try:
                os.kill(int(lock.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
