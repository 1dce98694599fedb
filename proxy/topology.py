"""Which endpoints a service port may use: kube-proxy's CategorizeEndpoints, sans-IO.

Follows pkg/proxy/topology.go (CategorizeEndpoints, topologyModeFromHints,
availableForTopology): traffic-policy categories (cluster / node-local), the fall back to
serving-and-terminating endpoints, and topology-aware routing by the hints the EndpointSlice
controller writes for a Service's trafficDistribution (PreferSameNode: forNodes hints;
PreferSameZone and PreferClose: forZones hints) against this node's name and its Node's
topology.kubernetes.io/zone label. The proxy reads only the hints, never trafficDistribution
itself, exactly as kube-proxy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kubeshim.cluster.state import EndpointInfo

# "" means no topology: every usable endpoint in the cluster.
TopologyMode = Literal["", "PreferSameNode", "PreferSameZone"]


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """The parts of a Service that decide endpoint categories (kube-proxy's ServicePort)."""

    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local (ExternalPolicyLocal)
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
    # The topology applied to the cluster endpoints ("" when none).
    topology: TopologyMode = ""

    def for_traffic(self, local_policy: bool) -> tuple[EndpointInfo, ...]:
        """The endpoints one kind of traffic uses: local ones under a Local policy."""
        return self.local if local_policy else self.cluster


def _is_local(ep: EndpointInfo, node_name: str) -> bool:
    return bool(node_name) and ep.node_name == node_name


def topology_mode(endpoints: Sequence[EndpointInfo], node_name: str, zone: str) -> TopologyMode:
    """kube-proxy's topologyModeFromHints, over the ready endpoints only:

    - every ready endpoint has a node hint and one is hinted for this node: PreferSameNode;
    - else every ready endpoint has a zone hint and one is hinted for this node's zone:
      PreferSameZone (also what PreferClose becomes);
    - else "" (hints incomplete, or none for this node/zone, or no ready endpoint at all):
      every endpoint, so traffic never goes nowhere for want of a close endpoint.
    """
    has_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone in ep.zone_hints:
            for_zone = True
    if not has_ready:
        return ""
    if all_node_hints and for_node:
        return "PreferSameNode"
    if all_zone_hints and for_zone:
        return "PreferSameZone"
    return ""


def _available(ep: EndpointInfo, mode: TopologyMode, node_name: str, zone: str) -> bool:
    """availableForTopology: no fall back here; that was decided when choosing the mode."""
    if mode == "PreferSameNode":
        return ep.node_hints is not None and node_name in ep.node_hints
    if mode == "PreferSameZone":
        return ep.zone_hints is not None and zone in ep.zone_hints
    return True


def categorize_endpoints(
    endpoints: Sequence[EndpointInfo], policy: PortPolicy, node_name: str, zone: str = ""
) -> Categorized:
    """Split endpoints into the cluster-wide and node-local sets traffic may use.

    - Cluster endpoints are the ready ones that the topology mode allows (all of them when
      hints do not apply, see topology_mode); when none is ready anywhere, the ones that are
      serving and terminating, whatever their hints (KEP-1669).
    - Local endpoints are this node's ready ones; when this node has none ready, its serving
      and terminating ones. Topology never narrows them. A node with neither has no local
      endpoints even if other nodes have some: traffic policy Local then drops the traffic
      (it never falls back to remote).
    - `has_any` is true when some endpoint in the cluster is ready or serving-and-terminating.
    """
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any = False
    mode: TopologyMode = ""
    if not endpoints:
        return Categorized(cluster, local, has_any)
    if policy.uses_cluster_endpoints:
        mode = topology_mode(endpoints, node_name, zone)
        cluster = tuple(
            ep for ep in endpoints if ep.ready and _available(ep, mode, node_name, zone)
        )
        if not cluster:
            # The mode already ignores topology when no ready endpoint fits it, so here no
            # endpoint is ready anywhere.
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)
    if not policy.uses_local_endpoints:
        return Categorized(cluster, local, has_any, mode)

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
    return Categorized(cluster, local, has_any, mode)
