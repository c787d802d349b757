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
* ``resume`` (not run by default): no service; VMs of the template restored with a tap and
  without a NIC back-end, alternated, each warmed and paused as a pooled sandbox is, then
  ``cont``, ``freshen``, ``set_defaults`` timed, with QEMU's CPU and run-queue time across them
  (schedstat) and the packets the guest's NIC moved: is the guest slower with a tap?
* ``download_tap`` / ``download_slirp``: the guest's own python3 reads ``--mb`` MiB from the
  internet's web server (timed in the guest); tap: a sandbox of the service with
  ``--network``; slirp: a VM of the same template with ``-netdev user`` (vmm, no service).
* ``ingress_*``: python3's http.server in the guest (files in its tmpfs), read from the node:
  through the sandbox proxy (E2B headers; each request a stream the guest agent opens over
  virtio-serial) or through QEMU user networking's ``hostfwd`` to the slirp VM; a
  ``--serve-mb`` MiB body (MB/s) and ``--small`` 1 KiB GETs, 4 at a time (requests/s).

Every figure is the median of ``--runs`` runs (each run's value listed beside it); guests run
under TCG here unless the machine has KVM.

    sudo .venv/bin/python tools/bench/sandbox_network.py --creates 30 --mb 200
    sudo .venv/bin/python tools/bench/sandbox_network.py --parts download,ingress
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shlex
import shutil
import signal
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_service import KEY, Service, bench_env, cubefs, log, stop_mount_server

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


def pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "p50": round(statistics.median(s), 4), "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 4)}


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


def sched_ms(pid: int) -> tuple[float, float]:
    """A process's time on a CPU and waiting for one so far, all its threads (ms, schedstat)."""
    on = wait = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            a, b, _ = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
        except OSError:
            continue
        on, wait = on + int(a), wait + int(b)
    return on / 1e6, wait / 1e6


async def one_resume(vm_template: str, name: str, netdev: Any) -> dict[str, float]:
    """A VM of the template made as a pooled sandbox is (restored, its agent's first requests,
    ``bash -l -c true``, QMP ``stop``), then what a pooled create does to it: ``cont``, the
    ``freshen`` request, ``set_defaults``; timed, with QEMU's CPU and run-queue time in it and
    the packets the guest's NIC sent and received across it."""
    from vmm.channel import AgentChannel
    from vmm.qmp import Qmp
    from vmm.vm import Root, Vm

    def qmp(command: str) -> None:
        q = Qmp(str(vm.dir / "qmp.sock"), name)  # a session per command, as the service's
        try:
            q.execute(command)
        finally:
            q.close()

    async def packets() -> int:
        proc = await ch.spawn(["/bin/cat", "/proc/net/dev"], user="root")
        text = b"".join([e[1] async for e in proc.events() if e[0] == "stdout"]).decode()
        fields = next(line for line in text.splitlines() if "eth0:" in line).split(":")[1].split()
        return int(fields[1]) + int(fields[9])

    vm = await asyncio.to_thread(Vm.start, name, Root(image="bench:1"), None, template=vm_template, netdev=netdev)
    try:
        if netdev is not None:
            os.close(netdev.fds[0])
        ch = await AgentChannel.connect(str(vm.dir / "agent.sock"), name, timeout=30)
        await ch.set_defaults(user="user", env={})
        async for _event in (await ch.spawn(["/bin/bash", "-l", "-c", "true"])).events():
            pass
        before = await packets()
        qmp("stop")
        time.sleep(0.5)
        pid = int(vm.info["qemu_pid"])
        cpu0, rq0 = sched_ms(pid)
        t0 = time.monotonic()
        qmp("cont")
        await ch.freshen(name, "00" * 16)
        await ch.set_defaults(user="user", env={})
        took = (time.monotonic() - t0) * 1000
        cpu1, rq1 = sched_ms(pid)
        row = {"ms": took, "qemu_cpu_ms": cpu1 - cpu0, "qemu_runqueue_ms": rq1 - rq0,
               "nic_packets": await packets() - before}
        await ch.close()
        return row
    finally:
        await asyncio.to_thread(vm.destroy)


def resume(vm_template: str, ns: str, rounds: int) -> dict[str, Any]:
    """``cont`` -> the second agent answer of a paused VM restored with a tap (in namespace
    ``ns``, made as the network pool makes one) and without a NIC back-end, alternated, no
    service: whether the guest or QEMU is slower with a tap, apart from the service."""
    from sandbox.network import gateway, netns
    from vmm.machine import Netdev

    sh(f"""ip netns add {ns}; ip -n {ns} link set lo up
ip -n {ns} tuntap add dev tap0 mode tap multi_queue vnet_hdr; ip -n {ns} link set tap0 address {gateway.GATEWAY_MAC}
ip -n {ns} addr add {gateway.GATEWAY_IP}/30 dev tap0; ip -n {ns} link set tap0 up
ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1""")
    rows: dict[str, list[dict[str, float]]] = {"plain": [], "tap": []}
    try:
        for i in range(rounds):
            for kind in ("plain", "tap") if i % 2 == 0 else ("tap", "plain"):
                netdev = None
                if kind == "tap":
                    fd = netns.in_netns(ns, lambda: netns.open_tap("tap0"))
                    netdev = Netdev(f"tap,fd={fd}", (fd,))
                rows[kind].append(asyncio.run(one_resume(vm_template, f"bench-resume-{kind}-{i}", netdev)))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {kind: {key: round(statistics.median(r[key] for r in rs), 1) for key in rs[0]} | {"n": len(rs)}
            for kind, rs in rows.items()}


def mbps(line: str) -> float:
    n, secs = line.split()
    return round(int(n) / float(secs) / 1e6, 1)


def median(runs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(runs), 1), "runs": runs}


SERVE = ("d=/dev/shm/www; mkdir -p $d 2>/dev/null && touch $d/.t 2>/dev/null || d=/tmp/www; mkdir -p $d; "
         "dd if=/dev/urandom of=$d/big bs=1M count={mb} 2>/dev/null; head -c 1024 /dev/urandom > $d/small; "
         "cd $d && exec python3 -m http.server {port}")


def download(url: str, headers: dict[str, str]) -> float:
    """MB/s of one GET of the whole body, read on the node."""
    t0 = time.monotonic()
    n = 0
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=300) as resp:
        while chunk := resp.read(1 << 20):
            n += len(chunk)
    return round(n / (time.monotonic() - t0) / 1e6, 1)


def rps(url: str, headers: dict[str, str], n: int, threads: int = 4) -> float:
    """Small GETs per second, ``threads`` at a time, each its own connection (http.server
    answers HTTP/1.0 and closes)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> None:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
            assert len(resp.read()) == 1024
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return round(n / (time.monotonic() - t0), 1)


def wait_http(url: str, headers: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def ingress(base: str, headers: dict[str, str], runs: int, small: int) -> dict[str, Any]:
    wait_http(base + "small", headers)
    rate = [download(base + "big", headers) for _ in range(runs)]
    log(f"  {base}: body {rate} MB/s")
    reqs = [rps(base + "small", headers, small) for _ in range(runs)]
    log(f"  {base}: small {reqs} requests/s")
    return {"download_mbps": median(rate), "small_rps": median(reqs)}


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="creates,download,ingress",
                    help="which to run, comma-separated: creates, download, ingress, resume")
    ap.add_argument("--resume-rounds", type=int, default=30, help="VMs of each kind in the resume part")
    ap.add_argument("--creates", type=int, default=30)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--mb", type=int, default=200, help="MiB the guest downloads from the internet")
    ap.add_argument("--serve-mb", type=int, default=64, help="MiB the node reads from the guest's server")
    ap.add_argument("--small", type=int, default=300, help="small GETs per requests/s run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the services' logs there at the end")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # finally cleans up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from make_vm_kernel import DEFAULT, make_kernel

    from vmm.machine import pick_accel

    kernel = make_kernel(Path(DEFAULT))
    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-net-"))
    tag = f"cfb{os.getpid() % 100000}"
    node_ns, inet_ns = f"{tag}-node", f"{tag}-inet"
    (tmp / "www").mkdir()
    with open(tmp / "www" / "big", "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1 << 20))
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
    env = bench_env(tmp, kernel)
    os.environ.update({k: v for k, v in env.items() if k.startswith("CUBEFS_")})
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "mb": args.mb,
                           "serve_mb": args.serve_mb, "accel": pick_accel("auto"),
                           "loadavg": os.getloadavg()[0]}
    url = f"http://{INTERNET}:{PORT}/big"
    env_plain = env
    port = 43100 + os.getpid() % 900
    try:
        cubefs(env, "build", args.rootfs, "--tag", "bench:1")
        cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
        if "resume" in parts:
            vm_template = json.loads(cubefs(env, "sandbox", "template", "ls", "--json"))[0]["vm_template"]
            out["resume"] = resume(vm_template, f"{tag}-tap", args.resume_rounds)
            log(f"resume: {out['resume']}")
        if "creates" in parts:
            # the plain service: a state and volume directory of its own (its template's volume too)
            env_plain = {**env, "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox-plain"),
                         "CUBEFS_VOLUME_DIR": str(tmp / "vol-plain")}
            cubefs(env_plain, "sandbox", "template", "create", "base", "--from", "bench:1")
            plain = Service(env_plain, tmp / "serve-plain.log", args.pool, port)
            net = Service(env, tmp / "serve-net.log", args.pool, port + 2, ("--network",))
            try:
                got = creates({"plain": plain, "net": net}, args.creates, args.pool)
                for name, series in got.items():
                    for kind, xs in series.items():
                        out[f"{kind}_{name}"] = pct(xs)
            finally:
                plain.stop()
                net.stop()
            for kind in ("create", "create_run"):
                out[f"{kind}_net_minus_plain_p50_ms"] = round(
                    (out[f"{kind}_net"]["p50"] - out[f"{kind}_plain"]["p50"]) * 1000, 1)
        if parts & {"download", "ingress"}:
            from e2b import Sandbox

            net = Service(env, tmp / "serve-net2.log", 0, port + 4, ("--network",))
            try:
                net.use()
                s = Sandbox.create(timeout=1200)
                if "creates" in parts:
                    out.update(policy_cost(net, s.sandbox_id))
                log(f"sandbox {s.sandbox_id}")
                if "download" in parts:
                    out["download_tap_mbps"] = median([
                        mbps(s.commands.run(f"python3 -c {shlex.quote(READ)} {url}", timeout=300).stdout)
                        for _ in range(args.runs)])
                if "ingress" in parts:
                    s.commands.run(SERVE.format(mb=args.serve_mb, port=PORT), background=True)
                    heads = {"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
                    out["ingress_proxy"] = ingress(f"http://127.0.0.1:{net.proxy}/", heads, args.runs, args.small)
                s.kill()
            finally:
                net.stop()
            print(json.dumps(out), file=sys.stderr, flush=True)
            from vmm.machine import Netdev
            from vmm.vm import Root, Vm

            vm_template = json.loads(cubefs(env, "sandbox", "template", "ls", "--json"))[0]["vm_template"]
            fwd = port + 6
            vm = Vm.start("bench-slirp", Root(image="bench:1"), None, template=vm_template,  # type: ignore[arg-type]
                          netdev=Netdev("user,net=169.254.0.0/24,host=169.254.0.22,dhcpstart=169.254.0.100,"
                                        f"hostfwd=tcp:127.0.0.1:{fwd}-169.254.0.21:{PORT}"))
            log("slirp VM up")
            try:
                if "download" in parts:
                    out["download_slirp_mbps"] = median([
                        mbps(vm.exec(f"python3 -c {shlex.quote(READ)} {url}", timeout=300).stdout.decode())
                        for _ in range(args.runs)])
                if "ingress" in parts:
                    vm.exec("setsid sh -c " + shlex.quote(SERVE.format(mb=args.serve_mb, port=PORT)) +
                            " </dev/null >/dev/null 2>&1 &", timeout=60)
                    out["ingress_hostfwd"] = ingress(f"http://127.0.0.1:{fwd}/", {}, args.runs, args.small)
            finally:
                vm.destroy()
    finally:
        for e in (env, env_plain):
            subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=e, capture_output=True)
        stop_mount_server(env)
        web.kill()
        subprocess.run(["ip", "netns", "del", node_ns], check=False)
        subprocess.run(["ip", "netns", "del", inet_ns], check=False)
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for log_file in tmp.glob("*.log"):
                shutil.copy(log_file, args.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)
    if "download_tap_mbps" in out and "download_slirp_mbps" in out:
        out["download_tap_over_slirp"] = round(out["download_tap_mbps"]["median"] /
                                               out["download_slirp_mbps"]["median"], 2)
    if "ingress_proxy" in out and "ingress_hostfwd" in out:
        for key in ("download_mbps", "small_rps"):
            out[f"ingress_{key}_proxy_over_hostfwd"] = round(out["ingress_proxy"][key]["median"] /
                                                             out["ingress_hostfwd"][key]["median"], 2)
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
