"""An asyncio etcd v3 client over etcd's native gRPC API (``grpc.aio``).

Why gRPC and not etcd's JSON gateway (which this client spoke first): the
cluster scheduler's placement rate (issue 15: >= 500 placements/s at 1,000
simulated nodes, one front) is bound by CPU, and etcd's share was the largest.
Measured on this machine (2 shared cores) with 3,000 puts, 20 at once, against
a one-member etcd 3.4 on loopback: the gateway ~1,500 puts/s at 0.36-0.41 ms
of etcd CPU and 0.26-0.29 ms of client CPU per put; gRPC ~3,200 puts/s at
0.14-0.15 ms and 0.17-0.18 ms (the gateway is a gRPC client inside etcd: every
call is decoded from JSON, re-encoded as protobuf and sent over a loopback
connection once more; a watch event sent as JSON costs ~52 us of etcd CPU).
Re-measured with this client (same burst, etcd's data on tmpfs, the JSON
client from git in the same run): 3,270-3,550 puts/s at 0.14 ms etcd CPU and
0.18 ms client CPU per put, against 1,730-1,950 puts/s at 0.29 and 0.23 ms;
``.venv/bin/python tools/bench/etcd_rtt.py`` (1,000 sequential calls each):
put p50 0.85-1.07 ms, txn (compare + put, a reservation's shape) p50
0.95-1.1 ms, get p50 0.56-0.71 ms, against 1.43-1.8, 1.36-1.48 and 0.82-0.91 ms
over the gateway (load 3-4 on the 2 cores).

The messages and stubs are the ones generated from etcd's ``rpc.proto``,
``kv.proto`` and ``auth.proto`` that the ``aetcd`` package ships
(``aetcd.rpc``): a maintained build of exactly those files, regenerated for
current protobuf runtimes, so this repository carries no generated code and
no protoc step; only the messages and stubs are used, not aetcd's client.

Behaviour that callers rely on:

* One ``grpc.aio`` channel per endpoint (one HTTP/2 connection, every call
  and watch multiplexed on it), created on first use and reused.  Requests go
  to the endpoint that last answered.  A connection refused or a timeout
  moves to the next endpoint, and the client sticks to the one that answers,
  so a lost member of a three-member cluster costs a caller at most one
  ``timeout`` once.  When no endpoint answers, :class:`EtcdUnavailable` comes
  within about ``timeout`` x endpoints (callers answer 503).  A channel whose
  connect was refused is replaced by a fresh one, so a member that comes back
  is used at once instead of after gRPC's reconnect backoff.
* Put, delete, grant, keepalive, revoke and the reads are sent again to the
  next member after a timeout: applying them twice leaves the same keys (a
  second grant's lease just expires).  That matters: a member killed while it
  led leaves the proposals it was forwarded unanswered for etcd's request
  timeout (5.5 s), which a client must not wait out (measured: the put right
  after SIGKILL of the leader of a three-member cluster hung past 2 s on a
  follower; sent again after the election it took ~10 ms).  A txn with
  compares is different (one without is a batch of puts and deletes, sent
  again like them): it is sent again only when it certainly was not (the
  connection was refused) or etcd said it was not proposed (no leader); after
  a timeout or a dropped connection its outcome is unknown, and that is what
  :class:`EtcdUnavailable` says (a reservation must neither be applied twice
  nor be reported lost when it won: the caller reads back).
* A watch is one bidirectional ``Watch`` stream on the endpoint's channel; it
  survives etcd restarts and lost members: it reconnects to the next endpoint
  and resumes at the last revision it delivered + 1, so no event is lost or
  repeated.  It asks for a member with a leader (``hasleader`` metadata: a
  member cut off from the others cancels the watch instead of going quiet).
  A resume from a compacted revision raises :class:`Compacted` (the caller
  re-lists and watches again from the list's revision).
* A keepalive is one request and one answer on a ``LeaseKeepAlive`` stream
  (etcdctl's ``keep-alive --once``): a keeper renews every ttl/3, rarely
  enough that a stream held open per lease would save nothing that shows.
* ``user``/``password`` authenticate with ``Auth.Authenticate``; the token goes
  in the ``token`` metadata and is renewed when etcd says it is invalid
  (simple tokens expire after 5 minutes by default).  ``https`` endpoints are
  verified against ``ca_file`` (or the system's CAs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

# gRPC's C core logs at INFO to stderr by default (a line per failed TLS handshake): errors only,
# unless the user asked for more.  It reads this once, when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from grpc import aio

from cubefs.errors import EXIT_STORE, CubefsError, UsageError

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, CA_ENV = "CUBEFS_ETCD_USER", "CUBEFS_ETCD_PASSWORD", "CUBEFS_ETCD_CA"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]  # 14: etcd could not serve it now (no leader, timed out, ...)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]  # 16
WATCH_BACKOFF = (0.05, 1.0)  # seconds between watch reconnects: first, at most
# gRPC's own reconnect backoff (1 s doubling to 120 s by default) would leave a member that came back
# unused for minutes; a connection keepalive notices a member that vanished without a reset (a host
# gone) within ~15 s (etcd refuses pings more often than every 5 s); ranges of thousands of nodes'
# records exceed gRPC's default 4 MiB receive limit.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000), ("grpc.max_receive_message_length", -1),
    ("grpc.use_local_subchannel_pool", 1),  # a replaced channel connects afresh, not through the old one
)
T = TypeVar("T")
_TIMEOUT = "no answer in time"
_EVENT_TYPES = {0: "PUT", 1: "DELETE"}  # mvccpb.Event.EventType


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


def _bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


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
    def from_pb(cls, kv: Any) -> KV:
        """From an ``mvccpb.KeyValue``."""
        return cls(kv.key.decode(errors="surrogateescape"), kv.value, kv.mod_revision, kv.create_revision,
                   kv.version, kv.lease)


@dataclass
class Event:
    type: str  # "PUT" or "DELETE" (a DELETE's kv has its key and mod_revision only)
    kv: KV


_RESULTS = {"=": pb.Compare.EQUAL, "!=": pb.Compare.NOT_EQUAL, ">": pb.Compare.GREATER, "<": pb.Compare.LESS}
_TARGETS = {"VERSION": pb.Compare.VERSION, "CREATE": pb.Compare.CREATE, "MOD": pb.Compare.MOD,
            "VALUE": pb.Compare.VALUE, "LEASE": pb.Compare.LEASE}


@dataclass
class Compare:
    """One condition of a transaction; build with the class methods.

    ``range_end`` (etcd >= 3.3) makes it a condition on every key in ``[key, range_end)``, true when it
    holds for all of them (``prefix_end(key)``: every key under ``key``; none there: true)."""

    key: str
    target: str  # VERSION, CREATE, MOD, VALUE, LEASE
    op: str  # =, !=, <, >
    field: str
    operand: int | bytes
    range_end: bytes = b""

    @classmethod
    def _make(cls, key: str, target: str, op: str, name: str, operand: int | bytes,
              range_end: bytes | str) -> Compare:
        if op not in _RESULTS:
            raise ValueError(f"compare operator {op!r}: use one of {', '.join(_RESULTS)}")
        return cls(key, target, op, name, operand, _bytes(range_end))

    @classmethod
    def version(cls, key: str, op: str, n: int, range_end: bytes | str = b"") -> Compare:
        """``version(key, "=", 0)``: the key does not exist."""
        return cls._make(key, "VERSION", op, "version", n, range_end)

    @classmethod
    def create_revision(cls, key: str, op: str, n: int, range_end: bytes | str = b"") -> Compare:
        return cls._make(key, "CREATE", op, "create_revision", n, range_end)

    @classmethod
    def mod_revision(cls, key: str, op: str, n: int, range_end: bytes | str = b"") -> Compare:
        """``mod_revision(p, "<", r + 1, range_end=prefix_end(p))``: nothing under ``p`` changed after ``r``."""
        return cls._make(key, "MOD", op, "mod_revision", n, range_end)

    @classmethod
    def value(cls, key: str, op: str, value: bytes | str, range_end: bytes | str = b"") -> Compare:
        return cls._make(key, "VALUE", op, "value", _bytes(value), range_end)

    @classmethod
    def lease(cls, key: str, op: str, lease: int, range_end: bytes | str = b"") -> Compare:
        return cls._make(key, "LEASE", op, "lease", lease, range_end)

    def to_pb(self) -> Any:
        """As an ``etcdserverpb.Compare``."""
        return pb.Compare(key=self.key.encode(), target=_TARGETS[self.target], result=_RESULTS[self.op],
                          range_end=self.range_end, **{self.field: self.operand})


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
        return cls("put", key, _bytes(value), lease)

    @classmethod
    def delete(cls, key: str, prefix: bool = False) -> Op:
        return cls("delete", key, prefix=prefix)

    @classmethod
    def get(cls, key: str, prefix: bool = False) -> Op:
        return cls("get", key, prefix=prefix)

    def request(self) -> Any:
        """The bare request: a ``PutRequest``, ``DeleteRangeRequest`` or ``RangeRequest``."""
        end = prefix_end(self.key) if self.prefix else b""
        if self.kind == "put":
            return pb.PutRequest(key=self.key.encode(), value=self.value, lease=self.lease)
        if self.kind == "delete":
            return pb.DeleteRangeRequest(key=self.key.encode(), range_end=end)
        return pb.RangeRequest(key=self.key.encode(), range_end=end)

    def to_pb(self) -> Any:
        """As a ``RequestOp`` of a transaction."""
        name = {"put": "request_put", "delete": "request_delete_range"}.get(self.kind, "request_range")
        return pb.RequestOp(**{name: self.request()})


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[Any] = field(default_factory=list)  # per op: list[KV] (get), int deleted (delete), None (put)


def _error_of(code: int, message: str) -> EtcdError:
    """What an error etcd answered means to a caller (``message`` is etcd's, ``etcdserver: ...``)."""
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


_CLOSED = "its channel was closed under it (another call found the endpoint unreachable)"


def _cancelled_here() -> bool:
    """The running task was asked to stop: a CancelledError is the caller's, not the channel's.

    grpc.aio raises CancelledError from a call whose channel was closed, and :meth:`Etcd._drop`
    closes an endpoint's channel when one call finds it unreachable, with other calls still out
    on it: those must fail like a lost answer, not cancel their caller.  Seen with every member
    SIGSTOPped: a reservation's transaction ended as CancelledError, and the front's create
    handler with it (the client saw its connection dropped instead of a 503)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Lost(Exception):
    """The request may have reached etcd but no answer came (timeout, dropped connection)."""


class _Refused(Exception):
    """The request never left: no connection to the endpoint (refused, TLS handshake failed)."""


def _sort(code: grpc.StatusCode, details: str | None) -> EtcdError | _Lost | _Refused:
    """An RPC's failure: an answer etcd gave, or which of the two transport failures it was."""
    details = details or ""
    if details.startswith(("etcdserver:", "mvcc:", "auth:", "lease")):
        return _error_of(code.value[0], details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _Lost(_TIMEOUT)
    if code == grpc.StatusCode.UNAVAILABLE:
        # gRPC says "failed to connect to all addresses; last error: UNKNOWN: ipv4:H:P: Failed to connect
        # to remote host: Connection refused": what came last is what a reader needs.
        last = re.sub(r"^.*last error: [A-Z_]+: (ipv[46]:\S+: )?", "", details)
        low = details.lower()
        if "handshake" in low or "ssl_error" in low or "certificate" in low:
            if "certificate_verify_failed" in low:
                last = "certificate verify failed: " + last.rsplit("CERTIFICATE_VERIFY_FAILED: ", 1)[-1]
            return _Refused(f"TLS: {last.removesuffix(': OK')} (the cluster's CA file: ${CA_ENV})")
        if "failed to connect" in low or "connection refused" in low or "resolution" in low:
            return _Refused(last)
        return _Lost(last)
    if code == grpc.StatusCode.CANCELLED:
        return _Lost(details or "cancelled")
    return _error_of(code.value[0], details)


@dataclass
class _Channel:
    """One endpoint's channel and the stubs on it."""

    endpoint: str
    channel: aio.Channel
    kv: pb_grpc.KVStub
    lease: pb_grpc.LeaseStub
    watch: pb_grpc.WatchStub
    auth: pb_grpc.AuthStub


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
        self._channels: dict[str, _Channel] = {}
        self._credentials: grpc.ChannelCredentials | None = None
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

    def _tls(self) -> grpc.ChannelCredentials:
        if self._credentials is None:
            path = self.ca_file or ssl.get_default_verify_paths().cafile  # else gRPC's own bundle
            roots = None
            if path:
                try:
                    with open(path, "rb") as f:
                        roots = f.read()
                except OSError as err:
                    raise EtcdError(f"etcd CA file {path}: {err.strerror} (${CA_ENV})") from None
            self._credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return self._credentials

    def _channel(self, endpoint: str) -> _Channel:
        """The endpoint's channel (made on first use; one connection for every call and watch)."""
        if self._closed:
            raise EtcdError("etcd client is closed")
        conn = self._channels.get(endpoint)
        if conn is None:
            target = urlsplit(endpoint).netloc
            if endpoint.startswith("https:"):
                channel = aio.secure_channel(target, self._tls(), options=CHANNEL_OPTIONS)
            else:
                channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            conn = _Channel(endpoint, channel, pb_grpc.KVStub(channel), pb_grpc.LeaseStub(channel),
                            pb_grpc.WatchStub(channel), pb_grpc.AuthStub(channel))
            self._channels[endpoint] = conn
        return conn

    async def _drop(self, conn: _Channel) -> None:
        """Forget a channel that could not connect: the next call connects afresh (no backoff)."""
        if self._channels.get(conn.endpoint) is conn:
            del self._channels[conn.endpoint]
            await conn.channel.close()

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for conn in channels:
            await conn.channel.close()

    async def _metadata(self, conn: _Channel, renew: bool = False) -> tuple[tuple[str, str], ...] | None:
        """The token to send (logging in first when there is none), or None without credentials."""
        if self.user is None:
            return None
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._token is None or renew:
                self._token = None
                try:
                    answer = await conn.auth.Authenticate(
                        pb.AuthenticateRequest(name=self.user, password=self.password or ""), timeout=self.timeout)
                except aio.AioRpcError as rpc_err:
                    failure = _sort(rpc_err.code(), rpc_err.details())
                    if not isinstance(failure, EtcdError) or isinstance(failure, EtcdUnavailable):
                        raise failure from None  # not an answer about us: the caller tries elsewhere
                    if "not enabled" in str(failure):  # a cluster without auth: go on without a token
                        self.user = None
                        return None
                    raise EtcdAuthError(f"etcd: user {self.user!r} could not log in: {rpc_err.details()}",
                                        failure.code) from None
                self._token = str(answer.token)
        return (("token", self._token),)

    async def _call(self, what: str, invoke: Callable[[_Channel, Any], Awaitable[T]], once: bool = False,
                    deadline: float | None = None) -> T:
        """``invoke(channel, metadata)`` on the endpoint that last worked, failing over as the module says;
        given up at ``deadline`` (``time.monotonic()``) when that comes before the client's own."""
        own = time.monotonic() + self.timeout * len(self.endpoints) + self.timeout / 2
        capped = deadline is not None and deadline < own  # a try may have waited less than timeout
        deadline = own if deadline is None else min(own, deadline)
        if time.monotonic() >= deadline:
            raise EtcdUnavailable(f"etcd: no time left for a {what} (the caller's deadline has passed)")
        tried: list[str] = []
        renewed = False
        n = len(self.endpoints)
        i = refused = 0  # refused: connections refused in a row (two rounds of them: nobody is there)
        while True:
            endpoint = self.endpoints[(self._current + i) % n]
            conn = self._channel(endpoint)
            try:
                try:
                    answer = await invoke(conn, await self._metadata(conn))
                except aio.AioRpcError as rpc_err:
                    raise _sort(rpc_err.code(), rpc_err.details()) from None
                except asyncio.CancelledError:
                    if _cancelled_here():
                        raise
                    raise _Lost(_CLOSED) from None
            except _Refused as err:  # never sent: any request may go elsewhere
                tried.append(f"{endpoint}: {err}")
                refused += 1
                await self._drop(conn)
            except _Lost as err:
                why = str(err) if str(err) != _TIMEOUT else "no answer before the caller's deadline" if capped \
                    else f"no answer in {self.timeout:.1f}s"
                tried.append(f"{endpoint}: {why}")
                refused = 0
                if once:
                    self._current = (self._current + i + 1) % n
                    raise EtcdUnavailable(f"etcd {endpoint} did not answer a {what} ({why}); "
                                          "its outcome is unknown") from None
            except EtcdError as err:
                refused = 0
                if isinstance(err, EtcdAuthError) and self.user is not None and not renewed \
                        and "invalid auth token" in str(err):
                    await self._metadata(conn, renew=True)
                    renewed = True
                    continue
                if not isinstance(err, EtcdUnavailable) or (once and not _not_proposed(err)):
                    self._current = (self._current + i) % n
                    raise
                tried.append(f"{endpoint}: {err}")  # this member cannot serve now: another might
            else:
                self._current = (self._current + i) % n
                return answer
            i += 1
            if time.monotonic() >= deadline or refused >= 2 * n:
                break
            if i % n == 0:  # every endpoint failed once: a short pause, then round again
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise EtcdUnavailable("etcd unavailable: " + "; ".join(tried[-n:]))

    async def _unary(self, what: str, stub: str, method: str, request: Any, once: bool = False,
                     deadline: float | None = None) -> Any:
        """One unary RPC (``stub``'s ``method``: ``"kv", "Put"``) through :meth:`_call`; each try
        waits ``timeout``, or what is left before ``deadline`` when that is less."""

        def invoke(conn: _Channel, md: Any) -> Awaitable[Any]:
            timeout = self.timeout if deadline is None else min(self.timeout, max(0.01, deadline - time.monotonic()))
            return getattr(getattr(conn, stub), method)(request, timeout=timeout, metadata=md)

        return await self._call(what, invoke, once, deadline)

    # --- KV --------------------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        answer = await self._unary("range", "kv", "Range", pb.RangeRequest(key=key.encode()))
        return KV.from_pb(answer.kvs[0]) if answer.kvs else None

    async def range(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted by key), and the revision they were read at."""
        answer = await self._unary("range", "kv", "Range", Op.get(prefix, prefix=True).request())
        return [KV.from_pb(kv) for kv in answer.kvs], answer.header.revision

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        answer = await self._unary("put", "kv", "Put", Op.put(key, value, lease).request())
        return int(answer.header.revision)

    async def delete(self, key: str, prefix: bool = False) -> int:
        answer = await self._unary("deleterange", "kv", "DeleteRange", Op.delete(key, prefix).request())
        return int(answer.deleted)

    async def txn(self, compares: list[Compare], success: list[Op], failure: list[Op] | None = None,
                  deadline: float | None = None) -> TxnResult:
        """All of ``compares`` hold → ``success`` is applied, else ``failure``; atomically.
        ``deadline`` (``time.monotonic()``): EtcdUnavailable then at the latest, whatever the
        endpoints (a placement's read-back waits no longer than its create may)."""
        failure = failure or []
        request = pb.TxnRequest(compare=[c.to_pb() for c in compares], success=[o.to_pb() for o in success],
                                failure=[o.to_pb() for o in failure])
        # Without compares a txn is a batch of puts and deletes: as safe to send again as they are.
        answer = await self._unary("txn", "kv", "Txn", request, once=bool(compares), deadline=deadline)
        ops = success if answer.succeeded else failure
        responses: list[Any] = []
        for op, resp in zip(ops, answer.responses):
            if op.kind == "get":
                responses.append([KV.from_pb(kv) for kv in resp.response_range.kvs])
            elif op.kind == "delete":
                responses.append(int(resp.response_delete_range.deleted))
            else:
                responses.append(None)
        return TxnResult(bool(answer.succeeded), int(answer.header.revision), responses)

    # --- leases ----------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self._unary("lease grant", "lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=int(ttl)))
        if answer.error:
            raise EtcdError(f"etcd: lease grant: {answer.error}")
        return int(answer.ID)

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL again, or 0 when etcd no longer has it."""

        async def once(conn: _Channel, md: Any) -> int:
            call = conn.lease.LeaseKeepAlive(timeout=self.timeout, metadata=md)
            try:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease))
                answer = await call.read()
            except asyncio.InvalidStateError:  # the stream had ended already: its status says why
                answer = aio.EOF
            finally:
                call.cancel()
            if answer is aio.EOF:
                code = await call.code()
                if code == grpc.StatusCode.OK:
                    raise _Lost("the keepalive stream ended without an answer")
                raise _sort(code, await call.details())
            return int(answer.TTL)

        return await self._call("lease keepalive", once)

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go); a lease already gone is not an error."""
        try:
            await self._unary("lease revoke", "lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease))
        except EtcdError as err:
            if "lease not found" not in str(err):
                raise

    async def time_to_live(self, lease: int) -> int:
        """Seconds ``lease`` has left, or -1 when it is gone."""
        answer = await self._unary("lease timetolive", "lease", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease))
        return int(answer.TTL)

    # --- watch -----------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` from ``start_revision`` (0: from now on), in
        revision order, across lost streams and endpoints; raises :class:`Compacted`."""
        next_rev = start_revision
        backoff = WATCH_BACKOFF[0]
        renewed = False  # the token was renewed for this stream already: a second refusal is final
        while True:
            n = len(self.endpoints)
            endpoint = self.endpoints[self._current % n]
            conn = self._channel(endpoint)  # raises once the client is closed
            call: Any = None
            why, failure, again = "stream ended", None, False
            try:
                # The member cancels the watch when it loses its leader (it would go quiet).
                md = (("hasleader", "true"), *(await self._metadata(conn) or ()))
                call = conn.watch.Watch(metadata=md)
                await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                    key=prefix.encode(), range_end=prefix_end(prefix), start_revision=next_rev)))
                async for answer in call:
                    if answer.compact_revision:
                        raise Compacted(f"etcd: revision {next_rev} of {prefix!r} is compacted "
                                        f"(oldest kept: {answer.compact_revision}); list again",
                                        answer.compact_revision)
                    if answer.canceled:  # a watch etcd refused arrives created and canceled at once
                        failure = _error_of(UNAVAILABLE, f"watch on {endpoint}: "
                                                         f"{answer.cancel_reason or 'canceled by etcd'}")
                        break
                    if answer.created:
                        backoff, renewed = WATCH_BACKOFF[0], False
                        if not next_rev:
                            next_rev = answer.header.revision + 1
                    events = [Event(_EVENT_TYPES[e.type], KV.from_pb(e.kv)) for e in answer.events
                              if e.kv.mod_revision >= next_rev]
                    if events:
                        next_rev = events[-1].kv.mod_revision + 1
                        yield events
            except aio.AioRpcError as rpc_err:
                failure = _sort(rpc_err.code(), rpc_err.details())
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise
                failure = _Lost(_CLOSED)
            except asyncio.InvalidStateError:  # written to a stream that had ended: its status says why
                failure = _sort(await call.code(), await call.details())
            except (_Lost, _Refused) as err:  # logging in did not get through
                failure = err
            finally:
                if call is not None:
                    call.cancel()
            if isinstance(failure, _Refused):
                await self._drop(conn)
            elif isinstance(failure, EtcdAuthError):
                if self.user is None or renewed:
                    raise failure
                self._token, renewed, again = None, True, True  # expired, most likely: log in again, at once
            if failure is not None:
                why = str(failure)
            if again:
                continue
            log.info("etcd watch of %r on %s: %s; resuming at revision %d elsewhere", prefix, endpoint, why,
                     next_rev)
            self._current = (self._current + 1) % n
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, WATCH_BACKOFF[1])


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
