"""Ingress through the sandbox proxy as its users see it: a WebSocket server started in a
sandbox with the stock E2B SDK, reached at ``sandbox.get_host(port)`` (Host
``PORT-ID.DOMAIN``) or with the E2B headers, with aiohttp's client.  Frames go both ways
untouched (text, 1 MiB binary, pings from either side, close codes), ten sockets at once;
a port nothing listens on is 502 "port is not open"; a sandbox killed under open sockets
closes them at once and leaves the service as it was; plain HTTP still goes through.

The guest's server is a few lines of python3's stdlib (the image has no WebSocket
library): it is a peer, not the thing under test, so it only does what the tests ask.
One service, one template (one TCG boot), one shared sandbox; the kill test makes its own."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_sandbox_service import Node, node_in

PORT = 8765
SERVER = r'''
import base64, hashlib, os, socket, struct, sys, threading, time
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def exact(c, n):
    b = bytearray()
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return bytes(b)

def send(c, op, data):
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack(">Q", n)
    c.sendall(head + data)

def frame(c):
    b0, b1 = exact(c, 2)
    n = b1 & 127
    if n == 126:
        n = struct.unpack(">H", exact(c, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(c, 8))[0]
    mask = exact(c, 4) if b1 & 128 else bytes(4)
    data = exact(c, n)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return b0 & 15, data

def serve(c):
    with c:
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(4096)
            if not d:
                return
            req += d
        key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")]
        if not key:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nnot a socket")
            return
        accept = base64.b64encode(hashlib.sha1(key[0] + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        try:
            while True:
                op, data = frame(c)
                if op == 1 and data.startswith(b"close "):
                    code = int(data.split()[1])
                    send(c, 8, struct.pack(">H", code) + b"asked to")
                    frame(c)  # the client's answer
                    return
                if op == 1 and data.startswith(b"hold "):
                    time.sleep(float(data.split()[1]))  # reads nothing meanwhile
                    continue
                if op == 1 and data.startswith(b"flood "):
                    block = os.urandom(1 << 20)
                    for i in range(int(data.split()[1])):
                        send(c, 2, block)
                        with open("/tmp/flood.sent", "w") as f:
                            f.write(str(i + 1))
                    continue
                if op == 1 and data == b"ping me":
                    send(c, 9, b"are you there")
                    op, data = frame(c)
                    send(c, 1, b"got %d %s" % (op, data))
                elif op == 1:
                    send(c, 1, data.upper())
                elif op == 2:
                    send(c, 2, hashlib.sha256(data).digest() + data[::-1])
                elif op == 9:
                    send(c, 10, data)
                elif op == 8:
                    send(c, 8, data[:2])
                    return
        except (EOFError, OSError):
            return

srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


@pytest.fixture(scope="module")
def node(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from node_in(tmp_path_factory.mktemp("ingress"), rootfs)


def start_server(sbx: Any) -> None:
    """The WebSocket server in the sandbox, in the background; returns once it listens."""
    sbx.files.write("/tmp/ws_echo.py", SERVER)
    sbx.commands.run(f"python3 /tmp/ws_echo.py {PORT}", background=True)
    sbx.commands.run(f"for i in $(seq 300); do (echo > /dev/tcp/127.0.0.1/{PORT}) 2>/dev/null && exit 0; "
                     "sleep 0.1; done; exit 1", timeout=60)


@pytest.fixture(scope="module")
def sandbox(node: Node) -> Iterator[Any]:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    try:
        start_server(sbx)
        yield sbx
    finally:
        sbx.kill()


def by_host(node: Node, sbx: Any, port: int = PORT) -> tuple[str, dict[str, str]]:
    """The proxy's URL and the Host the SDK's ``get_host`` names (no DNS for it here)."""
    host = sbx.get_host(port)
    assert host.startswith(f"{port}-{sbx.sandbox_id}."), host
    return f"http://127.0.0.1:{node.proxy_port}/", {"Host": host}


def by_headers(node: Node, sbx: Any, port: int = PORT) -> tuple[str, dict[str, str]]:
    return f"http://127.0.0.1:{node.proxy_port}/", {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_text_binary_pings_and_close_codes_through_get_host(node: Node, sandbox: Any) -> None:
    url, headers = by_host(node, sandbox)

    async def go() -> None:
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(url, headers=headers, autoping=False, max_msg_size=0) as ws:
            await ws.send_str("hello sandbox")
            assert (await ws.receive()).data == "HELLO SANDBOX"
            big = os.urandom(1 << 20)
            await ws.send_bytes(big)
            got = await ws.receive()
            assert got.type == aiohttp.WSMsgType.BINARY
            assert got.data == hashlib.sha256(big).digest() + big[::-1]
            await ws.ping(b"client ping")  # the guest's pong comes back as sent
            got = await ws.receive()
            assert (got.type, got.data) == (aiohttp.WSMsgType.PONG, b"client ping")
            await ws.send_str("ping me")  # the guest pings; our pong reaches it
            got = await ws.receive()
            assert (got.type, got.data) == (aiohttp.WSMsgType.PING, b"are you there")
            await ws.pong(got.data)
            assert (await ws.receive()).data == "got 10 are you there"
            await ws.send_str("close 4001")  # the guest closes with its code
            got = await ws.receive()
            assert (got.type, got.data, got.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "asked to")
            await ws.close()
            assert ws.close_code == 4001

    run(go())


def test_ten_sockets_at_once_with_the_e2b_headers_and_a_client_close(node: Node, sandbox: Any) -> None:
    url, headers = by_headers(node, sandbox)

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[str, bytes]:
        async with s.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            await ws.send_str(f"socket {i}")
            text = (await ws.receive()).data
            data = os.urandom(256 << 10)
            await ws.send_bytes(data)
            digest = (await ws.receive()).data[:32]
            assert digest == hashlib.sha256(data).digest()
            await ws.close(code=4002)  # the guest echoes our code
            assert ws.close_code == 4002
            return text, digest

    async def go() -> list[tuple[str, bytes]]:
        async with aiohttp.ClientSession() as s:
            return list(await asyncio.gather(*(one(s, i) for i in range(10))))

    got = run(go())
    assert [text for text, _ in got] == [f"SOCKET {i}" for i in range(10)]


def test_a_port_nothing_listens_on_is_502_port_is_not_open(node: Node, sandbox: Any) -> None:
    url, headers = by_host(node, sandbox, 8766)

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(url, headers=headers)
            assert err.value.status == 502
            async with s.get(url, headers=headers) as resp:
                assert resp.status == 502
                assert "port is not open" in (await resp.json())["message"]

    run(go())


def test_plain_http_still_goes_through_and_a_declined_upgrade_is_an_answer(node: Node, sandbox: Any) -> None:
    sandbox.files.write("/tmp/www/hello.txt", "hello through the proxy\n")
    sandbox.commands.run("cd /tmp/www && python3 -m http.server 8080", background=True)
    url, headers = by_host(node, sandbox, 8080)

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(url + "hello.txt", headers=headers) as resp:
                    if resp.status == 200:
                        assert await resp.text() == "hello through the proxy\n"
                        break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the sandbox's http.server never answered through the proxy")
            # an Upgrade the guest's server ignores: its ordinary answer comes back
            async with s.get(url + "hello.txt", headers={**headers, "Connection": "Upgrade",
                                                         "Upgrade": "websocket"}) as resp:
                assert resp.status == 200 and await resp.text() == "hello through the proxy\n"
            # an Upgrade the proxy does not relay as bytes (h2c, tcp): a plain request to the guest
            for proto in ("h2c", "tcp"):
                async with s.get(url + "hello.txt", headers={**headers, "Connection": "Upgrade",
                                                             "Upgrade": proto}) as resp:
                    assert resp.status == 200 and await resp.text() == "hello through the proxy\n"
            # and the connection still serves plain requests after it
            async with s.get(url + "hello.txt", headers=headers) as resp:
                assert resp.status == 200

    run(go())


def test_a_sandbox_without_public_traffic_asks_for_its_traffic_token(node: Node, sandbox: Any) -> None:
    """``network={"allow_public_traffic": False}`` (E2B's "restrict public access"): its ports
    answer 403 without ``e2b-traffic-access-token``, or with a wrong one (its envd token too:
    the two differ), WebSocket upgrades included; with it, they answer.  The module's public
    sandbox still needs nothing, and envd is untouched (the SDK drives the restricted one)."""
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert token and token != sbx._envd_access_token, "the traffic token is its own"
        start_server(sbx)  # envd (commands, files) works with the envd token alone
        url, headers = by_host(node, sbx)
        public_url, public_headers = by_host(node, sandbox)

        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                for given in ({}, {"e2b-traffic-access-token": "nope"},
                              {"e2b-traffic-access-token": sbx._envd_access_token}):
                    async with s.get(url, headers={**headers, **given}) as resp:
                        doc = await resp.json()
                        assert resp.status == 403 and doc["sandboxId"] == sbx.sandbox_id, doc
                        assert "e2b-traffic-access-token" in doc["message"], doc
                    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                        await s.ws_connect(url, headers={**headers, **given})
                    assert refused.value.status == 403
                async with s.get(url, headers={**headers, "e2b-traffic-access-token": token}) as resp:
                    assert resp.status == 200 and await resp.text() == "not a socket"
                async with s.ws_connect(url, headers={**headers, "e2b-traffic-access-token": token}) as ws:
                    await ws.send_str("let me in")
                    assert (await ws.receive()).data == "LET ME IN"
                async with s.ws_connect(public_url, headers=public_headers) as ws:  # the public one: no token
                    await ws.send_str("open")
                    assert (await ws.receive()).data == "OPEN"

        run(go())
    finally:
        sbx.kill()


def service_rss_mib(node: Node) -> float:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_backpressure_holds_both_ways(node: Node, sandbox: Any) -> None:
    """A client that does not read stops the guest's server from sending (it has not sent
    everything a while later) and the service does not hold what it could not pass on; a
    guest that does not read stops the client's sends the same way."""
    url, headers = by_host(node, sandbox)
    total = 64

    async def go() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            rss0 = service_rss_mib(node)
            # guest -> client: we read nothing for a while
            await ws.send_str(f"flood {total}")
            await asyncio.sleep(8)
            sent = int(sandbox.commands.run("cat /tmp/flood.sent").stdout or 0)
            assert sent <= 40, sent  # the guest is held: at most the buffers and windows on the way are in flight
            assert service_rss_mib(node) - rss0 < 24
            for _ in range(total):
                got = await ws.receive()
                assert got.type == aiohttp.WSMsgType.BINARY and len(got.data) == 1 << 20
            # client -> guest: the guest reads nothing for a while
            await ws.send_str("hold 8")
            blocks = [os.urandom(4 << 20) for _ in range(12)]

            async def send_all() -> None:
                for b in blocks:
                    await ws.send_bytes(b)
            async def receive_all() -> list[bytes]:  # the echoes come while we still send
                return [(await ws.receive()).data[:32] for _ in blocks]
            sending = asyncio.create_task(send_all())
            receiving = asyncio.create_task(receive_all())
            await asyncio.sleep(5)
            assert not sending.done()  # held: 48 MiB did not all go out while nobody read
            assert service_rss_mib(node) - rss0 < 24
            await sending
            assert await receiving == [hashlib.sha256(b).digest() for b in blocks]

    run(go())


