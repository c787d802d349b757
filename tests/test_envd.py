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
