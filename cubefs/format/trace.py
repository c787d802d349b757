"""Start-up traces: the order in which a workload first read an image's chunks.

A mount started with ``--record-trace`` notes each chunk the first time a
read touches it; ``cubefs trace push`` stores that list with the image, and
later mounts of the image prefetch it in the background in that order.  A
trace names chunks by their index in the image's chunk table, so it is as
store-independent as the image itself.  Format: docs/format.md, "Trace".
"""

from __future__ import annotations

import struct

import msgpack

from cubefs.errors import CorruptDataError
from cubefs.format.image import check_header, compress_blob, decompress_blob

MAGIC = "cubefs-trace"
VERSION = 1


def trace_key(image_digest: str) -> str:
    return f"traces/{image_digest}"


def encode_trace(image_digest: str, chunks: list[int]) -> bytes:
    doc = {"magic": MAGIC, "version": VERSION, "image": image_digest,
           "chunks": struct.pack(f"<{len(chunks)}I", *chunks)}
    return compress_blob(msgpack.packb(doc))


def decode_trace(blob: bytes, image_digest: str, nchunks: int) -> list[int]:
    what = f"trace of image sha256:{image_digest[:12]}"
    try:
        doc = msgpack.unpackb(decompress_blob(blob, what, limit=1 << 28))
    except (ValueError, msgpack.UnpackException) as err:
        raise CorruptDataError(f"{what}: not valid msgpack ({err})") from None
    check_header(doc, MAGIC, VERSION, what)
    raw = doc.get("chunks")
    if doc.get("image") != image_digest or not isinstance(raw, bytes) or len(raw) % 4:
        raise CorruptDataError(f"{what}: malformed")
    chunks = list(struct.unpack(f"<{len(raw) // 4}I", raw))
    if any(c >= nchunks for c in chunks):
        raise CorruptDataError(f"{what}: names a chunk the image does not have")
    return chunks
