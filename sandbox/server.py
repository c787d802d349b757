"""``cubefs sandbox serve``: one process, two listeners — the E2B API and the sandbox proxy.

Both are aiohttp applications on one asyncio loop, sharing one
``SandboxService``.  SIGTERM/SIGINT stop the listeners and leave the sandboxes
running: a restarted service adopts them (``SandboxService.adopt``).

**A stop is quick.**  aiohttp's own shutdown waits up to 60 s for every open
handler, and an SDK client holding an envd stream open (a background command,
a watch) holds one as long as it likes: a stop took ~47 s.  So a stop first
closes both listeners, then fails the creates queued for a restore (503),
cancels the restores in flight (each cleans up what it made) and ends every
open envd stream and agent session (the client reads the stream's end,
"unavailable"), and only then gives what is still in flight (a snapshot, a
pause) ``STOP_GRACE`` seconds before aiohttp cancels it.  Measured with an
SDK client following a background command: ~47 s before, see docs/design.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cubefs import __version__
from cubefs.errors import UsageError
from sandbox import api, proxy
from sandbox.admission import MAX_WAIT
from sandbox.config import ApiKeys
from sandbox.pool import Capacity
from sandbox.service import SandboxService

log = logging.getLogger("cubefs.sandbox")

STOP_GRACE = 3.0  # seconds a request in flight gets to finish once a stop has ended the streams


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise UsageError(f"listen address {text!r}: use HOST:PORT") from None


@dataclass
class ClusterOptions:
    """``--etcd``: this node joins a cluster (sandbox.cluster.member)."""

    etcd: str
    prefix: str
    node: str
    advertise: str | None = None
    peer: str | None = None  # HOST:PORT of this node's peer chunk server ('cubefs serve --listen')
    lease_ttl: int = 10


async def serve(api_addr: tuple[str, int], proxy_addr: tuple[str, int], keys: ApiKeys,
                domain: str | None = None, kernel: Path | None = None, ready: asyncio.Event | None = None,
                pool_size: int = 0, capacity: Capacity | None = None, cluster: ClusterOptions | None = None,
                network_pool: int | None = None, dns_upstream: list[str] | None = None,
                max_connections: int = 4096, max_restores: int | None = None,
                deny_always: list[str] | None = None, max_queue_wait: float = MAX_WAIT) -> None:
    service = SandboxService(domain, kernel, pool_size, capacity, max_restores, max_queue_wait)
    if network_pool is not None:  # a NIC per sandbox, egress through this node's gateway
        from sandbox.config import state_dir
        from sandbox.network.pool import Networks
        from sandbox.network.protect import Protected

        protected = Protected(deny_always or [], cluster.etcd if cluster else None, state_dir(),
                              cluster.peer if cluster else None)  # refused to every sandbox (protect.py)
        service.network = Networks(state_dir(), network_pool, dns_upstream, max_connections, protected)
    await service.start()
    member = None
    try:
        if cluster is not None:
            member = await _join(service, cluster, api_addr, proxy_addr)
            if service.network is not None:  # the other nodes' addresses, refused to sandboxes as they join
                await _protect_nodes(member, service.network.protected)
    except BaseException:
        await service.close()
        raise
    runners = [web.AppRunner(api.make_app(service, keys, member), access_log=None, shutdown_timeout=STOP_GRACE),
               web.AppRunner(proxy.make_app(service), access_log=None, shutdown_timeout=STOP_GRACE)]
    try:
        for runner, (host, port) in zip(runners, (api_addr, proxy_addr)):
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        log.info("sandbox service: API on http://%s:%d, proxy on http://%s:%d, API keys from %s, %d sandboxes "
                 "adopted, pools of %d, capacity %d vCPUs and %d MiB, %d restores at once", *api_addr, *proxy_addr,
                 keys.source, len(service.sandboxes), pool_size, service.capacity.vcpus, service.capacity.memory_mb,
                 service.restores.limit)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        print(f"cubefs sandbox: API http://{api_addr[0]}:{api_addr[1]}  proxy http://{proxy_addr[0]}:"
              f"{proxy_addr[1]}  (API keys: {keys.source})", flush=True)
        await stop.wait()
        log.info("sandbox service stopping")
    finally:
        t0 = time.monotonic()
        for runner in runners:  # no new request from here on
            for site in list(runner.sites):
                await site.stop()
        await service.quiesce()  # queued creates failed, open streams ended: their handlers return
        for runner in runners:
            await runner.cleanup()
        if member is not None:
            await member.close()
            await member.etcd.close()
        await service.close()
        log.info("sandbox service stopped in %.2f s", time.monotonic() - t0)


async def _protect_nodes(member: Any, protected: Any) -> None:
    """Keep the cluster's nodes in ``protected`` as they join (the member's own watch of
    ``members/``), and wait until the nodes known now are in (5 s at most: etcd answered the
    join a moment ago; the rest go on in the background)."""
    from sandbox.network.protect import node_listener

    told = member.follow_members(node_listener(member.etcd, member.layout.node, protected))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(told), 5.0)


async def _join(service: SandboxService, opts: ClusterOptions, api_addr: tuple[str, int],
                proxy_addr: tuple[str, int]) -> Any:
    """Register this node in the cluster's etcd (a NodeMember)."""
    from sandbox.cluster.etcd import Etcd, EtcdError
    from sandbox.cluster.keys import Layout, NodeInfo, check_node_name
    from sandbox.cluster.member import NodeMember, template_locality

    check_node_name(opts.node)
    host = opts.advertise or api_addr[0]
    if host in ("0.0.0.0", "::", ""):
        raise UsageError("this node listens on every address: say which one the cluster reaches it on "
                         "(--advertise HOST)")
    etcd = Etcd.from_text(opts.etcd)
    info = NodeInfo(opts.node, f"http://{host}:{api_addr[1]}", f"http://{host}:{proxy_addr[1]}", opts.peer or "",
                    started=time.time(), version=__version__)
    member = NodeMember(service, etcd, Layout(opts.prefix), info, opts.lease_ttl, locality=template_locality)
    try:
        await member.start()
    except EtcdError as err:
        await etcd.close()
        raise UsageError(f"cannot join the cluster at {opts.etcd}: {err}") from None
    service.peers_file = str(member.peers_file) if opts.peer else None
    return member
