"""ClusterState: the sans-IO reducer from watch events to the services kubeshim serves.

Everything that decides what a Service looks like to the proxy and the DNS server lives here;
nothing here touches a socket, a file or a clock. Sources feed it events (`apply`) or whole
lists (`replace`, for a list or a 410 relist); it merges each Service with its EndpointSlices
into a `ServiceInfo` and reports what changed as `ServiceChange`s to its subscribers.

It also holds this node's own Node object (`node_name`; other Nodes are ignored): its labels,
taints and deletion state. A change to them goes to node subscribers (`subscribe_node`), which
recompute what depends on the node (topology, health eligibility).

Cost rule: an event touches one Service, so applying it recomputes that Service only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import msgspec

from kubeshim.cluster.model import (
    LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME,
    EndpointSlice,
    KubeObject,
    NamespacedName,
    Node,
    Service,
    ServicePort,
    ServicePortName,
)
from kubeshim.cluster.netaddr import join_host_port

Kind = Literal["Service", "EndpointSlice", "Node"]
# The kinds that must be listed in full before anything is served; the Node is optional (a
# manifest folder may have none, an identity may not be allowed to read it).
REQUIRED_KINDS: frozenset[Kind] = frozenset(("Service", "EndpointSlice"))


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


class WatchEvent(msgspec.Struct, frozen=True, gc=False):
    type: EventType
    object: KubeObject


# The value types below are frozen msgspec Structs rather than dataclasses: construction and
# equality are ~10-20x cheaper, which is most of the cost of building 100k endpoints on a list
# (bench/bench_state.py). They stay immutable, hashable and keyword-constructible.


class EndpointInfo(msgspec.Struct, frozen=True, gc=False):
    """One endpoint of one service port, after merging slices (kube-proxy's BaseEndpointInfo)."""

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] | None = None
    node_hints: frozenset[str] | None = None

    @property
    def address(self) -> str:
        return join_host_port(self.ip, self.port)


class ServicePortInfo(msgspec.Struct, frozen=True):
    """A Service port with the endpoints that serve it."""

    name: ServicePortName
    spec: ServicePort
    endpoints: tuple[EndpointInfo, ...]


class ServiceInfo(msgspec.Struct, frozen=True):
    """A Service merged with its EndpointSlices: what consumers read."""

    service: Service
    ports: tuple[ServicePortInfo, ...]
    # The slices themselves (sorted by name), for DNS: headless records need hostnames and
    # every address, which the per-port proxy view flattens away.
    slices: tuple[EndpointSlice, ...]
    # False when kube-proxy would skip the Service (pkg/proxy ShouldSkipService + the label
    # selector kube-proxy's informers use): headless, ExternalName, no ClusterIP, or owned by
    # another proxy through service.kubernetes.io/service-proxy-name.
    proxied: bool

    @property
    def key(self) -> NamespacedName:
        return self.service.key


class ServiceChange(msgspec.Struct, frozen=True):
    """The Service `key` went from `previous` to `current`; None means absent."""

    key: NamespacedName
    previous: ServiceInfo | None
    current: ServiceInfo | None


Subscriber = Callable[[Sequence[ServiceChange]], None]
# Called with (previous, current) when this node's Node object changed; None means absent.
NodeSubscriber = Callable[["Node | None", "Node | None"], None]


