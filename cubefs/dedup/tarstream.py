"""A lean reader of tar streams, for image layers.

``tarfile`` spends ~100 µs of pure Python per member (and twice that with
the PAX header every layer tool writes), which made parsing, not hashing or
compressing, the bound of a conversion.  This reads what image layers
contain — ustar and GNU headers, PAX extended and global headers, GNU long
names and link names, octal and base-256 numbers — with one ``struct`` call
per header, and offers the small part of the ``tarfile`` interface that
:func:`cubefs.dedup.sources.apply_tar` uses (``next``, ``extractfile``, and
members with ``TarInfo``'s names).  Anything it does not understand
(a GNU sparse member, a bad checksum, a truncated stream) is an error that
names the member, never a guess.
"""

from __future__ import annotations

import struct
import tarfile
from typing import IO

BLOCK = 512
HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")
REGULAR = (b"0", b"\0", b"7")
NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


class TarStreamError(tarfile.TarError):
    pass


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256: the rest of the field, big-endian
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarStreamError(f"bad {what} field {field!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class Member:
    """One archive member, with the attribute names of ``tarfile.TarInfo``."""

    __slots__ = ("devmajor", "devminor", "gid", "linkname", "mode", "mtime", "name", "pax_headers", "size", "type",
                 "uid")

    def __init__(self) -> None:
        self.pax_headers: dict[str, str] = {}

    def isreg(self) -> bool:
        return self.type in REGULAR

    isfile = isreg

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"

    def isfifo(self) -> bool:
        return self.type == b"6"


class _Data:
    """The current member's bytes (reading past them is impossible)."""

    def __init__(self, stream: TarStream, size: int) -> None:
        self.stream = stream
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        data = self.stream._read(n)
        if len(data) < n:
            raise TarStreamError("unexpected end of the stream inside a member")
        self.left -= n
        return data


class TarStream:
    """``tarfile.open(fileobj=f, mode="r|")``, leaner, for the members layers hold."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self._buf = b""
        self._pos = 0
        self._skip = 0  # bytes of the previous member (and its padding) not read yet
        self._data: _Data | None = None
        self._global: dict[str, str] = {}

    def _read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, unless the stream ends first."""
        have = len(self._buf) - self._pos
        if have >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos :]]
        need = n - have
        while need > 0:
            chunk = self.f.read(max(need, 1 << 20))
            if not chunk:
                break
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                need = 0
                break
            parts.append(chunk)
            need -= len(chunk)
        else:
            self._buf, self._pos = b"", 0
        if need > 0:
            self._buf, self._pos = b"", 0
        return b"".join(parts)

    def _discard(self, n: int) -> None:
        while n > 0:
            got = len(self._read(min(n, 1 << 20)))
            if got == 0:
                raise TarStreamError("unexpected end of the stream inside a member")
            n -= got

    def next(self) -> Member | None:
        if self._data is not None:
            self._skip += self._data.left
            self._data = None
        if self._skip:
            self._discard(self._skip)
            self._skip = 0
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            block = self._read(BLOCK)
            if not block:
                return None  # no end-of-archive blocks: tolerated, like tar does
            if len(block) < BLOCK:
                raise TarStreamError("truncated header")
            if block == bytes(BLOCK):
                return None  # end of archive (a second zero block may follow; nothing else matters)
            f = HEADER.unpack(block)
            chksum = _number(f[6], "checksum")
            unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
            if chksum != unsigned:
                raise TarStreamError("bad header checksum (a corrupt archive, or not a tar)")
            kind = f[7]
            size = _number(f[4], "size")
            padded = -(-size // BLOCK) * BLOCK
            if kind in (b"x", b"g", b"L", b"K"):
                payload = self._read(padded)[:size]
                if len(payload) < size:
                    raise TarStreamError("truncated extended header")
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"K":
                    long_link = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    (pax if kind == b"x" else self._global).update(_pax_records(payload))
                continue
            if kind == b"S" or any(k.startswith("GNU.sparse") for k in pax):
                raise TarStreamError(f"sparse member {_text(f[0])!r} is not supported")
            m = Member()
            m.type = kind
            name = _text(f[0])
            if f[9] == b"ustar\0" and f[15][:1] not in (b"", b"\0"):
                name = _text(f[15]) + "/" + name
            m.name = long_name or name
            m.linkname = long_link or _text(f[8])
            m.mode = _number(f[1], "mode")
            m.uid = _number(f[2], "uid")
            m.gid = _number(f[3], "gid")
            m.mtime = _number(f[5], "mtime")
            m.devmajor = _number(f[13], "devmajor")
            m.devminor = _number(f[14], "devminor")
            headers = {**self._global, **pax} if self._global else pax
            if headers:
                m.pax_headers = headers
                m.name = headers.get("path", m.name)
                m.linkname = headers.get("linkpath", m.linkname)
                for key in ("uid", "gid", "size"):
                    if key in headers:
                        try:
                            value = int(headers[key])
                        except ValueError:
                            raise TarStreamError(f"bad PAX {key} {headers[key]!r}") from None
                        if key == "size":
                            size, padded = value, -(-value // BLOCK) * BLOCK
                        else:
                            setattr(m, key, value)
            if m.isdir():
                m.name = m.name.rstrip("/")
            # As tarfile reads them: data follows a regular member or one of a type it does
            # not know; a link, device, directory or fifo has none, whatever its size says.
            has_data = kind in REGULAR or kind not in NO_DATA
            m.size = size if has_data else 0
            if has_data:
                self._data = _Data(self, size)
                self._skip = padded - size
            return m

    def extractfile(self, m: Member) -> _Data:
        if self._data is None or not m.isreg():
            raise TarStreamError(f"member {m.name!r} has no data here")
        return self._data

    def close(self) -> None:
        pass


def _pax_records(payload: bytes) -> dict[str, str]:
    """``LENGTH KEY=VALUE\\n`` records (POSIX.1-2001), values as UTF-8 (binary kept as
    surrogate escapes, as tarfile keeps them)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(payload[pos:space])
        except ValueError:
            raise TarStreamError("malformed PAX record") from None
        if length <= 0 or pos + length > len(payload):
            raise TarStreamError("malformed PAX record")
        record = payload[space + 1 : pos + length - 1]  # without the trailing newline
        key, sep, value = record.partition(b"=")
        if not sep:
            raise TarStreamError("malformed PAX record")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out
