# msgspec Struct subclasses inherit frozen=True from _Struct; mypy cannot see that through
# dataclass_transform and reports each subclass as "non-frozen inherits frozen".
# mypy: disable-error-code="misc"
"""The Kubernetes objects kubeshim reads: v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node.

This module owns the wire model (the JSON/YAML shape the API server serves, decoded by msgspec
straight into typed structs) and its validation. Only the fields a proxy and a DNS server need are
declared; msgspec ignores the rest. Every decoding or validation failure becomes an
`InvalidObject` that names kind, namespace/name and the offending field.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import msgspec

Protocol = Literal["TCP", "UDP", "SCTP"]
IPFamily = Literal["IPv4", "IPv6"]

# Labels with a meaning to service proxies (k8s.io/api/core/v1 well_known_labels, KEP-2447).
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"

# The taint the cluster autoscaler puts on a node it is about to delete; kube-proxy's /healthz
# fails on such a node so load balancers drain it (pkg/proxy/healthcheck ToBeDeletedTaint).
TAINT_TO_BE_DELETED = "ToBeDeletedByClusterAutoscaler"

# The default ClientIP affinity timeout: 3 hours (core/v1 DefaultClientIPServiceAffinitySeconds).
DEFAULT_AFFINITY_TIMEOUT = 10800


class InvalidObject(ValueError):
    """An object that cannot be served: names the kind, the object and the field."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"invalid {kind} {name or '<unnamed>'}: {reason}")
        self.kind = kind
        self.name = name
        self.reason = reason


class NamespacedName(NamedTuple):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ServicePortName(NamedTuple):
    """One port of one Service, the unit kube-proxy balances (pkg/proxy ServicePortName)."""

    service: NamespacedName
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.service}:{self.port}" if self.port else str(self.service)


class _Struct(msgspec.Struct, rename="camel", frozen=True, gc=False, omit_defaults=True):
    """Base of the wire structs: camelCase on the wire, immutable, no GC tracking (no cycles)."""


class ObjectMeta(_Struct):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""
    uid: str = ""
    labels: dict[str, str] = {}
    # Set when deletion was requested (an RFC 3339 time); the object lives on until finalized.
    deletion_timestamp: str | None = None

    @property
    def key(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)


# --- v1 Service ---------------------------------------------------------------------------


class ServicePort(_Struct):
    port: int
    name: str = ""
    protocol: Protocol = "TCP"
    target_port: int | str | None = None  # unset means the same as port
    node_port: int = 0
    app_protocol: str | None = None


class ClientIPConfig(_Struct):
    timeout_seconds: int = DEFAULT_AFFINITY_TIMEOUT


class SessionAffinityConfig(_Struct):
    client_ip: ClientIPConfig | None = msgspec.field(default=None, name="clientIP")


class ServiceSpec(_Struct):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: list[str] = msgspec.field(default_factory=list, name="clusterIPs")
    ip_families: list[IPFamily] = []
    ports: list[ServicePort] | None = None
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_ips: list[str] = msgspec.field(default_factory=list, name="externalIPs")
    external_name: str = ""
    internal_traffic_policy: Literal["Cluster", "Local"] | None = None
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    health_check_node_port: int = 0
    publish_not_ready_addresses: bool = False
    # PreferClose, PreferSameZone, PreferSameNode: the EndpointSlice controller turns it into
    # endpoint hints, and the proxy routes by those hints (proxy/topology.py).
    traffic_distribution: str | None = None
    load_balancer_source_ranges: list[str] = []


class LoadBalancerIngress(_Struct):
    ip: str = ""
    hostname: str = ""
    ip_mode: Literal["VIP", "Proxy"] | None = None


class LoadBalancerStatus(_Struct):
    ingress: list[LoadBalancerIngress] | None = None


class ServiceStatus(_Struct):
    load_balancer: LoadBalancerStatus | None = None