@dataclass
class ClusterState:
    """The store both the proxy and the DNS server read. Not thread-safe; one event loop owns it."""

    proxy_name: str = "kubeshim"
    # This node's name (--hostname-override): the one Node object the state keeps.
    node_name: str = ""
    services: dict[NamespacedName, ServiceInfo] = field(default_factory=dict)
    # Bumped once per batch that changed anything; caches key their validity on it.
    generation: int = 0
    _service_objects: dict[NamespacedName, Service] = field(default_factory=dict)
    _slices: dict[NamespacedName, EndpointSlice] = field(default_factory=dict)
    _slices_by_service: dict[NamespacedName, dict[str, EndpointSlice]] = field(
        default_factory=dict
    )
    # This node's Node object, None until seen; `node_deleted` once it went away again.
    node: Node | None = None
    node_deleted: bool = False
    _synced: set[Kind] = field(default_factory=set)
    _subscribers: list[Subscriber] = field(default_factory=list)
    _node_subscribers: list[NodeSubscriber] = field(default_factory=list)

    # --- reading ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once both Services and EndpointSlices have been listed in full."""
        return self._synced >= REQUIRED_KINDS

    @property
    def node_zone(self) -> str:
        """This node's topology.kubernetes.io/zone label ("" when unknown)."""
        return self.node.zone if self.node is not None else ""

    @property
    def node_eligible(self) -> bool:
        """Whether load balancers may send this node traffic (kube-proxy's nodeEligible):
        eligible until its Node says otherwise (tainted ToBeDeletedByClusterAutoscaler, being
        deleted) or is deleted; like kube-proxy, eligible while the Node is not yet known."""
        if self.node is None:
            return not self.node_deleted
        return self.node.eligible

    def is_synced(self, kind: Kind) -> bool:
        return kind in self._synced

    def objects(self, kind: Kind) -> dict[NamespacedName, KubeObject]:
        """The raw objects of one kind currently held (for relists and `kubeshim state`)."""
        if kind == "Node":
            return {self.node.key: self.node} if self.node is not None else {}
        src = self._service_objects if kind == "Service" else self._slices
        return dict(src)

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def subscribe_node(self, subscriber: NodeSubscriber) -> None:
        self._node_subscribers.append(subscriber)

    # --- writing ------------------------------------------------------------------------

    def apply(self, events: Iterable[WatchEvent]) -> list[ServiceChange]:
        """Apply watch events in order; notify subscribers once with the net changes."""
        touched: dict[NamespacedName, ServiceInfo | None] = {}
        services = self.services
        node_before = self.node
        for event in events:
            if isinstance(event.object, Node):
                self._reduce_node(event.type, event.object)
                continue
            for key in self._reduce(event.type, event.object):
                if key not in touched:
                    touched[key] = services.get(key)
        # Each touched Service is rebuilt once per batch, however many of its objects changed.
        for key in touched:
            self._rebuild(key)
        if _node_view(self.node) != _node_view(node_before):
            for node_subscriber in self._node_subscribers:
                node_subscriber(node_before, self.node)
        return self._publish(touched)

    def replace(self, kind: Kind, objects: Iterable[KubeObject]) -> list[ServiceChange]:
        """Make the objects of `kind` exactly `objects` (a list or a relist after 410 Gone).

        Objects that vanished are deleted, changed ones updated, equal ones left alone, so a
        relist that finds nothing new reports nothing.
        """
        current = self.objects(kind) if kind == "Node" else (
            self._service_objects if kind == "Service" else self._slices)
        incoming = {obj.key: obj for obj in objects}
        deleted, modified = EventType.DELETED, EventType.MODIFIED
        events = [WatchEvent(deleted, obj) for key, obj in current.items() if key not in incoming]
        events += [
            WatchEvent(modified, obj) for key, obj in incoming.items() if current.get(key) != obj
        ]
        self._synced.add(kind)
        return self.apply(events)

    def mirror(self, changes: Sequence[ServiceChange], node: Node | None, node_deleted: bool,
               synced: bool) -> list[ServiceChange]:
        """Take the changes another process's state published (a worker following the
        control process): the same Services, Node and sync status, told to the subscribers
        here exactly as they were told there."""
        node_before = self.node
        self.node, self.node_deleted = node, node_deleted
        if synced:
            self._synced |= REQUIRED_KINDS
        touched: dict[NamespacedName, ServiceInfo | None] = {}
        for change in changes:
            touched.setdefault(change.key, self.services.get(change.key))
            if change.current is None:
                self.services.pop(change.key, None)
            else:
                self.services[change.key] = change.current
        if self.node != node_before:
            for node_subscriber in self._node_subscribers:
                node_subscriber(node_before, self.node)
        return self._publish(touched)

    # --- internals ----------------------------------------------------------------------

    def _reduce_node(self, type: EventType, node: Node) -> None:
        if not self.node_name or node.metadata.name != self.node_name:
            return  # another node's object: nothing on this node depends on it
        if type is EventType.DELETED:
            self.node_deleted = self.node_deleted or self.node is not None
            self.node = None
        else:
            self.node = node
            self.node_deleted = False

    def _reduce(self, type: EventType, obj: Service | EndpointSlice) -> list[NamespacedName]:
        """Update the raw stores; return the Services whose view may have changed."""
        key = obj.key
        if isinstance(obj, Service):
            if type is EventType.DELETED:
                self._service_objects.pop(key, None)
            else:
                self._service_objects[key] = obj
            return [key]
        old = self._slices.pop(key, None)
        affected = []
        if old is not None and (owner := old.service) is not None:
            self._slices_by_service.get(owner, {}).pop(old.metadata.name, None)
            if not self._slices_by_service.get(owner, True):
                del self._slices_by_service[owner]
            affected.append(owner)
        if type is not EventType.DELETED:
            self._slices[key] = obj
            if (owner := obj.service) is not None:
                self._slices_by_service.setdefault(owner, {})[obj.metadata.name] = obj
                if owner not in affected:
                    affected.append(owner)
        return affected

    def _rebuild(self, key: NamespacedName) -> None:
        svc = self._service_objects.get(key)
        if svc is None:
            self.services.pop(key, None)
            return
        by_name = self._slices_by_service.get(key, {})
        slices = tuple(by_name[name] for name in sorted(by_name))
        self.services[key] = build_service_info(svc, slices, self.proxy_name)

    def _publish(self, touched: dict[NamespacedName, ServiceInfo | None]) -> list[ServiceChange]:
        changes = [
            ServiceChange(key, before, after)
            for key, before in touched.items()
            if before != (after := self.services.get(key))
        ]
        if changes:
            self.generation += 1
            for subscriber in self._subscribers:
                subscriber(changes)
        return changes


