"""Start-up traces: the order in which workloads first read an image's chunks.

Every image mount notes each chunk the first time a read touches it, during
its start-up window, and publishes what it read that the image's trace did
not yet name (:mod:`cubefs.image.autotrace`); ``cubefs trace push`` publishes
on demand.  Later mounts prefetch the trace in the background, in its order.
A trace names chunks by their index in the image's chunk table -- never a
file name -- so it is as store-independent as the image, and tells a reader
nothing the image's own metadata does not.  Format: docs/format.md, "Trace".

A trace is never trusted: it only orders prefetching.  One that is malformed,
names chunks the image lacks, repeats a chunk or is larger than
:data:`MAX_CHUNKS` is refused by :func:`decode_trace` (the mount logs why and
goes on without it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import msgpack

from cubefs.errors import CorruptDataError
from cubefs.format.image import check_header, compress_blob, decompress_blob

MAGIC = "cubefs-trace"
VERSION = 1
# Bounds of one trace.  The largest start-up measured here (issue 18: import pandas
# from a venv) first reads ~1,000 chunks, 28 MB; a trace is cut at 16x that many
# chunks and 256 MiB of stored bytes, so merging many commands' starts cannot turn
# prefetching into a full pull of a large image.
MAX_CHUNKS = 16384
MAX_STORED_BYTES = 256 * 1024 * 1024


def trace_key(image_digest: str) -> str:
    return f"traces/{image_digest}"


def encode_trace(image_digest: str, chunks: list[int], starts: int = 1) -> bytes:
    """``starts``: how many mounts' recordings were merged into it (informational)."""
    doc = {"magic": MAGIC, "version": VERSION, "image": image_digest,
           "chunks": struct.pack(f"<{len(chunks)}I", *chunks), "starts": starts}
    return compress_blob(msgpack.packb(doc))


def decode_trace(blob: bytes, image_digest: str, nchunks: int) -> list[int]:
    return decode_trace_doc(blob, image_digest, nchunks)[0]


def decode_trace_doc(blob: bytes, image_digest: str, nchunks: int) -> tuple[list[int], int]:
    """(chunk indices, starts merged) of a stored trace; CorruptDataError if it must not be used."""
    what = f"trace of image sha256:{image_digest[:12]}"
    if len(blob) > 8 * MAX_CHUNKS + 4096:
        raise CorruptDataError(f"{what}: {len(blob)} bytes, larger than any trace this cubefs writes")
    try:
        doc = msgpack.unpackb(decompress_blob(blob, what, limit=4 * MAX_CHUNKS + 4096))
    except (ValueError, msgpack.UnpackException) as err:
        raise CorruptDataError(f"{what}: not valid msgpack ({err})") from None
    check_header(doc, MAGIC, VERSION, what)
    raw = doc.get("chunks")
    if doc.get("image") != image_digest or not isinstance(raw, bytes) or len(raw) % 4:
        raise CorruptDataError(f"{what}: malformed")
    if len(raw) // 4 > MAX_CHUNKS:
        raise CorruptDataError(f"{what}: {len(raw) // 4} chunks, more than the {MAX_CHUNKS} a trace may name")
    chunks = list(struct.unpack(f"<{len(raw) // 4}I", raw))
    if any(c >= nchunks for c in chunks):
        raise CorruptDataError(f"{what}: names a chunk the image does not have")
    if len(set(chunks)) != len(chunks):
        raise CorruptDataError(f"{what}: names a chunk twice")
    starts = doc.get("starts", 1)
    return chunks, starts if type(starts) is int and starts > 0 else 1


def merge_traces(old: list[int], new: Iterable[int], stored_len: Callable[[int], int],
                 max_bytes: int = MAX_STORED_BYTES, max_chunks: int = MAX_CHUNKS) -> list[int]:
    """``old`` in its order, then what ``new`` adds in its order, cut where the trace would
    exceed ``max_chunks`` chunks or ``max_bytes`` stored bytes.  Appending keeps the
    first recorded start-up first: the chunks every start needs lead, another
    command's extra chunks follow (prefetch fetches a trace in order)."""
    out: list[int] = []
    seen: set[int] = set()
    total = 0
    for idx in [*old, *new]:
        if idx in seen:
            continue
        size = stored_len(idx)
        if len(out) >= max_chunks or total + size > max_bytes:
            break
        seen.add(idx)
        out.append(idx)
        total += size
    return out
