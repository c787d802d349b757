"""Sandbox networking as its users see it: the stock E2B SDK creates sandboxes whose guests
reach "the internet" (a web server in a namespace of the test's) or not, as their egress
policy says, changed while they run; they never reach each other, the node or the metadata
address, even with a forged source address; nothing is left behind.

Everything runs in network namespaces this module makes: "node" (the service, its gateway
table, its sandboxes' namespaces hang off it) and "internet", joined by a veth pair.  The
test process's main thread enters "node" for the module (the SDK's connections and the
service it starts are there) and returns to its own namespace afterwards.  The machine's
own interfaces and ruleset are never touched.  One service, one template (one TCG boot).

"The internet" has an authoritative DNS server (dnslib's zone resolver) for ``good.test`` and
``bad.test``, two addresses of its web server; it is the service's ``--dns-upstream``."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import environ, free_ports, run_cubefs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel
from test_sandbox_service import API_KEY, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun (network namespaces, taps)")

TAG = f"cfnt{os.getpid() % 100000}"
INTERNET, OTHER_HOST, UPLINK = "198.18.0.1", "198.18.5.5", "198.18.0.2"  # 198.18/15: for tests (RFC 2544)
GOOD_IP, BAD_IP = "198.18.6.6", "198.18.7.7"  # good.test, bad.test
WEB_PORT, NODE_PORT = 8080, 9099
SINK_PORT = 8081  # "the internet"'s upload sink: reads to EOF, answers how many bytes came
DOWN, UP = 2_000_000, 1_000_000  # bytes a sandbox downloads and uploads in the accounting case
SINK = ("import socket,sys\n"
        "srv = socket.create_server(('0.0.0.0', int(sys.argv[1])))\n"
        "while True:\n"
        "    c, _ = srv.accept(); n = 0\n"
        "    while (d := c.recv(65536)):\n"
        "        n += len(d)\n"
        "    c.sendall(str(n).encode()); c.close()\n")
HELLO = "hello from the internet"
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


def sh(script: str) -> str:
    res = subprocess.run(["sh", "-euc", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


class World:
    def __init__(self, node: Node, base: Path, node_ns: str) -> None:
        self.node = node
        self.base = base
        self.node_ns = node_ns

    def metrics(self) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.node.api_port}/metrics", headers={"X-API-KEY": API_KEY})
        return urllib.request.urlopen(req, timeout=10).read().decode()

    def address(self, sandbox_id: str) -> str:
        """The sandbox's own address on the node (its slot's, from the service's record)."""
        from sandbox.network.gateway import addresses

        slot = json.loads((self.base / "sandbox" / "network" / f"{sandbox_id}.json").read_text())["slot"]
        return addresses(slot)[1]

    def wait_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first line of the service's log matching ``pattern``, waited for (a connection
        is logged when it ends: its conntrack entry goes 2 s after the close)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.node.log.read_text())
            if m or time.monotonic() > deadline:
                assert m, f"no line of the service's log matches {pattern!r}"
                return m
            time.sleep(0.2)


