"""The peer port serves members of the cluster only, only chunks of its store's
images, and only so much per request (issue 12, part 1).  A real ``cubefs serve
--listen`` on a ``file://`` store, its disk cache warmed by a real mount; the
requests are the attacker's, made by hand."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_ports, mounted, run_cubefs
from test_peers import SECRET, node_daemon, secret_file, signed

from cubefs.cache.peers import (
    MISSING,
    OK,
    PATH,
    RESPONSE,
    PeerProtocolError,
    check_response,
    encode_request,
    request_mac,
    response_mac,
)
from cubefs.format.image import F_MODE
from cubefs.format.packs import ChunkLocation, locate
from cubefs.node.peer_server import MAX_FETCH_BYTES, parse_listen

SHADOW = b"root:$y$j9T$made.up.hash:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n"


@dataclass
class Node:
    port: int
    store: str
    locations: dict[str, list[ChunkLocation]]  # file -> its chunks' locations

    def stats(self) -> dict:  # type: ignore[type-arg]
        status, _h, body = signed(self.port, "GET", "/stats")
        assert status == 200
        return json.loads(body)


def _locations(store: str, ref: str) -> dict[str, list[ChunkLocation]]:
    from cubefs.image.catalog import load_image, load_manifest
    from cubefs.remote import store_session

    with store_session(store) as (loop, st):
        image, cmap = loop.run(load_image(st, loop.run(load_manifest(st, ref))))
    out = {}
    for path, ino in image.walk():
        if stat.S_ISREG(image.record(ino)[F_MODE]):
            out[path.decode()] = [locate(image, cmap, i) for i in image.extents(ino)[1]]
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("peer-auth")
    (tmp / "src" / "etc").mkdir(parents=True)
    (tmp / "src" / "etc" / "shadow").write_bytes(SHADOW)
    (tmp / "src" / "big").write_bytes(os.urandom(40 * 1024 * 1024))
    store = f"file://{tmp / 'store'}"
    run_cubefs("build", str(tmp / "src"), "--tag", "app:1", "--store", store)
    port = free_ports(1)[0]
    with node_daemon(tmp, "n1", store, "", port):
        # A member's mount reads the file through the node: now it is in the node's disk cache.
        with mounted("app:1", tmp / "mnt", store, tmp / "cache-mount", "--peers", f"127.0.0.1:{port}",
                     "--peer-secret", secret_file(tmp)) as m:
            assert (tmp / "mnt" / "etc" / "shadow").read_bytes() == SHADOW
            assert m.stats()["tiers"]["peers"]["hits"] >= 1
        yield Node(port, f"file://{tmp / 'store'}", _locations(store, "app:1"))


def _raw(port: int, head: str, body: bytes) -> bytes:
    """A request as an attacker writes it; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode() + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _records(body: bytes) -> list[tuple[bytes, int, bytes]]:
    out, pos = [], 0
    while pos < len(body):
        digest, status, _codec, _plain, n = RESPONSE.unpack_from(body, pos)
        pos += RESPONSE.size
        out.append((digest, status, body[pos : pos + n]))
        pos += n
    return out


def test_the_shadow_digest_request_gets_nothing(node: Node) -> None:
    """Issue 12's 113-byte request: the SHA-256 of /etc/shadow, a made-up pack, offset
    0.  On the old main it returned the plaintext from the disk cache."""
    digest = hashlib.sha256(SHADOW).digest()
    fake = ChunkLocation(digest, "ab" * 32, 0, len(SHADOW), len(SHADOW), 0)
    body = encode_request([fake])
    answer = _raw(node.port, f"POST {PATH} HTTP/1.1\r\nhost: x\r\nx-cubefs-store: {node.store}\r\n"
                  f"content-length: {len(body)}\r\n\r\n", body)
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(b"content-length: 0\r\nconnection: close\r\n\r\n")
    assert SHADOW not in answer and b"root:" not in answer

    # Signed with a wrong secret: refused too.
    status, headers, got = signed(node.port, "POST", PATH, body, node.store, secret=b"w" * 40)
    assert (status, got) == (403, b"") and "x-cubefs-mac" not in headers

    # A member of the cluster naming a chunk no pack index of the store lists: "missing".
    status, headers, got = signed(node.port, "POST", PATH, body, node.store)
    assert status == 200 and _records(got) == [(digest, MISSING, b"")]

    # The same member naming the chunk where the store has it: served (the test can fail).
    real = node.locations["/etc/shadow"][0]
    status, _h, got = signed(node.port, "POST", PATH, encode_request([real]), node.store)
    assert status == 200 and [(d, s) for d, s, _b in _records(got)] == [(digest, OK)]
    stats = node.stats()["peer_requests"]
    assert stats["refused_unauthenticated"] >= 1 and stats["refused_bad_mac"] >= 1
    assert stats["chunks_not_indexed"] >= 1


def test_a_wrong_store_is_a_bare_409(node: Node) -> None:
    body = encode_request([node.locations["/etc/shadow"][0]])
    status, _h, got = signed(node.port, "POST", PATH, body, "s3://someone-elses-bucket")
    assert (status, got) == (409, b"")
    # Unsigned, the store is not even compared.
    answer = _raw(node.port, f"POST {PATH} HTTP/1.1\r\nx-cubefs-store: s3://x\r\ncontent-length: {len(body)}"
                  "\r\n\r\n", body)
    assert answer.startswith(b"HTTP/1.1 401 ")
    store_dir = node.store.removeprefix("file://").encode()
    for path in ("/stats", "/metrics", "/nothing"):
        answer = _raw(node.port, f"GET {path} HTTP/1.1\r\n\r\n", b"")
        assert answer.startswith(b"HTTP/1.1 401 ") and store_dir not in answer, path


