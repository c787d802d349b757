"""``cubefs sandbox serve``: one process, two listeners — the E2B API and the sandbox proxy.

Both are aiohttp applications on one asyncio loop, sharing one
``SandboxService``.  SIGTERM/SIGINT stop the listeners and leave the sandboxes
running: a restarted service adopts them (``SandboxService.adopt``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from cubefs.errors import UsageError
from sandbox import api, proxy
from sandbox.config import ApiKeys
from sandbox.pool import Capacity
from sandbox.service import SandboxService

log = logging.getLogger("cubefs.sandbox")


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise UsageError(f"listen address {text!r}: use HOST:PORT") from None


async def serve(api_addr: tuple[str, int], proxy_addr: tuple[str, int], keys: ApiKeys,
                domain: str | None = None, kernel: Path | None = None, ready: asyncio.Event | None = None,
                pool_size: int = 0, capacity: Capacity | None = None) -> None:
    service = SandboxService(domain, kernel, pool_size, capacity)
    await service.start()
    runners = [web.AppRunner(api.make_app(service, keys), access_log=None),
               web.AppRunner(proxy.make_app(service), access_log=None)]
    try:
        for runner, (host, port) in zip(runners, (api_addr, proxy_addr)):
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        log.info("sandbox service: API on http://%s:%d, proxy on http://%s:%d, API keys from %s, %d sandboxes "
                 "adopted, pools of %d, capacity %d vCPUs and %d MiB", *api_addr, *proxy_addr, keys.source,
                 len(service.sandboxes), pool_size, service.capacity.vcpus, service.capacity.memory_mb)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        print(f"cubefs sandbox: API http://{api_addr[0]}:{api_addr[1]}  proxy http://{proxy_addr[0]}:"
              f"{proxy_addr[1]}  (API keys: {keys.source})", flush=True)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await service.close()
