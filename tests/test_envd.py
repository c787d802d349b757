"""envd (sandbox/envd): the Connect codec on its own, then the stock E2B SDK driving ``Envd`` over the
real guest agent in host mode."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import pytest

from sandbox.envd import auth, connect
from sandbox.envd.connect import ConnectError

# -- the codec ---------------------------------------------------------------------------------------


def test_envelope_layout_and_trailer():
    data = connect.envelope({"event": {"start": {"pid": 42}}})
    flags, length = struct.unpack(">BI", data[:5])
    assert flags == 0 and length == len(data) - 5
    assert json.loads(data[5:]) == {"event": {"start": {"pid": 42}}}
    assert connect.end_stream() == b"\x02\x00\x00\x00\x02{}"
    err = connect.end_stream(ConnectError("not_found", "no process 7"))
    assert err[0] == 2 and json.loads(err[5:]) == {"error": {"code": "not_found", "message": "no process 7"}}
    both = data + err
    assert connect.split_envelopes(both) == [(0, {"event": {"start": {"pid": 42}}}), (2, json.loads(err[5:]))]
    with pytest.raises(ConnectError, match="truncated"):
        connect.split_envelopes(both[:-1])


class _Reader:
    """An aiohttp StreamReader stand-in that hands out a byte string in tiny pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readexactly(self, n: int) -> bytes:
        await asyncio.sleep(0)
        if len(self.data) < n:
            partial, self.data = self.data, b""
            raise asyncio.IncompleteReadError(partial, n)
        out, self.data = self.data[:n], self.data[n:]
        return out


async def _collect(data: bytes) -> list:
    return [m async for m in connect.read_envelopes(_Reader(data))]


def test_read_envelopes_streams_messages_and_rejects_bad_ones():
    body = connect.envelope({"start": {"process": {"pid": 3}}}) + connect.envelope({"data": {}})
    assert asyncio.run(_collect(body)) == [{"start": {"process": {"pid": 3}}}, {"data": {}}]
    # an end-of-stream envelope ends the request even with bytes after it
    assert asyncio.run(_collect(connect.envelope({"a": 1}) + connect.end_stream() + b"junk")) == [{"a": 1}]
    with pytest.raises(ConnectError, match="truncated"):
        asyncio.run(_collect(body[:-2]))
    with pytest.raises(ConnectError, match="larger"):
        asyncio.run(_collect(struct.pack(">BI", 0, connect.MAX_MESSAGE + 1)))
    with pytest.raises(ConnectError, match="compressed"):
        asyncio.run(_collect(struct.pack(">BI", 1, 2) + b"{}"))
    with pytest.raises(ConnectError, match="JSON") as e:
        asyncio.run(_collect(struct.pack(">BI", 0, 3) + b"{x}"))
    assert e.value.code == "invalid_argument" and e.value.http_status == 400


def test_json_value_rules():
    # zero values omitted, names camelCased, nested empty messages kept (a set oneof member)
    assert connect.msg(exit_code=0, exited=True, status="exit status 0", error=None) == {
        "exited": True,
        "status": "exit status 0",
    }
    assert connect.msg(exit_code=-1, exited=False, status="signal: killed") == {
        "exitCode": -1,
        "status": "signal: killed",
    }
    assert connect.msg(keepalive={}, symlink_target="", entries=[]) == {"keepalive": {}}
    assert connect.int64(0) is None and connect.int64(1 << 40) == str(1 << 40)
    assert connect.b64(b"hi\n") == "aGkK"
    assert connect.timestamp(0) == "1970-01-01T00:00:00Z"
    assert connect.timestamp(1767225600.25) == "2026-01-01T00:00:00.25Z"
    # reading: either spelling, ints as numbers or strings, bytes in any base64 flavour, enums by name
    m = {"watcherId": "w1", "exit_code": "5", "depth": 3, "stdin": "_-8", "signal": "SIGNAL_SIGKILL"}
    assert connect.get_str(m, "watcher_id") == "w1"
    assert connect.get_int(m, "exit_code") == 5 and connect.get_int(m, "depth") == 3
    assert connect.get_int(m, "missing", 1) == 1
    assert connect.get_bytes(m, "stdin") == b"\xff\xef"
    assert connect.get_bytes({"pty": "aGkK"}, "pty") == b"hi\n"
    assert connect.get_enum(m, "signal", {"SIGNAL_SIGKILL": 9}) == 9
    assert connect.get_enum({"signal": 15}, "signal", {}) == 15
    for bad, getter in [
        ({"depth": "x"}, connect.get_int),
        ({"depth": True}, connect.get_int),
        ({"depth": "!!"}, connect.get_bytes),
        ({"depth": 1}, connect.get_str),
        ({"depth": 1}, connect.get_bool),
        ({"depth": []}, connect.get_obj),
    ]:
        with pytest.raises(ConnectError) as e:
            getter(bad, "depth")
        assert e.value.code == "invalid_argument"
    with pytest.raises(ConnectError, match="unknown signal"):
        connect.get_enum({"signal": "SIGNAL_SIGHUP"}, "signal", {"SIGNAL_SIGKILL": 9})


