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

**Access.**  envd checks its own access token.  A user port is open to whoever
has its address, as in E2B, unless the sandbox was created with
``network.allowPublicTraffic: false``: then every request (an upgrade too) must
carry the sandbox's ``trafficAccessToken`` in ``e2b-traffic-access-token``, or
gets E2B's 403.  That token is not envd's: whoever is given it to reach a
sandbox's web server cannot run commands in the sandbox.

**As asked at create** (``sandbox.ingress``): ``network.maskRequestHost`` is the Host the
sandbox's servers see; ``network.httpsPorts`` are reached over TLS on the hop into the guest.

A sandbox paused at its timeout with ``autoResume`` is resumed by the first request for it
that would be served (``may_wake``: envd's with its access token, a port's as Access says;
``sandbox.lifecycle``).

``CONNECT`` is refused (405; aiohttp's router already gives it no route), so no
tunnel is ever relayed.  A sandbox holds at most ``MAX_UPGRADED`` open
WebSockets (429 past them).

**Upgrades** (WebSocket) are routed and refused by the same rules, then become
a raw byte relay for the connection's life (``sandbox.relay``): such a
connection is routed once, at its upgrade, as the protocol it switched to
has no further requests.  The proxy asks no more of an upgrade than of plain
HTTP (see Access).  At shutdown the proxy closes the upgraded connections it
holds (aiohttp would wait its shutdown timeout for their handlers otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from typing import Any

from aiohttp import web

from cubefs.errors import CubefsError
from sandbox.answers import not_found, port_closed
from sandbox.envd.auth import token_ok
from sandbox.ingress import TlsError, masked_host
from sandbox.relay import is_upgrade, relay
from sandbox.service import SandboxService

log = logging.getLogger("cubefs.sandbox.proxy")

ENVD_PORT = 49983
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"
MAX_UPGRADED = 1024  # open WebSockets per sandbox: each holds a guest stream and up to 256 KiB queued


def traffic_refused(request: web.Request, record: Any) -> web.Response | None:
    """403 unless the request shows the sandbox's traffic token (``allowPublicTraffic:
    false``), in E2B's header and with its message; None lets it through.  The header is
    passed on: the code interpreter's server takes it as its credential too."""
    given = request.headers.get(TRAFFIC_TOKEN_HEADER)
    if given is not None and hmac.compare_digest(given.encode(), (record.traffic_token or
                                                                   record.access_token).encode()):
        return None
    what = "missing" if given is None else "invalid"
    return web.json_response({"sandboxId": record.sandbox_id, "code": 403,
                              "message": f"Sandbox is secured with traffic access token. Token header "
                                         f"'{TRAFFIC_TOKEN_HEADER}' is {what}"}, status=403)


def may_wake(request: web.Request, record: Any, port: int) -> bool:
    """Whether this request resumes a sandbox paused at its timeout with ``autoResume``: only one
    its envd would serve (its access token) or its ports would (public, or the traffic token).
    A pause asked for through the API is not undone by traffic, and nobody without the sandbox's
    tokens can keep a private one awake by polling its address."""
    if not (record.auto_resume and record.paused_at_timeout):
        return False
    if port == ENVD_PORT:
        return token_ok(record.access_token, request.headers.get("X-Access-Token"))
    return record.public_traffic or traffic_refused(request, record) is None


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
    upgraded: dict[Any, str] = {}  # the transports of upgraded connections open now -> their sandbox

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            sid, port = target(request, service.domain)
        except web.HTTPBadRequest as exc:
            return web.json_response({"code": 400, "message": exc.reason}, status=400)
        sbx = service.sandboxes.get(sid)
        if sbx is not None and sbx.record.state == "paused" and may_wake(request, sbx.record, port):
            try:  # paused at its timeout, resumed by traffic for it (sandbox.lifecycle)
                await service.auto_resume(sbx)
            except CubefsError as err:
                log.warning("sandbox %s: resuming it for traffic: %s", sid, err)
        if sbx is None or sbx.envd is None:
            return not_found(sid)
        if port == ENVD_PORT:
            return await sbx.envd.handle(request)
        if not sbx.record.public_traffic and (refused := traffic_refused(request, sbx.record)) is not None:
            return refused
        if request.method == "CONNECT":  # a tunnel is not a request to relay (h11 would wait for it forever)
            return web.json_response({"sandboxId": sid, "code": 405,
                                      "message": "CONNECT is not relayed into sandboxes"}, status=405)
        transport = request.transport if is_upgrade(request) else None
        if transport is not None:
            if sum(1 for owner in upgraded.values() if owner == sid) >= MAX_UPGRADED:
                return web.json_response({"sandboxId": sid, "code": 429,
                                          "message": f"too many open WebSockets to this sandbox ({MAX_UPGRADED})"},
                                         status=429)
            upgraded[transport] = sid
        try:
            r = sbx.record
            return await relay(request, sbx.channel, port, masked_host(r.mask_request_host, port)
                               if r.mask_request_host else None, port in r.https_ports)
        except ConnectionRefusedError:
            return port_closed(sid, port)
        except (TlsError, ssl.SSLError) as err:  # an httpsPorts port whose server broke TLS
            log.info("sandbox %s port %d: %s", sid, port, err)
            return web.json_response({"sandboxId": sid, "port": port, "code": 502,
                                      "message": f"port {port} of the sandbox did not speak TLS: {err}"}, status=502)
        except CubefsError as err:
            if service.sandboxes.get(sid) is None:
                return not_found(sid)
            log.info("sandbox %s port %d: %s", sid, port, err)
            return port_closed(sid, port)
        finally:
            upgraded.pop(transport, None)

    async def close_upgraded(_app: web.Application) -> None:
        for transport in list(upgraded):
            transport.close()

    app = web.Application(client_max_size=0)  # bodies are streamed, never buffered whole
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_shutdown.append(close_upgraded)
    return app
