"""The loopback mapping of Service addresses (proxy/vip.py LoopbackMapper), a pure function."""

from __future__ import annotations

import pytest

from kubeshim.proxy.vip import LoopbackMapper, VipError


@pytest.mark.parametrize(("ip", "mapped"), [
    ("10.96.0.10", "127.96.0.10"),      # the low 22 bits are kept
    ("10.111.255.254", "127.111.255.254"),
    ("172.20.3.4", "127.84.3.4"),       # low 22 bits 0.20.3.4, over 127.64.0.0
    ("127.0.0.5", "127.0.0.5"),         # already loopback
    ("fd00::10", "fd00::10"),           # IPv6 is not mapped (check() refuses it)
])
def test_loopback_address(ip: str, mapped: str) -> None:
    assert LoopbackMapper().address(ip) == mapped


def test_one_service_cidr_never_collides() -> None:
    """kube-apiserver caps an IPv4 Service range at /12: 20 host bits, within the 22 kept."""
    mapper = LoopbackMapper()
    seen = {mapper.address(f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}")
            for i in range(0, 1 << 20, 997)}
    assert len(seen) == len(range(0, 1 << 20, 997))


def test_ipv6_is_refused_with_the_reason() -> None:
    with pytest.raises(VipError, match="cannot be served in loopback mode"):
        LoopbackMapper().check("fd00::10")
    LoopbackMapper().check("10.96.0.10")