def test_the_sdk_decodes_what_the_codec_writes():
    """Our JSON through the SDK's own message classes and codec: the fields land where it reads them."""
    from e2b.envd.client_shared import ENVD_JSON_CODEC
    from e2b.envd.filesystem import filesystem_pb
    from e2b.envd.process import process_pb

    end = ENVD_JSON_CODEC.decode(
        json.dumps({"event": {"end": connect.msg(exit_code=-1, status="signal: killed")}}).encode(),
        process_pb.StartResponse,
    )
    assert end.event.event.field == "end"
    assert end.event.event.value.exit_code == -1 and end.event.event.value.status == "signal: killed"
    data = ENVD_JSON_CODEC.decode(
        json.dumps({"event": {"data": {"stdout": connect.b64(b"\xff\x00")}}}).encode(), process_pb.ConnectResponse
    )
    assert data.event.event.value.output.value == b"\xff\x00"
    entry = ENVD_JSON_CODEC.decode(
        json.dumps(
            {
                "entry": connect.msg(
                    name="a",
                    type="FILE_TYPE_FILE",
                    path="/home/user/a",
                    size=connect.int64(5_000_000_000),
                    mode=0o644,
                    permissions="-rw-r--r--",
                    owner="user",
                    group="user",
                    modified_time=connect.timestamp(1767225600.5),
                )
            }
        ).encode(),
        filesystem_pb.StatResponse,
    ).entry
    assert entry.size == 5_000_000_000 and entry.mode == 0o644 and entry.type == filesystem_pb.FileType.FILE
    assert entry.modified_time.seconds == 1767225600 and entry.modified_time.nanos == 500_000_000
    # and what the SDK sends, we read
    req = json.loads(
        ENVD_JSON_CODEC.encode(
            process_pb.SendSignalRequest(
                process=process_pb.ProcessSelector(selector=_oneof("pid", 42)),
                signal=process_pb.Signal.SIGKILL,
            )
        )
    )
    assert connect.get_int(connect.get_obj(req, "process"), "pid") == 42
    assert connect.get_enum(req, "signal", {"SIGNAL_SIGKILL": 9}) == 9


def _oneof(field, value):
    from protobuf import Oneof

    return Oneof(field, value)


def test_error_mapping():
    assert {c: connect.HTTP_STATUS[c] for c in ("not_found", "already_exists", "unauthenticated")} == {
        "not_found": 404,
        "already_exists": 409,
        "unauthenticated": 401,
    }

    class AgentLike(Exception):
        code = "failed_precondition"

    e = connect.as_connect_error(AgentLike("/home/user/d is a directory"))
    assert (e.code, e.http_status, e.message) == ("failed_precondition", 400, "/home/user/d is a directory")
    assert connect.as_connect_error(OSError(28, "No space left on device")).code == "resource_exhausted"
    assert connect.as_connect_error(FileNotFoundError(2, "x")).code == "not_found"
    assert connect.as_connect_error(ValueError("boom")).code == "internal"
    assert ConnectError("bogus", "x").code == "unknown"
    body = json.loads(connect.error_response(ConnectError("not_found", "gone")).body)
    assert body == {"code": "not_found", "message": "gone"}