class Service(_Struct, kw_only=True):
    metadata: ObjectMeta
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus = ServiceStatus()
    kind: str = "Service"
    api_version: str = "v1"

    @property
    def key(self) -> NamespacedName:
        return self.metadata.key

    @property
    def headless(self) -> bool:
        return self.spec.cluster_ip == "None"

    @property
    def cluster_ips(self) -> list[str]:
        """Allocated ClusterIPs, primary family first; empty for headless and ExternalName."""
        spec = self.spec
        if self.headless or spec.type == "ExternalName":
            return []
        if spec.cluster_ips:
            return [ip for ip in spec.cluster_ips if ip != "None"]
        return [spec.cluster_ip] if spec.cluster_ip else []

    @property
    def ports(self) -> list[ServicePort]:
        return self.spec.ports or []

    @property
    def affinity_timeout(self) -> int:
        """Seconds a ClientIP affinity lasts, or 0 when affinity is off."""
        if self.spec.session_affinity != "ClientIP":
            return 0
        cfg = self.spec.session_affinity_config
        return cfg.client_ip.timeout_seconds if cfg and cfg.client_ip else DEFAULT_AFFINITY_TIMEOUT

    @property
    def load_balancer_ips(self) -> list[str]:
        """The ingress IPs the node proxies: ipMode Proxy means the load balancer delivers
        traffic to the node addresses itself, so kube-proxy does not capture that IP
        (KEP-1860; pkg/proxy serviceport.go)."""
        lb = self.status.load_balancer
        return [i.ip for i in (lb.ingress or []) if i.ip and i.ip_mode != "Proxy"] if lb else []

    @property
    def proxy_mode_ips(self) -> list[str]:
        """LoadBalancer ingress IPs with ipMode Proxy: the load balancer delivers traffic with
        its own address, so kube-proxy leaves them alone (KEP-1860)."""
        lb = self.status.load_balancer
        return [i.ip for i in (lb.ingress or []) if i.ip and i.ip_mode == "Proxy"] if lb else []

    @property
    def internal_local(self) -> bool:
        return self.spec.internal_traffic_policy == "Local"

    @property
    def externally_accessible(self) -> bool:
        """pkg/api/v1/service ExternallyAccessible: NodePort and LoadBalancer Services, and
        ClusterIP Services with externalIPs."""
        spec = self.spec
        return spec.type in ("NodePort", "LoadBalancer") or (
            spec.type == "ClusterIP" and bool(spec.external_ips)
        )

    @property
    def external_local(self) -> bool:
        # pkg/api/v1/service ExternalPolicyLocal: only an externally accessible Service has an
        # external policy, and that includes a ClusterIP Service with externalIPs.
        return self.externally_accessible and self.spec.external_traffic_policy == "Local"


# --- discovery.k8s.io/v1 EndpointSlice ----------------------------------------------------


class EndpointConditions(_Struct):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(_Struct):
    name: str


class ForNode(_Struct):
    name: str


class EndpointHints(_Struct):
    for_zones: list[ForZone] | None = None
    for_nodes: list[ForNode] | None = None


class ObjectReference(_Struct):
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class Endpoint(_Struct):
    addresses: list[str]
    conditions: EndpointConditions = EndpointConditions()
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None
    target_ref: ObjectReference | None = None

    # Condition defaults follow discovery/v1 and kube-proxy's endpointslicecache.go: a nil
    # ready means ready, a nil serving means serving, a nil terminating means not terminating.
    @property
    def ready(self) -> bool:
        return self.conditions.ready is not False

    @property
    def serving(self) -> bool:
        return self.conditions.serving is not False

    @property
    def terminating(self) -> bool:
        return self.conditions.terminating is True


class EndpointPort(_Struct):
    name: str | None = None
    protocol: Protocol = "TCP"
    port: int | None = None
    app_protocol: str | None = None


