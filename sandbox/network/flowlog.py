"""Every new connection out of a sandbox, allowed or refused: read from NFLOG.

The gateway's rules log each connection's first packet to NFLOG group ``LOG_GROUP`` with
the prefix ``cubefs SLOT allowed|refused`` and its first 64 bytes (IP and TCP/UDP headers);
this reads them from a netfilter netlink socket in the node's namespace (no nflog daemon, no
kernel log: ``log`` to the kernel log is dropped in a non-initial namespace), and calls
``on_flow`` with (slot, verdict, protocol, destination, port) for the service to log and count.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("cubefs.sandbox.network")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE = 1, 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
PROTOS = {1: "icmp", 6: "tcp", 17: "udp"}

Flow = tuple[int, str, str, str, int]  # slot, verdict, protocol, destination, port


def _attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * (-n % 4)


def _config(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def parse_packet(msg: bytes) -> Flow | None:
    """One NFULNL_MSG_PACKET's body (after the nlmsghdr): the flow, or None if not ours."""
    prefix = payload = b""
    off = 4  # nfgenmsg
    while off + 4 <= len(msg):
        n, kind = struct.unpack_from("=HH", msg, off)
        if n < 4:
            break
        data = msg[off + 4:off + n]
        kind &= 0x7FFF
        if kind == NFULA_PREFIX:
            prefix = data.rstrip(b"\0")
        elif kind == NFULA_PAYLOAD:
            payload = data
        off += (n + 3) & ~3
    words = prefix.decode(errors="replace").split()
    if len(words) != 3 or words[0] != "cubefs" or not words[1].isdigit() or len(payload) < 20:
        return None
    ihl = (payload[0] & 0x0F) * 4
    proto = payload[9]
    dest = str(ipaddress.IPv4Address(payload[16:20]))
    port = struct.unpack_from("!H", payload, ihl + 2)[0] if proto in (6, 17) and len(payload) >= ihl + 4 else 0
    return int(words[1]), words[2], PROTOS.get(proto, str(proto)), dest, port


class FlowLog:
    """A thread reading NFLOG group ``group`` until ``close``."""

    def __init__(self, group: int, on_flow: Callable[[Flow], None]) -> None:
        self.on_flow = on_flow
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._request(_config(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), 1))
        self._request(_config(group, _attr(NFULA_CFG_MODE, struct.pack("!IBB", 64, NFULNL_COPY_PACKET, 0)), 2))
        self._stop = False
        self.sock.settimeout(0.5)  # the reader looks at _stop this often
        self.thread = threading.Thread(target=self._run, name="flow log", daemon=True)
        self.thread.start()

    def _request(self, msg: bytes) -> None:
        self.sock.send(msg)
        reply = self.sock.recv(65536)
        if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == NLMSG_ERROR:
            err = -struct.unpack_from("=i", reply, 16)[0]
            if err:
                raise OSError(err, f"binding NFLOG group: {errno.errorcode.get(err, err)}")

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as err:
                if self._stop:
                    return
                log.warning("flow log: %s", err)  # ENOBUFS: a burst overran the buffer; go on
                continue
            off = 0
            while off + 16 <= len(data):
                n, kind = struct.unpack_from("=IH", data, off)
                if n < 16:
                    break
                if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    flow = parse_packet(data[off + 16:off + n])
                    if flow is not None:
                        try:
                            self.on_flow(flow)
                        except Exception as err:  # a bad callback must not end the log
                            log.warning("flow log: %s", err)
                off += (n + 3) & ~3

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