def test_auth_token_signature_and_user():
    assert auth.token_ok(None, None) and auth.token_ok("t", "t")
    assert not auth.token_ok("t", None) and not auth.token_ok("t", "T")
    from e2b.sandbox.signature import get_signature

    # the SDK's signature and ours agree, with and without an expiration
    assert auth.signature("a.txt", "read", "", "tok", None) == get_signature("a.txt", "read", None, "tok")["signature"]
    sdk = get_signature("/x", "write", "root", "tok", 60)
    assert auth.signature("/x", "write", "root", "tok", sdk["expiration"]) == sdk["signature"]

    class Req:
        def __init__(self, headers=None, query=None):
            self.headers = headers or {}
            self.query = query or {}

    basic = "Basic " + base64.b64encode(b"root:").decode()
    assert auth.basic_user(Req({"Authorization": basic})) == "root"
    assert auth.basic_user(Req()) is None
    with pytest.raises(ConnectError):
        auth.basic_user(Req({"Authorization": "Basic " + base64.b64encode(b"../etc:").decode()}))
    assert auth.files_user(Req({"Authorization": basic}, {"username": "user"})) == "user"
    q = {"path": "/x", "signature": sdk["signature"], "signature_expiration": str(sdk["expiration"])}
    auth.check_files_access(Req({}, q), "tok", "write", "root")
    for op, user in [("read", "root"), ("write", "user")]:
        with pytest.raises(ConnectError) as e:
            auth.check_files_access(Req({}, q), "tok", op, user)
        assert e.value.code == "unauthenticated"
    expired = get_signature("/x", "write", "root", "tok", -10)
    q = {"path": "/x", "signature": expired["signature"], "signature_expiration": str(expired["expiration"])}
    with pytest.raises(ConnectError, match="expired"):
        auth.check_files_access(Req({}, q), "tok", "write", "root")


# -- a stand-in agent, for injecting faults the real one cannot be made to show on demand ------------


class FakeAgentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeProcess:
    def __init__(self, pid: int, events: list) -> None:
        self.pid, self.tag, self._events, self.detached = pid, None, events, False

    async def events(self):
        for event in self._events:
            if event == "hang":
                await asyncio.sleep(3600)
            yield event

    async def detach(self) -> None:
        self.detached = True


class FakeAgent:
    """Only what the fault tests touch: each method fails or answers as the test sets it up."""

    def __init__(self) -> None:
        self.fail: dict[str, FakeAgentError] = {}
        self.procs: dict[int, FakeProcess] = {}
        self.written = 0

    def _check(self, op: str) -> None:
        if op in self.fail:
            raise self.fail[op]

    async def spawn(self, argv, **kw):
        self._check("spawn")
        return self.procs[1]

    async def attach(self, pid=None, tag=None):
        self._check("attach")
        if pid not in self.procs:
            raise FakeAgentError("not_found", f"no process {pid}")
        return self.procs[pid]

    async def stat(self, path, user=None):
        self._check("stat")
        return {"name": "d", "path": "/home/user/d", "type": "dir", "size": 0, "mode": 0o1755,
                "owner": "user", "group": "user", "mtime": 1.5, "symlink_target": None}

    async def write_file(self, path, chunks, user=None, mode=0o644):
        async for data in chunks:
            self.written += len(data)
        self._check("write_file")
        return {"name": "f", "path": "/home/user/f", "type": "file"}

    async def read_file_impl(self, path):
        self._check("read_file")
        yield b"x"

    def read_file(self, path, user=None):
        return self.read_file_impl(path)