def test_a_paused_clients_socket_tells_when_the_client_has_gone() -> None:
    """What the relay asks the kernel while it has stopped reading a client (its bytes wait for
    the guest's credit): asyncio reads nothing then and never sees the client go, so a relay
    whose guest does not read would outlive its client.  A reset client (state CLOSE) and one
    that closed with nothing left to send (CLOSE_WAIT) are gone; a connected one is not."""
    import socket
    import struct

    from sandbox.relay import _peer_closed

    server = socket.create_server(("127.0.0.1", 0))
    try:
        for how in ("alive", "fin", "reset"):
            client = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
            with peer:
                if how == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if how != "alive":
                    client.close()
                deadline = time.monotonic() + 5
                while _peer_closed(peer) != (how != "alive") and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _peer_closed(peer) == (how != "alive"), how
            client.close()
    finally:
        server.close()


def test_connect_is_refused_and_the_service_answers_on(node: Node, sandbox: Any) -> None:
    """CONNECT (a tunnel) to a sandbox port whose server answers 200 to anything: refused, not
    a relay that h11 would wait on forever with the service's event loop spinning."""
    async def go() -> None:
        host = sandbox.get_host(PORT)
        # authority-form (what proxies get) and origin-form: aiohttp 3.14's router gives CONNECT
        # no route (404); the proxy's own guard answers 405 should one ever reach it
        for target in ("example.com:443", "/"):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.proxy_port)
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 20)
            assert status.split()[1] in (b"404", b"405"), (target, status)
            writer.close()
        url, headers = by_host(node, sandbox)
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
            assert resp.status == 200 and await resp.text() == "not a socket"

    run(go())


