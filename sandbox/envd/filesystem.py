"""``filesystem.Filesystem``: stat, mkdir -p, move, list, rm -rf and directory watches, translated to
the guest agent (which resolves relative paths against the user's home and acts as that user).

Watches come in two shapes: ``WatchDir`` streams events (the async SDK), and the sync SDK polls
``CreateWatcher`` / ``GetWatcherEvents`` / ``RemoveWatcher``.  A polled watcher buffers at most
:data:`MAX_PENDING` events between polls; beyond that the oldest are dropped (a client that stopped
polling must not grow the service's memory without bound) and the watcher stays usable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import posixpath
import secrets
import stat as stat_module
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandbox.envd import connect
from sandbox.envd.auth import basic_user
from sandbox.envd.connect import ConnectError, ServerStream

if TYPE_CHECKING:
    from vmm.channel import AgentChannel, Watcher

FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
MAX_PENDING = 10_000


def permissions(kind: str, mode: int) -> str:
    """The ``permissions`` string as Go's ``FileMode.String()`` prints it (what envd sends):
    type and special-bit letters ("d", "L", "u", "g", "t"; "-" when none), then rwxrwxrwx."""
    head = ""
    if kind == "dir":
        head += "d"
    elif kind == "symlink":
        head += "L"
    if mode & stat_module.S_ISUID:
        head += "u"
    if mode & stat_module.S_ISGID:
        head += "g"
    if mode & stat_module.S_ISVTX:
        head += "t"
    rwx = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return (head or "-") + rwx


def entry_info(st: dict[str, Any]) -> dict[str, Any]:
    """An agent ``stat()`` dict as a proto3 JSON ``EntryInfo``.

    A symlink is sent with type SYMLINK *and* ``isSymlink``: SDKs before 2.6x read the type, newer
    ones the flag; both then say "symlink"."""
    kind = st.get("type", "other")
    mode = int(st.get("mode", 0))
    return connect.msg(
        name=st.get("name", ""),
        type=FILE_TYPES.get(kind),
        path=st.get("path", ""),
        size=connect.int64(int(st.get("size", 0))),
        mode=mode & 0o777,
        permissions=permissions(kind, mode),
        owner=st.get("owner", ""),
        group=st.get("group", ""),
        modified_time=connect.timestamp(float(st["mtime"])) if st.get("mtime") is not None else None,
        symlink_target=st.get("symlink_target"),
        is_symlink=kind == "symlink",
    )


class _PolledWatcher:
    """A watcher the sync SDK polls: a task moves the agent's events into a bounded queue."""

    def __init__(self, watcher: Watcher, base: str, include_entry: bool, fs: FilesystemService,
                 user: str | None) -> None:
        self.watcher = watcher
        self.pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_PENDING)
        self.error: ConnectError | None = None
        self.task = asyncio.create_task(self._collect(base, include_entry, fs, user))

    async def _collect(self, base: str, include_entry: bool, fs: FilesystemService, user: str | None) -> None:
        try:
            async for event in self.watcher.events():
                self.pending.append(await fs.event_message(event, base, include_entry, user))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.error = connect.as_connect_error(e)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(Exception):
            await self.watcher.close()


