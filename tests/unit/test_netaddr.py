"""cluster.netaddr: one family test and one host:port form for every layer."""

from __future__ import annotations

import socket

import pytest

from kubeshim.cluster.netaddr import ip_family, join_host_port, socket_family


@pytest.mark.parametrize(("ip", "family", "af", "joined"), [
    ("10.96.0.10", 4, socket.AF_INET, "10.96.0.10:53"),
    ("fd00::a", 6, socket.AF_INET6, "[fd00::a]:53"),
    ("::ffff:10.0.0.1", 6, socket.AF_INET6, "[::ffff:10.0.0.1]:53"),
    ("fe80::1%eth0", 6, socket.AF_INET6, "[fe80::1%eth0]:53"),  # the scope id is kept
])
def test_family_and_host_port(ip: str, family: int, af: socket.AddressFamily, joined: str) -> None:
    assert ip_family(ip) == family
    assert socket_family(ip) == af
    assert join_host_port(ip, 53) == joined
