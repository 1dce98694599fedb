"""Cluster names: a query name split into the parts of a Kubernetes DNS name.

Owns the syntax only (no state): which zone-relative name is a service, an endpoint of a
service, a named port, a pod, the apex or the version record, and which reverse name is which
address. The grammar follows the Kubernetes DNS-Based Service Discovery specification and,
where it is silent, CoreDNS's kubernetes plugin (parse.go):

    <svc>.<ns>.svc.<zone>                  service
    <endpoint>.<svc>.<ns>.svc.<zone>       endpoint (hostname or dashed IP)
    _<port>._<proto>.<svc>.<ns>.svc.<zone> named port (SRV)
    <a-b-c-d>.<ns>.pod.<zone>              pod (deprecated records, spec 2.6)
    <ns>.svc.<zone>, svc.<zone>, pod.<zone>, <zone>   names that exist without records
    dns-version.<zone>                     spec version TXT (spec 2.2)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NameKind(StrEnum):
    APEX = "apex"
    VERSION = "version"
    SERVICE = "service"  # under svc.<zone>; namespace/service may be empty (intermediate names)
    POD = "pod"  # under pod.<zone>; namespace/pod may be empty
    INVALID = "invalid"  # in the zone but not a name the schema can produce: NXDOMAIN


@dataclass(frozen=True, slots=True)
class ClusterName:
    kind: NameKind
    namespace: str = ""
    service: str = ""  # the Service name, or the dashed pod address for POD
    endpoint: str = ""
    port: str = ""  # SRV port name without the underscore
    protocol: str = ""  # SRV protocol without the underscore ("tcp", "udp", "sctp")


INVALID = ClusterName(NameKind.INVALID)


def wire_labels(labels: Sequence[bytes]) -> list[str]:
    """A query name's wire labels, lower-cased (ASCII only, RFC 4343) and decoded one byte to
    one character. A label may contain a dot (`www\\.example` is one label): names are
    compared label by label, never as dotted text."""
    return [label.lower().decode("latin-1") for label in labels]


def split_zone(labels: Sequence[str], zone: str) -> list[str] | None:
    """`labels` (lower case) left of `zone` (dotted text); None if the name is outside it."""
    zone_labels = zone.split(".")
    n = len(zone_labels)
    if len(labels) < n or list(labels[len(labels) - n :]) != zone_labels:
        return None
    return list(labels[: len(labels) - n])


def parse_cluster_name(labels: list[str]) -> ClusterName:
    """Classify zone-relative labels (lower case, left to right). A label holding a dot is
    never part of a name the schema can produce."""
    if not labels:
        return ClusterName(NameKind.APEX)
    if any("." in label for label in labels):
        return INVALID
    if labels == ["dns-version"]:
        return ClusterName(NameKind.VERSION)
    *rest, branch = labels
    if branch == "svc":
        return _parse_service(rest)
    if branch == "pod":
        if len(rest) > 2:
            return INVALID
        pod = rest[0] if len(rest) == 2 else ""
        return ClusterName(NameKind.POD, namespace=rest[-1] if rest else "", service=pod)
    return INVALID


def _parse_service(rest: list[str]) -> ClusterName:
    if not rest:
        return ClusterName(NameKind.SERVICE)
    namespace = rest[-1]
    if len(rest) == 1:
        return ClusterName(NameKind.SERVICE, namespace=namespace)
    service = rest[-2]
    extra = rest[:-2]
    if not extra:
        return ClusterName(NameKind.SERVICE, namespace, service)
    if len(extra) == 1:
        return ClusterName(NameKind.SERVICE, namespace, service, endpoint=extra[0])
    if len(extra) == 2:
        port, proto = extra
        # The spec's form is _<port>._<proto>; anything else with two labels cannot exist.
        if len(port) > 1 and len(proto) > 1 and port[0] == "_" and proto[0] == "_":
            return ClusterName(
                NameKind.SERVICE, namespace, service, port=port[1:], protocol=proto[1:]
            )
    return INVALID


def pod_address(dashed: str) -> IPAddress | None:
    """`10-244-0-5` -> 10.244.0.5, `fd00--5` -> fd00::5 (CoreDNS findPods); None if not an IP."""
    if dashed.count("-") == 3 and "--" not in dashed:
        text = dashed.replace("-", ".")
    else:
        text = dashed.replace("-", ":")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def dashed(ip: str) -> str:
    """The endpoint name CoreDNS gives an address without a hostname: dots/colons to dashes.

    An IPv6 address starting or ending with `::` would give a label starting or ending with a
    dash, which RFC 1123 (2.1) forbids and resolvers reject; as CoreDNS does since its fix for
    coredns/coredns#7430, a `0` is added on that side (`2001:db8::` -> `2001-db8--0`,
    `::1` -> `0--1`), which still reads back as the same address (`pod_address`)."""
    name = ip.replace(".", "-").replace(":", "-")
    if name.startswith("-"):
        name = "0" + name
    if name.endswith("-"):
        name += "0"
    return name


REVERSE_V4 = "in-addr.arpa"
REVERSE_V6 = "ip6.arpa"


def is_reverse(labels: Sequence[str]) -> bool:
    return list(labels[-2:]) in (["in-addr", "arpa"], ["ip6", "arpa"])


def reverse_address(qname: str) -> IPAddress | None:
    """The address a full PTR name stands for (RFC 1035 3.5, RFC 3596 2.5); None otherwise."""
    if qname.endswith("." + REVERSE_V4):
        octets = qname[: -len(REVERSE_V4) - 1].split(".")
        if len(octets) != 4 or not all(o.isdigit() and len(o) <= 3 for o in octets):
            return None
        if any(len(o) > 1 and o[0] == "0" for o in octets):
            return None
        try:
            return ipaddress.IPv4Address(".".join(reversed(octets)))
        except ValueError:
            return None
    if qname.endswith("." + REVERSE_V6):
        nibbles = qname[: -len(REVERSE_V6) - 1].split(".")
        if len(nibbles) != 32 or not all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return None
        return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
    return None


def reverse_zone(cidr: str) -> str:
    """The reverse zone of a CIDR, rounded out to an octet (v4) or nibble (v6) boundary."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 4:
        octets = str(net.network_address).split(".")[: net.prefixlen // 8]
        return ".".join([*reversed(octets), REVERSE_V4])
    nibbles = net.network_address.exploded.replace(":", "")[: net.prefixlen // 4]
    return ".".join([*reversed(nibbles), REVERSE_V6])
