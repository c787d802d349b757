"""``s3://bucket/prefix`` for any S3-compatible service: a small HTTP/1.1 client.

Why not aiobotocore (measured, docs/design.md "S3 client"): importing it and
creating a client costs ~0.55 s, a third of a cold start, and each ranged
GET ~4 ms of CPU; this client imports nothing outside the standard library
and spends well under a millisecond per request.  It implements only what a
chunk store needs: GET (whole and ranged), HEAD, PUT, DELETE, ListObjectsV2
and CreateBucket, signed with AWS Signature Version 4, path-style addressing.

Credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(/``AWS_SESSION_TOKEN``), else the ``AWS_PROFILE`` (or ``default``) section
of ``~/.aws/credentials``; with none, requests go unsigned (public buckets,
servers without auth).  Region: ``AWS_REGION``/``AWS_DEFAULT_REGION``, else
``us-east-1``.  Endpoint: ``--s3-endpoint``, ``AWS_ENDPOINT_URL``, else AWS.

Connections are kept alive in a pool bounded by ``max_connections``; a
connection that saw any error is closed, never reused.
"""

from __future__ import annotations

import asyncio
import configparser
import datetime
import functools
import hashlib
import hmac
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote

from cubefs.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from cubefs.remote.base import Store, StoreStats, check_key
from cubefs.remote.http import HttpPool, Response

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"}


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


def find_credentials() -> Credentials | None:
    env_key, env_secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if env_key and env_secret:
        return Credentials(env_key, env_secret, os.environ.get("AWS_SESSION_TOKEN"))
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    profile = os.environ.get("AWS_PROFILE", "default")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return None
    if parser.has_section(profile):
        sec = parser[profile]
        if sec.get("aws_access_key_id") and sec.get("aws_secret_access_key"):
            return Credentials(sec["aws_access_key_id"], sec["aws_secret_access_key"], sec.get("aws_session_token"))
    return None


def _uri_encode(text: str, slash: bool = True) -> str:
    return quote(text, safe="/-_.~" if slash else "-_.~")


def _query_string(query: dict[str, str]) -> str:
    return "&".join(f"{_uri_encode(k, False)}={_uri_encode(v, False)}" for k, v in sorted(query.items()))


def sign_v4(
    method: str,
    host: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    payload_hash: str,
    creds: Credentials,
    region: str,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """Return ``headers`` plus the SigV4 ``Authorization`` and ``x-amz-*`` headers."""
    now = now or datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    out = {k.lower(): v for k, v in headers.items()}
    out["host"] = host
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_hash
    if creds.token:
        out["x-amz-security-token"] = creds.token
    signed = sorted(out)
    canon_headers = "".join(f"{k}:{' '.join(str(out[k]).split())}\n" for k in signed)
    canon_query = _query_string(query)
    canonical = "\n".join([method, _uri_encode(path), canon_query, canon_headers, ";".join(signed), payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    signature = hmac.new(_signing_key(creds.secret_key, day, region), to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(signed)}, "
        f"Signature={signature}"
    )
    return out


@functools.lru_cache(maxsize=8)
def _signing_key(secret: str, day: str, region: str) -> bytes:
    """The SigV4 key changes once a day: derive it once, not on every chunk GET."""
    key = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, endpoint: str | None, max_connections: int = 32) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or f"https://s3.{self.region}.amazonaws.com"
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.stats = StoreStats()
        self.creds = find_credentials()
        self._max_connections = max_connections
        self._pool: HttpPool | None = None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _p(self) -> HttpPool:
        if self._pool is None:  # created lazily: it must bind to the running loop
            self._pool = HttpPool(self.endpoint, self._max_connections)
        return self._pool

    async def _request(
        self,
        method: str,
        key: str | None,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        what: str = "",
    ) -> Response:
        pool = self._p()
        path = f"{pool.base_path}/{self.bucket}" + (f"/{key}" if key is not None else "")
        query = query or {}
        payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        hdrs = dict(headers or {})
        if self.creds is not None:
            hdrs = sign_v4(method, pool.host_header, path, query, hdrs, payload_hash, self.creds, self.region)
        else:
            hdrs["host"] = pool.host_header
        target = _uri_encode(path)
        if query:
            target += "?" + _query_string(query)
        try:
            resp = await pool.request(method, target, hdrs, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
            raise StoreUnavailableError(
                f"store {self.url}: {what or method} failed: {type(err).__name__}: {err or 'connection error'}"
            ) from None
        if resp.status >= 300:
            raise self._error(resp, what or f"{method} {key}", key)
        return resp

    def _error(self, resp: Response, what: str, key: str | None) -> Exception:
        code = message = ""
        if resp.body:
            try:
                root = ET.fromstring(resp.body)
                code = root.findtext("Code") or ""
                message = root.findtext("Message") or ""
            except ET.ParseError:
                pass
        where = f"store {self.url}"
        if code == "NoSuchBucket":
            return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
        if resp.status == 404 or code == "NoSuchKey":
            return ObjectNotFoundError(self.url, key or "")
        if resp.status >= 500 or code in _RETRYABLE_CODES:
            return StoreUnavailableError(f"{where}: {what}: HTTP {resp.status} {code}".rstrip())
        if resp.status in (401, 403):
            detail = f"{code or resp.status}: {message or 'check credentials'}"
            return StoreError(f"{where}: {what}: access denied ({detail})")
        return StoreError(f"{where}: {what}: HTTP {resp.status} {code} {message}".rstrip())

    async def open(self, create: bool = True) -> None:
        """With ``create``, check the bucket and create it if it does not exist."""
        if not create:
            return
        try:
            await self._request("HEAD", None, what="HEAD bucket")
            return
        except ObjectNotFoundError:
            pass
        except StoreError as err:
            if "does not exist" not in str(err):
                raise
        body = b""
        if self.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            await self._request("PUT", None, body=body, what="create bucket")
        except StoreError as err:
            if "BucketAlreadyOwnedByYou" not in str(err):
                raise

    async def get(self, key: str) -> bytes:
        return (await self._request("GET", self._key(key), what=f"GET {key}")).body

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if length == 0:
            await self._request("HEAD", self._key(key), what=f"HEAD {key}")
            return b""
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        resp = await self._request("GET", self._key(key), headers=headers, what=f"GET {key}")
        if resp.status == 200 and len(resp.body) > length:  # a server that ignores Range
            return resp.body[start : start + length]
        return resp.body

    async def put(self, key: str, data: bytes) -> None:
        await self._request("PUT", self._key(key), body=data, what=f"PUT {key}")

    async def delete(self, key: str) -> None:
        await self._request("DELETE", self._key(key), what=f"DELETE {key}")

    async def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": full}
            if token:
                query["continuation-token"] = token
            resp = await self._request("GET", None, query=query, what=f"LIST {prefix}")
            try:
                root = ET.fromstring(resp.body)
            except ET.ParseError as err:
                raise StoreUnavailableError(f"store {self.url}: LIST {prefix}: malformed response ({err})") from None
            ns = _NS if root.tag.startswith(_NS) else ""
            out.extend(el.findtext(f"{ns}Key") or "" for el in root.iter(f"{ns}Contents"))
            if (root.findtext(f"{ns}IsTruncated") or "false").lower() != "true":
                break
            token = root.findtext(f"{ns}NextContinuationToken")
            if not token:
                break
        return sorted(k[strip:] for k in out if k)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
