"""The API server's validation of Services and EndpointSlices, for objects nothing validated yet.

Objects from the API server passed kube-apiserver's validation (pkg/apis/core/validation
ValidateService, pkg/apis/discovery/validation ValidateEndpointSlice) and its ClusterIP
allocator; objects read from manifest files did not. `validate_strict` applies those rules on
top of `model.validate`, so a file cannot get kubeshim to serve what a cluster would refuse:

- names: a Service name is a DNS-1035 label (it becomes a DNS label, and must not start with a
  digit); namespaces and port names are DNS-1123 labels; an EndpointSlice name, a nodeName and
  an ExternalName are DNS-1123 subdomains; an endpoint hostname is a DNS-1123 label.
- addresses: endpoint addresses and externalIPs pass ValidateNonSpecialIP (not unspecified,
  loopback, link-local unicast or link-local multicast). One exception, on request: loopback
  endpoint addresses, which the lab (loopback mode, backends on the same host) is made of;
  a manifest file is written by the node's operator, not by any user with access to the API.
  A ClusterIP must lie in the service CIDRs when they are given (--service-cluster-ip-range;
  the allocator's rule). Without them,
  a ClusterIP must at least not be special (the classes above, multicast, broadcast and other
  reserved space) nor a public address: a ClusterIP of 8.8.8.8 would capture the node's own
  traffic to that address.

Every failure names the object and the field, like the API server's field errors.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Sequence

from kubeshim.cluster.model import EndpointSlice, InvalidObject, KubeObject, Node, Service

ServiceCIDRs = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]

# k8s.io/apimachinery/pkg/util/validation: IsDNS1123Label, IsDNS1035Label, IsDNS1123Subdomain.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253


def _fail(obj: KubeObject, field: str, value: object, reason: str) -> None:
    raise InvalidObject(obj.kind, str(obj.key), f"field {field}: {value!r} {reason}")


@functools.lru_cache(maxsize=4096)
def _label_problem(value: str, rfc1035: bool = False) -> str:
    """Why `value` is no DNS label, or ''. Cached: the same namespaces, port names and node
    names recur in every object of a folder."""
    if len(value) > LABEL_MAX:
        return f"must be no more than {LABEL_MAX} characters"
    if rfc1035 and not _DNS1035_LABEL.fullmatch(value):
        return ("must be a DNS-1035 label (lower case letters, digits and '-', starting with a "
                "letter)")
    if not rfc1035 and not _DNS1123_LABEL.fullmatch(value):
        return ("must be a DNS-1123 label (lower case letters, digits and '-', starting and "
                "ending with a letter or digit)")
    return ""


@functools.lru_cache(maxsize=4096)
def _subdomain_problem(value: str) -> str:
    if len(value) > SUBDOMAIN_MAX:
        return f"must be no more than {SUBDOMAIN_MAX} characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return ("must be a DNS-1123 subdomain (lower case labels of letters, digits and '-', "
                "joined by '.')")
    return ""


def _label(obj: KubeObject, field: str, value: str, rfc1035: bool = False) -> None:
    if reason := _label_problem(value, rfc1035):
        _fail(obj, field, value, reason)


def _subdomain(obj: KubeObject, field: str, value: str) -> None:
    if reason := _subdomain_problem(value):
        _fail(obj, field, value, reason)


def _special(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """ValidateNonSpecialIP's classes (pkg/apis/core/validation/validation.go), or ''."""
    if ip.is_unspecified:
        return "may not be unspecified"
    if ip.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if ip.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if ip.is_multicast and (ip in _V4_LL_MULTICAST or ip in _V6_LL_MULTICAST):
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/16)"
    return ""


_V4_LL_MULTICAST = ipaddress.ip_network("224.0.0.0/24")
_V6_LL_MULTICAST = ipaddress.ip_network("ff02::/16")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _special_v4(packed: bytes) -> str:
    """`_special` of an IPv4 address in network order: the same classes, compared as bytes
    (100k endpoint addresses in a folder; ipaddress's properties cost ~10 µs each)."""
    if packed == b"\0\0\0\0":
        return "may not be unspecified"
    if packed[0] == 127:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if packed[:2] == b"\xa9\xfe":
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if packed[:3] == b"\xe0\0\0":
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/16)"
    return ""


