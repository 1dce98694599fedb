"""Where a Service's traffic arrives, as data: the desired listeners and the diff to apply.

Sans-IO: from a ServiceInfo, the node's NodePort addresses and the VIP mapping, compute one
`ListenerSpec` per (protocol, bind address, port); the proxier opens what is missing and closes
what is no longer wanted, for the changed Service only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kubeshim.cluster.model import ServicePortName
from kubeshim.cluster.netaddr import ip_family, join_host_port
from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.sctp import sctp_problem

ListenerKind = Literal["ClusterIP", "NodePort", "ExternalIP", "LoadBalancer"]


@dataclass(frozen=True, slots=True)
class ListenerKey:
    protocol: str
    ip: str  # the address bound (the mapped loopback address in loopback mode)
    port: int

    def __str__(self) -> str:
        return f"{join_host_port(self.ip, self.port)}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    key: ListenerKey
    port_name: ServicePortName
    kind: ListenerKind
    service_ip: str  # the address clients use (ClusterIP, node IP, externalIP, LB IP)

    @property
    def family(self) -> int:
        return ip_family(self.service_ip)

    @property
    def external(self) -> bool:
        """Traffic from outside the cluster: externalTrafficPolicy applies."""
        return self.kind != "ClusterIP"


def desired_listeners(
    info: ServiceInfo,
    node_ips: Sequence[str],
    bind_address: Callable[[str], str],
) -> tuple[dict[ListenerKey, ListenerSpec], list[tuple[ServicePortName, str]]]:
    """The listeners a proxied Service needs, and the ports it cannot serve (with the reason)."""
    out: dict[ListenerKey, ListenerSpec] = {}
    problems: list[tuple[ServicePortName, str]] = []
    if not info.proxied:
        return out, problems
    svc = info.service
    families = {ip_family(ip) for ip in svc.cluster_ips}
    external_ips = [("ExternalIP", ip) for ip in svc.spec.external_ips]
    external_ips += [("LoadBalancer", ip) for ip in svc.load_balancer_ips]
    for spi in info.ports:
        sp = spi.spec
        if sp.protocol == "SCTP":
            problems.append((spi.name, sctp_problem()))
            continue

        def add(kind: ListenerKind, ip: str, port: int, spi_name: ServicePortName = spi.name,
                protocol: str = sp.protocol) -> None:
            key = ListenerKey(protocol, bind_address(ip), port)
            out.setdefault(key, ListenerSpec(key, spi_name, kind, ip))

        for ip in svc.cluster_ips:
            add("ClusterIP", ip, sp.port)
        for kind, ip in external_ips:
            # An address of a family the Service does not have is ignored, as kube-proxy's
            # per-family proxiers do.
            if ip_family(ip) in families:
                add(kind, ip, sp.port)  # type: ignore[arg-type]
        if sp.node_port and svc.spec.type in ("NodePort", "LoadBalancer"):
            for ip in node_ips:
                if ip_family(ip) in families:
                    add("NodePort", ip, sp.node_port)
    return out, problems


def leave_to_dns(
    desired: Mapping[ListenerKey, ListenerSpec], dns_binds: Sequence[tuple[str, int]]
) -> tuple[dict[ListenerKey, ListenerSpec], set[str]]:
    """Split off the Service tuples the node's DNS server answers itself (`dns.transparentBinds`,
    e.g. the kube-dns ClusterIP on port 53): (the listeners still to open, the Service addresses
    that must stay on the VIP interface so that the kernel delivers them to the DNS sockets)."""
    owned = set(dns_binds)
    kept = {k: s for k, s in desired.items()
            if s.kind == "NodePort" or (s.service_ip, k.port) not in owned}
    return kept, {s.service_ip for k, s in desired.items() if k not in kept}


def diff_listeners(
    current: Mapping[ListenerKey, ListenerSpec], desired: Mapping[ListenerKey, ListenerSpec]
) -> tuple[list[ListenerKey], list[ListenerSpec]]:
    """(keys to close, specs to open); a key whose spec changed is closed and reopened."""
    close = [k for k, spec in current.items() if desired.get(k) != spec]
    open_ = [spec for k, spec in desired.items() if current.get(k) != spec]
    return close, open_


def vips_of(specs: Mapping[ListenerKey, ListenerSpec]) -> set[str]:
    """Service addresses (not node addresses) the listeners need on the VIP interface."""
    return {s.service_ip for s in specs.values() if s.kind != "NodePort"}
