"""``process.Process``: commands and PTYs in the sandbox, translated to the guest agent.

A Start or Connect stream relays one ``GuestProcess``'s events as they come: ``start{pid}`` first (the
SDK's ``run(background=True)`` returns on it), then ``data`` envelopes, one per chunk the agent hands
over, then ``end``, then the trailer.  The relay awaits every write, so a client that stops reading
stops the agent's reads of the process's output (the agent's backpressure) instead of piling bytes up
here.  Closing the stream (client gone, deadline) detaches from the process; it keeps running, as
under envd (E2B issue #500): only SendSignal ends it.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox.envd import connect
from sandbox.envd.auth import basic_user
from sandbox.envd.connect import ConnectError, ServerStream

if TYPE_CHECKING:
    from vmm.channel import AgentChannel, GuestProcess

SIGNALS = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}
KEEPALIVE = {"event": {"keepalive": {}}}


def signal_name(signo: int) -> str:
    """Go's name for a signal in ``ProcessState.String()`` ("killed", "terminated", "hangup"): the
    C library's description with a lower-case first letter, which is how Go's table reads."""
    try:
        text = signals.strsignal(signo) or f"signal {signo}"
    except ValueError:
        text = f"signal {signo}"
    return text[:1].lower() + text[1:]


def end_event(exit_code: int, signo: int | None) -> dict[str, Any]:
    """The ``end`` event as envd sends it: ``exitCode`` -1 and ``exited`` false for a signal,
    ``status`` as Go prints a ProcessState; zero values left out."""
    if signo is not None:
        return {"event": {"end": connect.msg(exit_code=-1, exited=False, status=f"signal: {signal_name(signo)}")}}
    return {"event": {"end": connect.msg(exit_code=exit_code, exited=True, status=f"exit status {exit_code}")}}


def data_envelope(kind: str, data: bytes) -> bytes:
    """The envelope of ``{"event": {"data": {kind: base64}}}``, built as bytes: json.dumps of a
    175 KB base64 string cost 4.5 ms per MB, more than half the service's CPU on a stdout stream
    (7.2 -> 1.5 ms per MB); base64's alphabet needs no JSON escaping, so the bytes are the same."""
    encoded = binascii.b2a_base64(data, newline=False)
    return connect.raw_envelope(b'{"event":{"data":{"' + kind.encode() + b'":"' + encoded + b'"}}}')


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConnectError("invalid_argument", f"{name} must be a list of strings")
    return value


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConnectError("invalid_argument", f"{name} must be a map of strings")
    return value


def _pty_size(pty: dict[str, Any]) -> tuple[int, int]:
    size = connect.get_obj(pty, "size")
    cols, rows = connect.get_int(size, "cols"), connect.get_int(size, "rows")
    if not (0 < cols <= 0xFFFF and 0 < rows <= 0xFFFF):
        raise ConnectError("invalid_argument", f"pty size {cols}x{rows} is out of range")
    return cols, rows


