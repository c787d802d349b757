"""``s3://bucket/prefix`` for any S3-compatible service: a small HTTP/1.1 client.

Why not aiobotocore (measured, docs/design.md "S3 client"): importing it and
creating a client costs ~0.55 s, a third of a cold start, and each ranged
GET ~4 ms of CPU; this client imports nothing outside the standard library
on its request path and spends well under a millisecond per request.  It
implements only what a chunk store needs: GET (whole and ranged), HEAD, PUT,
DELETE, ListObjectsV2 and CreateBucket, signed with AWS Signature Version 4.

Credentials: the AWS chain (:mod:`cubefs.remote.credentials`; botocore is
imported only when no plain keys are configured); with none at all, requests
go unsigned (public buckets, servers without auth).  Addressing:
virtual-hosted for AWS and COS, path style elsewhere
(:mod:`cubefs.remote.addressing`).  Region: ``AWS_REGION``/``AWS_DEFAULT_REGION``,
the profile's ``region``, the endpoint's host name, else discovered from the
bucket (``x-amz-bucket-region``).  Endpoint: ``--s3-endpoint``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else AWS.

Connections are kept alive in a pool bounded by ``max_connections``; a
connection that saw any error is closed, never reused.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import hmac
import logging
import os
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

from cubefs.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from cubefs.remote import addressing
from cubefs.remote.base import Store, StoreStats, check_key
from cubefs.remote.credentials import Credentials, CredentialSource, config_profile
from cubefs.remote.http import HttpPool, Response

__all__ = ["EMPTY_SHA256", "Credentials", "S3Store", "sign_v4"]
log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"}


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



def _given_region(endpoint: str | None) -> str | None:
    """A region the user set (environment, the profile, or the endpoint's name); None: discover it."""
    env = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if env:
        return env
    if endpoint:
        from urllib.parse import urlparse

        found = addressing.region_from_host(urlparse(endpoint).hostname or "")
        if found:
            return found
    return config_profile().get("region") or None


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, endpoint: str | None, max_connections: int = 32,
                 style: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.stats = StoreStats()
        self.style = addressing.style_setting(style)
        self._custom_endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        given = _given_region(self._custom_endpoint)
        self.region = given or "us-east-1"
        self._region_known = given is not None
        self.creds = CredentialSource()
        self.creds.resolve_cheap()  # env or plain keys: no botocore import, no thread
        self._max_connections = max_connections
        self._pool: HttpPool | None = None
        self._where()

    def _where(self) -> None:
        self.endpoint = self._custom_endpoint or f"https://s3.{self.region}.amazonaws.com"
        self.addressing = addressing.choose(self.endpoint, self.bucket, self.style)

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.addressing.endpoint, "addressing": "virtual" if self.addressing.virtual else "path",
                "region": self.region, "credentials": self.creds.describe()}

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _p(self) -> HttpPool:
        if self._pool is None:  # created lazily: it must bind to the running loop
            self._pool = HttpPool(self.addressing.endpoint, self._max_connections)
        return self._pool

    async def _ensure_region(self) -> None:
        """No region given: ask the bucket once (HEAD answers ``x-amz-bucket-region`` even when it refuses)."""
        if self._region_known:
            return
        resp = await self._send("HEAD", None, {}, {}, b"", "HEAD bucket")
        self._region_known = True
        found = resp.headers.get("x-amz-bucket-region")
        if found and found != self.region:
            self._move_to(found)
        if found:
            log.info("store %s: bucket region %s", self.url, found)

    def _move_to(self, region: str) -> None:
        log.info("store %s: the bucket is in %s (was signing for %s)", self.url, region, self.region)
        self.region = region
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._where()

    async def _send(self, method: str, key: str | None, query: dict[str, str], headers: dict[str, str],
                    body: bytes, what: str) -> Response:
        pool = self._p()
        path = f"{pool.base_path}{self.addressing.bucket_path}" + (f"/{key}" if key is not None else "")
        if not path:
            path = "/"
        payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        hdrs = dict(headers)
        creds = await self.creds.get()
        if creds is not None:
            hdrs = sign_v4(method, pool.host_header, path, query, hdrs, payload_hash, creds, self.region)
        else:
            hdrs["host"] = pool.host_header
        target = _uri_encode(path)
        if query:
            target += "?" + _query_string(query)
        try:
            return await pool.request(method, target, hdrs, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
            raise StoreUnavailableError(
                f"store {self.url}: {what} failed: {type(err).__name__}: {err or 'connection error'}"
            ) from None

    async def _request(
        self,
        method: str,
        key: str | None,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        what: str = "",
    ) -> Response:
        what = what or f"{method} {key}"
        await self._ensure_region()
        query, headers = query or {}, headers or {}
        resp = await self._send(method, key, query, headers, body, what)
        if resp.status >= 300:
            code = _error_code(resp)[0]
            found = resp.headers.get("x-amz-bucket-region")
            if found and found != self.region:  # signed for the wrong region: move and sign again
                self._move_to(found)
                resp = await self._send(method, key, query, headers, body, what)
            elif code in ("ExpiredToken", "TokenRefreshRequired") and await self.creds.invalidate():
                resp = await self._send(method, key, query, headers, body, what)  # with keys fetched just now
        if resp.status >= 300:
            raise self._error(resp, what, key)
        return resp

    def _error(self, resp: Response, what: str, key: str | None) -> Exception:
        code, message = _error_code(resp)
        where = f"store {self.url}"
        c = self.creds.current
        who = f"access key {c.access_key} from {c.source}" if c is not None else "unsigned requests (no credentials)"
        if code == "NoSuchBucket" or (resp.status == 404 and key is None and not code):
            return StoreError(f"{where}: bucket {self.bucket!r} does not exist at {self.addressing.endpoint}: "
                              "create it, or check the bucket name, --s3-endpoint and --s3-addressing")
        if resp.status == 404 or code == "NoSuchKey":
            return ObjectNotFoundError(self.url, key or "")
        if code == "RequestTimeTooSkewed":
            return StoreError(f"{where}: {what}: refused, this machine's clock is off{_skew(resp)}: "
                              "synchronize it (chrony, systemd-timesyncd or ntpdate)")
        if resp.status >= 500 or code in _RETRYABLE_CODES:
            return StoreUnavailableError(f"{where}: {what}: HTTP {resp.status} {code}".rstrip())
        fix = {
            "SignatureDoesNotMatch": f"the secret key does not match {who}: check AWS_SECRET_ACCESS_KEY or the "
                                     "profile's aws_secret_access_key",
            "InvalidAccessKeyId": f"the store does not know {who}: check the key, and that --s3-endpoint is the "
                                  "store those keys belong to",
            "ExpiredToken": f"the session token of {who} has expired and no fresh one could be had: renew it "
                            "(a new AWS_SESSION_TOKEN, 'aws sso login', or the role the profile names)",
            "TokenRefreshRequired": f"the session token of {who} has expired: renew it",
            "InvalidToken": f"the session token of {who} is not valid here: renew it, or unset AWS_SESSION_TOKEN",
            "AccessDenied": f"{who} may not do this: grant it s3:GetObject, s3:PutObject, s3:ListBucket (and "
                            "s3:DeleteObject for gc) on this bucket, or use other credentials (AWS_PROFILE)",
            "AuthorizationHeaderMalformed": f"the request was signed for region {self.region}: set AWS_REGION to "
                                            "the bucket's region",
            "PermanentRedirect": f"the bucket is not at {self.addressing.endpoint}: set AWS_REGION to its region or "
                                 "--s3-endpoint to its endpoint",
            "AllAccessDisabled": "all access to this bucket is disabled: ask its owner",
        }.get(code)
        if resp.status in (301, 307) and not fix:
            fix = fix or (f"the bucket is not at {self.addressing.endpoint}: set AWS_REGION to its region or "
                          "--s3-endpoint to its endpoint")
        if resp.status in (401, 403) and not fix:
            fix = f"check the credentials ({who})" if not message else f"{message} ({who})"
        if fix:
            label = "access denied" if resp.status in (401, 403) else "refused"
            return StoreError(f"{where}: {what}: {label} ({code or resp.status}): {fix}")
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


def _error_code(resp: Response) -> tuple[str, str]:
    if not resp.body:
        return "", ""
    try:
        root = ET.fromstring(resp.body)
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", " ".join((root.findtext("Message") or "").split())


def _skew(resp: Response) -> str:
    """How far off, from the server's ``Date`` (or the error's ServerTime)."""
    server: float | None = None
    try:
        server_time = ET.fromstring(resp.body).findtext("ServerTime") if resp.body else None
        if server_time:
            server = datetime.datetime.fromisoformat(server_time.replace("Z", "+00:00")).timestamp()
        elif resp.headers.get("date"):
            import email.utils  # only on this error: 3 ms of imports kept off every start

            server = email.utils.parsedate_to_datetime(resp.headers["date"]).timestamp()
    except (ET.ParseError, ValueError, TypeError):
        server = None
    if server is None:
        return " from the store's"
    off = time.time() - server
    return f" by {abs(off):.0f} s ({'ahead of' if off > 0 else 'behind'} the store's)"
