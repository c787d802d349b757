"""Conntrack over netlink (ctnetlink), read and written by hand: the events of connections
that end, a dump of those still open, the deletion of one.

No ``conntrack`` binary and no library: the messages are a netfilter netlink header and
nested attributes, parsed here as ``flowlog`` parses NFLOG's.  Only what accounting needs is
read: the original tuple (source, destination, protocol, destination port), the counters of
each direction (``nf_conntrack_acct=1``), the start and stop times (``nf_conntrack_timestamp=1``)
and the kernel's id of the entry.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NFNLGRP_CONNTRACK_DESTROY = 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 4, 1, 1
TCP_TIME_WAIT, TCP_CLOSE = 7, 8  # conntrack's TCP states: a connection that has ended
CTA_TUPLE_ORIG, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID, CTA_TIMESTAMP = 1, 9, 10, 12, 20
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
PROTOS = {1: "icmp", 6: "tcp", 17: "udp"}
DESTROY = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW


@dataclass
class Conn:
    """One conntrack entry as seen from the side that opened it (the original direction)."""

    id: int
    source: str
    dest: str
    proto: str
    port: int
    bytes_out: int = 0  # the original direction: what the opener sent
    bytes_in: int = 0
    packets: int = 0  # both directions
    start_ns: int = 0  # CLOCK_REALTIME, 0 without nf_conntrack_timestamp
    stop_ns: int = 0
    tcp_state: int = 0
    tuple_attr: bytes = b""  # CTA_TUPLE_ORIG as the kernel sent it: names the entry to delete

    @property
    def seconds(self) -> float:
        return max(0.0, (self.stop_ns - self.start_ns) / 1e9) if self.start_ns and self.stop_ns else 0.0


def _attrs(buf: bytes, off: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(type, start of data, end of data) of each attribute in ``buf[off:end]``."""
    end = len(buf) if end is None else end
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", buf, off)
        if n < 4 or off + n > end:
            return
        yield kind & NLA_TYPE_MASK, off + 4, off + n
        off += (n + 3) & ~3


def _u64(buf: bytes, a: int, b: int) -> int:
    if b - a >= 8:
        return struct.unpack_from("!Q", buf, a)[0]
    return struct.unpack_from("!I", buf, a)[0] if b - a >= 4 else 0


def parse(msg: bytes, off: int, end: int, source_prefix: bytes = b"") -> Conn | None:
    """The conntrack message in ``msg[off:end]`` (after the nlmsghdr, at its nfgenmsg), or None
    if it is not IPv4 or its source does not start with ``source_prefix`` (checked before
    anything else is read: most of a busy node's entries are not a sandbox's)."""
    if end - off < 4 or msg[off] != socket.AF_INET:
        return None
    if source_prefix and end - off >= 24:  # the kernel's layout: CTA_TUPLE_ORIG > CTA_TUPLE_IP > CTA_IP_V4_SRC first
        kinds = struct.unpack_from("=2xH2xH2xH", msg, off + 4)
        if [k & NLA_TYPE_MASK for k in kinds] == [CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_IP_V4_SRC] \
                and msg[off + 16:off + 16 + len(source_prefix)] != source_prefix:
            return None  # not a sandbox's: ~1 µs, where a full parse is ~30
    conn = Conn(0, "", "", "", 0)
    for kind, a, b in _attrs(msg, off + 4, end):
        if kind == CTA_TUPLE_ORIG:
            conn.tuple_attr = msg[a - 4:b]
            for k2, a2, b2 in _attrs(msg, a, b):
                if k2 == CTA_TUPLE_IP:
                    for k3, a3, b3 in _attrs(msg, a2, b2):
                        if k3 == CTA_IP_V4_SRC and b3 - a3 == 4:
                            if msg[a3:a3 + len(source_prefix)] != source_prefix:
                                return None
                            conn.source = str(ipaddress.IPv4Address(msg[a3:b3]))
                        elif k3 == CTA_IP_V4_DST and b3 - a3 == 4:
                            conn.dest = str(ipaddress.IPv4Address(msg[a3:b3]))
                elif k2 == CTA_TUPLE_PROTO:
                    for k3, a3, b3 in _attrs(msg, a2, b2):
                        if k3 == CTA_PROTO_NUM:
                            conn.proto = PROTOS.get(msg[a3], str(msg[a3]))
                        elif k3 == CTA_PROTO_DST_PORT and b3 - a3 >= 2:
                            conn.port = struct.unpack_from("!H", msg, a3)[0]
        elif kind in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            for k2, a2, b2 in _attrs(msg, a, b):
                if k2 == CTA_COUNTERS_BYTES:
                    if kind == CTA_COUNTERS_ORIG:
                        conn.bytes_out = _u64(msg, a2, b2)
                    else:
                        conn.bytes_in = _u64(msg, a2, b2)
                elif k2 == CTA_COUNTERS_PACKETS:
                    conn.packets += _u64(msg, a2, b2)
        elif kind == CTA_PROTOINFO:
            for k2, a2, b2 in _attrs(msg, a, b):
                if k2 == CTA_PROTOINFO_TCP:
                    for k3, a3, b3 in _attrs(msg, a2, b2):
                        if k3 == CTA_PROTOINFO_TCP_STATE and b3 > a3:
                            conn.tcp_state = msg[a3]
        elif kind == CTA_ID and b - a >= 4:
            conn.id = struct.unpack_from("!I", msg, a)[0]
        elif kind == CTA_TIMESTAMP:
            for k2, a2, b2 in _attrs(msg, a, b):
                if k2 == CTA_TIMESTAMP_START:
                    conn.start_ns = _u64(msg, a2, b2)
                elif k2 == CTA_TIMESTAMP_STOP:
                    conn.stop_ns = _u64(msg, a2, b2)
    return conn if conn.source else None


def messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start of body, end) of each netlink message in one datagram."""
    off = 0
    while off + 16 <= len(data):
        n, kind = struct.unpack_from("=IH", data, off)
        if n < 16 or off + n > len(data):
            return
        yield kind, off + 16, off + n
        off += (n + 3) & ~3


def _request(kind: int, flags: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | kind, flags, seq, 0) + body


def socket_for(groups: tuple[int, ...] = (), rcvbuf: int = 1 << 20) -> socket.socket:
    """A ctnetlink socket in the calling thread's namespace, a member of ``groups``; the
    receive buffer forced to ``rcvbuf`` (as root: above ``rmem_max``) so a burst of events
    is not lost."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


def dump(sock: socket.socket, source_prefix: bytes = b"", seq: int = 1) -> list[Conn]:
    """Every IPv4 entry of the namespace whose source starts with ``source_prefix``."""
    sock.send(_request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, b"", seq))
    out: list[Conn] = []
    while True:
        data = sock.recv(1 << 17)
        for kind, a, b in messages(data):
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, a)[0]
                if err:
                    raise OSError(err, f"conntrack dump: {errno.errorcode.get(err, err)}")
                return out
            if kind == NEW and (conn := parse(data, a, b, source_prefix)) is not None:
                out.append(conn)


def delete(sock: socket.socket, conn: Conn, seq: int = 1) -> bool:
    """Delete ``conn``'s entry (its tuple and id); False if it was gone already."""
    attrs = conn.tuple_attr + struct.pack("=HH", 8, CTA_ID) + struct.pack("!I", conn.id)
    sock.send(_request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, attrs, seq))
    while True:
        data = sock.recv(1 << 16)
        for kind, a, _b in messages(data):
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, a)[0]
                if err in (0, errno.ENOENT):
                    return err == 0
                raise OSError(err, f"conntrack delete: {errno.errorcode.get(err, err)}")
