"""Choosing one endpoint for a new connection or flow, sans-IO.

Balancing policies (round robin, random, least connections) and the ClientIP session-affinity
table. Nothing here reads a clock or a socket: the affinity table takes a clock, so tests drive
expiry by hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence

from kubeshim.cluster.state import EndpointInfo

Clock = Callable[[], float]
EndpointKey = tuple[str, int]


class Balancer:
    """Round robin: each new connection takes the next endpoint in order (the default)."""

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        endpoints: Sequence[EndpointInfo],
        active: Mapping[EndpointKey, int],
        exclude: Collection[EndpointInfo] = (),
    ) -> EndpointInfo | None:
        n = len(endpoints)
        for _ in range(n):
            ep = endpoints[self._next % n]
            self._next += 1
            if not exclude or ep not in exclude:
                return ep
        return None


class RandomBalancer(Balancer):
    """Uniformly random, like kube-proxy's iptables/nftables probability rules."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng or random.Random()

    def choose(
        self,
        endpoints: Sequence[EndpointInfo],
        active: Mapping[EndpointKey, int],
        exclude: Collection[EndpointInfo] = (),
    ) -> EndpointInfo | None:
        candidates = [ep for ep in endpoints if ep not in exclude] if exclude else endpoints
        return self._rng.choice(candidates) if candidates else None


class LeastConnectionsBalancer(Balancer):
    """The endpoint with the fewest active connections; ties go round robin (IPVS lc)."""

    def choose(
        self,
        endpoints: Sequence[EndpointInfo],
        active: Mapping[EndpointKey, int],
        exclude: Collection[EndpointInfo] = (),
    ) -> EndpointInfo | None:
        n = len(endpoints)
        best: EndpointInfo | None = None
        best_load = 0
        start = self._next
        for i in range(n):
            ep = endpoints[(start + i) % n]
            if exclude and ep in exclude:
                continue
            load = active.get((ep.ip, ep.port), 0)
            if best is None or load < best_load:
                best, best_load = ep, load
        self._next += 1
        return best


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round-robin": Balancer,
    "random": RandomBalancer,
    "least-connections": LeastConnectionsBalancer,
}


def make_balancer(policy: str) -> Balancer:
    try:
        return BALANCERS[policy]()
    except KeyError:
        raise ValueError(
            f"unknown balance policy {policy!r}; expected one of {', '.join(BALANCERS)}"
        ) from None


class AffinityTable:
    """sessionAffinity: ClientIP — a client IP sticks to one endpoint for `timeout` seconds.

    Like kube-proxy's iptables `recent` match, the timer restarts with every new connection
    from the client, so an affinity lasts `timeout` after the client's last new connection.
    An endpoint that is no longer usable is not returned; the caller picks anew.
    """

    def __init__(self, timeout: float, clock: Clock) -> None:
        self.timeout = timeout
        self._clock = clock
        self._entries: dict[str, tuple[EndpointInfo, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, client_ip: str, usable: Mapping[EndpointKey, EndpointInfo]
    ) -> EndpointInfo | None:
        """The client's endpoint if its affinity holds and the endpoint is still usable.

        Endpoints are matched by ip:port, so a change of conditions (ready -> terminating while
        still usable) keeps the affinity.
        """
        entry = self._entries.get(client_ip)
        if entry is None:
            return None
        ep, expires = entry
        current = usable.get((ep.ip, ep.port))
        if current is None or expires <= self._clock():
            del self._entries[client_ip]
            return None
        return current

    def remember(self, client_ip: str, ep: EndpointInfo) -> None:
        self._entries[client_ip] = (ep, self._clock() + self.timeout)

    def expire(self) -> int:
        """Drop expired entries; returns how many went."""
        now = self._clock()
        gone = [ip for ip, (_, expires) in self._entries.items() if expires <= now]
        for ip in gone:
            del self._entries[ip]
        return len(gone)