class FilesystemService:
    def __init__(self, agent: AgentChannel, closing: asyncio.Event) -> None:
        self._agent = agent
        self._closing = closing
        self._watchers: dict[str, _PolledWatcher] = {}

    async def close(self) -> None:
        watchers, self._watchers = self._watchers, {}
        for watcher in watchers.values():
            await watcher.close()

    # -- unary -----------------------------------------------------------------------------------

    async def stat(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        st = await self._agent.stat(_path(message, "path"), user=basic_user(request))
        return {"entry": entry_info(st)}

    async def make_dir(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        path = _path(message, "path")
        st, created = await self._agent.make_dir(path, user=basic_user(request))
        if not created:
            raise ConnectError("already_exists", f"directory {st.get('path') or path} already exists")
        return {"entry": entry_info(st)}

    async def move(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        st = await self._agent.move(_path(message, "source"), _path(message, "destination"), user=basic_user(request))
        return {"entry": entry_info(st)}

    async def list_dir(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        depth = connect.get_int(message, "depth") or 1
        if depth < 0:
            raise ConnectError("invalid_argument", "depth must be at least 1")
        entries = await self._agent.list_dir(_path(message, "path"), depth=depth, user=basic_user(request))
        return connect.msg(entries=[entry_info(st) for st in entries])

    async def remove(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        await self._agent.remove(_path(message, "path"), user=basic_user(request))
        return {}

    # -- watches ---------------------------------------------------------------------------------

    async def _open_watch(self, message: dict[str, Any], user: str | None) -> tuple[Watcher, str]:
        path = _path(message, "path")
        st = await self._agent.stat(path, user=user)
        if st.get("type") != "dir":
            raise ConnectError("invalid_argument", f"{st.get('path') or path} is not a directory")
        watcher = await self._agent.watch(path, recursive=connect.get_bool(message, "recursive"), user=user)
        return watcher, st.get("path") or path

    async def event_message(self, event: dict[str, Any], base: str, include_entry: bool,
                            user: str | None) -> dict[str, Any]:
        """A ``FilesystemEvent``; with ``include_entry`` the entry's stat when it still exists."""
        out = connect.msg(name=event.get("name", ""), type=EVENT_TYPES.get(event.get("type", "")))
        if include_entry and event.get("type") not in ("remove", "rename"):
            with contextlib.suppress(Exception):
                st = await self._agent.stat(posixpath.join(base, event.get("name", "")), user=user)
                out["entry"] = entry_info(st)
        return out

    async def watch_dir(self, request: web.Request) -> web.StreamResponse:
        message = await connect.read_stream_request(request)
        user = basic_user(request)
        stream = ServerStream(request, keepalive={"keepalive": {}})
        await stream.open()
        try:
            watcher, base = await self._open_watch(message, user)
        except Exception as e:
            return await stream.finish(connect.as_connect_error(e))
        include_entry = connect.get_bool(message, "include_entry")

        async def pump() -> None:
            await stream.send({"start": {}})
            async for event in watcher.events():
                await stream.send({"filesystem": await self.event_message(event, base, include_entry, user)})
            raise ConnectError("unavailable", "the agent ended the watch")

        error: ConnectError | None = None
        task = asyncio.create_task(pump())
        stops = [asyncio.create_task(stream.broken.wait()), asyncio.create_task(self._closing.wait())]
        try:
            done, _ = await asyncio.wait([task, *stops], timeout=connect.timeout_seconds(request),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, ConnectionResetError):
                    error = connect.as_connect_error(exc)
            elif stops[1] in done:
                error = ConnectError("unavailable", "the sandbox is shutting down")
            elif not done:
                error = ConnectError("deadline_exceeded", "the call's deadline (Connect-Timeout-Ms) passed")
        finally:
            for t in (task, *stops):
                t.cancel()
            for t in (task, *stops):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            with contextlib.suppress(Exception):
                await watcher.close()
        return await stream.finish(error)

    async def create_watcher(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        user = basic_user(request)
        watcher, base = await self._open_watch(message, user)
        watcher_id = secrets.token_hex(16)
        self._watchers[watcher_id] = _PolledWatcher(
            watcher, base, connect.get_bool(message, "include_entry"), self, user
        )
        return {"watcherId": watcher_id}

    def _watcher(self, message: dict[str, Any]) -> tuple[str, _PolledWatcher]:
        watcher_id = connect.get_str(message, "watcher_id")
        watcher = self._watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
        return watcher_id, watcher

    async def get_watcher_events(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        watcher_id, watcher = self._watcher(message)
        events = list(watcher.pending)
        watcher.pending.clear()
        if not events and watcher.error is not None:
            del self._watchers[watcher_id]
            await watcher.close()
            raise watcher.error
        return connect.msg(events=events)

    async def remove_watcher(self, message: dict[str, Any], request: web.Request) -> dict[str, Any]:
        watcher_id, watcher = self._watcher(message)
        del self._watchers[watcher_id]
        await watcher.close()
        return {}


def _path(message: dict[str, Any], name: str) -> str:
    path = connect.get_str(message, name)
    if not path:
        raise ConnectError("invalid_argument", f"{name} is empty")
    if "\0" in path:
        raise ConnectError("invalid_argument", f"{name} contains a NUL byte")
    return path
