#!/usr/bin/env python3
"""A DNS query's round trip through the sandboxes' resolver vs straight to its upstream.

No VM (a TCG guest's own stack would be most of what is timed): a namespace made here plays
the node, with an authoritative server (dnslib's zone resolver, answering any name under
``bench.test``) on its loopback as the upstream and a service's ``Networks`` with one
sandbox.  Queries are sent from a thread inside the sandbox's namespace to the resolver's
socket there (the same socket a guest's DNAT lands on) and, for comparison, from the node's
namespace straight to the upstream.  Kinds of query:

* ``upstream``: straight to the upstream (each name new);
* ``miss_allowed``: through the resolver, each name new and allowed by the policy
  (``*.bench.test``): forwarded, and its address put in the sandbox's nft set before the
  answer;
* ``miss_passed``: each name new, not named by the policy: forwarded only;
* ``hit``: a name asked before (the cache; its set element already long enough);
* ``refused``: a name the policy denies (answered at once).

    sudo .venv/bin/python tools/bench/sandbox_dns.py --n 2000
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

UPSTREAM = ("127.0.0.1", 5300)


def query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


def timed(addr: tuple[str, int], names: list[str]) -> list[float]:
    """ms per query, one at a time over one socket; each answer checked."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(addr)
        for i, name in enumerate(names):
            q = query(name, i & 0xFFFF)
            t = time.perf_counter()
            s.send(q)
            a = s.recv(4096)
            out.append((time.perf_counter() - t) * 1000)
            if a[:2] != q[:2]:
                raise SystemExit(f"{name}: a stray answer")
    return out


def pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "p50": round(statistics.median(xs), 3), "p99": round(xs[int(0.99 * (len(xs) - 1))], 3)}


def main() -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="queries of each kind")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from sandbox.network import netns
    from sandbox.network.policy import Policy
    from sandbox.network.pool import Networks

    ns = f"cfdnsbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    tmp = Path(tempfile.mkdtemp(prefix="dnsbench"))
    zone = tmp / "zone"
    zone.write_text("*.bench.test. 300 IN A 198.18.9.9\n")
    server = nets = None
    try:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        assert libc.setns(fd, 0x40000000) == 0
        os.close(fd)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "dnslib.zoneresolver", "--glob",
                                   "--zone", str(zone), "--address", UPSTREAM[0], "--port", str(UPSTREAM[1]),
                                   "--log=-request,-reply,-truncated,-error"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        nets = Networks(tmp / "state", pool_size=1, dns_upstream=[f"{UPSTREAM[0]}:{UPSTREAM[1]}"])
        nets.start(set())
        nets.attach("bench")
        nets.set_policy("bench", Policy.from_api({"allowOut": ["*.a.bench.test"], "denyOut": ["*.d.bench.test"]}))
        inside = nets.ns(nets.slots["bench"])
        n = args.n
        resolver = ("169.254.0.22", 53)
        timed(UPSTREAM, [f"warm{i}.bench.test" for i in range(50)])
        res = {
            "upstream": timed(UPSTREAM, [f"u{i}.bench.test" for i in range(n)]),
            "miss_allowed": netns.in_netns(inside, lambda: timed(resolver, [f"m{i}.a.bench.test" for i in range(n)])),
            "miss_passed": netns.in_netns(inside, lambda: timed(resolver, [f"p{i}.bench.test" for i in range(n)])),
            "hit": netns.in_netns(inside, lambda: timed(resolver, [f"m{i % 50}.a.bench.test" for i in range(n)])),
            "refused": netns.in_netns(inside, lambda: timed(resolver, [f"r{i}.d.bench.test" for i in range(n)])),
        }
        out = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0],
               **{k: pct(v) for k, v in res.items()}}
        print(json.dumps(out, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        if nets is not None:
            nets.release("bench")
            nets.close()
        if server is not None:
            server.kill()
            server.wait()
        libc.setns(home, 0x40000000)
        os.close(home)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
