"""Who may call envd, and as which user.

* The access token (``X-Access-Token``) is compared in constant time (``hmac.compare_digest``), so
  the answer's timing says nothing about how much of a guess was right.
* ``/files`` also accepts a signed URL instead of the header (``download_url``/``upload_url``):
  ``v1_`` + unpadded base64 of sha256(``"{path}:{read|write}:{user}:{token}[:{expiration}]"``), with an
  expiration in Unix seconds that must not have passed.
* The user is chosen with ``Authorization: Basic base64("user:")`` (empty password); ``/files`` also
  takes ``?username=``.  No header means the sandbox's default user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time

from aiohttp import web

from sandbox.envd.connect import ConnectError

# A POSIX user name as useradd accepts it (and as it can appear in a passwd line).
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?", re.IGNORECASE)


def token_ok(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` is the access token (always true when the sandbox has none)."""
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def check_token(request: web.Request, expected: str | None) -> None:
    if not token_ok(expected, request.headers.get("X-Access-Token")):
        raise ConnectError("unauthenticated", "invalid or missing access token (X-Access-Token)")


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration is not None else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def check_files_access(request: web.Request, expected: str | None, operation: str, user: str | None) -> None:
    """``/files`` auth: the header, or a valid unexpired signature for this path, operation and user."""
    if expected is None or token_ok(expected, request.headers.get("X-Access-Token")):
        return
    given = request.query.get("signature")
    if given is None:
        raise ConnectError("unauthenticated", "invalid or missing access token (X-Access-Token or signature)")
    expiration_text = request.query.get("signature_expiration")
    expiration = None
    if expiration_text is not None:
        if not expiration_text.isdigit():
            raise ConnectError("unauthenticated", "signature_expiration is not a Unix time")
        expiration = int(expiration_text)
        if expiration < time.time():
            raise ConnectError("unauthenticated", "the signature has expired")
    path = request.query.get("path", "")
    wanted = signature(path, operation, user or "", expected, expiration)
    if not hmac.compare_digest(wanted.encode(), given.encode()):
        raise ConnectError("unauthenticated", "invalid signature for this path, operation and user")


def valid_user(name: str) -> str:
    if not _USER_RE.fullmatch(name):
        raise ConnectError("invalid_argument", f"invalid user name {name!r}")
    return name


def basic_user(request: web.Request) -> str | None:
    """The user named by ``Authorization: Basic base64("user:")``, or None for the default user."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise ConnectError("unauthenticated", f"unsupported Authorization scheme {scheme!r}")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ConnectError("unauthenticated", "malformed Basic authorization") from None
    name = decoded.partition(":")[0]
    return valid_user(name) if name else None


def files_user(request: web.Request) -> str | None:
    """The user of a ``/files`` call: ``?username=``, else the Basic header, else the default."""
    name = request.query.get("username")
    if name:
        return valid_user(name)
    return basic_user(request)
