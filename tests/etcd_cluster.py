"""A real etcd (Debian's ``etcd-server``) for tests: one or three members on loopback.

Each member gets free ports, its own data dir under the test's tmp dir and short
heartbeat/election timings (50/250 ms: a three-member cluster elects a new leader
within about half a second of losing one), so fault tests stay fast.  Members
can be stopped (SIGTERM), killed (SIGKILL) and started again on the same ports
and data dir; :meth:`EtcdCluster.close` leaves no process behind.

Not a test file: test modules import the fixtures ``etcd1`` and ``etcd3``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_ports

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    scheme: str = "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, started and healthy on return.  With ``tls``
    clients speak https to a certificate of a CA made here (``ca_file``)."""

    def __init__(self, root: Path, size: int = 1, tls: bool = False) -> None:
        if not os.path.exists(ETCD):
            pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
        root.mkdir(parents=True, exist_ok=True)
        self.tls_args: list[str] = []
        self.ca_file: str | None = None
        if tls:
            self.ca_file = str(make_certs(root))
            self.tls_args = ["--cert-file", str(root / "server.pem"), "--key-file", str(root / "server.key")]
        ports = free_ports(2 * size)
        self.members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}.etcd", root / f"m{i}.log",
                   scheme="https" if tls else "http")
            for i in range(size)
        ]
        self.initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        try:
            for m in self.members:
                self._spawn(m, "new")
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _spawn(self, m: Member, state: str) -> None:
        log = open(m.log, "ab")
        m.proc = subprocess.Popen(
            [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
             "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
             "--initial-cluster", self.initial, "--initial-cluster-state", state,
             "--initial-cluster-token", "cubefs-test",
             "--heartbeat-interval", "50", "--election-timeout", "250",
             "--logger", "zap", "--log-outputs", "stderr", *self.tls_args],
            stdout=log, stderr=log, start_new_session=True)
        log.close()

    def member(self, m: int | Member) -> Member:
        return self.members[m] if isinstance(m, int) else m

    def stop(self, m: int | Member, sig: int = signal.SIGTERM) -> None:
        """Stop a member (SIGTERM: etcd shuts down cleanly) and wait for it."""
        member = self.member(m)
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(sig)
            try:
                member.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait(timeout=15)
        member.proc = None

    def kill(self, m: int | Member) -> None:
        self.stop(m, signal.SIGKILL)

    def start(self, m: int | Member, wait: bool = True) -> None:
        """Start a stopped member again (same ports, same data dir)."""
        member = self.member(m)
        if member.proc is None:
            self._spawn(member, "existing")
        if wait:
            self.wait_healthy([member])

    def wait_healthy(self, members: list[Member] | None = None, timeout: float = 30.0) -> None:
        """Until every member in ``members`` (default: all running) says it is healthy
        (it has a leader and answers a linearizable read)."""
        deadline = time.monotonic() + timeout
        for m in members or [m for m in self.members if m.proc is not None]:
            while True:
                try:
                    with urllib.request.urlopen(f"{m.endpoint}/health", timeout=2, context=self._ssl()) as resp:
                        if json.loads(resp.read()).get("health") == "true":
                            break
                except OSError:
                    pass
                if m.proc is None or m.proc.poll() is not None:
                    raise AssertionError(f"etcd {m.name} exited; see {m.log}:\n{m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd {m.name} not healthy in {timeout}s; see {m.log}")
                time.sleep(0.05)

    def leader(self) -> int:
        """The index of the member that leads now (as the running members see it)."""
        for m in self.members:
            if m.proc is None:
                continue
            req = urllib.request.Request(f"{m.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=5, context=self._ssl()) as resp:
                status = json.loads(resp.read())
            ids = {self._member_id(j): j for j, other in enumerate(self.members) if other.proc is not None}
            return ids[str(status["leader"])]
        raise AssertionError("no member is running")

    def _member_id(self, i: int) -> str:
        req = urllib.request.Request(f"{self.members[i].endpoint}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5, context=self._ssl()) as resp:
            return str(json.loads(resp.read())["header"]["member_id"])

    def etcdctl(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run Debian's etcdctl against the running members."""
        live = ",".join(m.endpoint for m in self.members if m.proc is not None)
        cmd = [ETCDCTL, "--endpoints", live, *(["--user", user] if user else []),
               *(["--cacert", self.ca_file] if self.ca_file else []), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
        if check and res.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} exited {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def _ssl(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None

    def close(self) -> None:
        for m in self.members:
            self.stop(m)


def make_certs(root: Path) -> Path:
    """A CA (``ca.pem``) and a server certificate for 127.0.0.1 signed by it, with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=cubefs test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return root / "ca.pem"


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", 1)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", 3)
    try:
        yield cluster
    finally:
        cluster.close()
