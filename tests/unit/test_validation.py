"""validate_strict: the API server's rules for Services and EndpointSlices read from files."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kubeshim.cluster.model import InvalidObject, decode
from kubeshim.cluster.validation import validate_strict

CIDRS = [ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:10:96::/112")]


def service(name: str = "web", ip: str = "10.96.0.10", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}], **spec}}


def endpoint_slice(name: str = "web-1", *addresses: str, **endpoint: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": list(addresses or ["10.244.0.5"]), **endpoint}]}


def error(kind: str, raw: dict[str, Any], cidrs: Any = None) -> str:
    with pytest.raises(InvalidObject) as e:
        validate_strict(decode(kind, raw), cidrs)
    return e.value.reason


@pytest.mark.parametrize("raw, field, reason", [
    (service(name="Web"), "metadata.name", "DNS-1035"),
    (service(name="a.b"), "metadata.name", "DNS-1035"),
    (service(name="1web"), "metadata.name", "DNS-1035"),
    (service(name="x" * 64), "metadata.name", "no more than 63"),
    (service(ip="0.0.0.0"), "spec.clusterIP", "unspecified"),
    (service(ip="127.0.0.5"), "spec.clusterIP", "loopback"),
    (service(ip="169.254.169.254"), "spec.clusterIP", "link-local"),
    (service(ip="224.0.0.1"), "spec.clusterIP", "link-local multicast"),
    (service(ip="239.1.1.1"), "spec.clusterIP", "multicast"),
    (service(ip="255.255.255.255"), "spec.clusterIP", "broadcast"),
    (service(ip="8.8.8.8"), "spec.clusterIP", "public address"),
    (service(ip="::1"), "spec.clusterIP", "loopback"),
    (service(externalIPs=["127.0.0.1"]), "spec.externalIPs[0]", "loopback"),
    (service(ports=[{"name": "HTTP", "port": 80}]), "spec.ports[0].name", "DNS-1123 label"),
    (service(ports=[{"port": 80, "targetPort": "no_such"}]), "spec.ports[0].targetPort",
     "IANA service name"),
    (service(type="ExternalName", externalName="bad_name.example"), "spec.externalName",
     "DNS-1123 subdomain"),
    (endpoint_slice("Web_1"), "metadata.name", "DNS-1123 subdomain"),
    (endpoint_slice("web-1", "0.0.0.0"), "endpoints[0].addresses[0]", "unspecified"),
    (endpoint_slice("web-1", "169.254.1.1"), "endpoints[0].addresses[0]", "link-local"),
    # The byte-wise checks: the special class is found at any endpoint, not only the first.
    (endpoint_slice("web-1", "10.244.0.5", "224.0.0.9"), "endpoints[0].addresses[1]",
     "link-local multicast"),
    # Just outside RFC 1918's 172.16/12, and shared address space: not private.
    (service(ip="172.32.0.1"), "spec.clusterIP", "public address"),
    (service(ip="172.15.255.1"), "spec.clusterIP", "public address"),
    (endpoint_slice("web-1", hostname="a.b"), "endpoints[0].hostname", "DNS-1123 label"),
    (endpoint_slice("web-1", nodeName="Node_1"), "endpoints[0].nodeName", "DNS-1123 subdomain"),
])
def test_rejected(raw: dict[str, Any], field: str, reason: str) -> None:
    kind = "Service" if "spec" in raw else "EndpointSlice"
    message = error(kind, raw)
    assert message.startswith(f"field {field}: "), message
    assert reason in message


def test_namespace_must_be_a_label() -> None:
    raw = service()
    raw["metadata"]["namespace"] = "Team.A"
    assert error("Service", raw).startswith("field metadata.namespace: 'Team.A' must be a DNS-1123")


def test_service_cidr_membership() -> None:
    validate_strict(decode("Service", service(ip="10.100.0.1")), CIDRS)
    # Inside the configured range, any address class the range holds is accepted.
    validate_strict(decode("Service", service(ip="8.8.8.8")),
                    [ipaddress.ip_network("8.8.8.0/24")])
    message = error("Service", service(ip="10.200.0.1"), CIDRS)
    assert message == ("field spec.clusterIP: '10.200.0.1' is not in the service CIDRs "
                       "(--service-cluster-ip-range 10.96.0.0/12,fd00:10:96::/112)")
    dual = service(ip="10.96.0.1", clusterIPs=["10.96.0.1", "fd00:10:97::1"],
                   ipFamilies=["IPv4", "IPv6"])
    assert error("Service", dual, CIDRS).startswith("field spec.clusterIPs[1]: 'fd00:10:97::1'")


@pytest.mark.parametrize("raw", [
    service(), service(ip="None"), service(ip="100.64.0.1"), service(ip="fd00::10"),
    service(ip="172.31.255.1"), service(ip="192.168.0.10"),
    endpoint_slice("web-1", "169.255.0.1", "27.0.0.1"),  # first bytes of special classes
    service(type="ExternalName", externalName="db.example.com.", ip=""),
    service(ports=[{"name": "http", "port": 80, "targetPort": "http-alt"}]),
    endpoint_slice("web-abc.x1"), endpoint_slice("web-1", hostname="pod-0", nodeName="node-1"),
])
def test_accepted(raw: dict[str, Any]) -> None:
    kind = "Service" if "spec" in raw else "EndpointSlice"
    validate_strict(decode(kind, raw))


def test_cached_checks_keep_rejecting() -> None:
    """The name checks are cached: a bad name is refused every time, in any field."""
    for _ in range(2):
        assert error("EndpointSlice", endpoint_slice("web-1", nodeName="Node_1")).startswith(
            "field endpoints[0].nodeName: 'Node_1'")
        assert error("Service", service(ports=[{"name": "Node_1", "port": 80}])).startswith(
            "field spec.ports[0].name: 'Node_1'")


def test_loopback_endpoints_only_on_request() -> None:
    raw = endpoint_slice("web-1", "127.0.0.21")
    assert "loopback" in error("EndpointSlice", raw)
    validate_strict(decode("EndpointSlice", raw), loopback_endpoints=True)
