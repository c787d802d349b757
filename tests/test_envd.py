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