def service_fds(node: Node) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def test_a_sandbox_killed_under_open_sockets_closes_them_at_once_and_leaks_nothing(node: Node) -> None:
    from e2b import Sandbox

    async def open_sockets(sbx: Any, n: int) -> tuple[aiohttp.ClientSession, list[Any]]:
        url, headers = by_host(node, sbx)
        s = aiohttp.ClientSession()
        sockets = [await s.ws_connect(url, headers=headers) for _ in range(n)]
        for ws in sockets:
            await ws.send_str("up")
            assert (await ws.receive()).data == "UP"
        return s, sockets

    def cycle(n: int) -> float:
        """A sandbox with ``n`` sockets open, killed; how long until every client saw it close."""
        sbx = Sandbox.create(timeout=300)
        start_server(sbx)

        async def go() -> float:
            s, sockets = await open_sockets(sbx, n)
            try:
                t0 = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, sbx.kill)
                for ws in sockets:
                    got = await asyncio.wait_for(ws.receive(), 10)
                    assert got.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE,
                                        aiohttp.WSMsgType.ERROR), got
                return time.monotonic() - t0
            finally:
                await s.close()

        return float(run(go()))

    cycle(1)  # warms what stays (the SDK's keep-alive connections)
    before = service_fds(node)
    took = cycle(5)
    assert took < 10, took
    deadline = time.monotonic() + 10
    while service_fds(node) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service_fds(node) == before


