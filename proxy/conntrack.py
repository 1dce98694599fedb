"""The original destination of a redirected connection or flow (tproxy mode, bridged traffic).

Captured traffic that arrives on a Linux bridge is NATed to the redirect listeners instead of
TPROXY'd (proxy/capture.py says why), so the listener sees its own address; the Service tuple the
client sent to lives in the connection's conntrack entry. TCP reads it with
getsockopt(SO_ORIGINAL_DST) (IP6T_SO_ORIGINAL_DST for IPv6). UDP has no such option (the kernel's
getorigdst() serves TCP and SCTP only), so a new flow asks ctnetlink for the entry by its reply
tuple (the listener's address -> the client, both known from the datagram) and reads the original
tuple's destination.

The request is packed here rather than through pyroute2's nfct_msg: over the same netlink socket
its encode and decode took 611 us per query, these 14 us (one query per new UDP flow; 1,000 GETs
of one entry in a test namespace, kernel 6.18).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (SOL_IPV6) is 80 too

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLA_F_NESTED = 0x8000
# linux/netfilter/nfnetlink_conntrack.h
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3


def original_tcp_destination(sock: Any) -> tuple[str, int] | None:
    """Where the client of a redirected TCP connection sent it (None: not NATed)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    except OSError:
        return None


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        out[kind & ~NLA_F_NESTED] = data[offset + 4:offset + size]
        offset += (size + 3) & ~3
    return out


def get_request(seq: int, protocol: int, local: tuple[str, int],
                client: tuple[str, int]) -> bytes:
    """IPCTNL_MSG_CT_GET of the entry whose reply tuple is local -> client."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    src, dst = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == socket.AF_INET6 else (
        CTA_IP_V4_SRC, CTA_IP_V4_DST)
    ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED,
               _attr(src, socket.inet_pton(family, local[0]))
               + _attr(dst, socket.inet_pton(family, client[0])))
    proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                  _attr(CTA_PROTO_NUM, bytes([protocol]))
                  + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", local[1]))
                  + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", client[1])))
    body = struct.pack("=BBH", family, 0, 0) + _attr(CTA_TUPLE_REPLY | NLA_F_NESTED, ip + proto)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def original_of(message: bytes) -> tuple[str, int] | None:
    """The original tuple's destination in a ctnetlink entry message (None: an error)."""
    if len(message) < 20 or struct.unpack_from("=H", message, 4)[0] == NLMSG_ERROR:
        return None
    tuple_ = _attrs(_attrs(message[20:]).get(CTA_TUPLE_ORIG, b""))
    ip, proto = _attrs(tuple_.get(CTA_TUPLE_IP, b"")), _attrs(tuple_.get(CTA_TUPLE_PROTO, b""))
    port = proto.get(CTA_PROTO_DST_PORT)
    if port is None or len(port) < 2:
        return None
    if (v4 := ip.get(CTA_IP_V4_DST)) is not None and len(v4) == 4:
        return socket.inet_ntop(socket.AF_INET, v4), struct.unpack("!H", port[:2])[0]
    if (v6 := ip.get(CTA_IP_V6_DST)) is not None and len(v6) == 16:
        return socket.inet_ntop(socket.AF_INET6, v6), struct.unpack("!H", port[:2])[0]
    return None


class Conntrack:
    """One ctnetlink socket of this process. The kernel answers a GET while the request is
    being sent, so the answer is read without waiting; none means no entry."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def original_destination(self, protocol: int, local: tuple[str, int],
                             client: tuple[str, int]) -> tuple[str, int] | None:
        """Where `client` sent the flow that reached `local` through the redirect."""
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                self._sock.setblocking(False)
                self._sock.bind((0, 0))
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._sock.send(get_request(self._seq, protocol, local, client))
            while True:  # skip answers to earlier requests (never expected, but harmless)
                message = self._sock.recv(8192)
                if len(message) >= 16 and struct.unpack_from("=I", message, 8)[0] == self._seq:
                    return original_of(message)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.close()
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
