"""Admission of proxied TCP connections and UDP flows: a cap in total and per client address.

A node proxy holds two descriptors per proxied TCP connection and one per UDP flow, all from
one RLIMIT_NOFILE it shares with DNS, the API watch and the ops endpoints. kube-proxy's data
path is the kernel's conntrack table (kube-proxy sizes it to conntrack.maxPerCore, 32768 per
core, at least conntrack.min, 131072); kubeshim's is its own descriptor table, so it caps
what one client, or all of them, may hold, and refuses a new connection or flow cleanly at the
cap (a TCP reset, a dropped datagram, both counted) instead of letting the process run out
of descriptors and fail everything else.

Sans-IO: plain counters the asyncio shells consult; sizing from the descriptor limit lives in
`caps_for_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Error reasons counted per service port (see proxy/metrics.py).
LIMIT_TOTAL = "limit_total"
LIMIT_CLIENT = "limit_per_client"

# kube-proxy's conntrack.min: the table size it asks for on a small node.
KUBE_PROXY_CONNTRACK_MIN = 131072


class Budget:
    """Counts what is open, in total and per client address, against two caps."""

    __slots__ = ("what", "limit", "per_client", "active", "by_client", "refused")

    def __init__(self, what: str, limit: int, per_client: int) -> None:
        self.what = what
        self.limit = limit
        self.per_client = per_client
        self.active = 0
        self.by_client: dict[str, int] = {}
        self.refused = {LIMIT_TOTAL: 0, LIMIT_CLIENT: 0}

    def admit(self, client: str) -> str | None:
        """Count one more for `client`; or the reason it is refused (nothing counted)."""
        if self.active >= self.limit:
            self.refused[LIMIT_TOTAL] += 1
            return LIMIT_TOTAL
        n = self.by_client.get(client, 0)
        if n >= self.per_client:
            self.refused[LIMIT_CLIENT] += 1
            return LIMIT_CLIENT
        self.active += 1
        self.by_client[client] = n + 1
        return None

    def release(self, client: str) -> None:
        self.active -= 1
        n = self.by_client.get(client, 0) - 1
        if n > 0:
            self.by_client[client] = n
        else:
            self.by_client.pop(client, None)

    def status(self) -> dict[str, object]:
        return {"active": self.active, "limit": self.limit, "perClientLimit": self.per_client,
                "clients": len(self.by_client), "refusedTotalLimit": self.refused[LIMIT_TOTAL],
                "refusedPerClientLimit": self.refused[LIMIT_CLIENT]}


@dataclass(frozen=True)
class Caps:
    connections: int
    connections_per_client: int
    udp_flows: int
    udp_flows_per_client: int


def reserved_descriptors(limit: int) -> int:
    """Descriptors kept out of the proxy's reach: DNS (UDP and TCP sessions), the API watch,
    the ops endpoints, listening sockets, logs. An eighth of the limit, at least 256, and never
    more than half of it."""
    return min(max(256, limit // 8), limit // 2)


def caps_for_limit(limit: int, connections: int = 0, connections_per_client: int = 0,
                   udp_flows: int = 0, udp_flows_per_client: int = 0) -> Caps:
    """The caps for a descriptor limit; a configured value (non-zero) wins if it fits.

    What is left after the reserve goes two thirds to TCP (two descriptors a connection) and
    one third to UDP flows (one each), each capped at kube-proxy's conntrack.min. One client
    address may take a quarter of each (a node-local cache or ingress is one busy client).
    """
    available = max(0, limit - reserved_descriptors(limit))
    tcp_fit = max(1, available * 2 // 3 // 2)
    udp_fit = max(1, available // 3)
    tcp = min(connections or KUBE_PROXY_CONNTRACK_MIN, tcp_fit)
    udp = min(udp_flows or KUBE_PROXY_CONNTRACK_MIN, udp_fit)
    return Caps(
        connections=tcp,
        connections_per_client=min(connections_per_client or max(1, tcp // 4), tcp),
        udp_flows=udp,
        udp_flows_per_client=min(udp_flows_per_client or max(1, udp // 4), udp),
    )