@pytest.fixture(scope="module")
def world(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("net")
    node_ns, inet_ns = f"{TAG}-node", f"{TAG}-inet"
    www = base / "www"
    www.mkdir()
    (www / "hello.txt").write_text(HELLO)
    (www / "big.bin").write_bytes(os.urandom(DOWN))
    sh(f"""ip netns add {node_ns}; ip netns add {inet_ns}
ip link add up0 netns {node_ns} type veth peer name in0 netns {inet_ns}
ip -n {node_ns} link set lo up; ip -n {node_ns} addr add {UPLINK}/24 dev up0; ip -n {node_ns} link set up0 up
ip -n {node_ns} route add default via {INTERNET}
ip -n {inet_ns} link set lo up; ip -n {inet_ns} addr add {INTERNET}/24 dev in0; ip -n {inet_ns} link set in0 up
ip -n {inet_ns} addr add {OTHER_HOST}/32 dev lo
ip -n {inet_ns} addr add {GOOD_IP}/32 dev lo; ip -n {inet_ns} addr add {BAD_IP}/32 dev lo""")
    zone = base / "test.zone"
    zone.write_text(f"good.test. 30 IN A {GOOD_IP}\nbad.test. 30 IN A {BAD_IP}\n")
    servers = [subprocess.Popen(["ip", "netns", "exec", inet_ns, sys.executable, "-m", "http.server", "-b",
                                 "0.0.0.0", str(WEB_PORT), "-d", str(www)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               # stands for the node's own listeners (API, proxy, peer port, etcd) on all its addresses
               subprocess.Popen(["ip", "netns", "exec", node_ns, sys.executable, "-m", "http.server", "-b",
                                 "0.0.0.0", str(NODE_PORT), "-d", str(www)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen(["ip", "netns", "exec", inet_ns, sys.executable, "-m", "dnslib.zoneresolver",
                                 "--zone", str(zone), "--address", INTERNET, "--port", "53"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    servers.append(subprocess.Popen(["ip", "netns", "exec", inet_ns, sys.executable, "-c", SINK, str(SINK_PORT)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    kernel = make_kernel(Path(DEFAULT))  # before entering the node: it may fetch Debian's packages
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    node = None
    try:
        setns(f"/run/netns/{node_ns}")
        env = {"CUBEFS_VM_DIR": str(base / "vm"), "CUBEFS_TEMPLATE_DIR": str(base / "templates"),
               "CUBEFS_VOLUME_DIR": str(base / "volumes"), "CUBEFS_STORE": f"file://{base / 'store'}",
               "CUBEFS_CACHE_DIR": str(base / "cache"), "CUBEFS_VM_KERNEL": str(kernel),
               "CUBEFS_SANDBOX_DIR": str(base / "sandbox"), "CUBEFS_SANDBOX_API_KEY": API_KEY}
        run_cubefs("build", str(rootfs), "--tag", "debian:12", env=env)
        run_cubefs("sandbox", "template", "create", "base", "--from", "debian:12", env=env, timeout=600)
        node = Node(env, *free_ports(2))
        node.args = ["--pool-size", "0", "--network", "--network-pool", "2", "--dns-upstream", f"{INTERNET}:53"]
        node.start()
        with environ(node.sdk_env):
            yield World(node, base, node_ns)
    finally:
        if node is not None:
            node.stop()
            run_cubefs("vm", "rm", "--all", env=node.env, check=False)
        _libc.setns(home, 0x40000000)
        os.close(home)
        for p in servers:
            p.kill()
            p.wait()
        from sandbox.network.pool import Networks

        prefix = Networks(base / "sandbox").prefix  # the service's (none, if it cleaned up), then ours
        for name in sh("ip netns list").split():
            if name.startswith((prefix, TAG)):
                subprocess.run(["ip", "netns", "del", name], check=False)


def fetch(sbx: object, url: str, bind: str | None = None, user: str = "user") -> str:
    """GET ``url`` from the guest (its own python3; the test image has no wget): the body, or
    ``FAILED <why>``; ``bind``: from that source address (IP_FREEBIND: a forged one)."""
    code = ("import socket,sys,urllib.request\n"
            "try:\n"
            f"    if {bind!r}:\n"
            "        host, port = sys.argv[1].split('/')[2].split(':')\n"
            "        s = socket.socket(); s.setsockopt(socket.SOL_IP, 15, 1); s.settimeout(4)\n"
            f"        s.bind(({bind!r}, 0)); s.connect((host, int(port)))\n"
            "        s.sendall(b'GET /hello.txt HTTP/1.0\\r\\n\\r\\n'); print(s.recv(4096).decode())\n"
            "    else:\n"
            "        print(urllib.request.urlopen(sys.argv[1], timeout=4).read().decode())\n"
            "except Exception as e:\n"
            "    print('FAILED', type(e).__name__, e)\n")
    res = sbx.commands.run(f"python3 -c {shlex.quote(code)} {url}", user=user, timeout=30)  # type: ignore[attr-defined]
    return str(res.stdout).strip()


def ping(sbx: object, host: str) -> str:
    """One ICMP echo from the guest (a raw socket, as root): ``REPLY`` or ``NOTHING``."""
    code = ("import socket,struct\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2)\n"
            "h = struct.pack('!BBHHH', 8, 0, 0, 7, 1) + b'cubefs'\n"
            "c = sum(struct.unpack('!%dH' % (len(h) // 2), h)); c = (c >> 16) + (c & 0xffff)\n"
            "c = ~(c + (c >> 16)) & 0xffff\n"
            "h = h[:2] + struct.pack('!H', c) + h[4:]\n"
            f"s.sendto(h, ({host!r}, 0))\n"
            "try:\n"
            "    while True:\n"
            "        d, a = s.recvfrom(2048)\n"
            f"        if a[0] == {host!r} and d[20] == 0:\n"
            "            print('REPLY'); break\n"
            "except OSError:\n"
            "    print('NOTHING')\n")
    return str(sbx.commands.run(f"python3 -c {shlex.quote(code)}", user="root", timeout=30).stdout).strip()  # type: ignore[attr-defined]


def dig(sbx: object, name: str, server: str) -> str:
    """One A query for ``name`` sent by the guest straight to ``server``:53 (hand-encoded, UDP):
    ``RCODE addresses...`` or ``NOTHING``."""
    code = ("import socket,struct,sys\n"
            "q = struct.pack('!HHHHHH', 4660, 256, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() "
            "for p in sys.argv[1].split('.')) + b'\\0' + struct.pack('!HH', 1, 1)\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
            "s.sendto(q, (sys.argv[2], 53))\n"
            "try:\n"
            "    d = s.recv(4096)\n"
            "except OSError:\n"
            "    print('NOTHING'); sys.exit()\n"
            "rc = {0: 'NOERROR', 2: 'SERVFAIL', 3: 'NXDOMAIN', 5: 'REFUSED'}.get(d[3] & 15, d[3] & 15)\n"
            "an = struct.unpack('!H', d[6:8])[0]; off = len(q); out = []\n"
            "for _ in range(an):\n"
            "    off += 2 if d[off] >= 192 else d.index(0, off) + 1 - off\n"
            "    t, _c, _ttl, n = struct.unpack('!HHIH', d[off:off + 10]); off += 10\n"
            "    if t == 1: out.append(socket.inet_ntoa(d[off:off + 4]))\n"
            "    off += n\n"
            "print(rc, *out)\n")
    return str(sbx.commands.run(f"python3 -c {shlex.quote(code)} {name} {server}", timeout=30).stdout).strip()  # type: ignore[attr-defined]


WEB = f"http://{INTERNET}:{WEB_PORT}/hello.txt"
OTHER = f"http://{OTHER_HOST}:{WEB_PORT}/hello.txt"


def test_default_goes_out_no_internet_does_not_and_a_put_changes_it(world: World) -> None:
    from e2b import Sandbox

    a = Sandbox.create(timeout=300)
    b = Sandbox.create(timeout=300, allow_internet_access=False)
    try:
        assert fetch(a, WEB) == HELLO
        assert fetch(a, OTHER) == HELLO
        assert fetch(b, WEB).startswith("FAILED")
        assert ping(a, INTERNET) == "REPLY"
        assert ping(b, INTERNET) == "NOTHING"
        assert b.get_info().allow_internet_access is False
        b.update_network({"allow_internet_access": True})  # PUT /sandboxes/{id}/network, while it runs
        assert b.get_info().allow_internet_access is True
        assert fetch(b, WEB) == HELLO
        m = world.metrics()
        assert f'cubefs_sandbox_egress_connections_total{{sandbox="{a.sandbox_id}",verdict="allowed"}}' in m
        assert f'cubefs_sandbox_egress_connections_total{{sandbox="{b.sandbox_id}",verdict="refused"}}' in m
        assert 'cubefs_egress_connections_total{verdict="refused"}' in m
        world.wait_log(f"sandbox {a.sandbox_id}: connection tcp {re.escape(INTERNET)}:{WEB_PORT} allowed: ")
        world.wait_log(f"sandbox {b.sandbox_id}: connection tcp {re.escape(INTERNET)}:{WEB_PORT} refused: ")
    finally:
        a.kill()
        b.kill()


def transfer(sbx: object, down_url: str | None = None, up: tuple[str, int, int] | None = None) -> str:
    """From the guest: the length of ``down_url``'s body, or what the sink said after ``up``
    (host, port, bytes) was sent to it."""
    if down_url is not None:
        code = "import sys,urllib.request\nprint(len(urllib.request.urlopen(sys.argv[1], timeout=30).read()))\n"
        argv = down_url
    else:
        assert up is not None
        code = ("import socket,sys\n"
                "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n"
                "s.sendall(b'u' * int(sys.argv[3])); s.shutdown(socket.SHUT_WR); print(s.recv(64).decode())\n")
        argv = " ".join(map(str, up))
    return str(sbx.commands.run(f"python3 -c {shlex.quote(code)} {argv}", timeout=120).stdout).strip()  # type: ignore[attr-defined]


def _metric(text: str, name: str, labels: str) -> int | None:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def test_each_connection_logged_with_its_bytes_and_counted_per_sandbox(world: World) -> None:
    """Issue 17: every connection logged (sandbox, destination, port, bytes, verdict) and in
    the metrics; another sandbox's counters untouched; nothing of it left after the kill."""
    from e2b import Sandbox

    from sandbox.network import ctnetlink

    a = Sandbox.create(timeout=300, network={"deny_out": [f"{OTHER_HOST}/32"]})
    b = Sandbox.create(timeout=300)
    try:
        aid, bid = a.sandbox_id, b.sandbox_id
        assert transfer(a, f"http://{INTERNET}:{WEB_PORT}/big.bin") == str(DOWN)
        assert transfer(a, up=(INTERNET, SINK_PORT, UP)) == str(UP)
        assert fetch(a, OTHER).startswith("FAILED")
        assert fetch(b, WEB) == HELLO
        inet = re.escape(INTERNET)
        down = world.wait_log(rf"sandbox {aid}: connection tcp {inet}:{WEB_PORT} allowed: (\d+) B out, "
                              rf"(\d+) B in, (\d+) packets, ([\d.]+) s")
        assert int(down.group(2)) >= DOWN and int(down.group(1)) < DOWN // 10, down.group(0)
        up = world.wait_log(rf"sandbox {aid}: connection tcp {inet}:{SINK_PORT} allowed: (\d+) B out, (\d+) B in")
        assert int(up.group(1)) >= UP and int(up.group(2)) < UP // 10, up.group(0)
        world.wait_log(rf"sandbox {aid}: connection tcp {re.escape(OTHER_HOST)}:{WEB_PORT} refused: 0 B out, 0 B in")
        world.wait_log(rf"sandbox {bid}: connection tcp {inet}:{WEB_PORT} allowed: ")

        m = world.metrics()
        bytes_ = "cubefs_sandbox_egress_bytes_total"
        assert _metric(m, bytes_, f'sandbox="{aid}",direction="in"') >= DOWN  # type: ignore[operator]
        assert _metric(m, bytes_, f'sandbox="{aid}",direction="out"') >= UP  # type: ignore[operator]
        assert _metric(m, "cubefs_sandbox_egress_connections_total", f'sandbox="{aid}",verdict="refused"') == 1
        assert _metric(m, bytes_, f'sandbox="{bid}",direction="in"') < DOWN // 10  # type: ignore[operator]
        assert _metric(m, bytes_, f'sandbox="{bid}",direction="out"') < UP // 10  # type: ignore[operator]
        node_in = _metric(m, "cubefs_egress_bytes_total", 'direction="in"')
        assert node_in is not None and node_in >= DOWN

        env = {**os.environ, "E2B_API_KEY": API_KEY}
        res = subprocess.run([sys.executable, "-m", "cubefs", "sandbox", "network", aid, "--json"],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        t = json.loads(res.stdout)["traffic"]
        assert t["bytesIn"] >= DOWN and t["bytesOut"] >= UP and t["connections"]["refused"] == 1
        seen = {(c["destination"], c["port"], c["verdict"]) for c in t["recent"]}
        assert {(INTERNET, WEB_PORT, "allowed"), (INTERNET, SINK_PORT, "allowed"),
                (OTHER_HOST, WEB_PORT, "refused")} <= seen
        assert all(c["bytesOut"] == c["bytesIn"] == 0 for c in t["recent"] if c["verdict"] == "refused")
        res = subprocess.run([sys.executable, "-m", "cubefs", "sandbox", "network", aid],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0 and f"{INTERNET}:{SINK_PORT}" in res.stdout, res.stdout + res.stderr

        address = world.address(aid)
        a.kill()
        m = world.metrics()
        assert f'sandbox="{aid}"' not in m  # its counters went with it
        assert _metric(m, "cubefs_egress_bytes_total", 'direction="in"') >= node_in  # type: ignore[operator]
        ctl = ctnetlink.socket_for()  # this thread is in the node's namespace: the service's table
        try:
            assert ctnetlink.dump(ctl, socket.inet_aton(address)) == []
        finally:
            ctl.close()
    finally:
        a.kill()
        b.kill()


def test_allow_and_deny_lists_and_the_cli(world: World) -> None:
    from e2b import Sandbox

    # E2B: an allowed destination goes out even inside a denied block
    sbx = Sandbox.create(timeout=300, network={"deny_out": ["0.0.0.0/0"], "allow_out": [OTHER_HOST]})
    try:
        assert fetch(sbx, OTHER) == HELLO
        assert fetch(sbx, WEB).startswith("FAILED")
        sbx.update_network({"deny_out": [f"{OTHER_HOST}/32"]})  # replaces the whole policy
        info = sbx.get_info().network
        assert info is not None and info.get("deny_out") == [f"{OTHER_HOST}/32"] and not info.get("allow_out"), info
        assert fetch(sbx, WEB) == HELLO
        assert fetch(sbx, OTHER).startswith("FAILED")
        env = {**os.environ, "E2B_API_KEY": API_KEY}
        res = subprocess.run([sys.executable, "-m", "cubefs", "sandbox", "network", sbx.sandbox_id, "--no-internet",
                              "--allow", INTERNET], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert fetch(sbx, WEB) == HELLO
        assert fetch(sbx, OTHER).startswith("FAILED")
        res = subprocess.run([sys.executable, "-m", "cubefs", "sandbox", "network", sbx.sandbox_id, "--deny",
                              "exa mple.com"], capture_output=True, text=True, env=env)
        assert res.returncode != 0, res.stdout
        assert "'exa mple.com' is not a CIDR block, an IP address or a domain name" in res.stderr
        assert fetch(sbx, WEB) == HELLO  # a refused update changed nothing
    finally:
        sbx.kill()
    from e2b import InvalidArgumentException, SandboxException

    with pytest.raises((InvalidArgumentException, SandboxException)):
        Sandbox.create(timeout=60, network={"deny_out": ["10.0.0.0/33"]})


GOOD, BAD = f"http://good.test:{WEB_PORT}/hello.txt", f"http://bad.test:{WEB_PORT}/hello.txt"


def test_names_go_through_the_gateways_resolver_and_a_put_swaps_them(world: World) -> None:
    from e2b import Sandbox

    a = Sandbox.create(timeout=300, network={"deny_out": ["0.0.0.0/0"], "allow_out": ["good.test"]})
    d = Sandbox.create(timeout=300)
    try:
        assert fetch(a, GOOD) == HELLO  # good.test's address went into a's allow set before the answer
        failed = fetch(a, BAD)
        assert failed.startswith("FAILED URLError") and "name resolution" in failed, failed
        assert fetch(a, f"http://{BAD_IP}:{WEB_PORT}/hello.txt").startswith("FAILED")  # nor by its address
        # DNS to the upstream itself, or to any address, is answered by the node's resolver
        assert dig(a, "bad.test", INTERNET) == "REFUSED"
        assert dig(a, "bad.test", "8.8.8.8") == "REFUSED"
        assert dig(a, "good.test", "8.8.8.8") == f"NOERROR {GOOD_IP}"
        a.update_network({"deny_out": ["0.0.0.0/0"], "allow_out": ["bad.test"]})  # swapped while it runs
        assert fetch(a, BAD) == HELLO
        assert fetch(a, GOOD).startswith("FAILED")
        assert fetch(a, f"http://{GOOD_IP}:{WEB_PORT}/hello.txt").startswith("FAILED")  # it left the allow set
        assert fetch(d, GOOD) == HELLO and fetch(d, BAD) == HELLO  # the default resolves both
        assert dig(d, "nothing.test", INTERNET) == "NXDOMAIN"  # the upstream's own answer
        log = world.node.log.read_text()
        assert f"sandbox {a.sandbox_id}: dns good.test A -> {GOOD_IP} allowed" in log
        assert f"sandbox {a.sandbox_id}: dns bad.test A -> - refused" in log
        assert f"sandbox {d.sandbox_id}: dns bad.test A -> {BAD_IP} passed" in log
        counts = {x.split('"')[1]: int(x.split()[-1]) for x in world.metrics().splitlines()
                  if x.startswith("cubefs_sandbox_dns_queries_total{")}
        assert counts["allowed"] > 0 and counts["refused"] > 0 and counts["passed"] > 0, counts
    finally:
        a.kill()
        d.kill()


def test_a_denied_name_is_not_reached_by_its_address_either(world: World) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300, network={"deny_out": ["bad.test"]})
    try:
        assert fetch(sbx, f"http://{BAD_IP}:{WEB_PORT}/hello.txt").startswith("FAILED")  # never asked for
        assert dig(sbx, "bad.test", INTERNET) == "REFUSED"
        assert fetch(sbx, GOOD) == HELLO and fetch(sbx, WEB) == HELLO  # the rest goes out
    finally:
        sbx.kill()


def test_a_sandbox_reaches_no_other_sandbox_nor_the_node_nor_metadata_nor_with_a_forged_source(
        world: World) -> None:
    from e2b import Sandbox

    a = Sandbox.create(timeout=300)
    b = Sandbox.create(timeout=300)
    try:
        b.commands.run(f"python3 -m http.server {WEB_PORT} -d /tmp", background=True)
        addr_b = world.address(b.sandbox_id)
        node_end = addr_b.rsplit(".", 1)[0] + "." + str(int(addr_b.rsplit(".", 1)[1]) - 1)
        assert fetch(a, WEB) == HELLO  # it has a network
        for target in (f"http://{addr_b}:{WEB_PORT}/", f"http://169.254.0.21:{WEB_PORT}/",
                       f"http://{UPLINK}:{NODE_PORT}/hello.txt", f"http://{node_end}:{NODE_PORT}/hello.txt",
                       "http://169.254.169.254/latest/meta-data/", "http://169.254.0.22:80/"):
            assert fetch(a, target).startswith("FAILED"), target
        for host in (addr_b, UPLINK, node_end, "169.254.169.254"):
            assert ping(a, host) == "NOTHING", host
        # a forged source: another sandbox's address, or another in the guest's own link
        for forged in (addr_b, "169.254.0.25", "10.0.0.1"):
            assert fetch(a, WEB, bind=forged, user="root").startswith("FAILED"), forged
        assert fetch(a, WEB, bind="169.254.0.21", user="root").startswith("HTTP/1.0 200")  # its own: fine
    finally:
        a.kill()
        b.kill()


def test_snapshots_rollback_and_forks_keep_a_network_and_the_policy(world: World) -> None:
    """Restored guests (a rollback in place, a fork, a create from a snapshot) keep the
    address their template gave them: each has a network at once, no fix-up."""
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300, network={"deny_out": [f"{OTHER_HOST}/32"]})
    made: list[Sandbox] = []
    try:
        snap = sbx.create_snapshot()
        status, body, _ = world.node.api("POST", f"/sandboxes/{sbx.sandbox_id}/rollback",
                                         {"snapshotID": snap.snapshot_id})
        assert status == 200, body
        assert fetch(sbx, WEB) == HELLO  # the same network and policy after a rollback
        assert fetch(sbx, OTHER).startswith("FAILED")
        made = sbx.fork(count=1, timeout=120)
        child = made[0]
        assert child.sandbox_id != sbx.sandbox_id
        assert world.address(child.sandbox_id) != world.address(sbx.sandbox_id)
        assert fetch(child, WEB) == HELLO  # a network of its own, its parent's policy
        assert fetch(child, OTHER).startswith("FAILED")
        made.append(Sandbox.create(template=snap.snapshot_id, timeout=120))  # a create's own policy: the default
        assert fetch(made[-1], OTHER) == HELLO
        Sandbox.delete_snapshot(snap.snapshot_id)
    finally:
        for s in [sbx, *made]:
            s.kill()


def test_a_restarted_service_keeps_its_sandboxes_networks_and_policies(world: World) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300, allow_internet_access=False, network={"allow_out": [OTHER_HOST]})
    try:
        world.node.stop()
        world.node.start()
        sbx = Sandbox.connect(sbx.sandbox_id)
        assert fetch(sbx, OTHER) == HELLO
        assert fetch(sbx, WEB).startswith("FAILED")
    finally:
        sbx.kill()


def test_killed_sandboxes_leave_no_namespace_veth_tap_or_chain(world: World) -> None:
    from e2b import Sandbox

    from sandbox.network.pool import Networks

    prefix = Networks(world.base / "sandbox").prefix
    slots = []
    for _ in range(3):
        sbx = Sandbox.create(timeout=60)
        slots.append(json.loads((world.base / "sandbox" / "network" / f"{sbx.sandbox_id}.json").read_text())["slot"])
        sbx.kill()
    ruleset, links, spaces = sh("nft list table inet cubefs"), sh("ip -br link"), sh("ip netns list")
    for slot in slots:
        assert f"chain s{slot} " not in ruleset and f'"cfh{slot}"' not in ruleset
        assert f"cfh{slot}@" not in links and f"cfh{slot} " not in links
        assert f"{prefix}{slot}" not in spaces.split()


def test_a_stopped_service_leaves_no_namespace_veth_or_table(world: World) -> None:
    """Last in the module: it stops the service (its sandboxes were all killed)."""
    from sandbox.network.pool import Networks

    prefix = Networks(world.base / "sandbox").prefix
    assert [n for n in sh("ip netns list").split() if n.startswith(prefix)]  # the pool's, ready
    world.node.stop()
    assert [n for n in sh("ip netns list").split() if n.startswith(prefix)] == []
    assert "cfh" not in sh("ip -br link")
    assert "cubefs" not in sh("nft list ruleset")


def test_fifty_networks_made_and_removed_leave_nothing(tmp_path: Path) -> None:
    """The pool's whole life, 50 times over, in a namespace of its own (no VM: a sandbox's
    network is made, its tap opened as QEMU's would be, a policy set, then removed)."""
    from sandbox.network.policy import Policy
    from sandbox.network.pool import Networks

    ns = f"{TAG}-cycles"
    sh(f"ip netns add {ns}")
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(f"/run/netns/{ns}")
        nets = Networks(tmp_path, pool_size=2)
        nets.start(set())
        for i in range(50):
            netdev = nets.attach(f"s{i}")
            nets.set_policy(f"s{i}", Policy(deny_out=["10.0.0.0/8"]))
            Networks.close_fds(netdev)
            nets.release(f"s{i}")
        nets.close()
        assert [n for n in sh("ip netns list").splitlines() if n.startswith(nets.prefix)] == []
        assert "cfh" not in sh("ip -br link") and "tap" not in sh("ip -br link")
        assert "cubefs" not in sh("nft list ruleset")
        assert list((tmp_path / "network").glob("*.json")) == []
    finally:
        _libc.setns(home, 0x40000000)
        os.close(home)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_policies_as_e2b_states_them_and_bad_ones_refused_with_the_entry_named() -> None:
    from cubefs.errors import UsageError
    from sandbox.network.policy import Policy

    p = Policy.from_api({"allowOut": ["8.8.8.8", "10.1.2.3/8"], "denyOut": ["0.0.0.0/0", "10.0.0.0/8"]})
    assert p.effective() == (["8.8.8.8/32", "10.0.0.0/8"], ["0.0.0.0/0"])  # overlaps collapsed for nft
    assert Policy.from_api(None, False).effective() == ([], ["0.0.0.0/0"])
    assert Policy.from_api({}, None).effective() == ([], [])
    p = Policy.from_api({"allowOut": ["Good.Test.", "*.cdn.test", "1password.com"],
                         "denyOut": ["0.0.0.0/0", "bad.test"]})
    assert p.names() == (["good.test", "*.cdn.test", "1password.com"], ["bad.test"])
    # names are not networks; with a name allowed, the dnsServers listed are opened (E2B opens 8.8.8.8
    # when none are: not here, where the node's resolver answers every guest's DNS)
    assert p.effective() == ([], ["0.0.0.0/0"]) and "dnsServers" not in p.api()
    p2 = Policy.from_api({"allowOut": ["good.test"], "denyOut": ["0.0.0.0/0"], "dnsServers": ["1.1.1.1 ", "9.9.9.9"]})
    assert p2.effective() == (["1.1.1.1/32", "9.9.9.9/32"], ["0.0.0.0/0"])
    assert p2.api()["dnsServers"] == ["1.1.1.1", "9.9.9.9"] and Policy.from_dict(p2.to_dict()) == p2
    assert Policy.from_api({"allowOut": ["good.test"], "dnsServers": []}).effective() == ([], [])
    assert Policy.from_api({"allowOut": ["10.0.0.1"], "dnsServers": ["1.1.1.1"]}).effective() == (["10.0.0.1/32"], [])
    assert [p.name_verdict(n) for n in ("good.test", "a.b.cdn.test", "cdn.test", "bad.test", "other.test")] == \
        ["allowed", "allowed", "refused", "refused", "refused"]  # deny-all: an unnamed name is refused too
    p = Policy.from_api({"allowOut": ["bad.test"], "denyOut": ["*.test"]})  # allowed wins, as for addresses
    assert [p.name_verdict(n) for n in ("bad.test", "good.test", "example.com")] == ["allowed", "refused", "passed"]
    for bad, words in (({"allowOut": ["exa_mple..com"]}, "or a domain name"), ({"denyOut": ["::/0"]}, "IPv4 only"),
                       ({"allowOut": ["1.2.3"]}, "'1.2.3' is not"), ({"allowOut": ["-a.test"]}, "'-a.test' is not"),
                       ({"denyOut": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not"), ({"allowOut": "1.2.3.4"}, "a list"),
                       ([1], "must be an object"), ({"dnsServers": ["dns.google"]}, "'dns.google' is not an IPv4"),
                       ({"dnsServers": [134744072]}, "is not an IPv4"),
                       ({"dnsServers": ["1.1.1.1"] * 11}, "at most 10"),
                       ({"egressProxy": {"address": "proxy.test:1080"}}, "egressProxy is not supported"),
                       ({"rules": {"api.test": [{"transform": {}}]}}, "rules .* is not supported")):
        with pytest.raises(UsageError, match=words):
            Policy.from_api(bad)
    with pytest.raises(UsageError, match="true or false"):
        Policy.from_api({}, "no")
