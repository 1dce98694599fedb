"""Budget and caps_for_limit: admission in total and per client, sizing from RLIMIT_NOFILE."""

from __future__ import annotations

import pytest

from kubeshim.proxy.budget import LIMIT_CLIENT, LIMIT_TOTAL, Budget, caps_for_limit


def test_per_client_then_total() -> None:
    b = Budget("connections", limit=3, per_client=2)
    assert [b.admit("a"), b.admit("a"), b.admit("a")] == [None, None, LIMIT_CLIENT]
    assert b.admit("b") is None
    assert b.admit("c") == LIMIT_TOTAL
    b.release("a")
    assert b.admit("c") is None
    assert b.status() == {"active": 3, "limit": 3, "perClientLimit": 2, "clients": 3,
                          "refusedTotalLimit": 1, "refusedPerClientLimit": 1}
    for client in ("a", "b", "c"):
        b.release(client)
    assert b.by_client == {} and b.active == 0


@pytest.mark.parametrize("limit, configured, expected", [
    # The usual soft limit: a quarter goes to the reserve, the rest is shared.
    (1024, {}, (256, 64, 256, 64)),
    # Plenty of descriptors: kube-proxy's conntrack.min.
    (1048576, {}, (131072, 32768, 131072, 32768)),
    # A configured value wins when it fits, and is clamped when it does not.
    (1048576, {"connections": 1000, "connections_per_client": 10}, (1000, 10, 131072, 32768)),
    (1024, {"connections": 100000, "udp_flows_per_client": 5000}, (256, 64, 256, 256)),
])
def test_caps_for_limit(limit: int, configured: dict[str, int],
                        expected: tuple[int, int, int, int]) -> None:
    caps = caps_for_limit(limit, **configured)
    assert (caps.connections, caps.connections_per_client, caps.udp_flows,
            caps.udp_flows_per_client) == expected
