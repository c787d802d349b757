"""Where the sandbox service keeps its state, and the API keys it accepts.

Everything lives under one private directory (``$CUBEFS_SANDBOX_DIR``, default
``/var/lib/cubefs/sandbox``, 0700): ``templates/NAME.json`` (what a sandbox
template is made of), ``sandboxes/ID.json`` (one per live sandbox: what a
restarted service needs to adopt it again), ``api-keys`` (0600, one key per
line) and ``service.log``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from pathlib import Path

from cubefs.errors import UsageError


def state_dir() -> Path:
    return Path(os.environ.get("CUBEFS_SANDBOX_DIR") or "/var/lib/cubefs/sandbox")


def private_dir(path: Path) -> Path:
    """``path`` made (with parents) and 0700: it holds access tokens and sandbox metadata."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file 0600 atomically (a crash leaves the old one or the new one).  The temporary
    name is the writer's own: two writers of one record (the event loop, a thread) each rename a
    whole file, the last one wins (with one shared name, one renamed the other's away: ENOENT)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ApiKeys:
    """The keys ``X-API-KEY`` must carry: ``$CUBEFS_SANDBOX_API_KEY`` (comma-separated),
    else the lines of a key file.  A service started with neither makes one key in
    ``STATE/api-keys`` (0600) and says where: a listener never runs open."""

    def __init__(self, keys: list[str], source: str) -> None:
        if not keys:
            raise UsageError(f"no API keys in {source}")
        self.keys = [k.encode() for k in keys]
        self.source = source

    @classmethod
    def load(cls, key_file: str | None = None) -> ApiKeys:
        env = os.environ.get("CUBEFS_SANDBOX_API_KEY")
        if env and not key_file:
            return cls([k.strip() for k in env.split(",") if k.strip()], "$CUBEFS_SANDBOX_API_KEY")
        path = Path(key_file) if key_file else state_dir() / "api-keys"
        if not path.exists():
            if key_file:
                raise UsageError(f"API key file {path} does not exist")
            private_dir(path.parent)
            write_private(path, f"e2b_{secrets.token_hex(20)}\n")
        if path.stat().st_mode & 0o077:
            raise UsageError(f"API key file {path} is readable by others: chmod 600 {path}")
        keys = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return cls(keys, str(path))

    def check(self, presented: str | None) -> bool:
        """Constant-time: a wrong key takes as long as a right one."""
        if not presented:
            return False
        given = presented.encode()
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok
