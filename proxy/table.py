"""The live forwarding table of one service port: usable endpoints, balancer, affinity, counters.

A `PortTable` is what listeners of a service port consult per new connection or flow. A sync
swaps its endpoint tuples in place (O(that port)); listeners keep pointing at the same table, so
an endpoint change never touches a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from kubeshim.cluster.model import Service
from kubeshim.cluster.state import EndpointInfo, ServicePortInfo
from kubeshim.proxy.balancer import AffinityTable, Clock, EndpointKey, make_balancer
from kubeshim.proxy.metrics import PortCounters
from kubeshim.proxy.topology import Categorized, PortPolicy, categorize_endpoints


def port_policy(svc: Service, spi: ServicePortInfo) -> PortPolicy:
    # kube-proxy's BaseServicePort.ExternallyAccessible: per port, from what the Service has.
    accessible = bool(spi.spec.node_port or svc.spec.external_ips or svc.load_balancer_ips)
    return PortPolicy(svc.internal_local, svc.external_local, accessible)


def _no_local_pods(ip: str) -> bool:
    return False


class PortTable:
    """Endpoints and balancing state of one ServicePort."""

    def __init__(self, spi: ServicePortInfo, family: int, balance: str, clock: Clock,
                 counters: PortCounters | None = None) -> None:
        self.name = spi.name
        # Like kube-proxy's per-family proxiers, a table serves one IP family: connections to
        # an IPv6 ClusterIP go to IPv6 endpoints only. Both families share the port's counters.
        self.family = family
        self.counters = counters if counters is not None else PortCounters()
        self.balancer = make_balancer(balance)
        self.affinity: AffinityTable | None = None
        self._clock = clock
        # Active TCP connections / UDP flows per endpoint (least-connections, status).
        self.active: dict[EndpointKey, int] = {}
        self.spec = spi.spec
        self.endpoints: tuple[EndpointInfo, ...] = ()
        self.categorized = Categorized((), (), False)
        self.internal: tuple[EndpointInfo, ...] = ()
        self.external: tuple[EndpointInfo, ...] = ()
        self._internal_keys: dict[EndpointKey, EndpointInfo] = {}
        self._external_keys: dict[EndpointKey, EndpointInfo] = {}
        # Clients on this node bypass externalTrafficPolicy Local (kube-proxy short-circuits
        # node-originated external traffic to cluster endpoints).
        self.node_addresses: Collection[str] = ()
        # ... and so do this node's pods (kube-proxy's detectLocal), where the proxy knows them.
        self.local_pod: Callable[[str], bool] = _no_local_pods
        self._external_uses_cluster = True

    def update(self, svc: Service, spi: ServicePortInfo, node_name: str,
               zone: str = "") -> set[EndpointKey]:
        """Take new endpoints and settings (`zone`: this node's topology zone); returns the
        endpoints no longer usable at all."""
        before = set(self._internal_keys) | set(self._external_keys)
        self.spec = spi.spec
        v6 = self.family == 6  # ip_family inlined: 100k endpoints on a first sync
        self.endpoints = tuple(ep for ep in spi.endpoints if (":" in ep.ip) == v6)
        policy = port_policy(svc, spi)
        self.categorized = categorize_endpoints(self.endpoints, policy, node_name, zone)
        self.internal = self.categorized.for_traffic(svc.internal_local)
        self.external = self.categorized.for_traffic(svc.external_local)
        self._external_uses_cluster = not svc.external_local
        self._internal_keys = {(ep.ip, ep.port): ep for ep in self.internal}
        self._external_keys = {(ep.ip, ep.port): ep for ep in self.external}
        timeout = svc.affinity_timeout
        if not timeout:
            self.affinity = None
        elif self.affinity is None or self.affinity.timeout != timeout:
            self.affinity = AffinityTable(timeout, self._clock)
        return before - set(self._internal_keys) - set(self._external_keys)

    @property
    def external_local(self) -> bool:
        """externalTrafficPolicy: Local."""
        return not self._external_uses_cluster

    def usable(self, key: EndpointKey) -> bool:
        return key in self._internal_keys or key in self._external_keys

    def pick(
        self, client_ip: str, external: bool, exclude: Collection[EndpointInfo] = ()
    ) -> EndpointInfo | None:
        """The endpoint for a new connection from `client_ip`, or None (reject)."""
        if external and not self._external_uses_cluster and (
                client_ip in self.node_addresses or self.local_pod(client_ip)):
            external = False
            endpoints, keys = self.categorized.cluster, None
        elif external:
            endpoints, keys = self.external, self._external_keys
        else:
            endpoints, keys = self.internal, self._internal_keys
        if not endpoints:
            return None
        affinity = self.affinity
        if affinity is not None:
            if keys is None:
                keys = {(ep.ip, ep.port): ep for ep in endpoints}
            ep = affinity.lookup(client_ip, keys)
            if ep is None or ep in exclude:
                ep = self.balancer.choose(endpoints, self.active, exclude)
                if ep is not None:
                    affinity.remember(client_ip, ep)
            else:
                affinity.remember(client_ip, ep)
            return ep
        return self.balancer.choose(endpoints, self.active, exclude)

    def opened(self, ep: EndpointInfo) -> None:
        key = (ep.ip, ep.port)
        self.active[key] = self.active.get(key, 0) + 1

    def closed(self, ep: EndpointInfo) -> None:
        key = (ep.ip, ep.port)
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)