class EndpointSlice(_Struct, kw_only=True):
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None
    kind: str = "EndpointSlice"
    api_version: str = "discovery.k8s.io/v1"

    @property
    def key(self) -> NamespacedName:
        return self.metadata.key

    @property
    def service(self) -> NamespacedName | None:
        """The Service this slice belongs to, from its kubernetes.io/service-name label."""
        name = self.metadata.labels.get(LABEL_SERVICE_NAME)
        return NamespacedName(self.metadata.namespace, name) if name else None


# --- v1 Node (only this node's own) ----------------------------------------------------------


class Taint(_Struct):
    key: str
    effect: str = ""
    value: str = ""


class NodeSpec(_Struct):
    taints: list[Taint] | None = None


class Node(_Struct, kw_only=True):
    metadata: ObjectMeta
    spec: NodeSpec = NodeSpec()
    kind: str = "Node"
    api_version: str = "v1"

    @property
    def key(self) -> NamespacedName:
        return self.metadata.key  # cluster-scoped: the namespace is empty

    @property
    def zone(self) -> str:
        return self.metadata.labels.get(LABEL_TOPOLOGY_ZONE, "")

    @property
    def eligible(self) -> bool:
        """kube-proxy's ProxyHealthServer.SyncNode: a node being deleted or tainted
        ToBeDeletedByClusterAutoscaler is not eligible for load-balancer traffic."""
        if self.metadata.deletion_timestamp:
            return False
        return not any(t.key == TAINT_TO_BE_DELETED for t in self.spec.taints or ())


KubeObject = Service | EndpointSlice | Node
KINDS: dict[str, type[Service] | type[EndpointSlice] | type[Node]] = {
    "Service": Service,
    "EndpointSlice": EndpointSlice,
    "Node": Node,
}


# --- decoding and validation --------------------------------------------------------------


JSONBytes = bytes | bytearray | memoryview | msgspec.Raw


