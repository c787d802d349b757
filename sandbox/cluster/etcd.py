"""An asyncio etcd v3 client over etcd's JSON gateway (``/v3/...``) on aiohttp.

Why not grpc: the gateway is part of every etcd since 3.3, speaks the same API
(rpc.proto, JSON-mapped: keys and values base64, int64 as strings), and
aiohttp is already a dependency; one more native wheel for five calls is not
worth it.  Measured on this machine (2 shared cores, load 4-5) against a
one-member etcd 3.4.23 on loopback, ``.venv/bin/python tools/bench/etcd_rtt.py``
(1,000 sequential calls each, one pooled connection): **put p50 1.2 ms (p99
3.6 ms), txn (compare + put, a reservation's shape) p50 1.35 ms (p99 4.7 ms),
get p50 0.9 ms**; 20 concurrent tasks on the one session: ~1,700 txns/s
(a run under less load: put 0.9 ms, 2,200 txns/s).  Every call reuses the one
session's pooled connections.

Behaviour that callers rely on:

* Requests go to the endpoint that last answered.  A connection refused or a
  timeout moves to the next endpoint, and the client sticks to the one that
  answers, so a lost member of a three-member cluster costs a caller at most
  one ``timeout`` once.  When no endpoint answers, :class:`EtcdUnavailable`
  comes within about ``timeout`` × endpoints (callers answer 503).
* Put, delete, grant, revoke and the reads are sent again to the next member
  after a timeout: applying them twice leaves the same keys (a second grant's
  lease just expires).  That matters: a member killed while it led leaves the
  proposals it was forwarded unanswered for etcd's request timeout (5.5 s),
  which a client must not wait out (measured: the put right after SIGKILL of
  the leader of a three-member cluster hung past 2 s on a follower; sent again
  after the election it took ~10 ms).  A txn with compares is different
  (one without is a batch of puts and deletes, sent again like them): it is sent again only
  when it certainly was not (the connection was refused) or etcd said it was
  not proposed (no leader); after a timeout or a dropped connection its
  outcome is unknown, and that is what :class:`EtcdUnavailable` says (a
  reservation must neither be applied twice nor be reported lost when it
  won: the caller reads back).
* One aiohttp session and its connection pool serve all requests; a watch
  has its own session (a long-lived streaming response) and survives etcd
  restarts and lost members: it reconnects to the next endpoint and resumes
  at the last revision it delivered + 1, so no event is lost or repeated.  A
  resume from a compacted revision raises :class:`Compacted` (the caller
  re-lists and watches again from the list's revision).
* ``user``/``password`` authenticate with ``/v3/auth/authenticate``; the token
  goes in the ``Authorization`` header and is renewed when etcd says it is
  invalid (simple tokens expire after 5 minutes by default).  ``https`` endpoints
  are verified against ``ca_file`` (or the system's CAs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from cubefs.errors import EXIT_STORE, CubefsError, UsageError

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, CA_ENV = "CUBEFS_ETCD_USER", "CUBEFS_ETCD_PASSWORD", "CUBEFS_ETCD_CA"
UNAVAILABLE = 14  # gRPC code: etcd could not serve it now (no leader, timed out, ...)
UNAUTHENTICATED = 16
WATCH_BACKOFF = (0.05, 1.0)  # seconds between watch reconnects: first, at most


class EtcdError(CubefsError):
    """An answer etcd gave that is an error (the message is etcd's)."""

    exit_code = EXIT_STORE

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time (or a mutation's outcome is unknown): callers answer 503."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials (or wants some and we have none)."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away; re-list and watch from there."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


@dataclass
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KV:
        return cls(_unb64(d.get("key")).decode(errors="surrogateescape"), _unb64(d.get("value")),
                   int(d.get("mod_revision", 0)), int(d.get("create_revision", 0)), int(d.get("version", 0)),
                   int(d.get("lease", 0)))


@dataclass
class Event:
    type: str  # "PUT" or "DELETE" (a DELETE's kv has its key and mod_revision only)
    kv: KV


_RESULTS = {"=": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}


@dataclass
class Compare:
    """One condition of a transaction; build with the class methods."""

    key: str
    target: str  # VERSION, CREATE, MOD, VALUE, LEASE
    op: str  # =, !=, <, >
    field: str
    operand: int | bytes

    @classmethod
    def _make(cls, key: str, target: str, op: str, name: str, operand: int | bytes) -> Compare:
        if op not in _RESULTS:
            raise ValueError(f"compare operator {op!r}: use one of {', '.join(_RESULTS)}")
        return cls(key, target, op, name, operand)

    @classmethod
    def version(cls, key: str, op: str, n: int) -> Compare:
        """``version(key, "=", 0)``: the key does not exist."""
        return cls._make(key, "VERSION", op, "version", n)

    @classmethod
    def create_revision(cls, key: str, op: str, n: int) -> Compare:
        return cls._make(key, "CREATE", op, "create_revision", n)

    @classmethod
    def mod_revision(cls, key: str, op: str, n: int) -> Compare:
        return cls._make(key, "MOD", op, "mod_revision", n)

    @classmethod
    def value(cls, key: str, op: str, value: bytes | str) -> Compare:
        return cls._make(key, "VALUE", op, "value", value.encode() if isinstance(value, str) else value)

    @classmethod
    def lease(cls, key: str, op: str, lease: int) -> Compare:
        return cls._make(key, "LEASE", op, "lease", lease)

    def to_json(self) -> dict[str, Any]:
        operand = _b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        return {"key": _b64(self.key), "target": self.target, "result": _RESULTS[self.op], self.field: operand}


@dataclass
class Op:
    """One request of a transaction; build with :meth:`put`, :meth:`delete`, :meth:`get`."""

    kind: str  # put, delete, get
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes | str, lease: int = 0) -> Op:
        return cls("put", key, value.encode() if isinstance(value, str) else value, lease)

    @classmethod
    def delete(cls, key: str, prefix: bool = False) -> Op:
        return cls("delete", key, prefix=prefix)

    @classmethod
    def get(cls, key: str, prefix: bool = False) -> Op:
        return cls("get", key, prefix=prefix)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key)}
        if self.prefix:
            body["range_end"] = _b64(prefix_end(self.key))
        if self.kind == "put":
            body["value"] = _b64(self.value)
            if self.lease:
                body["lease"] = str(self.lease)
            return {"request_put": body}
        if self.kind == "delete":
            return {"request_delete_range": body}
        return {"request_range": body}


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[Any] = field(default_factory=list)  # per op: list[KV] (get), int deleted (delete), None (put)


