"""The agent's wire format (docs/vm-agent.md), shared by both ends.

A frame is ``channel:u32 | type:u8 | length:u32`` (big-endian) and ``length``
bytes of payload.  Data travels raw (never base64); control messages are JSON.
A request's payload may carry binary after its JSON, separated by a NUL byte
(JSON text never contains a raw NUL), so a small write or a piece of stdin needs
no second frame.
"""

from __future__ import annotations

import json
import struct

HEADER = struct.Struct(">IBI")
MAGIC = b"CUBEFS\x01\xa6"  # opens every HELLO payload: what a reader resynchronizes on
MAX_PAYLOAD = 1 << 20      # larger frames are garbage: the reader resynchronizes
CHUNK = 128 << 10          # what one DATA frame carries at most (fewer, larger frames: ~2x faster under TCG)
WINDOW = 4 << 20           # credit a receiver grants a stream at first (1 MiB: reads through the SDK 31 -> 67 MB/s)

HELLO = 0   # both: MAGIC + nonce(16) [+ JSON from the guest]; a new nonce starts a new session
REQ = 1     # host: opens a channel: JSON {"op": ...} [NUL binary]
REPLY = 2   # guest: the answer: JSON {...} or {"error": {"code", "message"}}; unary ops end with it
DATA = 3    # both: bytes (stdout, pty, file or TCP data; stdin and file writes from the host)
DATA2 = 4   # guest: stderr bytes
EVENT = 5   # guest: JSON (a watch event)
CREDIT = 6  # both: u32, more bytes the sender may send on the channel (DATA/DATA2/EVENT count)
EOF = 7     # both: no more DATA from the sender on this channel
END = 8     # guest: the channel is over: JSON {...} (a process's end) or {"error": ...}
CLOSE = 9   # host: stop the channel (detach, cancel); the guest forgets it, sends nothing more
TYPES = range(10)


def frame(chan: int, kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(chan, kind, len(payload)) + payload


def jframe(chan: int, kind: int, doc: dict, tail: bytes = b"") -> bytes:  # type: ignore[type-arg]
    body = json.dumps(doc, separators=(",", ":")).encode()
    return frame(chan, kind, body + (b"\0" + tail if tail else b""))


def split(payload: bytes) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    """A request's JSON and its binary tail."""
    body, _, tail = bytes(payload).partition(b"\0")
    return json.loads(body), tail


def credit(chan: int, n: int) -> bytes:
    return frame(chan, CREDIT, struct.pack(">I", n))


class Parser:
    """Frames out of a byte stream; garbage (a peer that went away mid-frame) is skipped
    up to the next HELLO."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def add(self, data: bytes | memoryview) -> None:
        """Bytes to parse at the next feed (one copy: a reader's own buffer is reused)."""
        self.buf += data

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += data
        out = []
        at = 0  # consumed: the buffer shifts once per feed, not once per frame
        size = len(self.buf)
        while size - at >= HEADER.size:
            chan, kind, n = HEADER.unpack_from(self.buf, at)
            if kind not in TYPES or n > MAX_PAYLOAD or (kind == HELLO and size - at >= HEADER.size + 8
                                                        and self.buf[at + 9:at + 17] != MAGIC):
                del self.buf[:at]
                at = 0
                self.resync()
                size = len(self.buf)
                continue
            if size - at < HEADER.size + n:
                break
            with memoryview(self.buf) as view:  # one copy out (a bytearray slice would be two)
                out.append((chan, kind, bytes(view[at + HEADER.size:at + HEADER.size + n])))
            at += HEADER.size + n
        del self.buf[:at]
        return out

    def resync(self) -> None:
        """Drop bytes up to the next HELLO header (at least one byte: progress)."""
        at = self.buf.find(MAGIC, HEADER.size + 1)
        if at >= 0:
            del self.buf[:at - HEADER.size]
        else:  # keep a tail that may be the start of a HELLO still arriving
            del self.buf[:max(1, len(self.buf) - (HEADER.size + len(MAGIC) - 1))]

    def reset(self) -> None:
        self.buf.clear()
