"""The daemon's control socket and the per-node registry of live mounts.

Each mount daemon listens on a unix socket and answers two HTTP GETs,
``/stats`` (JSON, for ``cubefs stats``) and ``/metrics`` (Prometheus text),
and POSTs to its actions (``/trace/push``), answered in JSON.
A small JSON file per mount (``RUNDIR/mounts/<key>.json``) records the
mountpoint, pid, image and socket, so ``cubefs stats``/``umount`` can find the
daemon from the mountpoint alone.  ``run_dir`` and ``default_cache_dir`` say where a node keeps
its state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

from cubefs.errors import CubefsError, NotFoundError

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    env = os.environ.get("CUBEFS_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cubefs")


def run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/cubefs"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cubefs-{os.getuid()}"
    return os.path.join(base, "cubefs")


def mount_key(mountpoint: str) -> str:
    # abspath, not realpath: realpath would lstat the mount root, and the daemon
    # calling this on its own mount would wait on itself.
    return hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


def registry_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), "mounts", mount_key(mountpoint) + ".json")


def socket_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), "mounts", mount_key(mountpoint) + ".sock")


def write_registry(mountpoint: str, info: dict[str, Any]) -> None:
    path = registry_path(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)  # registries and control sockets: the owner's only
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(info, f)
    os.rename(tmp, path)


def read_registry(mountpoint: str) -> dict[str, Any]:
    try:
        with open(registry_path(mountpoint)) as f:
            return dict(json.load(f))
    except FileNotFoundError:
        raise NotFoundError(f"no cubefs mount at {mountpoint}") from None


def remove_registry(mountpoint: str) -> None:
    for path in (registry_path(mountpoint), socket_path(mountpoint)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def metric_lines(stats: dict[str, Any], labels: str) -> list[str]:
    """Prometheus lines for a daemon's stats: per-tier cache counters, FUSE requests."""
    lines = []
    for tier, counters in stats.get("tiers", {}).items():
        for name, value in counters.items():
            metric = f"cubefs_cache_{name}"
            lines.append(f'{metric}{{{labels},tier="{tier}"}} {value}')
    for op, count in sorted(stats.get("requests", {}).items()):
        lines.append(f'cubefs_fuse_requests_total{{{labels},op="{op}"}} {count}')
    for name in ("read_errors", "reads", "read_bytes", "restarts"):
        if name in stats:
            lines.append(f"cubefs_{name}_total{{{labels}}} {stats[name]}")
    return lines


def prometheus_text(stats: dict[str, Any]) -> str:
    labels = f'image="{stats.get("image", "")}",mountpoint="{stats.get("mountpoint", "")}"'
    return "\n".join(metric_lines(stats, labels)) + "\n"


async def serve_control(
    path: str,
    get_stats: Callable[[], dict[str, Any]],
    actions: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] | None = None,
    *,
    task_status: Any = None,
) -> None:
    """Serve /stats, /metrics and ``actions`` (POST, JSON answers) on a unix socket until cancelled.
    An action named with a trailing '/' takes the rest of the path, unquoted, as its argument."""
    import trio  # here, not at the top: the CLI imports this module and must start fast

    from cubefs.node.minihttp import parse_head, read_head
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        # A client that hangs up, stalls or sends garbage must never reach the
        # daemon's nursery: an exception there would unmount the filesystem.
        try:
            with trio.move_on_after(5):
                head, _rest = await read_head(stream, b"", 8192)
                if head is None:
                    return
                method, target, _headers = parse_head(head)
                if target == "/stats":
                    body, ctype, status = json.dumps(get_stats()).encode(), "application/json", "200 OK"
                elif target == "/metrics":
                    body, ctype, status = prometheus_text(get_stats()).encode(), "text/plain; version=0.0.4", "200 OK"
                elif method == "POST" and (found := _find_action(actions or {}, target)) is not None:
                    status, answer = await _run_action(target, *found)
                    body, ctype = json.dumps(answer).encode(), "application/json"
                else:
                    body, ctype, status = b"not found\n", "text/plain", "404 Not Found"
                head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
                await stream.send_all(head.encode() + body)
        except Exception as err:
            log.debug("control client dropped: %s", err)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    if task_status is not None:
        task_status.started()  # bound and listening: 'cubefs stats' works from here on
    await trio.serve_listeners(handle, [listener])


def _find_action(
    actions: dict[str, Callable[[str], Awaitable[dict[str, Any]]]], target: str
) -> tuple[Callable[[str], Awaitable[dict[str, Any]]], str] | None:
    from urllib.parse import unquote

    if target in actions:
        return actions[target], ""
    head, sep, arg = target.rpartition("/")
    action = actions.get(head + sep)
    return None if action is None or not arg else (action, unquote(arg))


async def _run_action(
    target: str, action: Callable[[str], Awaitable[dict[str, Any]]], arg: str
) -> tuple[str, dict[str, Any]]:
    try:
        return "200 OK", await action(arg)
    except CubefsError as err:
        return "409 Conflict", {"error": str(err), "exit_code": err.exit_code}
    except Exception as err:
        log.exception("control action %s failed", target)
        return "500 Internal Server Error", {"error": f"internal error: {err}"}


def call(mountpoint: str, target: str, timeout: float = 60.0) -> dict[str, Any]:
    """POST to an action of the daemon serving ``mountpoint``; its error as a CubefsError."""
    answer = json.loads(query(mountpoint, target, timeout, method="POST") or b"{}")
    if "error" in answer:
        err = CubefsError(answer["error"])
        err.exit_code = int(answer.get("exit_code", 1))
        raise err
    return answer


def query(mountpoint: str, target: str = "/stats", timeout: float = 5.0, method: str = "GET") -> bytes:
    """``method`` ``target`` of the daemon serving ``mountpoint`` (blocking client)."""
    path = socket_path(mountpoint)
    if not os.path.exists(path):
        raise NotFoundError(f"no cubefs mount at {mountpoint} (no control socket {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as err:
            raise NotFoundError(f"cubefs mount at {mountpoint} does not answer: {err.strerror}") from None
        s.sendall(f"{method} {target} HTTP/1.0\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    return raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
