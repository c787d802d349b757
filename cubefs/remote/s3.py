"""``s3://bucket/prefix`` for any S3-compatible service, through aiobotocore.

The endpoint comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``; credentials
the usual botocore way (environment, profile, instance role).  Path-style
addressing, because self-hosted servers (SeaweedFS, MinIO) rarely have
wildcard DNS.  botocore's own retries are off: :class:`RetryingStore` owns
retries so that every backend fails the same, bounded way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from cubefs.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from cubefs.remote.base import Store, StoreStats, check_key

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, endpoint: str | None, max_connections: int = 32) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.stats = StoreStats()
        self._max_connections = max_connections
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, err: Exception, key: str) -> Exception:
        """Map botocore/aiohttp failures to the store error hierarchy."""
        where = f"store {self.url}"
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _NOT_FOUND:
                return ObjectNotFoundError(self.url, key)
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
            if code == "InvalidRange":
                return StoreError(f"{where}: {key}: requested range is outside the object")
            if status >= 500 or code in {"SlowDown", "RequestTimeout", "ServiceUnavailable"}:
                return StoreUnavailableError(f"{where}: {key}: {code or status}")
            return StoreError(f"{where}: {key}: {code}: {err}")
        if isinstance(err, NoCredentialsError):
            return StoreError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        return StoreUnavailableError(f"{where}: {key}: {type(err).__name__}: {err}")

    async def open(self) -> None:
        if self._client is not None:
            return
        session = get_session()
        config = AioConfig(
            max_pool_connections=self._max_connections,
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.endpoint,
                config=config,
                region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            )
        )
        self._stack = stack
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code not in {"404", "NoSuchBucket", "NotFound"}:
                raise self._fail(err, "") from None
            try:
                await self._client.create_bucket(Bucket=self.bucket)
            except ClientError as err2:
                raise self._fail(err2, "") from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as err:
            await self.close()
            raise self._fail(err, "") from None

    def _c(self) -> Any:
        if self._client is None:
            raise StoreError(f"store {self.url} used before open()")
        return self._client

    async def get(self, key: str) -> bytes:
        try:
            resp = await self._c().get_object(Bucket=self.bucket, Key=self._key(key))
            async with resp["Body"] as body:
                return await body.read()
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
            raise self._fail(err, key) from None

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if length == 0:
            try:
                await self._c().head_object(Bucket=self.bucket, Key=self._key(key))
            except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
                raise self._fail(err, key) from None
            return b""
        try:
            resp = await self._c().get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            async with resp["Body"] as body:
                return await body.read()
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
            raise self._fail(err, key) from None

    async def put(self, key: str, data: bytes) -> None:
        try:
            await self._c().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
            raise self._fail(err, key) from None

    async def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            paginator = self._c().get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
            raise self._fail(err, prefix) from None
        return sorted(out)

    async def delete(self, key: str) -> None:
        try:
            await self._c().delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as err:
            raise self._fail(err, key) from None

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            with contextlib.suppress(Exception):
                await stack.aclose()