# The first bytes of the IPv4 classes _special_v4 refuses.
_V4_SPECIAL_FIRST = frozenset((0, 127, 169, 224))


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address model.validate accepted, parsed by inet_pton (C) rather than ipaddress's
    text parser."""
    return ipaddress.ip_address(socket.inet_pton(
        socket.AF_INET6 if ":" in value else socket.AF_INET, value))


def _special_address(value: str, loopback: bool = False) -> str:
    """Why `value` may not be used (ValidateNonSpecialIP), or ''; loopback allowed on request."""
    if ":" not in value:
        packed = socket.inet_pton(socket.AF_INET, value)
        if (reason := _special_v4(packed)) and not (loopback and packed[0] == 127):
            return reason
        return ""
    ip = ipaddress.ip_address(value)
    if (reason := _special(ip)) and not (loopback and ip.is_loopback):
        return reason
    return ""


def _non_special(obj: KubeObject, field: str, value: str, loopback: bool = False) -> None:
    if reason := _special_address(value, loopback):
        _fail(obj, field, value, reason)


def _private_v4(value: str) -> bool:
    """In 10/8, 172.16/12 or 192.168/16 (RFC 1918): none of the classes refused below."""
    if ":" in value:
        return False
    a, b = socket.inet_pton(socket.AF_INET, value)[:2]
    return a == 10 or (a == 172 and 16 <= b < 32) or (a == 192 and b == 168)


def _cluster_ip(svc: Service, field: str, value: str, cidrs: ServiceCIDRs | None) -> None:
    if not cidrs and _private_v4(value):
        return  # the common case, without ipaddress's slower class properties
    ip = _address(value)
    if cidrs:
        if not any(ip in net for net in cidrs if net.version == ip.version):
            _fail(svc, field, value, "is not in the service CIDRs (--service-cluster-ip-range "
                  + ",".join(map(str, cidrs)) + ")")
        return
    if reason := _special(ip):
        _fail(svc, field, value, reason)
    if ip.is_multicast:
        _fail(svc, field, value, "may not be a multicast address")
    if ip.is_reserved or ip == _BROADCAST:
        _fail(svc, field, value, "may not be a broadcast or reserved address")
    if ip.is_global:
        _fail(svc, field, value, "is a public address; give --service-cluster-ip-range to "
              "serve ClusterIPs outside private address space")


def validate_strict(obj: KubeObject, service_cidrs: ServiceCIDRs | None = None,
                    loopback_endpoints: bool = False) -> None:
    """The API server's rules for an object `model.validate` already accepted."""
    if obj.metadata.namespace:
        _label(obj, "metadata.namespace", obj.metadata.namespace)
    if isinstance(obj, Service):
        _validate_service(obj, service_cidrs)
    elif isinstance(obj, EndpointSlice):
        _validate_slice(obj, loopback_endpoints)
    elif isinstance(obj, Node):
        _subdomain(obj, "metadata.name", obj.metadata.name)


def _validate_service(svc: Service, cidrs: ServiceCIDRs | None) -> None:
    _label(svc, "metadata.name", svc.metadata.name, rfc1035=True)
    spec = svc.spec
    for i, ip in enumerate(svc.cluster_ips):
        field = "spec.clusterIP" if i == 0 and not spec.cluster_ips else f"spec.clusterIPs[{i}]"
        _cluster_ip(svc, field, ip, cidrs)
    for i, ip in enumerate(spec.external_ips):
        _non_special(svc, f"spec.externalIPs[{i}]", ip)
    for i, port in enumerate(svc.ports):
        if port.name and (reason := _label_problem(port.name)):
            _fail(svc, f"spec.ports[{i}].name", port.name, reason)
        if isinstance(port.target_port, str):
            _port_name(svc, f"spec.ports[{i}].targetPort", port.target_port)
    if spec.type == "ExternalName":
        _subdomain(svc, "spec.externalName", spec.external_name.rstrip(".").lower()
                   if spec.external_name.endswith(".") else spec.external_name)


def _port_name(obj: KubeObject, field: str, value: str) -> None:
    """IsValidPortName: an IANA_SVC_NAME, at most 15 characters with at least one letter."""
    if (len(value) > 15 or not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", value)
            or "--" in value or not re.search(r"[a-z]", value)):
        _fail(obj, field, value, "must be a port number or an IANA service name (at most 15 "
              "lower case letters, digits and '-', with at least one letter)")


def _validate_slice(eps: EndpointSlice, loopback: bool) -> None:
    _subdomain(eps, "metadata.name", eps.metadata.name)
    ip_family = eps.address_type in ("IPv4", "IPv6")
    # The field names only on failure: a folder holds hundreds of thousands of endpoints.
    v4 = eps.address_type == "IPv4"
    for i, ep in enumerate(eps.endpoints or ()):
        for j, addr in enumerate(ep.addresses):
            if v4 and socket.inet_pton(socket.AF_INET, addr)[0] not in _V4_SPECIAL_FIRST:
                continue  # the common case: no special class starts with this byte
            if reason := (_special_address(addr, loopback) if ip_family
                          else _subdomain_problem(addr)):
                _fail(eps, f"endpoints[{i}].addresses[{j}]", addr, reason)
        if ep.hostname is not None and (reason := _label_problem(ep.hostname)):
            _fail(eps, f"endpoints[{i}].hostname", ep.hostname, reason)
        if ep.node_name is not None and (reason := _subdomain_problem(ep.node_name)):
            _fail(eps, f"endpoints[{i}].nodeName", ep.node_name, reason)
    for i, port in enumerate(eps.ports or ()):
        if port.name and (reason := _label_problem(port.name)):
            _fail(eps, f"ports[{i}].name", port.name, reason)
