"""The sandbox proxy (``E2B_SANDBOX_URL``): every byte into a sandbox comes through here.

**Routing** is E2B's own rule (infra ``host.go``): when the Host is an IP
literal, ``localhost`` or ``sandbox.DOMAIN``, the ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port`` headers name the target (the SDK sends them when
``E2B_SANDBOX_URL`` is set); any other Host is read as ``PORT-ID.DOMAIN``
(browsers, ``get_host()``).  Routing is per request, never per connection:
with ``E2B_SANDBOX_URL`` every sandbox shares one origin, so the SDK's
keep-alive pool sends requests for different sandboxes down one connection.

**Targets.**  Port 49983 is envd, served on the host (``sandbox.envd``) over
the sandbox's agent channel.  Any other port is relayed as HTTP/1.1 to that
port inside the guest through a TCP stream the agent opens there
(``sandbox.relay``).  An unknown, killed or expired sandbox answers 502 "The
sandbox was not found" (``is_running()`` reads exactly that); a port nothing
listens on, 502 "port is not open" — the SDK maps both substrings.

**Upgrades** (WebSocket) are routed and refused by the same rules, then become
a raw byte relay for the connection's life (``sandbox.relay``): such a
connection is routed once, at its upgrade, as the protocol it switched to
has no further requests.  The proxy asks no more of an upgrade than of plain
HTTP (today: nothing for user ports; envd checks its own access token).  At
shutdown the proxy closes the upgraded connections it holds (aiohttp would
wait its shutdown timeout for their handlers otherwise).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from aiohttp import web

from cubefs.errors import CubefsError
from sandbox.relay import is_upgrade, relay
from sandbox.service import SandboxService

log = logging.getLogger("cubefs.sandbox.proxy")

ENVD_PORT = 49983


def not_found(sandbox_id: str) -> web.Response:
    return web.json_response({"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502},
                             status=502)


def port_closed(sandbox_id: str, port: int) -> web.Response:
    return web.json_response({"sandboxId": sandbox_id, "port": port, "code": 502,
                              "message": f"The sandbox is running but port is not open (port {port})"},
                             status=502)


def _header_host(host: str, domain: str | None) -> bool:
    """Whether routing comes from the headers: the Host is an IP, localhost or sandbox.DOMAIN."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost" or (domain and name == f"sandbox.{domain}"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def target(request: web.Request, domain: str | None) -> tuple[str, int]:
    """(sandbox id, port) of a request; HTTPBadRequest when neither rule names one."""
    host = request.headers.get("Host", "")
    if _header_host(host, domain):
        sid = request.headers.get("E2b-Sandbox-Id", "")
        port = request.headers.get("E2b-Sandbox-Port", "")
    else:
        label = host.split(".", 1)[0]
        port, _, sid = label.partition("-")
    if not sid or not port.isdigit() or not 0 < int(port) < 65536:
        raise web.HTTPBadRequest(reason="no sandbox named: send E2b-Sandbox-Id and E2b-Sandbox-Port, "
                                        "or a Host of PORT-SANDBOXID.DOMAIN")
    return sid, int(port)


def make_app(service: SandboxService) -> web.Application:
    upgraded: set[Any] = set()  # the transports of upgraded connections, open now

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            sid, port = target(request, service.domain)
        except web.HTTPBadRequest as exc:
            return web.json_response({"code": 400, "message": exc.reason}, status=400)
        sbx = service.sandboxes.get(sid)
        if sbx is None or sbx.envd is None:
            return not_found(sid)
        if port == ENVD_PORT:
            return await sbx.envd.handle(request)
        transport = request.transport if is_upgrade(request) else None
        if transport is not None:
            upgraded.add(transport)
        try:
            return await relay(request, sbx.channel, port)
        except ConnectionRefusedError:
            return port_closed(sid, port)
        except CubefsError as err:
            if service.sandboxes.get(sid) is None:
                return not_found(sid)
            log.info("sandbox %s port %d: %s", sid, port, err)
            return port_closed(sid, port)
        finally:
            upgraded.discard(transport)

    async def close_upgraded(_app: web.Application) -> None:
        for transport in list(upgraded):
            transport.close()

    app = web.Application(client_max_size=0)  # bodies are streamed, never buffered whole
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_shutdown.append(close_upgraded)
    return app