def test_replayed_stale_and_tampered_requests_are_refused(node: Node) -> None:
    body = encode_request([node.locations["/etc/shadow"][0]])
    when, nonce = str(int(time.time())), os.urandom(16).hex()
    auth = {"x-cubefs-time": when, "x-cubefs-nonce": nonce,
            "x-cubefs-mac": request_mac(SECRET, "POST", PATH, node.store, when, nonce, body)}
    status, headers, got = signed(node.port, "POST", PATH, body, node.store, auth=auth)
    assert status == 200
    check_response(SECRET, nonce, status, headers, got)  # the answer is bound to our nonce...
    with pytest.raises(PeerProtocolError):
        check_response(SECRET, os.urandom(16).hex(), status, headers, got)  # ...and no other
    with pytest.raises(PeerProtocolError):
        check_response(SECRET, nonce, status, {"x-cubefs-mac": response_mac(SECRET, nonce, 200, b"")}, got)

    assert signed(node.port, "POST", PATH, body, node.store, auth=auth)[:3:2] == (403, b"")  # replayed

    old = str(int(time.time()) - 120)
    stale = {"x-cubefs-time": old, "x-cubefs-nonce": nonce[::-1],
             "x-cubefs-mac": request_mac(SECRET, "POST", PATH, node.store, old, nonce[::-1], body)}
    assert signed(node.port, "POST", PATH, body, node.store, auth=stale)[0] == 403

    other = encode_request([node.locations["/big"][0]])  # the MAC covers the body
    fresh = {**auth, "x-cubefs-nonce": os.urandom(16).hex()}
    fresh["x-cubefs-mac"] = request_mac(SECRET, "POST", PATH, node.store, when, fresh["x-cubefs-nonce"], body)
    assert signed(node.port, "POST", PATH, other, node.store, auth=fresh)[0] == 403
    counts = node.stats()["peer_requests"]
    assert counts["refused_replayed"] >= 1 and counts["refused_stale"] >= 1


def test_made_up_digests_at_real_offsets_cost_no_store_read(node: Node) -> None:
    """Issue 12: one 324 KiB request of made-up digests at real pack offsets made a
    node read 111 MiB from the store in 2,055 GETs."""
    real = node.locations["/big"]
    fakes = [ChunkLocation(os.urandom(32), r.pack, r.offset, r.stored_len, r.plain_len, r.codec) for r in real]
    fakes = (fakes * (1024 // len(fakes) + 1))[:1024]
    before = node.stats()
    status, _h, got = signed(node.port, "POST", PATH, encode_request(fakes), node.store)
    after = node.stats()
    assert status == 200 and all(s == MISSING for _d, s, _b in _records(got))
    assert after["tiers"]["store"]["requests"] == before["tiers"]["store"]["requests"]
    packs = {r.pack for r in real}
    assert after["peer_requests"]["index_reads"] - before["peer_requests"]["index_reads"] <= len(packs)


def test_one_request_fetches_at_most_the_cap_from_the_store(node: Node) -> None:
    real = node.locations["/big"]
    assert sum(r.stored_len for r in real) > 2 * MAX_FETCH_BYTES
    before = node.stats()
    status, _h, got = signed(node.port, "POST", PATH, encode_request(real), node.store)
    after = node.stats()
    records = _records(got)
    assert status == 200 and len(records) == len(real)
    sent = [d for d, s, _b in records if s == OK]
    assert 0 < len(sent) < len(real)
    fetched = after["tiers"]["store"]["bytes"] - before["tiers"]["store"]["bytes"]
    assert fetched <= MAX_FETCH_BYTES + 1024 * 1024, fetched  # + a merged range's gap (cached chunks)
    assert after["peer_requests"]["chunks_over_budget"] > before["peer_requests"]["chunks_over_budget"]
    # Too many records in one request: refused from its length, before its body is read.
    try:
        status, _h, got = signed(node.port, "POST", PATH, encode_request(real * 30), node.store)
        assert (status, got) == (400, b"")
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert node.stats()["peer_requests"]["bad_requests"] >= 1


def test_the_secret_file(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "CUBEFS_PEER_SECRET_FILE": ""}
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--listen", str(port), "--socket",
                             str(tmp_path / "s.sock"), "--cache-dir", str(tmp_path / "cache"), "--store",
                             f"file://{tmp_path / 'store'}"], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        path = tmp_path / "config" / "cubefs" / "peer-secret"
        deadline = time.monotonic() + 30
        while not (path.exists() and path.stat().st_size):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        secret = path.read_bytes().strip()
        assert len(secret) == 64
        deadline = time.monotonic() + 30
        while True:  # up, on loopback (a bare port), and answering its own secret's holders
            try:
                status, _h, _b = signed(port, "GET", "/stats", secret=secret)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert parse_listen("8777") == ("127.0.0.1", 8777) and parse_listen(":8777") == ("127.0.0.1", 8777)

    loose = tmp_path / "loose"
    loose.write_bytes(b"x" * 64)
    loose.chmod(0o644)
    (tmp_path / "mnt").mkdir()
    res = run_cubefs("mount", "app:1", str(tmp_path / "mnt"), "--store", f"file://{tmp_path / 'store'}",
                     "--peers", f"127.0.0.1:{port}", "--peer-secret", str(loose), check=False)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"cubefs: peer secret {loose} is open to others (mode 0644): chmod 600 {loose}")
    res = run_cubefs("mount", "app:1", str(tmp_path / "mnt"), "--store", f"file://{tmp_path / 'store'}",
                     "--peers", f"127.0.0.1:{port}", "--peer-secret", str(tmp_path / "none"), check=False)
    assert res.returncode == 3 and "no peer secret at" in res.stderr and len(res.stderr.splitlines()) == 1

