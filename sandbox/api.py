"""The control plane: E2B's REST API (``E2B_API_URL``), as the stock SDK speaks it.

Both create paths are served — ``POST /sandboxes`` (SDK <= 2.50) and ``POST
/v2/sandboxes`` (>= 2.51, with an ``Idempotency-Key``) — and both answer 201
with a ``Sandbox``; every error is JSON ``{code, message}``, since the SDK's
generated parsers read that body for every 4xx/5xx and crash on anything else.
Fields and statuses follow ../shared/e2b-protocol.md section 2.  Pause and
connect (resume), snapshots (a snapshot is a template ID to the SDK), fork, and
our extension ``POST /sandboxes/{id}/rollback`` are the service's (service.py).
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
from sandbox import ingress, lifecycle, usage
from sandbox.admission import AdmissionError, QueueFullError
from sandbox.cluster.keys import RESERVATION_HEADER
from sandbox.config import ApiKeys
from sandbox.network.policy import Policy
from sandbox.pool import CapacityError
from sandbox.service import ConflictError, NoSpaceError, SandboxService

log = logging.getLogger("cubefs.sandbox.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDEMPOTENCY_SECONDS = 600.0
MAX_BODY = 1 << 20  # a control-plane request is a few hundred bytes
PAGE_LIMIT = 100


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


def make_app(service: SandboxService, keys: ApiKeys, member: Any = None) -> web.Application:
    """``member``: the node's :class:`sandbox.cluster.member.NodeMember` when it is in a cluster."""
    middlewares = [_errors, _auth(keys)] + ([_publish(member)] if member is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app["service"] = service
    api = Api(service)
    r = app.router
    r.add_get("/health", api.health)
    r.add_get("/metrics", api.metrics)
    r.add_post("/sandboxes", api.create)
    r.add_post("/v2/sandboxes", api.create)
    r.add_get("/sandboxes", api.list_v1)
    r.add_get("/v2/sandboxes", api.list_v2)
    r.add_get("/sandboxes/metrics", api.usage_of_many)  # before /sandboxes/{id}
    r.add_get("/sandboxes/{id}", api.get)
    r.add_get("/sandboxes/{id}/metrics", api.usage_of)
    r.add_delete("/sandboxes/{id}", api.kill)
    r.add_post("/sandboxes/{id}/timeout", api.timeout)
    r.add_post("/sandboxes/{id}/refreshes", api.refresh)
    r.add_post("/sandboxes/{id}/connect", api.connect)
    r.add_post("/v2/sandboxes/{id}/connect", api.connect)
    r.add_get("/sandboxes/{id}/logs", api.logs)
    r.add_get("/templates", api.templates)
    r.add_post("/sandboxes/{id}/pause", api.pause)
    r.add_post("/sandboxes/{id}/resume", api.resume)
    r.add_post("/sandboxes/{id}/snapshots", api.snapshot)
    r.add_post("/sandboxes/{id}/fork", api.fork)
    r.add_post("/sandboxes/{id}/rollback", api.rollback)  # an extension of ours
    r.add_get("/snapshots", api.snapshots)
    r.add_delete("/templates/{id}", api.delete_template)
    r.add_put("/sandboxes/{id}/network", api.network)
    r.add_get("/sandboxes/{id}/network", api.traffic)
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
    except ConflictError as err:
        return error(409, str(err))
    except NoSpaceError as err:
        return error(507, str(err))
    except QueueFullError as err:  # not queued: its turn would come after the SDK gave up
        return error(503, str(err), headers={"Retry-After": str(err.retry_after)})
    except AdmissionError as err:  # a queued restore that will not run: the service stops (or nobody waits)
        return error(503, str(err))
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


def _publish(member: Any) -> Any:
    """In a cluster, a request that changed what this node runs (a create, a kill, a snapshot, a
    fork) is answered once etcd has it: the SDK's next request may reach any front, which must
    already route it.  A create's reservation (from the front that placed it) is deleted in the
    same transaction that publishes the sandbox it became."""
    @web.middleware
    async def publish(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.monotonic()
        response = await handler(request)
        if request.method != "GET" and response.status < 300:
            member.filled(request.headers.get(RESERVATION_HEADER))
            if not await member.settle():
                log.warning("%s %s: answered before etcd had it (etcd does not answer)", request.method,
                            request.path)
            # The node's own time (publishing included): what a front added is the rest.
            response.headers["Server-Timing"] = f"node;dur={(time.monotonic() - t0) * 1000:.1f}"
        return response
    return publish


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


UNSUPPORTED = {"mcp": "E2B's MCP gateway", "iam": "workload identity tokens", "volumeMounts": "E2B volumes"}


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


def _gone(request: web.Request) -> bool:
    """The client closed the request's connection (its timeout passed): nobody reads the answer."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _page(items: list[dict[str, Any]], query: Any, key: str) -> web.Response:
    """Pages of ``limit``; ``X-Next-Token`` (the last ``key`` given) when more remain."""
    try:
        limit = max(1, min(int(query.get("limit", PAGE_LIMIT)), PAGE_LIMIT))
    except ValueError:
        raise UsageError("limit must be a number") from None
    token = query.get("nextToken")
    if token:
        ids = [s[key] for s in items]
        if token not in ids:
            raise UsageError("nextToken is not valid (what it names is gone: list again)")
        items = items[ids.index(token) + 1:]
    page, rest = items[:limit], items[limit:]
    headers = {"X-Next-Token": page[-1][key]} if rest else {}
    return web.json_response(page, headers=headers)


class Api:
    def __init__(self, service: SandboxService) -> None:
        self.service = service
        self.idempotent: dict[str, tuple[float, asyncio.Future[Any]]] = {}
        self.usage: dict[str, usage.Usage] = {}  # sandbox -> its samples (sandbox/usage.py)
        self.askers: dict[str, list[web.Request]] = {}  # an idempotent create's requests, first and retries

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
        for field, what in UNSUPPORTED.items():  # a sandbox without what its user asked for is not made
            if doc.get(field):
                raise UsageError(f"{field} ({what}) is not supported by this node")
        args = (template, _timeout(doc), _str_map(doc, "metadata"), _str_map(doc, "envVars"))
        policy = Policy.from_api(doc.get("network"), doc.get("allow_internet_access"))  # a bad one: 400, nothing made
        reach = ingress.Ingress.from_api(doc.get("network"))
        life = lifecycle.Lifecycle.from_api(doc)
        key = request.headers.get("Idempotency-Key")
        if key:  # a retried create gets the sandbox the first attempt made, never a second one
            now = time.monotonic()
            for k in [k for k, (t, _) in self.idempotent.items() if now - t > IDEMPOTENCY_SECONDS]:
                del self.idempotent[k]
            askers = self.askers.setdefault(key, [])
            askers.append(request)
            if key not in self.idempotent:  # queued, it is dropped once every request for it has gone
                self.idempotent[key] = (now, asyncio.ensure_future(
                    self.service.create(*args, gone=lambda: all(map(_gone, askers)))))
            future = self.idempotent[key][1]
            try:
                sbx = await asyncio.shield(future)
            except BaseException:
                if len(askers) == 1:  # the last asker: a retry after this starts afresh (others still wait on it)
                    self.idempotent.pop(key, None)
                    if not future.done():  # it was cancelled (a stop): so is the create
                        future.cancel()
                raise
            finally:
                askers.remove(request)
                if not askers:
                    self.askers.pop(key, None)
        else:
            sbx = await self.service.create(*args, gone=lambda: _gone(request))
        self._set_policy(sbx.id, policy)
        if reach.apply(sbx.record) | life.apply(sbx.record):  # before its ID leaves this node
            sbx.record.save()
        return web.json_response(sbx.created(self.version, self.service.domain), status=201)

    def _listed(self, request: web.Request) -> list[dict[str, Any]]:
        q = request.query
        want = dict(parse_qsl(q.get("metadata", ""), keep_blank_values=True))
        states = {s for s in q.get("state", "running").split(",") if s}
        out = []
        for sbx in self.service.list():
            if ("paused" if sbx.record.state == "paused" else "running") not in states:
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
        return _page(self._listed(request), request.query, "sandboxID")

    async def get(self, request: web.Request) -> web.Response:
        sbx = self.service.get(request.match_info["id"])
        detail = sbx.detail(self.version, self.service.domain)
        detail["network"] = ingress.api_fields(sbx.record)  # SandboxDetail's optional fields
        detail |= lifecycle.api_fields(sbx.record)
        if (policy := self._policy(sbx.id)) is not None:
            detail |= {"allowInternetAccess": policy.internet}
            detail["network"] |= policy.api()
        return web.json_response(detail)

    async def usage_of(self, request: web.Request) -> web.Response:
        """``GET /sandboxes/{id}/metrics``: a sample now (a running sandbox), then every sample
        kept within ``start``..``end``."""
        start, end = usage.bounds(request.query)
        samples = await self._sampled(self.service.get(request.match_info["id"]))
        return web.json_response(samples.between(start, end))

    async def usage_of_many(self, request: web.Request) -> web.Response:
        """``GET /sandboxes/metrics?sandbox_ids=A,B``: each one's latest sample, sampled at once
        (unknown ones left out; at most ``usage.MANY``)."""
        ids = list(dict.fromkeys(s for s in request.query.get("sandbox_ids", "").split(",") if s))[:usage.MANY]
        found = [sbx for sid in ids if (sbx := self.service.sandboxes.get(sid)) is not None]
        sampled = await asyncio.gather(*(self._sampled(sbx) for sbx in found))
        latest = {sbx.id: got.samples[-1].api() for sbx, got in zip(found, sampled, strict=True) if got.samples}
        return web.json_response({"sandboxes": latest})

    async def _sampled(self, sbx: Any) -> usage.Usage:
        for gone in [s for s in self.usage if s not in self.service.sandboxes]:
            del self.usage[gone]
        samples = self.usage.setdefault(sbx.id, usage.Usage())
        if sbx.record.state == "running" and sbx.channel is not None and not sbx.busy.locked():
            try:
                await samples.sample(sbx.channel)
            except CubefsError as err:  # what was kept is still an answer
                log.warning("sandbox %s: usage: %s", sbx.id, err)
        return samples

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
        """200 for a running sandbox (its TTL only lengthened), 201 for a paused one resumed."""
        sid = request.match_info["id"]
        resumed = await self.service.resume(sid, _timeout(await _body(request)))
        return web.json_response(self.service.get(sid).created(self.version, self.service.domain),
                                 status=201 if resumed else 200)

    async def resume(self, request: web.Request) -> web.Response:
        """The deprecated ``POST /sandboxes/{id}/resume``: 201, or 409 if it was not paused."""
        sid = request.match_info["id"]
        if self.service.get(sid).record.state != "paused":
            raise ConflictError(f"sandbox {sid} is not paused")
        await self.service.resume(sid, _timeout(await _body(request)))
        return web.json_response(self.service.get(sid).created(self.version, self.service.domain), status=201)

    async def pause(self, request: web.Request) -> web.Response:
        await self.service.pause(request.match_info["id"])
        return web.Response(status=204)

    async def snapshot(self, request: web.Request) -> web.Response:
        doc = await _body(request)
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise UsageError("name must be a string")
        memory = doc.get("memory", True)
        if not isinstance(memory, bool):
            raise UsageError("memory must be true or false")
        rec = await self.service.snapshot(request.match_info["id"], name or None, memory=memory)
        return web.json_response(rec.info(), status=201)

    async def snapshots(self, request: web.Request) -> web.Response:
        """``GET /snapshots?sandboxID=&name=&limit=&nextToken=``, pages as the sandbox list."""
        q = request.query
        items = [s.info() for s in self.service.list_snapshots(q.get("sandboxID") or None, q.get("name") or None)]
        return _page(items, q, "snapshotID")

    async def delete_template(self, request: web.Request) -> web.Response:
        """``DELETE /templates/{id}``: how the SDK deletes a snapshot (templates are the CLI's)."""
        if not await self.service.delete_snapshot(request.match_info["id"]):
            raise NotFoundError(f"snapshot {request.match_info['id']!r} not found")
        return web.Response(status=204)

    async def network(self, request: web.Request) -> web.Response:
        """``PUT /sandboxes/{id}/network``: the sandbox's whole egress policy from now on (what
        the body leaves out is cleared, as E2B's API says)."""
        doc = await _body(request)
        sbx = self.service.get(request.match_info["id"])
        if self.service.network is None:
            raise UsageError("this node's sandboxes have no network ('cubefs sandbox serve --network')")
        self._set_policy(sbx.id, Policy.from_api(doc, doc.get("allow_internet_access")))
        return web.Response(status=204)

    async def traffic(self, request: web.Request) -> web.Response:
        """``GET /sandboxes/{id}/network`` (cubefs's own): the policy, and the connections and
        bytes so far (sandbox/network/accounting.py): totals, open ones, the last ended."""
        sbx = self.service.get(request.match_info["id"])
        if self.service.network is None:
            raise UsageError("this node's sandboxes have no network ('cubefs sandbox serve --network')")
        doc: dict[str, Any] = {"sandboxID": sbx.id}
        if (policy := self._policy(sbx.id)) is not None:
            doc |= {"allowInternetAccess": policy.internet, "network": policy.api()}
        return web.json_response(doc | {"traffic": self.service.network.traffic(sbx.id)})

    def _set_policy(self, sandbox_id: str, policy: Policy | None) -> None:
        if self.service.network is not None and policy is not None:
            self.service.network.set_policy(sandbox_id, policy)

    def _policy(self, sandbox_id: str) -> Policy | None:
        return self.service.network.policy(sandbox_id) if self.service.network is not None else None

    async def fork(self, request: web.Request) -> web.Response:
        doc = await _body(request)
        count = doc.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool):
            raise UsageError("count must be a whole number")
        results = await self.service.fork(request.match_info["id"], count, _timeout(doc))
        out: list[dict[str, Any]] = []
        for res in results:
            if isinstance(res, BaseException):
                code = (429 if isinstance(res, CapacityError) else 404 if isinstance(res, NotFoundError)
                        else 503 if isinstance(res, AdmissionError) else 500)
                out.append({"error": {"code": code, "message": str(res) or type(res).__name__}})
            else:
                self._set_policy(res.id, self._policy(request.match_info["id"]))  # a fork goes out as its parent
                out.append({"sandbox": res.created(self.version, self.service.domain)})
        return web.json_response(out, status=201)

    async def rollback(self, request: web.Request) -> web.Response:
        """``POST /sandboxes/{id}/rollback {"snapshotID": ...}``: back to a snapshot, in place."""
        doc = await _body(request)
        snap = doc.get("snapshotID")
        if not isinstance(snap, str) or not snap:
            raise UsageError("snapshotID is required")
        sbx = await self.service.rollback(request.match_info["id"], snap)
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


