"""``GET /files`` and ``POST /files``: file transfer, streamed both ways.

Neither direction holds a file in memory: a download relays the agent's chunks as they come (gzip-
compressed on the way when the client accepts it, in a worker thread since zlib frees the GIL), an
upload hands the agent an async iterator over the request body (or each multipart part) read a
chunk at a time, so aiohttp's flow control holds the client back while the guest writes.  Uploads
far larger than the host's RAM therefore pass through in bounded memory.

Errors are the envd HTTP API's JSON ``{"code": <http status>, "message": ...}``: 404 missing,
400 a directory or bad request, 401 bad token, 403 permission, 406 unacceptable encoding, 507 no
space (the SDK's NotEnoughSpaceException).
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from sandbox.envd import connect
from sandbox.envd.auth import check_files_access, files_user
from sandbox.envd.connect import ConnectError

if TYPE_CHECKING:
    from vmm.channel import AgentChannel

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Connect code -> the envd HTTP API's status for /files.
FILES_STATUS = {
    "not_found": 404,
    "invalid_argument": 400,
    "failed_precondition": 400,
    "out_of_range": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "already_exists": 409,
    "resource_exhausted": 507,
    "unavailable": 503,
}


def files_error(error: ConnectError) -> web.Response:
    status = FILES_STATUS.get(error.code, 500)
    return web.Response(
        status=status, body=json.dumps({"code": status, "message": error.message}).encode(),
        content_type="application/json",
    )


def accepts_gzip(header: str) -> tuple[bool, bool]:
    """(gzip acceptable, identity acceptable) from an ``Accept-Encoding`` header (RFC 9110 12.5.3)."""
    q: dict[str, float] = {}
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        params = params.strip()
        if params.lower().startswith("q="):
            try:
                weight = float(params[2:])
            except ValueError:
                weight = 0.0
        q[coding] = weight
    star = q.get("*")
    gzip = q.get("gzip", q.get("x-gzip", star if star is not None else 0.0)) > 0
    identity = q.get("identity", star if star is not None else 1.0) > 0
    return gzip, identity


class FilesService:
    def __init__(self, agent: AgentChannel, access_token: str | None) -> None:
        self._agent = agent
        self._token = access_token

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.method in ("GET", "HEAD"):
                opened = await self.open_download(request)
                if isinstance(opened, web.Response):
                    return opened
            elif request.method == "POST":
                return await self.upload(request)
            else:
                return web.Response(status=405, headers={"Allow": "GET, POST"})
        except Exception as e:
            error = connect.as_connect_error(e)
            if error.code == "internal":
                log.exception("envd /files %s failed", request.method)
            return files_error(error)
        # Past the headers an error can no longer become a status: it cuts the connection.
        return await self.send_download(request, *opened)

    async def open_download(self, request: web.Request) -> web.Response | tuple[AsyncIterator[bytes], bytes, Any]:
        """Everything that can still fail with a status: auth, path, encoding, the first chunk."""
        check_files_access(request, self._token, "read", request.query.get("username"))
        user = files_user(request)
        path = request.query.get("path", "")
        if not path:
            raise ConnectError("invalid_argument", "the path query parameter is required")
        gzip, identity = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        if not gzip and not identity:
            return web.json_response({"code": 406, "message": "only gzip and identity encodings are served"},
                                     status=406)
        chunks = self._agent.read_file(path, user=user)
        # The first chunk before the headers: a missing file or a directory must still get its 404/400.
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        compressor = None
        if gzip:
            compressor, first = await _gzip_if_worth_it(first, must=not identity)
        return chunks, first, compressor

    async def send_download(self, request: web.Request, chunks: AsyncIterator[bytes], first: bytes,
                            compressor: Any) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        if compressor is not None:
            response.headers["Content-Encoding"] = "gzip"
        response.enable_chunked_encoding()
        await response.prepare(request)
        if request.method == "HEAD":
            await chunks.aclose()  # type: ignore[attr-defined]
            return response
        try:
            data = first  # already compressed, when it is
            while True:
                if data:
                    await response.write(data)
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    break
                if compressor is not None:
                    data = await _in_thread(compressor.compress, data)
            if compressor is not None:
                await response.write(compressor.flush())
            await response.write_eof()
        except ConnectionError:
            log.debug("envd /files: the client went away mid-download")
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        # Any other failure here (the guest went away mid-file) propagates: aiohttp then drops the
        # connection without the last chunk, so the client sees a truncated transfer, never a short file.
        return response

    async def upload(self, request: web.Request) -> web.Response:
        check_files_access(request, self._token, "write", request.query.get("username"))
        user = files_user(request)
        path = request.query.get("path") or None
        content_type = request.content_type
        written: list[dict[str, Any]] = []
        if content_type == "multipart/form-data":
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                target = path if path and not written else part.filename
                if not target:
                    raise ConnectError("invalid_argument", "a file part has no filename and no path was given")
                written.append(await self._write(target, _part_chunks(part), user))
        else:
            if not path:
                raise ConnectError("invalid_argument", "the path query parameter is required")
            encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip", "x-gzip", ""):
                raise ConnectError("invalid_argument", f"unsupported Content-Encoding {encoding!r}")
            gunzip = encoding in ("gzip", "x-gzip") and not _server_decompresses(request)
            written.append(await self._write(path, _body_chunks(request, gunzip), user))
        if not written:
            raise ConnectError("invalid_argument", "no file part named 'file' in the upload")
        return web.json_response(
            [{"path": st["path"], "name": st.get("name") or st["path"].rsplit("/", 1)[-1], "type": "file"}
             for st in written]
        )

    async def _write(self, path: str, chunks: AsyncIterator[bytes], user: str | None) -> dict[str, Any]:
        return await self._agent.write_file(path, chunks, user=user)


async def _in_thread(fn: Any, data: bytes) -> bytes:
    """zlib on a worker thread for big chunks: it releases the GIL, so the event loop keeps serving."""
    if len(data) < 64 << 10:
        return fn(data)
    return await asyncio.to_thread(fn, data)


async def _gzip_if_worth_it(first: bytes, must: bool) -> tuple[Any, bytes]:
    """(compressor, first chunk as it goes on the wire), or (None, first) when gzip would not pay.

    Every SDK download sends ``Accept-Encoding: gzip, ...`` (httpx's default), so compressing
    everything would spend host CPU on every already-compressed archive, image or wheel.  The first
    chunk decides: kept as identity unless gzip at level 1 saves a tenth of it (level 1: a 200 MB
    compressible file comes down in about the time of an uncompressed one on this machine)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = await _in_thread(lambda data: compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH), first)
    if must or len(out) < len(first) * 0.9:
        return compressor, out
    return None, first


def _server_decompresses(request: web.Request) -> bool:
    """Whether aiohttp already un-gzipped the body (its default, ``auto_decompress=True``)."""
    parser = getattr(request.protocol, "_request_parser", None)
    return bool(getattr(parser, "_auto_decompress", True))


async def _body_chunks(request: web.Request, gunzip: bool) -> AsyncIterator[bytes]:
    decompressor = zlib.decompressobj(31) if gunzip else None
    while True:
        data = await request.content.read(CHUNK)
        if not data:
            break
        if decompressor is None:
            yield data
            continue
        # Bounded output per step: a small gzip bomb must not inflate into one huge buffer.
        while data:
            out = decompressor.decompress(data, CHUNK)
            data = decompressor.unconsumed_tail
            if out:
                yield out
    if decompressor is not None:
        tail = decompressor.flush()
        if tail:
            yield tail
        if not decompressor.eof:
            raise ConnectError("invalid_argument", "the gzip body is truncated")


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        data = await part.read_chunk(CHUNK)
        if not data:
            return
        yield data