def _error_of(status: int, body: dict[str, Any]) -> EtcdError:
    message = str(body.get("message") or body.get("error") or f"HTTP {status}")
    code = int(body.get("code", 0) or 0)
    if "compacted" in message:
        return EtcdError(f"etcd: {message} (the revision asked for is older than etcd keeps)", code)
    if code == UNAUTHENTICATED or "authentication failed" in message or "user name is empty" in message \
            or "invalid auth token" in message or "permission denied" in message:
        return EtcdAuthError(f"etcd refused the request: {message} (check --etcd credentials: "
                             f"${USER_ENV} / ${PASSWORD_ENV})", code)
    if code == UNAVAILABLE:
        return EtcdUnavailable(f"etcd: {message}", code)
    return EtcdError(f"etcd: {message}", code)


def _not_proposed(err: EtcdError) -> bool:
    """etcd refused before proposing (safe to send a mutation again)."""
    return isinstance(err, EtcdUnavailable) and "no leader" in str(err)


class Etcd:
    """A client of one etcd cluster (any of ``endpoints``); create and use it on one asyncio loop."""

    def __init__(self, endpoints: list[str], *, timeout: float = 2.0, user: str | None = None,
                 password: str | None = None, ca_file: str | None = None) -> None:
        if not endpoints:
            raise UsageError("etcd: no endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.user, self.password = user, password
        self.ca_file = ca_file
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._auth_lock: asyncio.Lock | None = None
        self._closed = False

    @classmethod
    def from_text(cls, text: str, **kw: Any) -> Etcd:
        """``http://h:p,https://h:p`` or ``h:p,h:p`` (http).  Credentials from keyword
        arguments or ``$CUBEFS_ETCD_USER`` (``user`` or ``user:password``) and
        ``$CUBEFS_ETCD_PASSWORD``; a CA file from ``$CUBEFS_ETCD_CA``."""
        endpoints = []
        for raw in (p.strip() for p in text.split(",")):
            if not raw:
                continue
            url = raw if "://" in raw else f"http://{raw}"
            try:
                parts = urlsplit(url)
                port = parts.port
            except ValueError:
                port, parts = None, None  # type: ignore[assignment]
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None \
                    or parts.path not in ("", "/") or parts.query or parts.username:
                raise UsageError(f"etcd endpoint {raw!r}: want HOST:PORT or http(s)://HOST:PORT "
                                 "(credentials go in $" + USER_ENV + " / $" + PASSWORD_ENV + ")")
            endpoints.append(f"{parts.scheme}://{parts.netloc}")
        if not endpoints:
            raise UsageError(f"no etcd endpoint in {text!r}: want HOST:PORT[,HOST:PORT...]")
        user = kw.pop("user", None) or os.environ.get(USER_ENV) or None
        password = kw.pop("password", None) or os.environ.get(PASSWORD_ENV)
        if user and ":" in user and password is None:
            user, password = user.split(":", 1)
        if user and password is None:
            raise UsageError(f"etcd user {user!r} without a password: set ${PASSWORD_ENV}")
        kw.setdefault("ca_file", os.environ.get(CA_ENV) or None)
        return cls(endpoints, user=user, password=password, **kw)

    # --- transport -----------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | None:
        if not any(e.startswith("https:") for e in self.endpoints):
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def _new_session(self, limit: int = 64) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=limit, ssl=self._ssl() or False, enable_cleanup_closed=True)
        return aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)

    def _sess(self) -> aiohttp.ClientSession:
        if self._closed:
            raise EtcdError("etcd client is closed")
        if self._session is None:
            self._session = self._new_session()
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _headers(self, endpoint: str, session: aiohttp.ClientSession, renew: bool = False) -> dict[str, str]:
        if self.user is None:
            return {}
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._token is None or renew:
                self._token = None
                status, body = await self._post_once(session, endpoint, "/v3/auth/authenticate",
                                                     {"name": self.user, "password": self.password or ""}, {})
                if status != 200:
                    err = _error_of(status, body)
                    if "not enabled" in str(err):  # a cluster without auth: go on without a token
                        self.user = None
                        return {}
                    raise EtcdAuthError(f"etcd: user {self.user!r} could not log in: "
                                        f"{body.get('message') or status}", err.code)
                self._token = str(body["token"])
        return {"Authorization": self._token}

    async def _post_once(self, session: aiohttp.ClientSession, endpoint: str, path: str, body: dict[str, Any],
                         headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with session.post(endpoint + path, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
            raw = await resp.read()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"message": f"HTTP {resp.status}: {raw[:200]!r}"}
        return resp.status, answer if isinstance(answer, dict) else {}

    async def _call(self, path: str, body: dict[str, Any], once: bool = False) -> dict[str, Any]:
        """POST ``body`` to the endpoint that last worked, failing over as the module says."""
        session = self._sess()
        deadline = time.monotonic() + self.timeout * len(self.endpoints) + self.timeout / 2
        tried: list[str] = []
        renewed = False
        n = len(self.endpoints)
        i = refused = 0  # refused: connections refused in a row (two rounds of them: nobody is there)
        while True:
            endpoint = self.endpoints[(self._current + i) % n]
            try:
                status, answer = await self._post_once(session, endpoint, path, body,
                                                       await self._headers(endpoint, session))
            except aiohttp.ClientConnectorError as err:  # never sent: any request may go elsewhere
                if isinstance(err, aiohttp.ClientSSLError):
                    tried.append(f"{endpoint}: TLS: {err.os_error} (the cluster's CA file: ${CA_ENV})")
                else:
                    tried.append(f"{endpoint}: {err.os_error.strerror or err}")
                refused += 1
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
                why = f"no answer in {self.timeout:.1f}s" if isinstance(err, TimeoutError) \
                    else f"{type(err).__name__}: {err}"
                tried.append(f"{endpoint}: {why}")
                refused = 0
                if once:
                    self._current = (self._current + i + 1) % n
                    raise EtcdUnavailable(f"etcd {endpoint} did not answer a {path.rsplit('/', 1)[-1]} ({why}); "
                                          "its outcome is unknown") from None
            else:
                refused = 0
                if status == 200:
                    self._current = (self._current + i) % n
                    return answer
                err = _error_of(status, answer)
                if isinstance(err, EtcdAuthError) and self.user is not None and not renewed \
                        and "invalid auth token" in str(err):
                    await self._headers(endpoint, session, renew=True)
                    renewed = True
                    continue
                if not isinstance(err, EtcdUnavailable) or (once and not _not_proposed(err)):
                    self._current = (self._current + i) % n
                    raise err
                tried.append(f"{endpoint}: {err}")  # this member cannot serve now: another might
            i += 1
            if time.monotonic() >= deadline or refused >= 2 * n:
                break
            if i % n == 0:  # every endpoint failed once: a short pause, then round again
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise EtcdUnavailable("etcd unavailable: " + "; ".join(tried[-n:]))

    # --- KV --------------------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return KV.from_json(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted by key), and the revision they were read at."""
        answer = await self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [KV.from_json(d) for d in answer.get("kvs") or []], int(answer["header"]["revision"])

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = Op.put(key, value, lease).to_json()["request_put"]
        answer = await self._call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    async def delete(self, key: str, prefix: bool = False) -> int:
        body = Op.delete(key, prefix).to_json()["request_delete_range"]
        answer = await self._call("/v3/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def txn(self, compares: list[Compare], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        """All of ``compares`` hold → ``success`` is applied, else ``failure``; atomically."""
        failure = failure or []
        body = {"compare": [c.to_json() for c in compares], "success": [o.to_json() for o in success],
                "failure": [o.to_json() for o in failure]}
        # Without compares a txn is a batch of puts and deletes: as safe to send again as they are.
        answer = await self._call("/v3/kv/txn", body, once=bool(compares))
        succeeded = bool(answer.get("succeeded", False))
        ops = success if succeeded else failure
        responses: list[Any] = []
        for op, resp in zip(ops, answer.get("responses") or [{}] * len(ops)):
            if op.kind == "get":
                responses.append([KV.from_json(d) for d in (resp.get("response_range") or {}).get("kvs") or []])
            elif op.kind == "delete":
                responses.append(int((resp.get("response_delete_range") or {}).get("deleted", 0)))
            else:
                responses.append(None)
        return TxnResult(succeeded, int(answer["header"]["revision"]), responses)

    # --- leases ----------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self._call("/v3/lease/grant", {"TTL": str(int(ttl))})
        if answer.get("error"):
            raise EtcdError(f"etcd: lease grant: {answer['error']}")
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL again, or 0 when etcd no longer has it."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        if "error" in answer and "result" not in answer:
            raise _error_of(int(answer["error"].get("http_code", 500)), answer["error"])
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go); a lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as err:
            if "lease not found" not in str(err):
                raise

    async def time_to_live(self, lease: int) -> int:
        """Seconds ``lease`` has left, or -1 when it is gone."""
        answer = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    # --- watch -----------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` from ``start_revision`` (0: from now on), in
        revision order, across lost streams and endpoints; raises :class:`Compacted`."""
        next_rev = start_revision
        backoff = WATCH_BACKOFF[0]
        session = self._new_session(limit=4)
        try:
            while True:
                n = len(self.endpoints)
                endpoint = self.endpoints[self._current % n]
                request = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                              **({"start_revision": str(next_rev)} if next_rev else {})}}
                try:
                    # The member cancels the watch when it loses its leader (it would go quiet).
                    headers = {"Grpc-Metadata-hasleader": "true", **await self._headers(endpoint, session)}
                    async with session.post(endpoint + "/v3/watch", json=request, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                                                          sock_connect=self.timeout)) as resp:
                        if resp.status != 200:
                            raw = await resp.read()
                            try:
                                err = _error_of(resp.status, json.loads(raw))
                            except ValueError:
                                err = EtcdUnavailable(f"etcd watch: HTTP {resp.status}")
                            if isinstance(err, EtcdAuthError) and "invalid auth token" in str(err):
                                self._token = None
                                continue
                            raise err
                        async for message in _json_lines(resp.content):
                            if "error" in message:
                                err = _error_of(int(message["error"].get("http_code", 503)), message["error"])
                                raise err if isinstance(err, EtcdAuthError) else EtcdUnavailable(str(err))
                            result = message.get("result") or {}
                            if int(result.get("compact_revision", 0) or 0):
                                compact = int(result["compact_revision"])
                                raise Compacted(f"etcd: revision {next_rev} of {prefix!r} is compacted "
                                                f"(oldest kept: {compact}); list again", compact)
                            if result.get("canceled"):
                                why = result.get("cancel_reason") or "canceled by etcd"
                                raise EtcdUnavailable(f"etcd watch on {endpoint}: {why}")
                            if result.get("created"):
                                backoff = WATCH_BACKOFF[0]
                                if not next_rev:
                                    next_rev = int(result["header"]["revision"]) + 1
                            events = [Event(e.get("type", "PUT"), KV.from_json(e.get("kv") or {}))
                                      for e in result.get("events") or []]
                            events = [e for e in events if e.kv.mod_revision >= next_rev]
                            if events:
                                next_rev = events[-1].kv.mod_revision + 1
                                yield events
                    why = "stream ended"
                except (Compacted, EtcdAuthError):
                    raise
                except (aiohttp.ClientError, TimeoutError, ConnectionError, EtcdError) as err:
                    why = f"{type(err).__name__}: {err}"
                log.info("etcd watch of %r on %s: %s; resuming at revision %d elsewhere", prefix, endpoint, why,
                         next_rev)
                self._current = (self._current + 1) % n
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, WATCH_BACKOFF[1])
        finally:
            await session.close()


