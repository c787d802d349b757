"""What logging every sandbox connection with its bytes costs the service: CPU per 1,000
connections of the flow log and accounting threads (issue 17).

No VM: a "node" namespace runs the sandbox networks (``sandbox.network.pool.Networks``, its
gateway, flow log and accounting), an "internet" namespace a TCP server; a sandbox's
connections are opened from inside its slot's namespace, so they cross the gateway exactly as a
guest's do (same source address, same chain, same conntrack entry in the node's namespace).
The CPU is the two reader threads' own (``/proc/self/task/TID/stat``), not the client's.

    sudo .venv/bin/python tools/bench/egress_accounting.py --connections 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sandbox.network import netns
from sandbox.network.pool import Networks

INTERNET, OTHER_HOST, UPLINK = "198.18.0.1", "198.18.5.5", "198.18.0.2"
_libc = ctypes.CDLL(None, use_errno=True)


def _sh(script: str) -> None:
    subprocess.run(["sh", "-euc", script], check=True, capture_output=True, text=True)


class Lab:
    """Namespaces ``TAG-node`` and ``TAG-inet`` joined by a veth; a server on ``INTERNET:port``
    (and ``OTHER_HOST``): a line ``GET n`` is answered with n bytes, ``PUT n`` reads n bytes
    and answers ``ok``; the calling thread in ``TAG-node`` with ``nets`` started there."""

    def __init__(self, tag: str, state: Path, pool_size: int = 1) -> None:
        self.tag, self.state, self.pool_size = tag, state, pool_size
        self.node_ns, self.inet_ns = f"{tag}-node", f"{tag}-inet"
        self.port = 0
        self.nets: Networks | None = None
        self._server: socket.socket | None = None
        self._home = -1

    def __enter__(self) -> Lab:
        _sh(f"""ip netns add {self.node_ns}; ip netns add {self.inet_ns}
ip link add up0 netns {self.node_ns} type veth peer name in0 netns {self.inet_ns}
ip -n {self.node_ns} link set lo up; ip -n {self.node_ns} addr add {UPLINK}/24 dev up0
ip -n {self.node_ns} link set up0 up; ip -n {self.node_ns} route add default via {INTERNET}
ip -n {self.inet_ns} link set lo up; ip -n {self.inet_ns} addr add {INTERNET}/24 dev in0
ip -n {self.inet_ns} link set in0 up; ip -n {self.inet_ns} addr add {OTHER_HOST}/32 dev lo""")
        self._server = netns.in_netns(self.inet_ns, lambda: socket.create_server(("0.0.0.0", 0), backlog=512))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._serve, name="lab server", daemon=True).start()
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.node_ns}", os.O_RDONLY)
        try:
            assert _libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        self.nets = Networks(self.state, pool_size=self.pool_size)
        self.nets.start(set())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.nets is not None:
                for sid in list(self.nets.slots):
                    self.nets.release(sid)
                self.nets.close()
        finally:
            if self._home >= 0:
                _libc.setns(self._home, 0x40000000)
                os.close(self._home)
            if self._server is not None:
                self._server.close()
            for ns in (self.node_ns, self.inet_ns):
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def _serve(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            f = conn.makefile("rb")
            verb, n = f.readline().split()
            if verb == b"GET":
                block = b"x" * 65536
                left = int(n)
                while left > 0:
                    conn.sendall(block[:left])
                    left -= min(left, len(block))
            else:
                left = int(n)
                while left > 0:
                    got = f.read(min(left, 65536))
                    if not got:
                        return
                    left -= len(got)
                conn.sendall(b"ok")

    def sandbox_socket(self, sandbox_id: str) -> socket.socket:
        """A TCP socket of the sandbox's namespace (its connections leave as the guest's do)."""
        assert self.nets is not None
        return netns.in_netns(self.nets.ns(self.nets.slots[sandbox_id]), socket.socket)

    def get(self, sandbox_id: str, n: int, host: str = INTERNET) -> int:
        """n bytes downloaded by the sandbox: how many came."""
        with self.sandbox_socket(sandbox_id) as s:
            s.settimeout(10)
            s.connect((host, self.port))
            s.sendall(b"GET %d\n" % n)
            got = 0
            while chunk := s.recv(1 << 16):
                got += len(chunk)
            return got

    def put(self, sandbox_id: str, n: int) -> bytes:
        with self.sandbox_socket(sandbox_id) as s:
            s.settimeout(10)
            s.connect((INTERNET, self.port))
            s.sendall(b"PUT %d\n" % n + b"y" * n)
            return s.recv(16)


def thread_cpu(names: tuple[str, ...]) -> float:
    """CPU seconds (user + system) of this process's threads with these names so far."""
    tids = {t.native_id for t in threading.enumerate() if t.name in names}
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in tids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def settle(lab: Lab, ended: int, timeout: float = 30) -> None:
    """Until the accounting has booked ``ended`` connections."""
    acc = lab.nets._accounting if lab.nets is not None else None
    deadline = time.monotonic() + timeout
    while acc is not None and acc.totals["ended"] < ended and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=1000, help="downloaded per connection")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        # the service logs each connection to its log file: so does the bench (the lines cost too)
        logging.basicConfig(filename=str(Path(tmp) / "service.log"), level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _bench(args, Path(tmp), runs)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


def _bench(args: argparse.Namespace, tmp: Path, runs: list[dict[str, object]]) -> None:
    with Lab(f"cfba{os.getpid() % 100000}", tmp) as lab:
        assert lab.nets is not None
        lab.nets.attach("bench")
        from sandbox.network.policy import Policy

        lab.nets.set_policy("bench", Policy())
        names = ("flow log", "egress accounting")
        booked = 0
        for _ in range(args.repeat):
            cpu0, t0 = thread_cpu(names), time.monotonic()
            for _ in range(args.connections):
                lab.get("bench", args.bytes)
            booked += args.connections
            settle(lab, booked)
            seconds = time.monotonic() - t0
            cpu = thread_cpu(names) - cpu0
            runs.append({"connections": args.connections, "seconds": round(seconds, 2),
                         "reader_cpu_seconds": round(cpu, 3),
                         "cpu_ms_per_1000": round(cpu * 1000 * 1000 / args.connections, 1)})
            print(json.dumps(runs[-1]))
        acc = lab.nets._accounting
        assert acc is not None and acc.totals["ended"] >= booked, acc.totals if acc else None
        lines = sum(1 for x in (tmp / "service.log").read_text().splitlines() if " allowed: " in x)
        print(json.dumps({"overruns": acc.lost, "ended": acc.totals["ended"], "lines logged": lines,
                          "accounting_thread_cpu_seconds": round(acc.cpu, 3)}))


if __name__ == "__main__":
    sys.exit(main())
