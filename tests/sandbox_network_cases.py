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
``bad.test``, two addresses of its web server; it is the service's ``--dns-upstream``.  It also
plays the rest of a cluster, whose machines a sandbox must not reach whatever its policy: a real
etcd (the node's ``--etcd``), an S3 endpoint (``$AWS_ENDPOINT_URL``), a ``--deny-always``
network and other nodes' records put in etcd, each an address of "the internet"'s web server."""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
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
# the rest of the cluster, all on "the internet"'s lo: its web server answers on each
ETCD_IP, DENY_IP, STORE_IP, PEER_IP, NODE2_IP, NODE3_IP = (f"198.18.9.{n}" for n in (5, 10, 11, 12, 13, 14))
ETCD_PORT = 2379
ALIBABA_METADATA = "100.100.100.200"  # a metadata address outside 169.254/16 (on "the internet"'s lo here)
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """This thread in network namespace ``ns`` for the block (threads it starts meanwhile are
    too), back in its own after."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(f"/run/netns/{ns}")
        yield
    finally:
        _libc.setns(home, 0x40000000)
        os.close(home)


@contextlib.contextmanager
def own_namespace(name: str) -> Iterator[None]:
    """A new network namespace (``TAG-name``), this thread in it for the block, deleted after."""
    ns = f"{TAG}-{name}"
    sh(f"ip netns add {ns}")
    try:
        with entered(ns):
            yield
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def etcdctl(inet_ns: str, *args: str) -> str:
    """etcdctl against "the internet"'s etcd, retried while it starts (~1 s)."""
    deadline = time.monotonic() + 30
    while True:
        res = subprocess.run(["ip", "netns", "exec", inet_ns, "etcdctl", "--endpoints",
                              f"http://{ETCD_IP}:{ETCD_PORT}", "--dial-timeout", "2s", *args],
                             capture_output=True, text=True)
        if res.returncode == 0 or time.monotonic() > deadline:
            assert res.returncode == 0, res.stderr
            return res.stdout
        time.sleep(0.3)


def sh(script: str) -> str:
    res = subprocess.run(["sh", "-euc", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


class World:
    def __init__(self, node: Node, base: Path, node_ns: str, inet_ns: str) -> None:
        self.node = node
        self.base = base
        self.node_ns = node_ns
        self.inet_ns = inet_ns

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
ip -n {inet_ns} addr add {GOOD_IP}/32 dev lo; ip -n {inet_ns} addr add {BAD_IP}/32 dev lo
for a in {ALIBABA_METADATA} {ETCD_IP} {DENY_IP} {STORE_IP} {PEER_IP} {NODE2_IP} {NODE3_IP}; do
  ip -n {inet_ns} addr add $a/32 dev lo
done""")
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
    servers.append(subprocess.Popen(["ip", "netns", "exec", inet_ns, "etcd", "--name", "e", "--data-dir",
                                     str(base / "etcd"), "--listen-client-urls", f"http://{ETCD_IP}:{ETCD_PORT}",
                                     "--advertise-client-urls", f"http://{ETCD_IP}:{ETCD_PORT}",
                                     "--listen-peer-urls", "http://127.0.0.1:2380",
                                     "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                                     "--initial-cluster", "e=http://127.0.0.1:2380"],
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
        # another node of the cluster, there before this one (its API at NODE2_IP, its peer port at PEER_IP)
        etcdctl(inet_ns, "put", "/cubefs/nodes/n2", json.dumps({"name": "n2", "api": f"http://{NODE2_IP}:3000",
                                                                 "proxy": f"http://{NODE2_IP}:3002"}))
        etcdctl(inet_ns, "put", "/cubefs/members/n2", f"{PEER_IP}:7000")
        node = Node({**env, "AWS_ENDPOINT_URL": f"http://{STORE_IP}:8333"}, *free_ports(2))
        node.args = ["--pool-size", "0", "--network", "--network-pool", "2", "--dns-upstream", f"{INTERNET}:53",
                     "--etcd", f"http://{ETCD_IP}:{ETCD_PORT}", "--node", "n1", "--deny-always", f"{DENY_IP}/32"]
        node.start()
        with environ(node.sdk_env):
            yield World(node, base, node_ns, inet_ns)
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


# What a root guest does to get past its namespace (the targets stay the same): a second address
# on its NIC (the one its namespace SNATs it to), host routes straight on the link to every target (no gateway:
# it ARPs for them), ARP replies claiming the gateway's and the targets' addresses, then IPv6
# link-local to the tap (the namespace has IPv6 off).  Prints one line per IPv6 try.
EVADE = """import ctypes, fcntl, socket, struct, sys
other, targets = sys.argv[1], sys.argv[2].split(',')
def sa(ip):
    return struct.pack('HH4s8x', socket.AF_INET, 0, socket.inet_aton(ip))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(s, 0x8916, struct.pack('16s', b'eth0:1') + sa(other))  # SIOCSIFADDR
B16 = ctypes.c_ubyte * 16  # a sockaddr (c_char would stop at its first NUL)
class Rt(ctypes.Structure):
    _fields_ = [('pad1', ctypes.c_ulong), ('dst', B16), ('gw', B16), ('mask', B16), ('flags', ctypes.c_ushort),
                ('pad2', ctypes.c_short), ('pad3', ctypes.c_ulong), ('pad4', ctypes.c_void_p),
                ('metric', ctypes.c_short), ('dev', ctypes.c_char_p), ('mtu', ctypes.c_ulong),
                ('window', ctypes.c_ulong), ('irtt', ctypes.c_ushort)]
for t in targets:
    rt = Rt(dst=B16.from_buffer_copy(sa(t)), mask=B16.from_buffer_copy(sa('255.255.255.255')), flags=1 | 4,
            dev=b'eth0')  # RTF_UP | RTF_HOST
    fcntl.ioctl(s, 0x890B, bytes(rt))  # SIOCADDRT
mine = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
p.bind(('eth0', 0))
gw = bytes.fromhex('02cf00000002')
for ip in ['169.254.0.22', other] + targets:
    for dst in (gw, b'\\xff' * 6):
        p.send(dst + mine + b'\\x08\\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 2) + mine
               + socket.inet_aton(ip) + gw + socket.inet_aton('169.254.0.22'))
print('EVADED')
for port in (53, int(sys.argv[3])):
    try:
        c = socket.create_connection(('fe80::cf:ff:fe00:2%eth0', port), timeout=3)
        print('v6', port, 'OPEN')
    except OSError as e:
        print('v6', port, 'FAILED', e)
try:
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.sendto(b'\\x12\\x34\\x01\\x00\\x00\\x01' + bytes(6) + b'\\x04good\\x04test\\x00\\x00\\x01\\x00\\x01',
             ('ff02::1%eth0', 53))
    print('v6 dns ANSWERED', u.recv(512))
except OSError as e:
    print('v6 dns FAILED', e)
"""


def test_a_sandbox_reaches_no_other_sandbox_nor_the_node_nor_metadata_whatever_its_root_tries(
        world: World) -> None:
    from e2b import Sandbox

    a = Sandbox.create(timeout=300)
    b = Sandbox.create(timeout=300)
    try:
        b.commands.run(f"python3 -m http.server {WEB_PORT} -d /tmp", background=True)
        addr_b = world.address(b.sandbox_id)
        node_end = addr_b.rsplit(".", 1)[0] + "." + str(int(addr_b.rsplit(".", 1)[1]) - 1)
        assert fetch(a, WEB) == HELLO  # it has a network
        # the metadata address outside 169.254/16 answers from the node (a web server here): not from a guest
        assert urllib.request.urlopen(f"http://{ALIBABA_METADATA}:{WEB_PORT}/hello.txt", timeout=5).read() \
            == HELLO.encode()
        urls = [f"http://{addr_b}:{WEB_PORT}/", f"http://169.254.0.21:{WEB_PORT}/",
                f"http://{UPLINK}:{NODE_PORT}/hello.txt", f"http://{node_end}:{NODE_PORT}/hello.txt",
                "http://169.254.169.254/latest/meta-data/", "http://169.254.0.22:80/",
                f"http://{ALIBABA_METADATA}:{WEB_PORT}/hello.txt"]
        hosts = [addr_b, UPLINK, node_end, "169.254.169.254"]

        def unreachable() -> None:
            for target in urls:
                assert fetch(a, target).startswith("FAILED"), target
            for host in hosts:
                assert ping(a, host) == "NOTHING", host

        unreachable()
        # a forged source: another sandbox's address, or another in the guest's own link
        for forged in (addr_b, "169.254.0.25", "10.0.0.1"):
            assert fetch(a, WEB, bind=forged, user="root").startswith("FAILED"), forged
        assert fetch(a, WEB, bind="169.254.0.21", user="root").startswith("HTTP/1.0 200")  # its own: fine

        # root changes its own address and routes, answers ARP for others, tries IPv6 to the tap
        # its second address: its own on the node (what the namespace SNATs it to)
        targets = [addr_b, UPLINK, node_end, "169.254.169.254", ALIBABA_METADATA]
        res = a.commands.run(f"python3 -c {shlex.quote(EVADE)} {world.address(a.sandbox_id)} {','.join(targets)} "
                             f"{NODE_PORT}",
                             user="root", timeout=60)
        out = str(res.stdout)
        assert "EVADED" in out, out + str(res.stderr)
        v6 = [line for line in out.splitlines() if line.startswith("v6 ")]
        assert len(v6) == 3 and all(" FAILED" in line for line in v6), out
        unreachable()
        assert fetch(a, WEB) == HELLO  # the gateway still serves it: nothing it claimed was believed
    finally:
        a.kill()
        b.kill()


PROTECTED = {"etcd": f"http://{ETCD_IP}:{ETCD_PORT}/version", "--deny-always": f"http://{DENY_IP}:{WEB_PORT}/hello.txt",
             "the store": f"http://{STORE_IP}:{WEB_PORT}/hello.txt",
             "another node's peer port": f"http://{PEER_IP}:{WEB_PORT}/hello.txt",
             "another node's API": f"http://{NODE2_IP}:{WEB_PORT}/hello.txt"}


# A connection held open (a request whose header lines keep coming); prints OPEN, then CUT and
# the error when a send fails (a dropped packet alone would not fail a send for minutes).
HELD = """import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b'GET /hello.txt HTTP/1.0\\r\\n')
print('OPEN', flush=True)
try:
    for _ in range(400):
        time.sleep(0.3)
        c.sendall(b'X-Held: yes\\r\\n')
    print('NOT CUT', flush=True)
except OSError as e:
    print('CUT', type(e).__name__, e, flush=True)
"""


def test_the_clusters_etcd_nodes_and_store_are_refused_whatever_the_policy(world: World) -> None:
    """The node's --etcd, the other nodes (their records in etcd), its S3 endpoint and a
    --deny-always network: refused to a sandbox with the default policy and to one whose allowOut
    names them; a node joining later is refused from then on; the internet still answers."""
    from e2b import Sandbox

    for what, url in PROTECTED.items():  # each answers the node itself
        assert urllib.request.urlopen(url, timeout=5).status == 200, what
    a = Sandbox.create(timeout=300)
    named = [ETCD_IP, DENY_IP, f"{STORE_IP}/32", PEER_IP, NODE2_IP, "198.18.9.0/24", INTERNET]
    b = Sandbox.create(timeout=300, network={"deny_out": ["0.0.0.0/0"], "allow_out": named})
    try:
        for sbx in (a, b):
            assert fetch(sbx, WEB) == HELLO
            for what, url in PROTECTED.items():
                assert fetch(sbx, url).startswith("FAILED"), (sbx.sandbox_id, what)
        world.wait_log(rf"sandbox {b.sandbox_id}: connection tcp {re.escape(ETCD_IP)}:{ETCD_PORT} refused")
        late = f"http://{NODE3_IP}:{WEB_PORT}/hello.txt"
        assert fetch(a, late) == HELLO  # not a node yet
        # a connection to it opened now (a request sent a header line every 0.3 s) is cut when it joins
        a.commands.run(f"python3 -c {shlex.quote(HELD)} {NODE3_IP} {WEB_PORT} > /tmp/held.log 2>&1",
                       background=True)
        deadline = time.monotonic() + 10
        while "OPEN" not in (held := str(a.commands.run("cat /tmp/held.log || true").stdout)):
            assert time.monotonic() < deadline, held
            time.sleep(0.3)
        etcdctl(world.inet_ns, "put", "/cubefs/nodes/n3", json.dumps({"name": "n3", "api": f"http://{NODE3_IP}:3000",
                                                                      "proxy": f"http://{NODE3_IP}:3002"}))
        etcdctl(world.inet_ns, "put", "/cubefs/members/n3", "")  # it joins (no peer port)
        deadline = time.monotonic() + 10
        while not fetch(a, late).startswith("FAILED"):
            assert time.monotonic() < deadline, "a node that joined is still reached 10 s later"
            time.sleep(0.5)
        deadline = time.monotonic() + 5
        while "CUT" not in (held := str(a.commands.run("cat /tmp/held.log").stdout)):
            assert time.monotonic() < deadline, f"a connection open to a node that joined goes on: {held}"
            time.sleep(0.3)
        assert "ConnectionResetError" in held, held  # a reset: the guest's program knows at once
        assert fetch(a, WEB) == HELLO
    finally:
        a.kill()
        b.kill()


GUEST_PORT = 8000


def test_ingress_only_through_the_proxy_even_for_a_sandbox_without_internet(world: World) -> None:
    """A server in a sandbox without internet access answers at get_host(port) through the
    proxy; from "the internet" and from the node, with routes to the sandboxes' range and the
    guest's address, nothing gets in."""
    from e2b import Sandbox

    from sandbox.network import netns

    sbx = Sandbox.create(timeout=300, allow_internet_access=False)
    routes = []
    try:
        sbx.commands.run("mkdir -p /tmp/www && printf 'hello from the guest' > /tmp/www/hi.txt")
        sbx.commands.run(f"python3 -m http.server {GUEST_PORT} -d /tmp/www", background=True)
        req = urllib.request.Request(f"http://127.0.0.1:{world.node.proxy_port}/hi.txt",
                                     headers={"Host": sbx.get_host(GUEST_PORT)})
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(req, timeout=10).read()
                break
            except OSError:  # 502 until the server listens
                assert time.monotonic() < deadline, "the guest's server never answered through the proxy"
                time.sleep(0.5)
        assert body == b"hello from the guest"
        own = world.address(sbx.sandbox_id)
        slot = json.loads((world.base / "sandbox" / "network" / f"{sbx.sandbox_id}.json").read_text())["slot"]
        sh(f"ip -n {world.inet_ns} route add 10.200.0.0/16 via {UPLINK}")
        routes.append(f"ip -n {world.inet_ns} route del 10.200.0.0/16")
        sh(f"ip -n {world.inet_ns} route add 169.254.0.21/32 via {UPLINK}")
        routes.append(f"ip -n {world.inet_ns} route del 169.254.0.21/32")
        sh(f"ip route add 169.254.0.21/32 via {own} dev cfh{slot}")  # this thread's namespace: the node's
        routes.append("ip route del 169.254.0.21/32")

        def get(address: str) -> str:
            try:
                with socket.create_connection((address, GUEST_PORT), timeout=3) as c:
                    c.sendall(b"GET /hi.txt HTTP/1.0\r\n\r\n")
                    return c.recv(4096).decode(errors="replace") or "FAILED closed"
            except OSError as err:
                return f"FAILED {err}"

        for address in (own, "169.254.0.21"):
            assert get(address).startswith("FAILED"), ("from the node", address)
            got = netns.in_netns(world.inet_ns, lambda a=address: get(a))
            assert got.startswith("FAILED"), ("from the internet", address, got)
        assert urllib.request.urlopen(req, timeout=10).read() == b"hello from the guest"  # still there
    finally:
        for cmd in reversed(routes):
            subprocess.run(cmd.split(), check=False)
        sbx.kill()


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

    with own_namespace("cycles"):
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
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_pool_makes_the_next_network_after_the_create_not_during_it(tmp_path: Path) -> None:
    """A network taken from a pool that still has one ready is not replaced for ``SETTLE``
    seconds (made at once it ran beside the create's first steps and slowed them); an emptied
    pool is refilled without waiting for that."""
    from sandbox.network.pool import SETTLE, Networks

    def wait_for(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    with own_namespace("settle"):
        nets = Networks(tmp_path, pool_size=2)
        nets.start(set())
        try:
            wait_for(lambda: len(nets.ready) == 2, "the pool filled")
            made = nets.made
            t0 = time.monotonic()
            Networks.close_fds(nets.attach("a"))
            time.sleep(SETTLE * 0.6)
            assert nets.made == made and len(nets.ready) == 1  # nothing made while "a" is created
            wait_for(lambda: len(nets.ready) == 2, "refilled after the settle")
            assert time.monotonic() - t0 >= SETTLE
            Networks.close_fds(nets.attach("b"))
            Networks.close_fds(nets.attach("c"))  # the pool is empty now: refilled at once
            t1 = time.monotonic()
            wait_for(lambda: nets.made > made + 1 or bool(nets.making), "an empty pool refilled")
            assert time.monotonic() - t1 < SETTLE
        finally:
            for sid in ("a", "b", "c"):
                nets.release(sid)  # nothing if it has none
            nets.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_an_adopted_sandbox_gets_todays_rules_and_the_protected_set(tmp_path: Path) -> None:
    """A sandbox whose chain an older service left (here: nothing but accept) gets its chain
    made anew from its record when a service adopts it, with the protected set before its
    policy (no VM: a network made, its service closed and started again)."""
    from sandbox.network.nft import run_once
    from sandbox.network.policy import Policy
    from sandbox.network.pool import Networks
    from sandbox.network.protect import Protected

    try:
        with own_namespace("adopt"):
            nets = Networks(tmp_path, pool_size=0)
            nets.start(set())
            Networks.close_fds(nets.attach("a"))
            nets.set_policy("a", Policy(deny_out=["10.9.0.0/16"]))
            slot = nets.slots["a"]
            nets.close()  # the sandbox keeps its network
            run_once(f"flush chain inet cubefs s{slot}\nadd rule inet cubefs s{slot} accept")
            nets = Networks(tmp_path, pool_size=0, protected=Protected(["10.8.0.0/16"]))
            nets.start({"a"})
            chain = run_once(f"list chain inet cubefs s{slot}")
            assert chain.index("@protected") < chain.index("10.9.0.0/16"), chain
            # an open connection to a protected address is cut, not let through as a reply
            assert "ct state established,related ip daddr != @protected accept" in chain, chain
            assert chain.index("ip daddr != @protected accept") < chain.index("reject with tcp reset"), chain
            assert "10.8.0.0/16" in run_once("list set inet cubefs protected")
            nets.release("a")
            nets.close()
            assert "cubefs" not in sh("nft list ruleset") and "cfh" not in sh("ip -br link")
    finally:  # the namespaces of its networks, if a failure left them
        for name in sh("ip netns list").split():
            if name.startswith(Networks(tmp_path).prefix):
                subprocess.run(["ip", "netns", "del", name], check=False)


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


def test_deny_always_takes_addresses_only_and_belongs_to_network(tmp_path: Path) -> None:
    """A bad --deny-always is refused with the entry named before anything starts; names are
    not taken (the gateway matches addresses); IPv6 is taken and left out."""
    from cubefs.errors import UsageError
    from sandbox.network.protect import Protected, host_of, parse_networks

    env = {**os.environ, "CUBEFS_SANDBOX_DIR": str(tmp_path / "sandbox")}
    for args, words in ((["--network", "--deny-always", "etcd.internal"], "'etcd.internal': not a CIDR block"),
                        (["--network", "--deny-always", "10.0.0.0/33"], "'10.0.0.0/33'"),
                        (["--deny-always", "10.0.0.5"], "--deny-always belongs to --network")):
        res = subprocess.run([sys.executable, "-m", "cubefs", "sandbox", "serve", "--api-listen", "127.0.0.1:1",
                              *args], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "sandbox" / "network").exists()  # nothing was started
    assert parse_networks(["10.0.0.5", "10.1.0.0/16 ", "fd00::/8"]) == ["10.0.0.5/32", "10.1.0.0/16"]
    with pytest.raises(UsageError, match="'x': not a CIDR"):
        parse_networks(["x"])
    assert [host_of(a) for a in ("http://10.0.0.5:2379", "10.0.0.11:7000", "https://s3.internal/", "")] == \
        ["10.0.0.5", "10.0.0.11", "s3.internal", None]
    applied: list[list[str]] = []
    p = Protected(["10.0.0.5/32"], "http://10.0.0.6:2379,10.0.0.7:2379", tmp_path, "10.0.0.8:7000")
    p.start(applied.append)
    assert applied[-1] == ["10.0.0.5/32", "10.0.0.6/31", "10.0.0.8/32"]  # collapsed for the interval set
    p.set("node n2", ["10.0.0.4/32"], keep=True)
    p.set("node n2", ["10.0.0.9/32"], keep=True)  # a node's old address stays refused
    assert applied[-1] == ["10.0.0.4/30", "10.0.0.8/31"]
    n = len(applied)
    p.set("node n2", ["10.0.0.9/32"], keep=True)
    assert len(applied) == n  # nothing changed: nothing applied


def test_a_name_that_does_not_resolve_is_looked_up_again_with_a_warning_until_it_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A DNS hiccup at the start (here: the lookups fail) leaves nothing refused for good: each
    rescan looks the failing names up again (--etcd, a template's store, a node joining) with a
    warning naming each, and once they resolve their addresses are in the set; a name that
    resolved is not looked up again (no VM: the lookup is the fault injected, nft is not run)."""
    import logging
    import types

    from sandbox.network import protect

    answers: dict[str, str | None] = {"etcd.internal": None, "s3.internal": None, "n4.internal": None}
    asked: list[str] = []

    def getaddrinfo(host: str, *_args: object) -> list[tuple[object, ...]]:
        asked.append(host)
        if answers.get(host) is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]

    monkeypatch.setattr(protect, "socket", types.SimpleNamespace(getaddrinfo=getaddrinfo, AF_INET=socket.AF_INET,
                                                                 SOCK_STREAM=socket.SOCK_STREAM))
    for key in protect.STORE_ENV:
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.json").write_text(json.dumps({"store": {"s3_endpoint": "http://s3.internal:8333"}}))
    caplog.set_level(logging.WARNING, logger="cubefs.sandbox.network")
    applied: list[list[str]] = []
    p = protect.Protected(["10.0.0.1/32"], "http://etcd.internal:2379", tmp_path, "[fd00::8]:7000")
    p.start(applied.append)
    p.set_hosts("node n4", ["n4.internal"], keep=True)
    assert applied[-1] == ["10.0.0.1/32"] and p.unresolved() == ["etcd.internal", "n4.internal", "s3.internal"]

    def warned(host: str) -> int:
        return sum(f"cannot resolve {host} to refuse it" in r.getMessage() for r in caplog.records)

    assert [warned(h) for h in ("etcd.internal", "s3.internal", "n4.internal")] == [1, 1, 1]
    p.rescan()  # still failing: asked again, warned again
    assert [warned(h) for h in ("etcd.internal", "s3.internal", "n4.internal")] == [2, 2, 2]
    assert applied[-1] == ["10.0.0.1/32"]
    answers.update({"etcd.internal": "10.0.0.6", "s3.internal": "10.0.0.7", "n4.internal": "10.0.0.9"})
    p.rescan()
    assert applied[-1] == ["10.0.0.1/32", "10.0.0.6/31", "10.0.0.9/32"] and p.unresolved() == []
    n = len(asked)
    p.rescan()
    assert len(asked) == n and "fd00::8" not in asked  # resolved names kept; an address is never looked up
    assert [warned(h) for h in ("etcd.internal", "s3.internal", "n4.internal")] == [2, 2, 2]