async def _json_lines(stream: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The newline-separated JSON objects of a streaming gateway response."""
    buf = b""
    async for chunk in stream.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)


class LeaseKeeper:
    """Keeps one lease alive in the background (a keepalive every ttl/3).

    While etcd is unreachable it keeps trying every second; when etcd answers
    that the lease is gone (it expired meanwhile), ``alive`` turns False and
    ``on_lost`` is called once: whatever was under the lease is gone too."""

    def __init__(self, etcd: Etcd, ttl: int, on_lost: Callable[[], None] | None = None) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_lost = on_lost
        self.lease = 0
        self.alive = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.lease = await self.etcd.grant(self.ttl)
        self.alive = True
        self._task = asyncio.create_task(self._run(), name=f"etcd lease {self.lease:x}")
        return self.lease

    async def _run(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self.etcd.keepalive(self.lease)
            except EtcdError as err:
                log.warning("etcd lease %x: keepalive failed (%s); retrying", self.lease, err)
                interval = min(1.0, max(self.ttl / 3, 0.2))
                continue
            interval = max(self.ttl / 3, 0.2)
            if ttl <= 0:
                self.alive = False
                log.warning("etcd lease %x is gone (it expired while etcd was unreachable)", self.lease)
                if self.on_lost is not None:
                    self.on_lost()
                return

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke and self.alive:
            with contextlib.suppress(EtcdError):
                await self.etcd.revoke(self.lease)
        self.alive = False
