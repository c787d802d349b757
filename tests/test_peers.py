"""Peers: nodes ask the chunk's owner before the store, and survive peers that
die, stall or lie.  Three real node daemons and one real SeaweedFS S3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import S3_ENV, S3Server, free_ports, mounted, run_cubefs

from cubefs.cache.disk import StoredChunk
from cubefs.cache.peers import H_MAC, H_NONCE, decode_request, encode_response, response_mac, sign_request

SECRET = b"0123456789abcdef0123456789abcdef-test"


def secret_file(tmp_path: Path, secret: bytes = SECRET) -> str:
    """The cluster secret every node and mount of a test shares (0600, as required)."""
    path = tmp_path / "peer-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secret)
        os.close(fd)
    return str(path)


def signed(port: int, method: str, path: str, body: bytes = b"", store: str = "", secret: bytes = SECRET,
           auth: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to a node daemon, signed as a member of the cluster would."""
    import http.client

    auth = sign_request(secret, method, path, store, body) if auth is None else auth
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, {"x-cubefs-store": store, **auth})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"lib/m{i:02d}.so": os.urandom(120_000) for i in range(30)}
    files |= {f"py/t{i:02d}.py": (f"# module {i}\n" + "x = 1\n" * 20000).encode() for i in range(10)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


WORKLOAD = [f"lib/m{i:02d}.so" for i in range(0, 30, 2)] + [f"py/t{i:02d}.py" for i in range(0, 10, 3)]


@contextmanager
def node_daemon(tmp_path: Path, name: str, store: str, endpoint: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``cubefs serve --listen`` with its own cache dir and mount-server socket."""
    log = open(tmp_path / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cubefs", "serve", "--listen", f"127.0.0.1:{port}", "--socket",
         str(tmp_path / f"{name}.sock"), "--cache-dir", str(tmp_path / f"cache-{name}"), "--store", store,
         *(["--s3-endpoint", endpoint] if endpoint else []), "--peer-secret", secret_file(tmp_path)],
        stdout=log, stderr=log, env={**os.environ, **S3_ENV}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _node_stats(port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"node {name} did not come up; see {tmp_path / f'{name}.log'}") from None
                time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _node_stats(port: int) -> dict:  # type: ignore[type-arg]
    status, _h, body = signed(port, "GET", "/stats")
    assert status == 200, status
    return json.loads(body)


def _run_workload(mnt: Path, files: dict[str, bytes]) -> None:
    for rel in WORKLOAD:
        assert (mnt / rel).read_bytes() == files[rel], rel


def test_three_nodes_read_each_chunk_from_the_store_about_once(s3: S3Server, tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = s3.store("peers")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store, "--s3-endpoint", s3.endpoint)

    # One node alone, no peers: what a cold start reads from the store.
    with mounted("app:1", tmp_path / "alone", store, tmp_path / "cache-alone", s3_endpoint=s3.endpoint) as m:
        _run_workload(tmp_path / "alone", files)
        alone = m.stats()["tiers"]["store"]["bytes"]
    assert alone > 1_000_000

    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    with node_daemon(tmp_path, "n1", store, s3.endpoint, ports[0]), \
            node_daemon(tmp_path, "n2", store, s3.endpoint, ports[1]), \
            node_daemon(tmp_path, "n3", store, s3.endpoint, ports[2]):
        mount_store_bytes = 0
        shares = []
        for i, name in enumerate(("n1", "n2", "n3")):
            mnt = tmp_path / f"mnt-{name}"
            with mounted("app:1", mnt, store, tmp_path / f"cache-{name}", "--peers", peers,
                         "--peer-secret", secret_file(tmp_path), s3_endpoint=s3.endpoint) as m:
                _run_workload(mnt, files)
                tiers = m.stats()["tiers"]
            mount_store_bytes += tiers["store"]["bytes"]
            misses = tiers["peers"]["hits"] + tiers["store"]["hits"]
            shares.append(tiers["peers"]["hits"] / misses if misses else 1.0)
            if i > 0:
                assert tiers["store"]["requests"] == 0, (name, tiers)
        daemons = [_node_stats(p) for p in ports]
        token = run_cubefs("serve", "--print-metrics-token", "--peer-secret", secret_file(tmp_path)).stdout.strip()
        request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/metrics",
                                         headers={"authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'cubefs_node_requests_total{role="node"' in metrics
        assert 'cubefs_node_refused_bad_mac_total{role="node"' in metrics
        assert 'cubefs_cache_bytes{role="node",store="s3://peers",tier="disk"}' in metrics
    node_store_bytes = sum(d["tiers"]["store"]["bytes"] for d in daemons)
    total = mount_store_bytes + node_store_bytes
    assert total <= 1.3 * alone, (total, alone, [d["peer_requests"] for d in daemons])
    assert shares[1] >= 0.9 and shares[2] >= 0.9, shares
    # Ownership is spread: more than one node served chunks.
    assert sum(d["peer_requests"].get("chunks_asked", 0) > 0 for d in daemons) >= 2, daemons


class _FakePeer:
    """Fault injection beside the real-daemon test: a peer that lies or stalls."""

    def __init__(self, mode: str, secret: bytes = SECRET) -> None:
        self.mode = mode
        self.secret = secret
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    part = conn.recv(65536)
                    if not part:
                        return
                    data += part
                head, _, body = data.partition(b"\r\n\r\n")
                fields = dict(ln.decode().lower().split(": ", 1) for ln in head.split(b"\r\n")[1:])
                length = int(fields["content-length"])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                if self.mode == "stall":
                    time.sleep(30)
                    return
                # Well-formed answers, signed ("lie": a member of the cluster that sends wrong
                # bytes; "forge": one without the secret, sending the right ones).
                refs = decode_request(body)
                payload = encode_response([(r.digest, StoredChunk(0, r.plain_len, os.urandom(r.plain_len)))
                                           for r in refs])
                mac = response_mac(self.secret, fields[H_NONCE.lower()], 200, payload)
                conn.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {len(payload)}\r\n{H_MAC}: {mac}\r\n\r\n"
                             .encode() + payload)

    def close(self) -> None:
        self.sock.close()


def test_dead_stalled_and_lying_peers_cost_time_not_bytes(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store)
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    fakes = (("dead", None), ("stall", _FakePeer("stall")), ("lie", _FakePeer("lie")),
             ("forge", _FakePeer("forge", secret=b"not-the-cluster-secret-0123456789abcdef")))
    for label, peer in fakes:
        address = peer.address if peer else dead
        t0 = time.monotonic()
        with mounted("app:1", tmp_path / f"mnt-{label}", store, tmp_path / f"cache-{label}", "--peers", address,
                     "--peer-timeout", "1", "--peer-secret", secret_file(tmp_path)) as m:
            _run_workload(tmp_path / f"mnt-{label}", files)
            stats = m.stats()
        elapsed = time.monotonic() - t0
        peers = stats["tiers"]["peers"]
        assert stats["read_errors"] == 0
        assert peers["hits"] == 0 and stats["tiers"]["store"]["hits"] > 0, (label, stats["tiers"])
        if label == "lie":
            assert peers["lies"] > 0
        else:
            assert peers["lies"] == 0  # a forged answer is refused whole, before its bytes are looked at
            assert peers["errors"] >= 1
            # Marked down after its first failure: one timeout, not one per read.
            assert elapsed < 20, elapsed
        if label == "stall":
            # Only the requests already in flight when it first timed out (a read and
            # its background neighbours) waited on it; every later read skipped it.
            assert 1 <= peers["timeouts"] <= 3, peers
        if peer:
            peer.close()


def test_a_peer_killed_mid_run(s3: S3Server, tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = s3.store("killed")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store, "--s3-endpoint", s3.endpoint)
    port = free_ports(1)[0]
    with node_daemon(tmp_path, "victim", store, s3.endpoint, port) as proc, \
            mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache", "--peers", f"127.0.0.1:{port}",
                    "--peer-timeout", "2", "--peer-secret", secret_file(tmp_path), s3_endpoint=s3.endpoint) as m:
        half = len(WORKLOAD) // 2
        for rel in WORKLOAD[:half]:
            assert (tmp_path / "mnt" / rel).read_bytes() == files[rel]
        assert m.stats()["tiers"]["peers"]["hits"] > 0
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for rel in WORKLOAD[half:]:
            assert (tmp_path / "mnt" / rel).read_bytes() == files[rel]
        stats = m.stats()
    assert stats["read_errors"] == 0 and stats["tiers"]["peers"]["errors"] >= 1


def test_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cubefs("serve", "--listen", f"127.0.0.1:{port}", "--socket", str(tmp_path / "s.sock"),
                         "--cache-dir", str(tmp_path / "cache"), "--store", f"file://{tmp_path / 'store'}",
                         "--peer-secret", secret_file(tmp_path), check=False, timeout=30)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == f"cubefs: cannot listen on 127.0.0.1:{port}: Address already in use"
    res = run_cubefs("serve", "--listen", "nonsense", "--socket", str(tmp_path / "s.sock"), check=False, timeout=30)
    assert res.returncode == 2 and "HOST:PORT" in res.stderr
