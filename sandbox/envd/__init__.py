"""envd, the E2B data plane on port 49983, served on the host over a sandbox's guest agent.

The sandbox proxy hands every request for port 49983 of a sandbox to :meth:`Envd.handle`; nothing of
envd runs in the guest, whose agent (``vmm.channel``) only spawns processes and moves bytes.  The
modules, one job each: ``connect`` (the Connect protocol codec), ``auth`` (token, signatures, user),
``process`` (``process.Process``), ``filesystem`` (``filesystem.Filesystem``), ``files`` (``/files``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox.envd import connect
from sandbox.envd.auth import check_token
from sandbox.envd.connect import ConnectError
from sandbox.envd.files import FilesService
from sandbox.envd.filesystem import FilesystemService
from sandbox.envd.process import ProcessService

if TYPE_CHECKING:
    from vmm.channel import AgentChannel

log = logging.getLogger(__name__)

Unary = Callable[[dict[str, Any], web.Request], Awaitable[dict[str, Any]]]
Streaming = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: envd's own control routes (the orchestrator's, never a user's): refused with 403 and not served.
INTERNAL_ROUTES = frozenset({"/init", "/freeze", "/upgrade", "/snapshot", "/envs", "/metrics", "/files/compose"})


class Envd:
    """One sandbox's envd.

    ``ENVD_VERSION`` is what the control plane reports as ``envdVersion``; the SDK picks its code
    paths from it (e2b/envd/versions.py).  0.5.7 is the newest whose paths are all served here:
    stdin control (0.3.0), the default user without Basic auth (0.4.0), CloseStdin (0.5.2),
    octet-stream and gzip uploads (0.5.7).  File metadata (0.6.2, xattrs) and watch entries / network
    mounts (0.6.3, 0.6.4) are not, so the SDK refuses them client-side with a clear message."""

    ENVD_VERSION = "0.5.7"

    def __init__(self, agent: AgentChannel, *, access_token: str | None, default_user: str = "user") -> None:
        self._agent = agent
        self._token = access_token
        self.default_user = default_user  # the agent applies it (set_defaults); kept for the record
        self._closing = asyncio.Event()
        self._process = ProcessService(agent, self._closing)
        self._filesystem = FilesystemService(agent, self._closing)
        self._files = FilesService(agent, access_token)
        self._unary: dict[str, Unary] = {
            "/process.Process/List": self._process.list,
            "/process.Process/SendInput": self._process.send_input,
            "/process.Process/SendSignal": self._process.send_signal,
            "/process.Process/CloseStdin": self._process.close_stdin,
            "/process.Process/Update": self._process.update,
            "/filesystem.Filesystem/Stat": self._filesystem.stat,
            "/filesystem.Filesystem/MakeDir": self._filesystem.make_dir,
            "/filesystem.Filesystem/Move": self._filesystem.move,
            "/filesystem.Filesystem/ListDir": self._filesystem.list_dir,
            "/filesystem.Filesystem/Remove": self._filesystem.remove,
            "/filesystem.Filesystem/CreateWatcher": self._filesystem.create_watcher,
            "/filesystem.Filesystem/GetWatcherEvents": self._filesystem.get_watcher_events,
            "/filesystem.Filesystem/RemoveWatcher": self._filesystem.remove_watcher,
        }
        self._streaming: dict[str, Streaming] = {
            "/process.Process/Start": self._process.start,
            "/process.Process/Connect": self._process.connect,
            "/process.Process/StreamInput": self._process.stream_input,
            "/filesystem.Filesystem/WatchDir": self._filesystem.watch_dir,
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/health":
            if request.method not in ("GET", "HEAD"):
                return _plain(405, "method not allowed")
            return web.Response(status=204)
        if path == "/files":
            return await self._files.handle(request)
        if path in INTERNAL_ROUTES:
            return _plain(403, f"{path} is not served to clients")
        unary = self._unary.get(path)
        streaming = self._streaming.get(path)
        if unary is None and streaming is None:
            return _plain(404, f"no route {path}")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        try:
            check_token(request, self._token)
            _check_codec(request, streaming=streaming is not None)
            if streaming is not None:
                return await streaming(request)
            assert unary is not None
            message = await connect.read_unary(request)
            return connect.unary_response(await unary(message, request))
        except Exception as e:
            error = connect.as_connect_error(e)
            if error.code == "internal":
                log.exception("envd %s failed", path)
            return connect.error_response(error)

    async def close(self) -> None:
        """End every open stream (with "unavailable") and drop the polled watchers."""
        self._closing.set()
        await self._filesystem.close()


def _plain(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _check_codec(request: web.Request, *, streaming: bool) -> None:
    """Only the JSON codec, uncompressed, is spoken (what every E2B SDK sends)."""
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    expected = connect.STREAM_CONTENT_TYPE if streaming else connect.UNARY_CONTENT_TYPE
    if content_type and content_type != expected:
        raise ConnectError("unimplemented", f"content type {content_type!r} is not served; use {expected!r}")
    encoding = request.headers.get("Connect-Content-Encoding" if streaming else "Content-Encoding", "identity")
    if encoding.strip().lower() not in ("identity", ""):
        raise ConnectError("unimplemented", f"compression {encoding!r} is not served")
