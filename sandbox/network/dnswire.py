"""The few parts of DNS's wire format (RFC 1035) the sandbox resolver needs: a query's
question, a response's records (their TTLs where they sit, the addresses of A records), and
the answers it makes itself (REFUSED, an empty NOERROR).  Hand-written: the resolver reads
only the header, the question and the records' fixed fields, and a library's whole-message
decode and re-encode would cost more than the forwarding it wraps."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
QR, TC, RD, RA = 0x8000, 0x0200, 0x0100, 0x0080
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, REFUSED = 0, 1, 2, 3, 5
A, NS, CNAME, SOA, AAAA, OPT = 1, 2, 5, 6, 28, 41
CLASS_IN = 1
MAX_UDP = 512  # a query without EDNS gets at most this much over UDP
MAX_NAME = 255  # a name's wire length (RFC 1035 2.3.4)
TTL_SANE = (1 << 31) - 1  # a TTL above this counts as 0 (RFC 2181 section 8)
_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class DnsError(ValueError):
    """A message too malformed to answer."""


class FormError(DnsError):
    """A query whose question this resolver will not pass on (answered FORMERR): a label
    with a dot or a byte outside letters, digits, ``-`` and ``_`` (``*`` only as a whole
    first label), compression in the question, a name past 255 bytes.  Such a name has no
    one spelling (``\\x09good.test`` would read as ``good.test``): judged, cached or sent
    upstream it could stand for another."""

    def __init__(self, why: str, qid: int, flags: int) -> None:
        super().__init__(why)
        self.qid, self.flags = qid, flags


@dataclass
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot ("" is the root)
    qtype: int
    qclass: int
    question: bytes  # the question section as the client sent it (its letter case kept)
    udp_size: int  # the largest UDP answer the client takes (EDNS, else 512)

    @property
    def key(self) -> bytes:
        """The question normalised (lower case, no compression): the cache's key and what goes upstream."""
        return question(self.name, self.qtype, self.qclass)


@dataclass
class Response:
    rcode: int
    truncated: bool
    ttl_offsets: list[int] = field(default_factory=list)  # where each record's TTL is (not OPT's)
    ttls: list[int] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # A records of the answer section
    min_answer_ttl: int | None = None
    negative_ttl: int | None = None  # from an SOA in the authority section


def _name(msg: bytes, off: int) -> tuple[str, int]:
    """The name at ``off`` (compression followed) and the offset after it."""
    labels: list[str] = []
    end = None
    jumps = 0
    while True:
        if off >= len(msg):
            raise DnsError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg) or jumps > 32:
                raise DnsError("bad compression pointer")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            continue
        if n & 0xC0:
            raise DnsError("bad label")
        off += 1
        if n == 0:
            break
        labels.append(msg[off:off + n].decode("ascii", errors="replace"))
        off += n
    return ".".join(labels).lower(), (end if end is not None else off)


def _strict_name(msg: bytes, off: int, qid: int, flags: int) -> tuple[str, int]:
    """A question's name: plain labels only (``FormError`` otherwise), lower case."""
    labels: list[str] = []
    start = off
    while True:
        if off >= len(msg):
            raise DnsError("name runs past the message")
        n = msg[off]
        if n & 0xC0:
            raise FormError("compression or a bad label in the question", qid, flags)
        off += 1
        if n == 0:
            break
        label = msg[off:off + n]
        if len(label) < n:
            raise DnsError("name runs past the message")
        if not (_LDH.issuperset(label) or (label == b"*" and not labels)):
            raise FormError("a label with a byte no host name has", qid, flags)
        labels.append(label.decode("ascii").lower())
        off += n
        if off - start > MAX_NAME:
            raise FormError("a name longer than 255 bytes", qid, flags)
    return ".".join(labels), off


def question(name: str, qtype: int, qclass: int = CLASS_IN) -> bytes:
    """A question section for ``name`` (dotted, lower case)."""
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".") if p)
    return labels + b"\0" + struct.pack("!HH", qtype, qclass)


def query(qid: int, question_: bytes) -> bytes:
    """A query of our own (RD set, nothing else: no client's EDNS, DO or CD bits go upstream)."""
    return HEADER.pack(qid, RD, 1, 0, 0, 0) + question_


def formerr(err: FormError, msg: bytes) -> bytes:
    """FORMERR for a query whose question is refused (header only: its question is not echoed)."""
    return HEADER.pack(err.qid, QR | (err.flags & RD) | RA | FORMERR, 0, 0, 0, 0)


