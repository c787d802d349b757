"""What the proxy answers for a sandbox it cannot reach, in E2B's words: the SDK maps these
exact messages ("was not found" to ``is_running() == False``, "port is not open" to its own
error), so every path that answers for a sandbox (the node's proxy, a rolled-back sandbox's
requests held while it settles, a cluster front) uses these and nothing else."""

from __future__ import annotations

from aiohttp import web


def not_found(sandbox_id: str) -> web.Response:
    return web.json_response({"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502},
                             status=502)


def port_closed(sandbox_id: str, port: int) -> web.Response:
    return web.json_response({"sandboxId": sandbox_id, "port": port, "code": 502,
                              "message": f"The sandbox is running but port is not open (port {port})"},
                             status=502)
