"""A ``cubefs sandbox serve`` for the benches: started on loopback ports of its own, with its
state in the directories ``env`` names, waited for until ``/health`` answers, stopped.

The sandbox benches each had a copy of this launcher (sandbox_create, sandbox_network);
new ones import it from here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

KEY = "e2b_" + "ab" * 20


def cubefs(env: dict[str, str], *args: str) -> str:
    """``cubefs ARGS`` in ``env``; its stdout, or exit with its error."""
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def bench_env(tmp: Path, kernel: Path, **more: str) -> dict[str, str]:
    """The environment of a node whose every directory is under ``tmp``, its mount server
    too (the machine's, /run/cubefs, is shared: it restarts when anyone's checkout changes,
    and a VM whose root daemon went with it stalls the bench)."""
    return {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
            "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
            "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
            "CUBEFS_SERVER": str(tmp / "serve.sock"), "CUBEFS_SANDBOX_API_KEY": KEY,
            "CUBEFS_VM_KERNEL": str(kernel), **more}


def stop_mount_server(env: dict[str, str]) -> None:
    """The mount server the node's first mount started (its lock file names it): it would
    otherwise wait 15 minutes idle before it exits."""
    try:
        os.kill(int(Path(env["CUBEFS_SERVER"] + ".lock").read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        pass


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


class Service:
    """The service on 127.0.0.1:``port`` (API) and ``port + 1`` (proxy)."""

    def __init__(self, env: dict[str, str], log: Path, pool: int, port: int, extra: tuple[str, ...] = ()) -> None:
        self.api, self.proxy = port, port + 1
        self.proc = subprocess.Popen([sys.executable, "-m", "cubefs", "sandbox", "serve", "--api-listen",
                                      f"127.0.0.1:{self.api}", "--proxy-listen", f"127.0.0.1:{self.proxy}",
                                      "--pool-size", str(pool), *extra], env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        while self.health() is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"the sandbox service exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def use(self) -> None:
        """Point the E2B SDK at this service."""
        os.environ.update({"E2B_API_KEY": KEY, "E2B_API_URL": f"http://127.0.0.1:{self.api}",
                           "E2B_SANDBOX_URL": f"http://127.0.0.1:{self.proxy}"})

    def health(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.api}/health", timeout=2).read()))
        except OSError:
            return None

    def wait_pool(self, n: int, template: str = "base") -> None:
        while (self.health() or {}).get("pools", {}).get(template, 0) < n:
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