def parse_query(msg: bytes) -> Query:
    if len(msg) < HEADER.size:
        raise DnsError("shorter than a header")
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    if flags & QR or qd != 1 or (flags >> 11) & 0xF != 0:
        raise DnsError("not a standard query with one question")
    name, off = _strict_name(msg, HEADER.size, qid, flags)
    if off + 4 > len(msg):
        raise DnsError("question cut short")
    qtype, qclass = struct.unpack_from("!HH", msg, off)
    question = msg[HEADER.size:off + 4]
    udp_size = MAX_UDP
    off += 4
    try:  # EDNS: an OPT record in the additional section says how large a UDP answer may be
        for _ in range(an + ns + ar):
            _n, off = _name(msg, off)
            rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
            if rtype == OPT:
                udp_size = max(MAX_UDP, min(rclass, 4096))
            off += 10 + rdlen
    except (DnsError, struct.error):
        pass
    return Query(qid, flags, name, qtype, qclass, question, udp_size)


def parse_response(msg: bytes) -> Response:
    if len(msg) < HEADER.size:
        raise DnsError("shorter than a header")
    _id, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    resp = Response(flags & 0xF, bool(flags & TC))
    off = HEADER.size
    try:
        for _ in range(qd):
            _n, off = _name(msg, off)
            off += 4
        for i in range(an + ns + ar):
            _n, off = _name(msg, off)
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
            ttl = 0 if ttl > TTL_SANE else ttl
            rdata = off + 10
            if rdata + rdlen > len(msg):
                raise DnsError("record runs past the message")
            if rtype != OPT:
                resp.ttl_offsets.append(off + 4)
                resp.ttls.append(ttl)
            if i < an:
                resp.min_answer_ttl = ttl if resp.min_answer_ttl is None else min(resp.min_answer_ttl, ttl)
                if rtype == A and rclass == CLASS_IN and rdlen == 4:
                    resp.addresses.append(str(ipaddress.IPv4Address(bytes(msg[rdata:rdata + 4]))))
            elif i < an + ns and rtype == SOA and rdlen >= 20:
                minimum = struct.unpack_from("!I", msg, rdata + rdlen - 4)[0]
                minimum = 0 if minimum > TTL_SANE else minimum
                resp.negative_ttl = min(ttl, minimum)
            off = rdata + rdlen
    except struct.error:
        raise DnsError("record cut short") from None
    return resp


def reply(query: Query, rcode: int) -> bytes:
    """An answer of our own: ``rcode`` with no records (REFUSED, SERVFAIL, or NOERROR: no data)."""
    flags = QR | (query.flags & RD) | RA | rcode
    return HEADER.pack(query.id, flags, 1, 0, 0, 0) + query.question


def for_client(msg: bytes, query: Query, ttl_offsets: list[int] = (), age: int = 0) -> bytes:  # type: ignore[assignment]
    """An upstream's (or the cache's) answer made the client's: its id, its question as it
    spelled it, TTLs less ``age`` seconds; over UDP cut to the header and question with TC
    set when larger than the client takes (it asks again over TCP)."""
    out = bytearray(msg)
    struct.pack_into("!H", out, 0, query.id)
    q = HEADER.size
    if out[q:q + len(query.question)].lower() == query.question.lower():
        out[q:q + len(query.question)] = query.question
    if age:
        for off in ttl_offsets:
            ttl = struct.unpack_from("!I", out, off)[0]
            struct.pack_into("!I", out, off, max(0, ttl - age))
    return bytes(out)


def truncated(msg: bytes, query: Query) -> bytes:
    """``msg`` cut to its header and question, TC set (too large for the client's UDP)."""
    _id, flags, *_ = HEADER.unpack_from(msg)
    return HEADER.pack(query.id, flags | TC, 1, 0, 0, 0) + query.question


def with_id(msg: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + msg[2:]


def capped(msg: bytes, ttl_offsets: list[int], cap: int) -> bytes:
    """``msg`` with every record's TTL at most ``cap`` (one above 2^31 - 1 made 0, RFC 2181):
    what is cached and handed on is never kept longer than the resolver keeps it."""
    out = bytearray(msg)
    for off in ttl_offsets:
        ttl = struct.unpack_from("!I", out, off)[0]
        struct.pack_into("!I", out, off, 0 if ttl > TTL_SANE else min(ttl, cap))
    return bytes(out)
