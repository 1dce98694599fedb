"""Decoding the socket addresses recvmmsg stores (struct sockaddr_in / sockaddr_in6)."""

from __future__ import annotations

import socket
import struct
import sys

import pytest

from kubeshim.dns.mmsg import sockaddr


def test_ipv4_address() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53000)
    raw += socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(8)
    assert sockaddr(raw) == ("10.1.2.3", 53000)


def test_ipv6_address_keeps_flowinfo_and_scope() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 5353, 0x12345)
    raw += socket.inet_pton(socket.AF_INET6, "fe80::1") + (7).to_bytes(4, sys.byteorder)
    assert sockaddr(raw) == ("fe80::1", 5353, 0x12345, 7)


def test_ipv4_mapped_address_stays_ipv6() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 1, 0)
    raw += socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1") + bytes(4)
    assert sockaddr(raw) == ("::ffff:127.0.0.1", 1, 0, 0)


def test_other_family_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="family 1"):
        sockaddr(struct.pack("=H", socket.AF_UNIX) + b"/tmp/x")
