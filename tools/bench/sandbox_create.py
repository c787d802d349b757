#!/usr/bin/env python3
"""How fast a sandbox is created, driven by the stock E2B SDK, against baselines of the same run.

Each sample is ``Sandbox.create()`` + ``commands.run("true")`` (the kill after it is
not timed), as an agent framework sees a sandbox become usable.  Measured:

* ``vm_run_template``: ``cubefs vm run --template T IMAGE -- true``, the same
  restore through the CLI (a process start included), ``--baseline`` times;
* ``cold_c1`` / ``cold_cN``: the service with no pool (``--pool-size 0``), one at
  a time and ``--concurrency`` at once;
* ``pool_c1`` / ``pool_cN``: the service with a warm pool of ``--concurrency``
  sandboxes, in bursts of 1 or N creates launched together, the pool refilled
  before each burst (a pool serves bursts; a sustained rate above the refill
  rate — one sandbox at a time, ~1 s each under TCG — is a cold create).

p50/p95/p99 over ``--creates`` samples each.

``--burst N``: instead, N creates at once against a pool of ``--burst-pool`` (so most
restore), once per ``--max-restores`` value (the node's restore gate; ``none``: unbounded,
as before the gate): each create's latency (create + ``true``), the failures, the most
restores the service ran at once and its queue waits (its /metrics).

``--cpu N``: instead, where a pooled sample's CPU goes: N samples at concurrency 1 and N at
``--concurrency`` (bursts against a full pool of that size, the pool refilled and the node idle
before each burst), each process class's utime+stime (+ its reaped children's) over the bursts
divided by the samples: the sandboxes' QEMUs (guest and emulation), QEMUs the pool started during
the burst (its refill), the service, the mount server, the root host(s), the bench's own SDK
client; the kills after a burst are not counted.  Needs root, the guest kernel
(tools/make_vm_kernel.py) and the test rootfs (tools/make_rootfs.py).

    sudo .venv/bin/python tools/bench/sandbox_create.py --creates 100 --concurrency 10
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sandbox_service  # the shared launcher
from sandbox_service import KEY, cubefs

__all__ = ["KEY", "Service", "cubefs", "pct", "sample"]


def pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 3)

    return {"n": len(s), "p50": round(statistics.median(s), 3), "p95": at(0.95), "p99": at(0.99)}


class Service(sandbox_service.Service):
    """The shared launcher, on this bench's ports, its log in ``tmp``, the SDK pointed at it."""

    def __init__(self, env: dict[str, str], tmp: Path, pool: int, extra: tuple[str, ...] = ()) -> None:
        self.env = env
        super().__init__(env, tmp / f"serve-pool{pool}{'-'.join(('', *extra))}.log", pool, 43000 + os.getpid() % 1000,
                         extra)
        self.use()


def sample() -> float:
    from e2b import Sandbox

    t0 = time.monotonic()
    s = Sandbox.create(timeout=120)
    s.commands.run("true")
    took = time.monotonic() - t0
    s.kill()
    return took


def bursts(n: int, size: int, before: Any = None) -> list[float]:
    out: list[float] = []
    with ThreadPoolExecutor(size) as pool:
        while len(out) < n:
            if before is not None:
                before()
            out += list(pool.map(lambda _: sample(), range(min(size, n - len(out)))))
    return out


TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float | None:
    """Seconds of CPU ``pid`` and its reaped children used (utime+stime+cutime+cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / TICK


def node_processes(env: dict[str, str], service: int) -> dict[int, str]:
    """This bench's node's processes by class: every process whose environment names its mount
    server's socket (the service, the QEMUs it starts, the mount server and its root hosts)."""
    mark = f"CUBEFS_SERVER={env['CUBEFS_SERVER']}".encode()
    out: dict[int, str] = {}
    parents: dict[int, int] = {}
    cmds: dict[int, bytes] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if mark not in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                continue
            cmds[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes()
            parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            continue
    for pid, cmd in cmds.items():
        if b"qemu-system" in cmd:
            out[pid] = "qemu"
        elif pid == service:
            out[pid] = "service"
        elif parents[pid] == service:
            out[pid] = "service's helpers"
        elif parents[pid] in cmds and b"qemu-system" not in cmds[parents[pid]]:
            out[pid] = "root host"  # forked by the mount server
        else:
            out[pid] = "mount server"
    return out


def cpu_profile(env: dict[str, str], tmp: Path, n: int, c: int) -> dict[str, Any]:
    """Where a pooled sample's CPU goes, by process class, at concurrency 1 and ``c``."""
    from e2b import Sandbox

    svc = Service(env, tmp, c)
    out: dict[str, Any] = {}
    try:
        for k in (1, c):
            used: dict[str, float] = {}
            lat: list[float] = []
            done = 0
            while done < n:
                svc.wait_pool(c)
                time.sleep(1.0)  # the last fill's stop and bookkeeping: the node idle
                procs = node_processes(env, svc.proc.pid)
                before = {pid: _proc_cpu(pid) for pid in procs}
                me0 = os.times()
                made: list[Any] = []

                def one(_: int, made: list[Any] = made) -> float:
                    t0 = time.monotonic()
                    s = Sandbox.create(timeout=120)
                    made.append(s)
                    s.commands.run("true")
                    return time.monotonic() - t0

                with ThreadPoolExecutor(k) as ex:
                    lat += list(ex.map(one, range(min(k, n - done))))
                me1 = os.times()
                for pid, cls in node_processes(env, svc.proc.pid).items():
                    now = _proc_cpu(pid)
                    if now is None:
                        continue
                    if pid not in before:
                        cls = "qemu (pool refill)" if cls == "qemu" else cls
                    used[cls] = used.get(cls, 0.0) + now - (before.get(pid) or 0.0)
                used["bench (SDK client)"] = used.get("bench (SDK client)", 0.0) + (me1.user + me1.system) - (
                    me0.user + me0.system)
                done += len(made)
                with ThreadPoolExecutor(10) as ex:
                    list(ex.map(lambda s: s.kill(), made))
            per = {cls: round(v / done * 1e3, 1) for cls, v in sorted(used.items())}
            per["total"] = round(sum(used.values()) / done * 1e3, 1)
            out[f"c{k}"] = {"ms_cpu_per_sample": per, "latency": pct(lat)}
            print(json.dumps({f"c{k}": out[f"c{k}"]}), file=sys.stderr, flush=True)
    finally:
        svc.stop()
    return out


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    out = {}
    for line in urllib.request.urlopen(req, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def burst(env: dict[str, str], tmp: Path, n: int, pool: int, limit: str) -> dict[str, Any]:
    """``n`` creates at once (each kept until all are made, then all killed)."""
    from e2b import Sandbox

    extra = ("--max-vcpus", str(4 * (n + pool)), "--max-memory", str(512 * (n + pool)),
             "--max-restores", str(10 * n) if limit == "none" else limit)
    svc = Service(env, tmp, pool, extra)
    made: list[Any] = []
    try:
        svc.wait_pool(pool)

        def one(_: int) -> float | str:
            t0 = time.monotonic()
            try:
                s = Sandbox.create(timeout=300)
                made.append(s)
                s.commands.run("true")
            except Exception as err:  # a failed create is a result here
                return f"{type(err).__name__}: {err}"[:200]
            return time.monotonic() - t0

        t0 = time.monotonic()
        with ThreadPoolExecutor(n) as ex:
            results = list(ex.map(one, range(n)))
        wall = time.monotonic() - t0
        m = metrics(svc.api)
        with ThreadPoolExecutor(10) as ex:
            list(ex.map(lambda s: s.kill(), made))
    finally:
        svc.stop()
    ok = [r for r in results if isinstance(r, float)]
    return {"max_restores": limit, "pool": pool, "wall_s": round(wall, 1), **pct(ok),
            "failed": [r for r in results if not isinstance(r, float)],
            "restores_peak": m.get("cubefs_sandbox_restores_running_peak"),
            "queue_wait_p50": m.get('cubefs_sandbox_restore_queue_seconds{quantile="0.5"}'),
            "queue_wait_max": m.get('cubefs_sandbox_restore_queue_seconds{quantile="1.0"}'),
            "create_p50_in_service": m.get('cubefs_sandbox_create_seconds{quantile="0.5"}')}


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--baseline", type=int, default=10, help="cubefs vm run --template runs")
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--no-pool", action="store_true", help="only the baseline and the creates without a pool")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--burst", type=int, default=0, metavar="N", help="N creates at once (see above)")
    ap.add_argument("--burst-pool", type=int, default=4)
    ap.add_argument("--max-restores", default="none,2", help="with --burst: values to run, comma-separated")
    ap.add_argument("--cpu", type=int, default=0, metavar="N", help="CPU per pooled sample by process (see above)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-sbx-"))
    env = {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
           "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
           "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
           "CUBEFS_SANDBOX_API_KEY": KEY, "CUBEFS_SERVER": str(tmp / "serve.sock")}
    cubefs(env, "build", args.rootfs, "--tag", "bench:1")
    cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    c = args.concurrency
    if args.cpu:
        out["loadavg_start"] = os.getloadavg()
        try:
            out["cpu"] = cpu_profile(env, tmp, args.cpu, c)
        finally:
            subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
            sandbox_service.stop_mount_server(env)
        out["loadavg_end"] = os.getloadavg()
        print(json.dumps(out, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    if args.burst:
        try:
            for limit in args.max_restores.split(","):
                out[f"burst{args.burst}_restores_{limit}"] = res = burst(env, tmp, args.burst, args.burst_pool, limit)
                print(json.dumps(res), file=sys.stderr, flush=True)
        finally:
            subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
            sandbox_service.stop_mount_server(env)
        print(json.dumps(out, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        return 0

    def report(key: str, xs: list[float]) -> None:
        out[key] = pct(xs)
        print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)

    try:
        vm_template = json.loads(cubefs(env, "sandbox", "template", "ls", "--json"))[0]["vm_template"]
        base = []
        for _ in range(args.baseline):
            t0 = time.monotonic()
            cubefs(env, "vm", "run", "--template", vm_template, "bench:1", "--", "true")
            base.append(time.monotonic() - t0)
        report("vm_run_template", base)

        svc = Service(env, tmp, 0)
        try:
            report("cold_c1", bursts(args.creates, 1))
            report(f"cold_c{c}", bursts(args.creates, c))
        finally:
            svc.stop()
        if not args.no_pool:
            svc = Service(env, tmp, c)
            try:
                report("pool_c1", bursts(args.creates, 1, lambda: svc.wait_pool(c)))
                report(f"pool_c{c}", bursts(args.creates, c, lambda: svc.wait_pool(c)))
            finally:
                svc.stop()
            out["ratio_pool_c1_p50_vs_vm_run"] = round(out["pool_c1"]["p50"] / out["vm_run_template"]["p50"], 3)
    finally:
        subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
    out["ratio_cold_c1_p50_vs_vm_run"] = round(out["cold_c1"]["p50"] / out["vm_run_template"]["p50"], 3)
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
