#!/usr/bin/env python3
"""What a sandbox's network costs: create latency with and without it, and download speed
into a sandbox through its tap and gateway vs through QEMU's user networking (slirp).

Everything runs in two network namespaces made here ("node" and "internet", joined by a
veth pair; the internet serves a file with Python's http.server); the machine's own
interfaces and ruleset are not touched.

* ``create_*`` / ``create_run_*``: ``Sandbox.create()`` (and + ``commands.run("true")``)
  through the stock SDK, from a warm pool of ``--pool`` sandboxes, against two services
  running side by side, one without ``--network`` (``plain``) and one with (``net``), their
  creates interleaved, both pools full and the machine quiet before each sample.
* ``policy_change_ms``: what a pooled create adds with a network (its policy set): the
  median of ``PUT /sandboxes/ID/network`` minus that of ``GET /sandboxes/ID``, interleaved.
* ``download_tap`` / ``download_slirp``: the guest's own python3 reads ``--mb`` MiB from the
  internet's web server (timed in the guest); tap: a sandbox of the service with
  ``--network``; slirp: a VM of the same template with ``-netdev user`` (vmm, no service).

    sudo .venv/bin/python tools/bench/sandbox_network.py --creates 30 --mb 64
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

KEY = "e2b_" + "ab" * 20
INTERNET, UPLINK = "198.18.0.1", "198.18.0.2"
PORT = 8080
READ = ("import sys,time,urllib.request\n"
        "t=time.monotonic(); r=urllib.request.urlopen(sys.argv[1], timeout=60); n=0\n"
        "while True:\n"
        "    b=r.read(1<<20)\n"
        "    if not b: break\n"
        "    n+=len(b)\n"
        "print(n, time.monotonic()-t)\n")


def sh(script: str) -> None:
    subprocess.run(["sh", "-euc", script], check=True)


def cubefs(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "p50": round(statistics.median(s), 4), "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 4)}


class Service:
    def __init__(self, env: dict[str, str], log: Path, pool: int, port: int, extra: tuple[str, ...] = ()) -> None:
        self.api, self.proxy = port, port + 1
        self.proc = subprocess.Popen([sys.executable, "-m", "cubefs", "sandbox", "serve", "--api-listen",
                                      f"127.0.0.1:{self.api}", "--proxy-listen", f"127.0.0.1:{self.proxy}",
                                      "--pool-size", str(pool), *extra], env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        while self.health() is None:
            time.sleep(0.2)

    def use(self) -> None:
        os.environ.update({"E2B_API_KEY": KEY, "E2B_API_URL": f"http://127.0.0.1:{self.api}",
                           "E2B_SANDBOX_URL": f"http://127.0.0.1:{self.proxy}"})

    def health(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.api}/health", timeout=2).read()))
        except OSError:
            return None

    def wait_pool(self, n: int) -> None:
        while (self.health() or {}).get("pools", {}).get("base", 0) < n:
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def creates(services: dict[str, Service], n: int, pool: int) -> dict[str, dict[str, list[float]]]:
    """``n`` creates from each service, interleaved (which goes first alternates), every pool
    full and the machine quiet before each: the two see the same load."""
    from e2b import Sandbox

    out: dict[str, dict[str, list[float]]] = {k: {"create": [], "create_run": []} for k in services}
    names = list(services)
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            for svc in services.values():
                svc.wait_pool(pool)
            time.sleep(0.5)  # the refill's last steps (warm, pause) off the CPU
            svc = services[name]
            svc.use()
            t0 = time.monotonic()
            s = Sandbox.create(timeout=120)
            t1 = time.monotonic()
            s.commands.run("true")
            t2 = time.monotonic()
            out[name]["create"].append(t1 - t0)
            out[name]["create_run"].append(t2 - t0)
            s.kill()
    return out


def policy_cost(svc: Service, sandbox_id: str, n: int = 60) -> dict[str, Any]:
    """The one step a pooled create adds with a network: setting the policy.  A PUT of the
    default policy against a GET of the same sandbox, interleaved: the same HTTP round trip,
    so the difference is the policy change (the nft transaction and the record)."""
    def call(method: str, body: bytes | None) -> float:
        req = urllib.request.Request(f"http://127.0.0.1:{svc.api}/sandboxes/{sandbox_id}" +
                                     ("/network" if method == "PUT" else ""), data=body, method=method,
                                     headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
        t0 = time.monotonic()
        urllib.request.urlopen(req, timeout=30).read()
        return time.monotonic() - t0

    put, get = [], []
    for _ in range(n):
        get.append(call("GET", None))
        put.append(call("PUT", b"{}"))
    return {"put_network_ms_p50": round(statistics.median(put) * 1000, 2),
            "get_sandbox_ms_p50": round(statistics.median(get) * 1000, 2),
            "policy_change_ms": round((statistics.median(put) - statistics.median(get)) * 1000, 2)}


def mbps(line: str) -> float:
    n, secs = line.split()
    return round(int(n) / float(secs) / 1e6, 1)


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=30)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from make_vm_kernel import DEFAULT, make_kernel

    kernel = make_kernel(Path(DEFAULT))
    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-net-"))
    tag = f"cfb{os.getpid() % 100000}"
    node_ns, inet_ns = f"{tag}-node", f"{tag}-inet"
    (tmp / "www").mkdir()
    with open(tmp / "www" / "big", "wb") as f:
        f.write(os.urandom(args.mb << 20))
    sh(f"""ip netns add {node_ns}; ip netns add {inet_ns}