def _serve_fake(test, token: str | None = "tok"):
    """Run ``test(client, agent)`` against Envd over a FakeAgent on an aiohttp test server."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sandbox.envd import Envd

    async def main():
        agent = FakeAgent()
        envd = Envd(agent, access_token=token)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", envd.handle)
        async with TestClient(TestServer(app)) as client:
            try:
                await test(client, agent)
            finally:
                await envd.close()

    asyncio.run(main())


STREAM_HEADERS = {"Content-Type": "application/connect+json", "X-Access-Token": "tok"}


async def _read_envelope(resp) -> tuple[int, dict]:
    flags, length = struct.unpack(">BI", await resp.content.readexactly(5))
    return flags, json.loads(await resp.content.readexactly(length))


def test_start_stream_flushes_each_event_and_keeps_alive():
    async def test(client, agent):
        agent.procs[1] = FakeProcess(7, [("stdout", b"hi\n"), "hang"])
        body = connect.envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "x"]}})
        headers = {**STREAM_HEADERS, "Keepalive-Ping-Interval": "0.1"}
        async with client.post("/process.Process/Start", data=body, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "application/connect+json"
            # the process never ends, yet start and its output arrive at once, then keepalives
            assert await asyncio.wait_for(_read_envelope(resp), 5) == (0, {"event": {"start": {"pid": 7}}})
            assert await asyncio.wait_for(_read_envelope(resp), 5) == (0, {"event": {"data": {"stdout": "aGkK"}}})
            assert await asyncio.wait_for(_read_envelope(resp), 5) == (0, {"event": {"keepalive": {}}})
        # the client went away: the relay detaches, the process is left running
        for _ in range(100):
            if agent.procs[1].detached:
                break
            await asyncio.sleep(0.05)
        assert agent.procs[1].detached

    _serve_fake(test)


def test_start_stream_end_deadline_and_spawn_error():
    async def test(client, agent):
        agent.procs[1] = FakeProcess(8, [("stderr", b"\xff"), ("end", 0, None)])
        body = connect.envelope({"process": {"cmd": "/bin/true"}})
        async with client.post("/process.Process/Start", data=body, headers=STREAM_HEADERS) as resp:
            envelopes = connect.split_envelopes(await resp.read())
        assert envelopes == [
            (0, {"event": {"start": {"pid": 8}}}),
            (0, {"event": {"data": {"stderr": "/w=="}}}),
            (0, {"event": {"end": {"exited": True, "status": "exit status 0"}}}),
            (2, {}),
        ]
        assert not agent.procs[1].detached
        agent.procs[1] = FakeProcess(9, ["hang"])
        headers = {**STREAM_HEADERS, "Connect-Timeout-Ms": "200"}
        async with client.post("/process.Process/Start", data=body, headers=headers) as resp:
            envelopes = connect.split_envelopes(await resp.read())
        assert envelopes[-1][0] == 2 and envelopes[-1][1]["error"]["code"] == "deadline_exceeded"
        assert agent.procs[1].detached
        agent.fail["spawn"] = FakeAgentError("permission_denied", "user nobody2 does not exist")
        async with client.post("/process.Process/Start", data=body, headers=STREAM_HEADERS) as resp:
            assert resp.status == 200
            assert connect.split_envelopes(await resp.read()) == [
                (2, {"error": {"code": "permission_denied", "message": "user nobody2 does not exist"}})
            ]
        # Connect to a process that is not there: the trailer says not_found
        body = connect.envelope({"process": {"pid": 12345}})
        async with client.post("/process.Process/Connect", data=body, headers=STREAM_HEADERS) as resp:
            assert connect.split_envelopes(await resp.read())[-1][1]["error"]["code"] == "not_found"

    _serve_fake(test)


def test_routes_auth_and_files_errors():
    async def test(client, agent):
        assert (await client.get("/health")).status == 204
        assert (await client.post("/init", json={})).status == 403
        assert (await client.get("/nope")).status == 404
        r = await client.post("/filesystem.Filesystem/Stat", json={"path": "d"}, headers={"X-Access-Token": "bad"})
        assert r.status == 401 and (await r.json())["code"] == "unauthenticated"
        r = await client.post("/filesystem.Filesystem/Stat", json={"path": "d"}, headers={"X-Access-Token": "tok"})
        assert r.status == 200
        assert await r.json() == {"entry": {
            "name": "d", "type": "FILE_TYPE_DIRECTORY", "path": "/home/user/d", "mode": 0o755,
            "permissions": "dtrwxr-xr-x", "owner": "user", "group": "user",
            "modifiedTime": "1970-01-01T00:00:01.5Z"}}
        r = await client.get("/files", params={"path": "f"}, headers={"X-Access-Token": "bad"})
        assert r.status == 401 and (await r.json())["code"] == 401
        agent.fail["read_file"] = FakeAgentError("not_found", "/home/user/f: no such file")
        r = await client.get("/files", params={"path": "f"}, headers={"X-Access-Token": "tok"})
        assert r.status == 404 and await r.json() == {"code": 404, "message": "/home/user/f: no such file"}
        agent.fail["read_file"] = FakeAgentError("failed_precondition", "/home/user: is a directory")
        r = await client.get("/files", params={"path": "/home/user"}, headers={"X-Access-Token": "tok"})
        assert r.status == 400
        r = await client.get("/files", params={"path": "f"},
                             headers={"X-Access-Token": "tok", "Accept-Encoding": "br, identity;q=0"})
        assert r.status == 406
        # an upload that fills the disk: 507, what the SDK turns into NotEnoughSpaceException
        agent.fail["write_file"] = FakeAgentError("resource_exhausted", "/home/user/f: no space left on device")
        r = await client.post("/files", params={"path": "f"}, data=b"x" * 1000,
                              headers={"X-Access-Token": "tok", "Content-Type": "application/octet-stream"})
        assert r.status == 507 and "no space" in (await r.json())["message"]
        del agent.fail["write_file"]
        import gzip

        agent.written = 0
        r = await client.post("/files", params={"path": "f"}, data=gzip.compress(b"y" * 3_000_000),
                              headers={"X-Access-Token": "tok", "Content-Type": "application/octet-stream",
                                       "Content-Encoding": "gzip"})
        assert r.status == 200 and await r.json() == [{"path": "/home/user/f", "name": "f", "type": "file"}]
        assert agent.written == 3_000_000

    _serve_fake(test)


# -- the stock SDK against Envd over the real agent in host mode --------------------------------------

TOKEN = "envd-test-token"


class EnvdServer:
    """Envd over a host-mode agent, served by aiohttp on a loopback port from a thread of its own,
    so the synchronous SDK can drive it from the test thread."""

    def __init__(self, agent_socket: str) -> None:
        import threading

        self.port = 0
        self._sock = agent_socket
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="envd-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("envd test server did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from sandbox.envd import Envd
        from vmm.channel import AgentChannel

        try:
            self.agent = await AgentChannel.connect(self._sock, "envd-test", timeout=30)
            await self.agent.set_defaults(user="user", env={"SANDBOX_WIDE": "from-create"})
            self.envd = Envd(self.agent, access_token=TOKEN)
            app = web.Application(client_max_size=1 << 20)
            app.router.add_route("*", "/{tail:.*}", self.envd.handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _stop(self) -> None:
        await self.envd.close()
        await self.runner.cleanup()
        await self.agent.close()

    def stop(self) -> None:
        if self._error is None:
            self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _sandbox(server: EnvdServer, token: str | None = TOKEN, cls=None):
    """The stock SDK's Sandbox pointed at our envd, exactly as Sandbox.create() builds it from a
    create response carrying envdVersion 0.5.7 and an access token."""
    from e2b import Sandbox
    from e2b.connection_config import ConnectionConfig
    from packaging.version import Version

    from sandbox.envd import Envd

    headers = {"E2b-Sandbox-Id": "sbx-test", "E2b-Sandbox-Port": "49983"}
    if token is not None:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(api_key="unused", sandbox_url=f"http://127.0.0.1:{server.port}",
                              extra_sandbox_headers=headers, debug=False)
    return (cls or Sandbox)(sandbox_id="sbx-test", sandbox_domain=None, envd_version=Version(Envd.ENVD_VERSION),
                   envd_access_token=token, traffic_access_token=None, connection_config=config)


def _agent_command(sock: str, root: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "vmm.guest.agent", "--socket", sock, "--root", root]


@pytest.fixture(scope="module")
def envd_server(tmp_path_factory):
    """A throwaway copy-on-write copy of the test rootfs (overlayfs; user ``user``, home /home/user,
    as E2B templates have), the real agent serving it in host mode, Envd over its channel."""
    import os
    import subprocess
    import time

    from conftest import ROOTFS_CACHE

    pytest.importorskip("vmm.channel")
    if not os.path.isdir(ROOTFS_CACHE):
        pytest.skip(f"no test rootfs at {ROOTFS_CACHE}")
    base = tmp_path_factory.mktemp("envd")
    upper, work, root = base / "upper", base / "work", base / "root"
    for d in (upper, work, root):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ROOTFS_CACHE},upperdir={upper},workdir={work}", str(root)], check=True)
    agent = None
    server = None
    try:
        with open(root / "etc/passwd", "a") as f:
            f.write("user:x:1000:1000::/home/user:/bin/bash\n")
        with open(root / "etc/group", "a") as f:
            f.write("user:x:1000:\n")
        (root / "home/user").mkdir(parents=True, exist_ok=True)
        os.chown(root / "home/user", 1000, 1000)
        sock = str(base / "agent.sock")
        agent = subprocess.Popen(_agent_command(sock, str(root)), cwd=os.path.dirname(os.path.dirname(__file__)),
                                 stdout=open(base / "agent.log", "wb"), stderr=subprocess.STDOUT)
        for _ in range(200):
            if os.path.exists(sock) or agent.poll() is not None:
                break
            time.sleep(0.05)
        assert agent.poll() is None, (base / "agent.log").read_text()
        server = EnvdServer(sock)
        server.root = root  # type: ignore[attr-defined]
        yield server
    finally:
        if server is not None:
            server.stop()
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_sdk_commands_run(envd_server):
    from e2b import CommandExitException

    sbx = _sandbox(envd_server)
    out, err = [], []
    r = sbx.commands.run("echo hi; echo oops >&2; echo $SANDBOX_WIDE $MINE; pwd; whoami",
                         envs={"MINE": "per-call"}, on_stdout=out.append, on_stderr=err.append)
    assert r.exit_code == 0 and r.error is None
    assert r.stdout == "hi\nfrom-create per-call\n/home/user\nuser\n" and r.stderr == "oops\n"
    assert "".join(out) == r.stdout and "".join(err) == r.stderr
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo partial; exit 3")
    assert e.value.exit_code == 3 and e.value.stdout == "partial\n"
    r = sbx.commands.run("whoami; pwd", user="root", cwd="/tmp")
    assert r.stdout == "root\n/tmp\n"
    # bytes that are not UTF-8 reach the callbacks decoded with replacement, never a dropped stream
    assert sbx.commands.run(r"printf '\xff\xfeok'").stdout == "\ufffd\ufffdok"


def test_sdk_background_stdin_list_connect_kill(envd_server):
    from e2b import CommandExitException

    sbx = _sandbox(envd_server)
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello\n")
    sbx.commands.send_stdin(h.pid, b"\x00bytes\n")
    sbx.commands.stream_input(h.pid, ["streamed ", b"in\n"])
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "hello\n\x00bytes\nstreamed in\ndone\n"

    sleeper = sbx.commands.run("echo started; sleep 987.654", background=True)
    listed = {p.pid: p for p in sbx.commands.list()}
    assert sleeper.pid in listed and listed[sleeper.pid].cmd == "/bin/bash"
    assert listed[sleeper.pid].args == ["-l", "-c", "echo started; sleep 987.654"]
    # a second consumer attaches, then the first goes away: the process keeps running
    other = sbx.commands.connect(sleeper.pid)
    sleeper.disconnect()
    assert sleeper.pid in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as e:
        other.wait()
    assert e.value.exit_code == -1
    assert sbx.commands.kill(sleeper.pid) is False  # gone: NOT_FOUND, as the SDK expects
    assert sleeper.pid not in {p.pid for p in sbx.commands.list()}
    # bash's child went with it: kill takes the command's process group, nothing is left running
    import subprocess
    import time

    for _ in range(50):
        if subprocess.run(["pgrep", "-f", "sleep 987.654"], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", "sleep 987.654"], capture_output=True).returncode != 0


def test_sdk_pty(envd_server):
    from e2b.sandbox.commands.command_handle import PtySize

    sbx = _sandbox(envd_server)
    data = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; echo $((6*7)); exit 7\n")
    from e2b import CommandExitException

    with pytest.raises(CommandExitException) as e:
        h.wait(on_pty=lambda chunk: data.extend(chunk))
    assert e.value.exit_code == 7
    assert b"30 100" in data and b"42" in data
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(h.pid) is True


def test_sdk_files_roundtrip(envd_server):
    from e2b import FileType
    from e2b.exceptions import FileNotFoundException

    sbx = _sandbox(envd_server)
    info = sbx.files.write("notes/hello.txt", "héllo\n")
    assert info.path == "/home/user/notes/hello.txt" and info.name == "hello.txt"
    assert sbx.files.read("notes/hello.txt") == "héllo\n"
    blob = bytes(range(256)) * 1000
    sbx.files.write("/home/user/notes/blob.bin", blob)
    assert bytes(sbx.files.read("notes/blob.bin", format="bytes")) == blob
    assert b"".join(sbx.files.read("notes/blob.bin", format="stream")) == blob
    assert bytes(sbx.files.read("notes/blob.bin", format="bytes", gzip=True)) == blob
    # written as the user: the file is theirs, the command sees the same bytes
    assert sbx.commands.run("stat -c %U:%s notes/blob.bin").stdout == f"user:{len(blob)}\n"
    import io

    sbx.files.write("notes/gz.bin", io.BytesIO(blob), gzip=True)  # octet-stream, gzip-encoded
    assert bytes(sbx.files.read("notes/gz.bin", format="bytes")) == blob
    with pytest.raises(FileNotFoundException):
        sbx.files.read("notes/missing.txt")
    # a root-owned place is root's to write
    sbx.files.write("/etc/envd-test.conf", "x=1\n", user="root")
    assert envd_server.root.joinpath("etc/envd-test.conf").read_text() == "x=1\n"

    assert sbx.files.exists("notes/hello.txt") and not sbx.files.exists("notes/nope")
    entry = sbx.files.get_info("notes/hello.txt")
    assert (entry.type, entry.size, entry.mode, entry.permissions, entry.owner) == (
        FileType.FILE, len("héllo\n".encode()), 0o644, "-rw-r--r--", "user")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("notes/nope")

    assert sbx.files.make_dir("tree/a/b") is True
    assert sbx.files.make_dir("tree/a/b") is False
    sbx.files.write("tree/a/f.txt", "f")
    sbx.files.write("tree/z.txt", "z")
    names = [(e.path, e.type) for e in sbx.files.list("tree", depth=3)]
    assert names == [("/home/user/tree/a", FileType.DIR), ("/home/user/tree/a/b", FileType.DIR),
                     ("/home/user/tree/a/f.txt", FileType.FILE), ("/home/user/tree/z.txt", FileType.FILE)]
    assert [e.name for e in sbx.files.list("tree")] == ["a", "z.txt"]
    moved = sbx.files.rename("tree/z.txt", "tree/a/moved.txt")
    assert moved.path == "/home/user/tree/a/moved.txt" and not sbx.files.exists("tree/z.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.rename("tree/nope", "tree/x")
    sbx.files.remove("tree")
    sbx.files.remove("tree")  # missing: no error
    assert not sbx.files.exists("tree")


def test_sdk_large_file_streams_both_ways(envd_server, tmp_path):
    """200 MB up and down through the SDK: bytes intact, and the test process (SDK + Envd) grows by far
    less than the file, so neither side held it whole."""
    import hashlib
    import resource

    size = 200 << 20
    src = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
        for i in range(size // len(block)):
            chunk = i.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    sbx = _sandbox(envd_server)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(src, "rb") as f:
        sbx.files.write("big.bin", f)
    back = hashlib.sha256()
    n = 0
    for chunk in sbx.files.read("big.bin", format="stream"):
        back.update(chunk)
        n += len(chunk)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert n == size and back.hexdigest() == digest.hexdigest()
    assert grown_mb < 100, f"peak RSS grew {grown_mb:.0f} MB for a {size >> 20} MB file"
    sbx.files.remove("big.bin")


def test_sdk_watch_dir(envd_server):
    from e2b import FilesystemEventType

    sbx = _sandbox(envd_server)
    sbx.files.make_dir("watched")
    handle = sbx.files.watch_dir("watched")
    try:
        sbx.files.write("watched/new.txt", "1")
        sbx.commands.run("rm watched/new.txt")
        import time

        seen: list = []
        for _ in range(50):
            seen += [(e.name, e.type) for e in handle.get_new_events()]
            if ("new.txt", FilesystemEventType.REMOVE) in seen:
                break
            time.sleep(0.1)
        assert ("new.txt", FilesystemEventType.CREATE) in seen
        assert ("new.txt", FilesystemEventType.REMOVE) in seen
    finally:
        handle.stop()


def test_sdk_wrong_token(envd_server):
    from e2b.exceptions import AuthenticationException

    for token in ("wrong", None):
        sbx = _sandbox(envd_server, token=token)
        with pytest.raises(AuthenticationException):
            sbx.commands.run("true")
        with pytest.raises(AuthenticationException):
            sbx.files.read("anything")
        with pytest.raises(AuthenticationException):
            sbx.files.list("/")
    # the signed URL works without the header, and only for what it was signed for
    import httpx

    sbx = _sandbox(envd_server)
    sbx.files.write("signed.txt", "s")
    url = sbx.download_url("signed.txt", use_signature_expiration=60)
    assert httpx.get(url).text == "s"
    assert httpx.get(url.replace("signed.txt", "other.txt")).status_code == 401


def test_sdk_no_space_is_507(envd_server):
    """A full disk in the sandbox: the SDK's NotEnoughSpaceException, and the upload stops there."""
    import subprocess

    from e2b.exceptions import NotEnoughSpaceException

    small = envd_server.root / "mnt/small"
    small.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", "tmpfs", str(small)], check=True)
    try:
        sbx = _sandbox(envd_server)
        with pytest.raises(NotEnoughSpaceException):
            sbx.files.write("/mnt/small/f.bin", b"\0" * (3 << 20))
        sbx.files.remove("/mnt/small/f.bin")  # what the full disk kept of it
        sbx.files.write("/mnt/small/ok.txt", "fits")  # the sandbox and envd carry on
        assert sbx.files.read("/mnt/small/ok.txt") == "fits"
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_async_sdk_streams(envd_server):
    """The async SDK: output callbacks as the command runs, and WatchDir as a server stream."""
    from e2b import AsyncSandbox, FilesystemEventType

    async def main():
        sbx = _sandbox(envd_server, cls=AsyncSandbox)
        lines: list[str] = []
        r = await sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=lines.append)
        assert r.stdout == "1\n2\n3\n" and "".join(lines) == r.stdout
        await sbx.files.make_dir("awatched")
        events: list = []
        handle = await sbx.files.watch_dir("awatched", on_event=events.append)
        try:
            await sbx.files.write("awatched/a.txt", "a")
            for _ in range(50):
                if ("a.txt", FilesystemEventType.CREATE) in [(e.name, e.type) for e in events]:
                    break
                await asyncio.sleep(0.1)
            assert ("a.txt", FilesystemEventType.CREATE) in [(e.name, e.type) for e in events]
        finally:
            await handle.stop()

    asyncio.run(main())


