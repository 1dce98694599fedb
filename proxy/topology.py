"""Which endpoints a service port may use: kube-proxy's CategorizeEndpoints, sans-IO.

Follows pkg/proxy/topology.go. Topology-aware hints are not applied (kubeshim does not know its
node's zone labels), so "cluster" endpoints are every usable endpoint in the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubeshim.cluster.state import EndpointInfo


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """The parts of a Service that decide endpoint categories (kube-proxy's ServicePort)."""

    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    # NodePort, externalIPs or LoadBalancer ingress IPs present (ExternallyAccessible()).
    externally_accessible: bool = False

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Cluster endpoints are needed when the internal policy is Cluster, or when the port
        # takes external traffic at all: even with externalTrafficPolicy Local, traffic from the
        # node itself is short-circuited to cluster endpoints.
        return not self.internal_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_local or (self.external_local and self.externally_accessible)


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[EndpointInfo, ...]
    local: tuple[EndpointInfo, ...]
    # Whether any endpoint anywhere could serve; False means "reject" (no endpoints).
    has_any: bool

    def for_traffic(self, local_policy: bool) -> tuple[EndpointInfo, ...]:
        """The endpoints one kind of traffic uses: local ones under a Local policy."""
        return self.local if local_policy else self.cluster


def _is_local(ep: EndpointInfo, node_name: str) -> bool:
    return bool(node_name) and ep.node_name == node_name


def categorize_endpoints(
    endpoints: Sequence[EndpointInfo], policy: PortPolicy, node_name: str
) -> Categorized:
    """Split endpoints into the cluster-wide and node-local sets traffic may use.

    - Cluster endpoints are the ready ones; when none is ready anywhere, the ones that are
      serving and terminating (KEP-1669, graceful termination of proxied traffic).
    - Local endpoints are this node's ready ones; when this node has none ready, its serving
      and terminating ones. A node with neither has no local endpoints even if other nodes
      have some: traffic policy Local then drops the traffic (it never falls back to remote).
    - `has_any` is true when some endpoint in the cluster is ready or serving-and-terminating.
    """
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any = False
    if policy.uses_cluster_endpoints:
        cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)
    if not policy.uses_local_endpoints:
        return Categorized(cluster, local, has_any)

    local_ready = local_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or _is_local(ep, node_name)
        elif ep.serving and ep.terminating:
            has_any = True
            local_terminating = local_terminating or _is_local(ep, node_name)
    if local_ready:
        local = tuple(ep for ep in endpoints if _is_local(ep, node_name) and ep.ready)
    elif local_terminating:
        local = tuple(
            ep
            for ep in endpoints
            if _is_local(ep, node_name) and ep.serving and ep.terminating
        )
    return Categorized(cluster, local, has_any)