ip link add up0 netns {node_ns} type veth peer name in0 netns {inet_ns}
ip -n {node_ns} link set lo up; ip -n {node_ns} addr add {UPLINK}/24 dev up0; ip -n {node_ns} link set up0 up
ip -n {node_ns} route add default via {INTERNET}
ip -n {inet_ns} link set lo up; ip -n {inet_ns} addr add {INTERNET}/24 dev in0; ip -n {inet_ns} link set in0 up""")
    web = subprocess.Popen(["ip", "netns", "exec", inet_ns, sys.executable, "-m", "http.server", "-b", INTERNET,
                            str(PORT), "-d", str(tmp / "www")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{node_ns}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0
    os.close(fd)
    env = {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
           "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
           "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
           "CUBEFS_SANDBOX_API_KEY": KEY, "CUBEFS_VM_KERNEL": str(kernel)}
    os.environ.update({k: v for k, v in env.items() if k.startswith("CUBEFS_")})
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "mb": args.mb}
    url = f"http://{INTERNET}:{PORT}/big"
    env_plain = env
    try:
        cubefs(env, "build", args.rootfs, "--tag", "bench:1")
        cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
        # the plain service: a state and volume directory of its own (its template's volume too)
        env_plain = {**env, "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox-plain"),
                     "CUBEFS_VOLUME_DIR": str(tmp / "vol-plain")}
        cubefs(env_plain, "sandbox", "template", "create", "base", "--from", "bench:1")
        port = 43100 + os.getpid() % 900
        plain = Service(env_plain, tmp / "serve-plain.log", args.pool, port)
        net = Service(env, tmp / "serve-net.log", args.pool, port + 2, ("--network",))
        try:
            got = creates({"plain": plain, "net": net}, args.creates, args.pool)
            for name, series in got.items():
                for kind, xs in series.items():
                    out[f"{kind}_{name}"] = pct(xs)
            from e2b import Sandbox

            net.use()
            s = Sandbox.create(timeout=300)
            out.update(policy_cost(net, s.sandbox_id))
            runs = [mbps(s.commands.run(f"python3 -c {shlex.quote(READ)} {url}", timeout=300).stdout)
                    for _ in range(3)]
            out["download_tap_mbps"] = max(runs)
            s.kill()
        finally:
            plain.stop()
            net.stop()
        print(json.dumps(out), file=sys.stderr, flush=True)
        from vmm.machine import Netdev
        from vmm.vm import Root, Vm

        vm_template = json.loads(cubefs(env, "sandbox", "template", "ls", "--json"))[0]["vm_template"]
        vm = Vm.start("bench-slirp", Root(image="bench:1"), None, template=vm_template,  # type: ignore[arg-type]
                      netdev=Netdev("user,net=169.254.0.0/24,host=169.254.0.22,dhcpstart=169.254.0.100"))
        try:
            runs = [mbps(vm.exec(f"python3 -c {shlex.quote(READ)} {url}", timeout=300).stdout.decode())
                    for _ in range(3)]
            out["download_slirp_mbps"] = max(runs)
        finally:
            vm.destroy()
    finally:
        for e in (env, env_plain):
            subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=e, capture_output=True)
        web.kill()
        subprocess.run(["ip", "netns", "del", node_ns], check=False)
        subprocess.run(["ip", "netns", "del", inet_ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    for kind in ("create", "create_run"):
        out[f"{kind}_net_minus_plain_p50_ms"] = round((out[f"{kind}_net"]["p50"] - out[f"{kind}_plain"]["p50"]) * 1000,
                                                      1)
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
