"""The control plane: E2B's REST API (``E2B_API_URL``), as the stock SDK speaks it.

Both create paths are served — ``POST /sandboxes`` (SDK <= 2.50) and ``POST
/v2/sandboxes`` (>= 2.51, with an ``Idempotency-Key``) — and both answer 201
with a ``Sandbox``; every error is JSON ``{code, message}``, since the SDK's
generated parsers read that body for every 4xx/5xx and crash on anything else.
Fields and statuses follow ../shared/e2b-protocol.md section 2.  Pause, resume,
snapshots and fork belong to the next layer (issue 14) and answer 501.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from cubefs.errors import CubefsError, NotFoundError, UsageError
from sandbox.config import ApiKeys
from sandbox.pool import CapacityError
from sandbox.service import SandboxService

log = logging.getLogger("cubefs.sandbox.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDEMPOTENCY_SECONDS = 600.0
MAX_BODY = 1 << 20  # a control-plane request is a few hundred bytes
PAGE_LIMIT = 100


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


def make_app(service: SandboxService, keys: ApiKeys) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth(keys)], client_max_size=MAX_BODY)
    app["service"] = service
    api = Api(service)
    r = app.router
    r.add_get("/health", api.health)
    r.add_get("/metrics", api.metrics)
    r.add_post("/sandboxes", api.create)
    r.add_post("/v2/sandboxes", api.create)
    r.add_get("/sandboxes", api.list_v1)
    r.add_get("/v2/sandboxes", api.list_v2)
    r.add_get("/sandboxes/{id}", api.get)
    r.add_delete("/sandboxes/{id}", api.kill)
    r.add_post("/sandboxes/{id}/timeout", api.timeout)
    r.add_post("/sandboxes/{id}/refreshes", api.refresh)
    r.add_post("/sandboxes/{id}/connect", api.connect)
    r.add_post("/v2/sandboxes/{id}/connect", api.connect)
    r.add_get("/sandboxes/{id}/logs", api.logs)
    r.add_get("/templates", api.templates)
    for path in ("/sandboxes/{id}/pause", "/sandboxes/{id}/resume", "/sandboxes/{id}/snapshots",
                 "/sandboxes/{id}/fork"):
        r.add_post(path, api.later)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except NotFoundError as err:
        return error(404, str(err))
    except CapacityError as err:  # final here: a scheduler places it on another node, the SDK must not retry
        return error(429, str(err), headers={"Should-Retry": "false"})
    except UsageError as err:
        return error(400, str(err))
    except CubefsError as err:
        log.warning("%s %s: %s", request.method, request.path, err)
        return error(500, str(err))


def _auth(keys: ApiKeys) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/health":
            key = request.headers.get("X-API-KEY")
            bearer = request.headers.get("Authorization", "")
            if not key and bearer.startswith("Bearer "):
                key = bearer[7:]  # Prometheus scrapes with a bearer token
            if not keys.check(key):
                return error(401, "invalid or missing API key (X-API-KEY)")
        return await handler(request)

    return check


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        doc = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise UsageError("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise UsageError("the request body must be a JSON object")
    return doc


def _str_map(doc: dict[str, Any], key: str) -> dict[str, str]:
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UsageError(f"{key} must be an object of strings")
    return value


def _timeout(doc: dict[str, Any], key: str = "timeout") -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{key} must be a whole number of seconds")
    return value


class Api:
    def __init__(self, service: SandboxService) -> None:
        self.service = service
        self.idempotent: dict[str, tuple[float, asyncio.Future[Any]]] = {}

    @property
    def version(self) -> str:
        return self.service.envd_version

    async def health(self, request: web.Request) -> web.Response:
        svc = self.service
        return web.json_response({"status": "ok", "sandboxes": len(svc.sandboxes), "creating": len(svc.creating),
                                  "pools": {name: len(pool) for name, pool in svc.pools.items()}})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.service.metrics(), content_type="text/plain")

    async def create(self, request: web.Request) -> web.Response:
        doc = await _body(request)
        template = doc.get("templateID")
        if not isinstance(template, str) or not template:
            raise UsageError("templateID is required")
        args = (template, _timeout(doc), _str_map(doc, "metadata"), _str_map(doc, "envVars"))
        key = request.headers.get("Idempotency-Key")
        if key:  # a retried create gets the sandbox the first attempt made, never a second one
            now = time.monotonic()
            for k in [k for k, (t, _) in self.idempotent.items() if now - t > IDEMPOTENCY_SECONDS]:
                del self.idempotent[k]
            if key not in self.idempotent:
                self.idempotent[key] = (now, asyncio.ensure_future(self.service.create(*args)))
            future = self.idempotent[key][1]
            try:
                sbx = await asyncio.shield(future)
            except BaseException:
                self.idempotent.pop(key, None)
                raise
        else:
            sbx = await self.service.create(*args)
        return web.json_response(sbx.created(self.version, self.service.domain), status=201)

    def _listed(self, request: web.Request) -> list[dict[str, Any]]:
        q = request.query
        want = dict(parse_qsl(q.get("metadata", ""), keep_blank_values=True))
        states = {s for s in q.get("state", "running").split(",") if s}
        out = []
        for sbx in self.service.list():
            if "running" not in states:
                continue
            if any(sbx.record.metadata.get(k) != v for k, v in want.items()):
                continue
            if q.get("template") and sbx.record.template != q["template"]:
                continue
            out.append(sbx.detail(self.version, self.service.domain))
        if q.get("order") == "desc":
            out.reverse()
        return out

    async def list_v1(self, request: web.Request) -> web.Response:
        return web.json_response(self._listed(request))

    async def list_v2(self, request: web.Request) -> web.Response:
        """Pages of ``limit``; ``X-Next-Token`` (the last id given) when more remain."""
        items = self._listed(request)
        try:
            limit = max(1, min(int(request.query.get("limit", PAGE_LIMIT)), PAGE_LIMIT))
        except ValueError:
            raise UsageError("limit must be a number") from None
        token = request.query.get("nextToken")
        if token:
            ids = [s["sandboxID"] for s in items]
            if token not in ids:
                raise UsageError("nextToken is not valid (the sandbox it names is gone: list again)")
            items = items[ids.index(token) + 1:]
        page, rest = items[:limit], items[limit:]
        headers = {"X-Next-Token": page[-1]["sandboxID"]} if rest else {}
        return web.json_response(page, headers=headers)

    async def get(self, request: web.Request) -> web.Response:
        sbx = self.service.get(request.match_info["id"])
        return web.json_response(sbx.detail(self.version, self.service.domain))

    async def kill(self, request: web.Request) -> web.Response:
        if not await self.service.kill(request.match_info["id"]):
            raise NotFoundError(f"sandbox {request.match_info['id']!r} not found")
        return web.Response(status=204)

    async def timeout(self, request: web.Request) -> web.Response:
        t = _timeout(await _body(request))
        if t is None:
            raise UsageError("timeout is required")
        self.service.set_timeout(request.match_info["id"], t)
        return web.Response(status=204)

    async def refresh(self, request: web.Request) -> web.Response:
        self.service.extend(request.match_info["id"], _timeout(await _body(request), "duration"))
        return web.Response(status=204)

    async def connect(self, request: web.Request) -> web.Response:
        sbx = self.service.extend(request.match_info["id"], _timeout(await _body(request)))
        return web.json_response(sbx.created(self.version, self.service.domain), status=200)

    async def logs(self, request: web.Request) -> web.Response:
        """The guest's console, line by line (``GET /sandboxes/{id}/logs``)."""
        sbx = self.service.get(request.match_info["id"])
        from vmm import vm as vmm

        path = vmm.Vm(sbx.record.vm).dir / "console.log"
        try:
            lines = path.read_text(errors="replace").splitlines()[-1000:]
        except OSError:
            lines = []
        stamp = sbx.detail(self.version, None)["startedAt"]
        entries = [{"timestamp": stamp, "line": line} for line in lines]
        return web.json_response({"logs": entries, "logEntries": [
            {"timestamp": stamp, "message": line, "level": "info", "fields": {}} for line in lines]})

    async def templates(self, request: web.Request) -> web.Response:
        from sandbox.templates import SandboxTemplate

        return web.json_response([{"templateID": t.name, "aliases": [t.name], "cpuCount": t.cpus,
                                   "memoryMB": t.memory_mb, "public": False, "createdAt": t.created}
                                  for t in SandboxTemplate.list()])

    async def later(self, request: web.Request) -> web.Response:
        self.service.get(request.match_info["id"])
        return error(501, f"{request.path.rsplit('/', 1)[-1]} is not available on this node yet")