def test_the_2_45_sdk_line(envd_server, old_sdk):
    import os
    import subprocess
    import sys

    script = f"""
import json
from e2b import Sandbox, CommandExitException
from e2b.connection_config import ConnectionConfig
from packaging.version import Version
config = ConnectionConfig(api_key="unused", sandbox_url="http://127.0.0.1:{envd_server.port}",
                          extra_sandbox_headers={{"X-Access-Token": "{TOKEN}"}})
s = Sandbox(sandbox_id="sbx-old", sandbox_domain=None, envd_version=Version("0.5.7"),
            envd_access_token="{TOKEN}", connection_config=config)
out = []
r = s.commands.run("echo old; echo err >&2", on_stdout=out.append)
try:
    s.commands.run("exit 4")
    code = 0
except CommandExitException as e:
    code = e.exit_code
h = s.commands.run("sleep 600", background=True)
killed = s.commands.kill(h.pid)
s.files.write("old/a.txt", "via 2.45")
print(json.dumps({{"out": r.stdout, "err": r.stderr, "cb": "".join(out), "code": code, "killed": killed,
                  "file": s.files.read("old/a.txt"), "list": [e.name for e in s.files.list("old")],
                  "mkdir": s.files.make_dir("old")}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(old_sdk)})
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc == {"out": "old\n", "err": "err\n", "cb": "old\n", "code": 4, "killed": True,
                   "file": "via 2.45", "list": ["a.txt"], "mkdir": False}


def test_sdk_concurrent_commands(envd_server):
    """Ten commands at once over the one agent channel, each with its own output, none mixed."""
    from concurrent.futures import ThreadPoolExecutor

    sbx = _sandbox(envd_server)

    def one(i: int) -> str:
        return sbx.commands.run(f"for k in 1 2 3; do echo {i}-$k; sleep 0.05; done").stdout

    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(one, range(10)))
    assert outs == [f"{i}-1\n{i}-2\n{i}-3\n" for i in range(10)]