def decode(kind: str, raw: JSONBytes | Mapping[str, Any]) -> KubeObject:
    """Decode one object of `kind` from JSON bytes (or a msgspec.Raw slice of a watch event)
    or a parsed YAML/JSON mapping, validated."""
    cls = KINDS[kind]
    try:
        obj: KubeObject
        if isinstance(raw, JSONBytes):
            obj = msgspec.json.decode(raw, type=cls)
        else:
            obj = msgspec.convert(raw, type=cls, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidObject(kind, _name_of(raw), _field_message(str(e))) from None
    except msgspec.DecodeError as e:
        raise InvalidObject(kind, "", f"not valid JSON: {e}") from None
    validate(obj)
    return obj


def _name_of(raw: JSONBytes | Mapping[str, Any]) -> str:
    """Best-effort namespace/name of an object that failed to decode, for the error message."""
    try:
        mapping = msgspec.json.decode(raw) if isinstance(raw, JSONBytes) else raw
        meta = mapping.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    except Exception:
        return ""


def _field_message(msg: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.spec.ports[0].port`": put the field first.
    if " - at `$." in msg:
        what, where = msg.rsplit(" - at `$.", 1)
        return f"field {where.rstrip('`')}: {what}"
    return msg


def validate(obj: KubeObject) -> None:
    """Semantic checks msgspec's types cannot express; raises InvalidObject."""
    if isinstance(obj, Service):
        _validate_service(obj)
    elif isinstance(obj, Node):
        if not obj.metadata.name:
            _fail(obj, "metadata.name", "required")
    else:
        _validate_slice(obj)


def _fail(obj: KubeObject, field: str, reason: str) -> None:
    raise InvalidObject(obj.kind, str(obj.key), f"field {field}: {reason}")


def ip_version(value: str) -> int:
    """4 or 6 for a textual IP address, else 0. inet_pton is the C parser: ~15x faster than
    ipaddress.ip_address, which matters for 100k endpoints in a list; like current Kubernetes
    validation it rejects IPv4 octets with leading zeros and IPv6 zone ids."""
    try:
        socket.inet_pton(socket.AF_INET, value)
        return 4
    except (OSError, ValueError):
        pass
    try:
        socket.inet_pton(socket.AF_INET6, value)
        return 6
    except (OSError, ValueError):
        return 0


def _check_ip(obj: KubeObject, field: str, value: str) -> None:
    if not ip_version(value):
        _fail(obj, field, f"{value!r} is not an IP address")


def _check_port(obj: KubeObject, field: str, value: int, allow_zero: bool = False) -> None:
    if not (0 if allow_zero else 1) <= value <= 65535:
        _fail(obj, field, f"{value} is not a valid port number")


def _validate_meta(obj: KubeObject) -> None:
    if not obj.metadata.name:
        _fail(obj, "metadata.name", "required")
    if not obj.metadata.namespace:
        _fail(obj, "metadata.namespace", "required")


def _validate_service(svc: Service) -> None:
    _validate_meta(svc)
    spec = svc.spec
    if spec.cluster_ip not in ("", "None"):
        _check_ip(svc, "spec.clusterIP", spec.cluster_ip)
    for i, ip in enumerate(spec.cluster_ips):
        if ip != "None":
            _check_ip(svc, f"spec.clusterIPs[{i}]", ip)
    if spec.cluster_ips and spec.cluster_ip and spec.cluster_ips[0] != spec.cluster_ip:
        _fail(svc, "spec.clusterIPs[0]", "must equal spec.clusterIP")
    for i, ip in enumerate(spec.external_ips):
        _check_ip(svc, f"spec.externalIPs[{i}]", ip)
    lb = svc.status.load_balancer
    for i, ingress in enumerate(lb.ingress or () if lb else ()):
        if ingress.ip:
            _check_ip(svc, f"status.loadBalancer.ingress[{i}].ip", ingress.ip)
    for i, cidr in enumerate(spec.load_balancer_source_ranges):
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            _fail(svc, f"spec.loadBalancerSourceRanges[{i}]", f"{cidr!r} is not a CIDR")
    if spec.type == "ExternalName" and not spec.external_name:
        _fail(svc, "spec.externalName", "required for type ExternalName")
    ports = svc.ports
    seen: set[tuple[str, str]] = set()
    for i, p in enumerate(ports):
        _check_port(svc, f"spec.ports[{i}].port", p.port)
        _check_port(svc, f"spec.ports[{i}].nodePort", p.node_port, allow_zero=True)
        if isinstance(p.target_port, int):
            _check_port(svc, f"spec.ports[{i}].targetPort", p.target_port)
        if len(ports) > 1 and not p.name:
            _fail(svc, f"spec.ports[{i}].name", "required when a Service has several ports")
        if (p.name, p.protocol) in seen:
            _fail(svc, f"spec.ports[{i}].name", f"duplicate port name {p.name!r}/{p.protocol}")
        seen.add((p.name, p.protocol))
    if spec.session_affinity_config and spec.session_affinity_config.client_ip:
        t = spec.session_affinity_config.client_ip.timeout_seconds
        if not 0 < t <= 86400:
            _fail(svc, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{t} not in 1..86400")
    _check_port(svc, "spec.healthCheckNodePort", spec.health_check_node_port, allow_zero=True)


def _validate_slice(eps: EndpointSlice) -> None:
    _validate_meta(eps)
    family = {"IPv4": 4, "IPv6": 6}.get(eps.address_type)
    for i, ep in enumerate(eps.endpoints or ()):
        if not ep.addresses:
            _fail(eps, f"endpoints[{i}].addresses", "at least one address is required")
        if family is None:
            continue
        for j, addr in enumerate(ep.addresses):
            if ip_version(addr) != family:
                field = f"endpoints[{i}].addresses[{j}]"
                _fail(eps, field, f"{addr!r} is not an {eps.address_type}")
    for i, port in enumerate(eps.ports or ()):
        if port.port is not None:
            _check_port(eps, f"ports[{i}].port", port.port)