class ProcessService:
    def __init__(self, agent: AgentChannel, closing: asyncio.Event) -> None:
        self._agent = agent
        self._closing = closing

    # -- selectors -------------------------------------------------------------------------------

    async def _pid(self, message: dict[str, Any]) -> int:
        """The pid a ``ProcessSelector`` names (by pid, or by tag among the agent's processes)."""
        selector = connect.get_obj(message, "process")
        if connect.get(selector, "pid") is not None:
            return connect.get_int(selector, "pid")
        tag = connect.get_str(selector, "tag")
        if not tag:
            raise ConnectError("invalid_argument", "process selector needs a pid or a tag")
        for info in await self._agent.processes():
            if info.get("tag") == tag:
                return int(info["pid"])
        raise ConnectError("not_found", f"no process with tag {tag!r}")

    # -- streams ---------------------------------------------------------------------------------

    async def start(self, request: web.Request) -> web.StreamResponse:
        message = await connect.read_stream_request(request)
        config = connect.get_obj(message, "process")
        cmd = connect.get_str(config, "cmd")
        if not cmd:
            raise ConnectError("invalid_argument", "process.cmd is empty")
        argv = [cmd, *_strings(connect.get(config, "args"), "process.args")]
        env = _string_map(connect.get(config, "envs"), "process.envs")
        cwd = connect.get_str(config, "cwd") or None
        pty = connect.get(message, "pty")
        size = _pty_size(pty) if isinstance(pty, dict) else None
        tag = connect.get_str(message, "tag") or None
        stdin = connect.get_bool(message, "stdin")
        user = basic_user(request)

        async def spawn() -> GuestProcess:
            return await self._agent.spawn(
                argv, env=env or None, cwd=cwd, user=user, pty=size, stdin=stdin, tag=tag
            )

        return await self._relay(request, spawn)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        message = await connect.read_stream_request(request)
        selector = connect.get_obj(message, "process")

        async def attach() -> GuestProcess:
            if connect.get(selector, "pid") is not None:
                return await self._agent.attach(pid=connect.get_int(selector, "pid"))
            tag = connect.get_str(selector, "tag")
            if not tag:
                raise ConnectError("invalid_argument", "process selector needs a pid or a tag")
            return await self._agent.attach(tag=tag)

        return await self._relay(request, attach)

    async def _relay(
        self, request: web.Request, open_process: Callable[[], Awaitable[GuestProcess]]
    ) -> web.StreamResponse:
        """Open the stream, get the process, relay its events until its end, the client going away,
        the call's deadline or the service closing; detach in every case but the process's end."""
        stream = ServerStream(request, keepalive=KEEPALIVE)
        await stream.open()
        try:
            proc = await open_process()
        except Exception as e:
            return await stream.finish(connect.as_connect_error(e))
        error: ConnectError | None = None
        ended = False  # the process's end event went out: nothing left to detach from
        pump = asyncio.create_task(self._pump(stream, proc))
        stops = [asyncio.create_task(stream.broken.wait()), asyncio.create_task(self._closing.wait())]
        try:
            done, _ = await asyncio.wait([pump, *stops], timeout=connect.timeout_seconds(request),
                                         return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                error = _task_error(pump)
                ended = pump.exception() is None
            elif stops[1] in done:
                error = ConnectError("unavailable", "the sandbox is shutting down")
            elif not done:
                error = ConnectError("deadline_exceeded", "the call's deadline (Connect-Timeout-Ms) passed")
        finally:
            for task in (pump, *stops):
                task.cancel()
            for task in (pump, *stops):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if not ended:
                with contextlib.suppress(Exception):
                    await proc.detach()
        return await stream.finish(error)

    async def _pump(self, stream: ServerStream, proc: GuestProcess) -> None:
        await stream.send({"event": {"start": {"pid": proc.pid}}})
        events: AsyncIterator[tuple] = proc.events()
        try:
            async for event in events:
                if event[0] == "end":
                    await stream.send(end_event(event[1], event[2]))
                    return
                await stream.send_raw(data_envelope(event[0], event[1]))
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
        raise ConnectError("unavailable", f"process {proc.pid}: the agent's stream ended without an end event")

    # -- unary -----------------------------------------------------------------------------------

    async def list(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        processes = []
        for info in await self._agent.processes():
            argv = list(info.get("argv") or [""])
            config = connect.msg(cmd=argv[0], args=argv[1:], envs=info.get("env") or None, cwd=info.get("cwd"))
            processes.append(connect.msg(config=config, pid=int(info["pid"]), tag=info.get("tag")))
        return connect.msg(processes=processes)

    async def send_input(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        pid = await self._pid(message)
        await self._agent.send_input(pid, _input_bytes(connect.get_obj(message, "input")))
        return {}

    async def stream_input(self, request: web.Request) -> web.Response:
        """Client stream: ``start{process}``, then ``data{input}``s (and ``keepalive``s), each sent
        to the process as it arrives."""
        pid: int | None = None
        try:
            async for message in connect.read_envelopes(request.content):
                if connect.get(message, "start") is not None:
                    pid = await self._pid(connect.get_obj(message, "start"))
                elif connect.get(message, "data") is not None:
                    if pid is None:
                        raise ConnectError("failed_precondition", "StreamInput: data before start")
                    data = _input_bytes(connect.get_obj(connect.get_obj(message, "data"), "input"))
                    await self._agent.send_input(pid, data)
            if pid is None:
                raise ConnectError("invalid_argument", "StreamInput: no start message")
        except Exception as e:
            return connect.enveloped_response(None, connect.as_connect_error(e))
        return connect.enveloped_response({})

    async def send_signal(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        pid = await self._pid(message)
        signo = connect.get_enum(message, "signal", SIGNALS)
        if signo not in (9, 15):
            raise ConnectError("invalid_argument", f"unsupported signal {connect.get(message, 'signal')!r}")
        # The whole process group (each command is a session of its own): `kill` of a
        # `bash -l -c "a; b"` must not leave `b` running in the sandbox.
        await self._agent.signal(pid, signo, group=True)
        return {}

    async def close_stdin(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        await self._agent.close_stdin(await self._pid(message))
        return {}

    async def update(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        pid = await self._pid(message)
        pty = connect.get(message, "pty")
        if isinstance(pty, dict):
            cols, rows = _pty_size(pty)
            await self._agent.resize(pid, cols, rows)
        return {}


def _input_bytes(process_input: dict[str, Any]) -> bytes:
    if connect.get(process_input, "pty") is not None:
        return connect.get_bytes(process_input, "pty")
    return connect.get_bytes(process_input, "stdin")


def _task_error(task: asyncio.Task[None]) -> ConnectError | None:
    exc = task.exception()
    if exc is None or isinstance(exc, ConnectionResetError):
        return None
    return connect.as_connect_error(exc)