def test_a_service_stopped_under_an_open_socket_closes_it_at_once(node: Node, sandbox: Any) -> None:
    """aiohttp waits up to its shutdown timeout for running handlers, and an upgraded
    connection's handler runs as long as its socket: the proxy closes those at shutdown, so
    the client sees the close at once.  (The whole stop took ~47 s here with the socket
    closed first too: what holds it is not this relay.)"""
    url, headers = by_host(node, sandbox)

    async def go() -> float:
        async with aiohttp.ClientSession() as s, s.ws_connect(url, headers=headers) as ws:
            await ws.send_str("before")
            assert (await ws.receive()).data == "BEFORE"
            t0 = time.monotonic()
            stopping = asyncio.get_running_loop().run_in_executor(None, node.stop)
            got = await asyncio.wait_for(ws.receive(), 30)
            took = time.monotonic() - t0
            assert got.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR), got
            await stopping
            return took

    try:
        assert run(go()) < 10
    finally:
        node.start()  # the module's teardown stops it again


HOST_ECHO = r'''
import http.server, ssl, sys, threading

class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        tls = int(isinstance(self.connection, ssl.SSLSocket))
        body = ("host=%s path=%s tls=%d" % (self.headers["Host"], self.path, tls)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

for port in sys.argv[2:]:
    plain = http.server.ThreadingHTTPServer(("0.0.0.0", int(port)), Echo)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
tls = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Echo)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("/tmp/cert.pem", "/tmp/key.pem")
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
tls.serve_forever()
'''


def test_https_ports_and_a_masked_host_as_asked_at_create(node: Node, tmp_path: Path) -> None:
    """``network={"https_ports": [8443], "mask_request_host": "${PORT}-app.example.test"}``: a
    server in the sandbox speaking TLS itself with a self-signed certificate answers through
    the proxy (the client speaks plain HTTP to the proxy, as to every port here), a plain one
    on another port still does, and both see the Host their owner chose; ``get_info`` shows
    the settings; what the node cannot do is refused, not ignored."""
    import subprocess

    from e2b import Sandbox

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=app",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    sbx = Sandbox.create(timeout=300, network={"https_ports": [8443, 8081],
                                               "mask_request_host": "${PORT}-app.example.test"})
    try:
        for name in ("cert.pem", "key.pem"):
            sbx.files.write(f"/tmp/{name}", (tmp_path / name).read_text())
        sbx.files.write("/tmp/echo.py", HOST_ECHO)
        sbx.commands.run("python3 /tmp/echo.py 8443 8080 8081 >/tmp/echo.log 2>&1", background=True)
        up = sbx.commands.run("for i in $(seq 1200); do (echo > /dev/tcp/127.0.0.1/8443) 2>/dev/null && exit 0; "
                              "sleep 0.1; done; cat /tmp/echo.log; exit 1", timeout=180)
        assert up.exit_code == 0, up.stdout

        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                for port, tls in ((8443, 1), (8080, 0)):
                    url, headers = by_host(node, sbx, port)
                    for _ in range(3):  # a new TLS session each time: the relay's connections are one-shot
                        async with s.get(url + "x?y=1", headers=headers) as resp:
                            assert resp.status == 200, await resp.text()
                            assert await resp.text() == f"host={port}-app.example.test path=/x?y=1 tls={tls}"
                # a port listed as HTTPS whose server speaks plain HTTP: a 502 that says so, and the
                # service answers on
                url, headers = by_host(node, sbx, 8081)
                async with s.get(url, headers=headers) as resp:
                    assert resp.status == 502 and "did not speak TLS" in (await resp.json())["message"]

        run(go())
        net = sbx.get_info().network
        assert net is not None and net["https_ports"] == [8081, 8443], net
        assert net["mask_request_host"] == "${PORT}-app.example.test" and net["allow_public_traffic"] is True
    finally:
        sbx.kill()
    for bad, words in (({"egress_proxy": {"address": "proxy.example.test:1080"}}, "egressProxy is not supported"),
                       ({"https_ports": [49983]}, "envd port"), ({"mask_request_host": "a\r\nX-Evil: 1"}, "printable"),
                       ({"dns_servers": ["dns.example.test"]}, "not an IPv4 address")):
        before = live(node)
        with pytest.raises(Exception, match=words):  # the SDK's InvalidArgumentException, with our message
            Sandbox.create(timeout=60, network=bad)
        assert live(node) == before  # nothing made


def live(node: Node) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/health", timeout=30) as resp:
        return int(json.load(resp)["sandboxes"])