def _node_view(node: Node | None) -> object:
    """What of a Node matters here: labels, taints, deletion. A kubelet's status heartbeat
    (a new resourceVersion and nothing else decoded) is no change."""
    if node is None:
        return None
    return node.metadata.labels, node.spec.taints, node.metadata.deletion_timestamp


def build_service_info(
    svc: Service, slices: Sequence[EndpointSlice], proxy_name: str
) -> ServiceInfo:
    """Merge a Service with its slices into per-port endpoint lists.

    Follows kube-proxy's endpointslicecache.go: endpoints are matched to a service port by
    the slice port's name and protocol (the EndpointSlice controller resolves a named
    targetPort into the slice port's number); only the first address of an endpoint is used;
    a slice port without a number is skipped; FQDN slices are not proxied. Duplicates across
    slices (same ip:port, e.g. while the controller moves an endpoint) collapse into the
    first copy in slice-name order.
    """
    ports = tuple(
        ServicePortInfo(
            ServicePortName(svc.key, sp.name, sp.protocol), sp, _merge_endpoints(sp, slices)
        )
        for sp in svc.ports
    )
    return ServiceInfo(svc, ports, tuple(slices), _is_proxied(svc, slices, proxy_name))


def _merge_endpoints(sp: ServicePort, slices: Sequence[EndpointSlice]) -> tuple[EndpointInfo, ...]:
    merged: dict[tuple[str, int], EndpointInfo] = {}
    for eps in slices:
        if eps.address_type == "FQDN" or not eps.endpoints:
            continue
        number = next(
            (
                p.port
                for p in eps.ports or ()
                if (p.name or "") == sp.name and p.protocol == sp.protocol and p.port
            ),
            None,
        )
        if number is None:
            continue
        for ep in eps.endpoints:
            ip = ep.addresses[0]
            if (ip, number) in merged:
                continue
            hints = ep.hints
            zones = hints.for_zones if hints else None
            nodes = hints.for_nodes if hints else None
            cond = ep.conditions  # the defaults of Endpoint.ready/.serving/.terminating, inlined
            merged[(ip, number)] = EndpointInfo(
                ip,
                number,
                cond.ready is not False,
                cond.serving is not False,
                cond.terminating is True,
                ep.node_name,
                ep.zone,
                frozenset(z.name for z in zones) if zones else None,
                frozenset(n.name for n in nodes) if nodes else None,
            )
    return tuple(merged.values())


def _is_proxied(svc: Service, slices: Sequence[EndpointSlice], proxy_name: str) -> bool:
    owner = svc.metadata.labels.get(LABEL_SERVICE_PROXY_NAME)
    if owner is not None and owner != proxy_name:
        return False
    if any(LABEL_HEADLESS in s.metadata.labels for s in slices):
        return False
    return bool(svc.cluster_ips) and svc.spec.type != "ExternalName"
