"""A small client of the sandbox service for the CLI (``cubefs sandbox ls/create/exec/logs/kill``).

Standard library only, so the CLI starts fast and needs no SDK: JSON over
``http.client`` for the API, and for ``exec`` the envd ``process.Process/Start``
server stream (Connect, JSON codec: 5-byte envelopes) through the proxy, its
output written as it arrives.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import struct
import sys
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from cubefs.errors import CubefsError, NotFoundError, StoreUnavailableError, UsageError
from sandbox.config import state_dir

ENVD_PORT = 49983


def default_key() -> str:
    for env in ("E2B_API_KEY", "CUBEFS_SANDBOX_API_KEY"):
        if os.environ.get(env):
            return os.environ[env].split(",")[0].strip()
    path = state_dir() / "api-keys"
    try:
        return next(line.strip() for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    except (OSError, StopIteration):
        raise UsageError(f"no API key: set E2B_API_KEY, or run where {path} is readable") from None


class Client:
    def __init__(self, api_url: str | None = None, proxy_url: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0) -> None:
        self.api = urlsplit(api_url or os.environ.get("E2B_API_URL") or "http://127.0.0.1:3000")
        self.proxy = urlsplit(proxy_url or os.environ.get("E2B_SANDBOX_URL") or "http://127.0.0.1:3002")
        self.key = api_key or default_key()
        self.timeout = timeout

    def _conn(self, url: Any) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        return cls(url.hostname or "127.0.0.1", url.port, timeout=self.timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = self._conn(self.api)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"X-API-KEY": self.key, "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except OSError as err:
            raise StoreUnavailableError(f"sandbox service at {self.api.geturl()} unreachable: {err}") from None
        finally:
            conn.close()
        doc = json.loads(data) if data else None
        if resp.status == 404:
            raise NotFoundError(doc.get("message") if isinstance(doc, dict) else f"{path}: not found")
        if resp.status >= 400:
            message = doc.get("message") if isinstance(doc, dict) else data.decode(errors="replace")
            raise (UsageError if resp.status < 500 else CubefsError)(f"{message} (HTTP {resp.status})")
        return doc

    def exec(self, sandbox_id: str, cmd: str, env: dict[str, str] | None = None, cwd: str | None = None,
             user: str | None = None, out: BinaryIO | None = None, err: BinaryIO | None = None,
             timeout: float | None = None) -> int:
        """Run ``cmd`` with bash in the sandbox, output streamed to ``out``/``err``; its exit code."""
        token = self.call("GET", f"/sandboxes/{sandbox_id}").get("envdAccessToken") or ""
        process: dict[str, Any] = {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": env or {}}
        if cwd:
            process["cwd"] = cwd
        msg = json.dumps({"process": process, "stdin": False}).encode()
        headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
                   "E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT), "X-Access-Token": token}
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        if timeout:
            headers["Connect-Timeout-Ms"] = str(int(timeout * 1000))
        conn = self._conn(self.proxy)
        out = out or sys.stdout.buffer
        err = err or sys.stderr.buffer
        try:
            conn.request("POST", "/process.Process/Start", body=struct.pack(">BI", 0, len(msg)) + msg,
                         headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                doc = resp.read()
                raise CubefsError(f"exec in sandbox {sandbox_id}: HTTP {resp.status}: "
                                  f"{doc.decode(errors='replace')[:300]}")
            while True:
                head = resp.read(5)
                if len(head) < 5:
                    raise CubefsError(f"exec in sandbox {sandbox_id}: the stream ended without the command's end")
                flags, size = struct.unpack(">BI", head)
                frame = json.loads(resp.read(size) or b"{}")
                if flags & 2:
                    error = frame.get("error")
                    if error:
                        raise CubefsError(f"exec in sandbox {sandbox_id}: {error.get('code')}: {error.get('message')}")
                    raise CubefsError(f"exec in sandbox {sandbox_id}: the stream ended without the command's end")
                event = frame.get("event", {})
                if "data" in event:
                    for key, sink in (("stdout", out), ("stderr", err), ("pty", out)):
                        if key in event["data"]:
                            sink.write(base64.b64decode(event["data"][key]))
                            sink.flush()
                elif "end" in event:
                    end = event["end"]
                    code = int(end.get("exitCode", end.get("exit_code", 0)))
                    return code if code >= 0 else 128 + 9
        except OSError as e:
            raise StoreUnavailableError(f"sandbox proxy at {self.proxy.geturl()} unreachable: {e}") from None
        finally:
            conn.close()

