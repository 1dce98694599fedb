"""Balancing policies and ClientIP affinity, with an injected clock."""

from __future__ import annotations

import collections
import random

import pytest

from kubeshim.cluster.state import EndpointInfo
from kubeshim.proxy.balancer import (
    AffinityTable,
    Balancer,
    LeastConnectionsBalancer,
    RandomBalancer,
    make_balancer,
)

EPS = tuple(EndpointInfo(f"10.0.0.{i}", 80, True, True, False) for i in range(1, 4))
KEYS = {(e.ip, e.port): e for e in EPS}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_cycles_in_order() -> None:
    b = Balancer()
    assert [b.choose(EPS, {}) for _ in range(6)] == [*EPS, *EPS]


def test_round_robin_skips_excluded() -> None:
    b = Balancer()
    picks = [b.choose(EPS, {}, exclude={EPS[1]}) for _ in range(4)]
    assert EPS[1] not in picks and set(picks) == {EPS[0], EPS[2]}


def test_all_excluded_gives_none() -> None:
    for name in ("round-robin", "random", "least-connections"):
        assert make_balancer(name).choose(EPS, {}, exclude=set(EPS)) is None
        assert make_balancer(name).choose((), {}) is None


def test_random_spreads_roughly_evenly() -> None:
    b = RandomBalancer(random.Random(7))
    counts = collections.Counter(b.choose(EPS, {}) for _ in range(3000))
    assert all(800 < counts[e] < 1200 for e in EPS)


@pytest.mark.parametrize(
    "active,want",
    {
        "idle endpoints first": ({("10.0.0.1", 80): 2, ("10.0.0.2", 80): 1}, EPS[2]),
        "fewest active wins": (
            {("10.0.0.1", 80): 3, ("10.0.0.2", 80): 1, ("10.0.0.3", 80): 2},
            EPS[1],
        ),
    }.values(),
    ids=["idle endpoints first", "fewest active wins"],
)
def test_least_connections(active: dict[tuple[str, int], int], want: EndpointInfo) -> None:
    assert LeastConnectionsBalancer().choose(EPS, active) is want


def test_least_connections_ties_rotate() -> None:
    b = LeastConnectionsBalancer()
    assert {b.choose(EPS, {}) for _ in range(3)} == set(EPS)


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="'fastest'"):
        make_balancer("fastest")


def test_affinity_pins_until_timeout_after_last_use() -> None:
    clock = FakeClock()
    table = AffinityTable(10, clock)
    assert table.lookup("192.0.2.1", KEYS) is None
    table.remember("192.0.2.1", EPS[1])
    clock.now += 9
    assert table.lookup("192.0.2.1", KEYS) is EPS[1]
    table.remember("192.0.2.1", EPS[1])  # a new connection restarts the timer
    clock.now += 9
    assert table.lookup("192.0.2.1", KEYS) is EPS[1]
    clock.now += 10
    assert table.lookup("192.0.2.1", KEYS) is None
    assert len(table) == 0


def test_affinity_dropped_when_endpoint_unusable() -> None:
    table = AffinityTable(100, FakeClock())
    table.remember("192.0.2.1", EPS[0])
    assert table.lookup("192.0.2.1", {k: v for k, v in KEYS.items() if v is not EPS[0]}) is None


def test_affinity_survives_condition_change() -> None:
    table = AffinityTable(100, FakeClock())
    table.remember("192.0.2.1", EPS[0])
    terminating = EndpointInfo(EPS[0].ip, 80, False, True, True)
    assert table.lookup("192.0.2.1", {(EPS[0].ip, 80): terminating}) is terminating


def test_affinity_expire_sweeps() -> None:
    clock = FakeClock()
    table = AffinityTable(5, clock)
    table.remember("a", EPS[0])
    clock.now += 3
    table.remember("b", EPS[1])
    clock.now += 3
    assert table.expire() == 1
    assert table.lookup("b", KEYS) is EPS[1]
