"""cluster.model: decoding, validation errors that name the field, condition defaults."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
import pytest

from kubeshim.cluster.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Endpoint,
    EndpointSlice,
    InvalidObject,
    Service,
    decode,
    ip_version,
)

SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "default", "resourceVersion": "7"},
    "spec": {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
    },
}

SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-abc",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
}


def edited(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with the dotted `path` set (list indexes as numbers); DELETE removes it."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = obj
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return obj


DELETE = object()

# (id, kind, object, expected text of the error: always names the object and the field)
INVALID = [
    (
        "port-not-int",
        "Service",
        edited(SERVICE, "spec.ports.0.port", "eighty"),
        "invalid Service default/web: field spec.ports[0].port: Expected `int`, got `str`",
    ),
    (
        "port-out-of-range",
        "Service",
        edited(SERVICE, "spec.ports.0.port", 70000),
        "field spec.ports[0].port: 70000 is not a valid port number",
    ),
    (
        "port-zero",
        "Service",
        edited(SERVICE, "spec.ports.0.port", 0),
        "field spec.ports[0].port: 0 is not a valid port number",
    ),
    (
        "target-port-out-of-range",
        "Service",
        edited(SERVICE, "spec.ports.0.targetPort", 65536),
        "field spec.ports[0].targetPort: 65536 is not a valid port number",
    ),
    (
        "node-port-out-of-range",
        "Service",
        edited(SERVICE, "spec.ports.0.nodePort", 99999),
        "field spec.ports[0].nodePort: 99999 is not a valid port number",
    ),
    (
        "unknown-protocol",
        "Service",
        edited(SERVICE, "spec.ports.0.protocol", "HTTP"),
        "field spec.ports[0].protocol: Invalid enum value 'HTTP'",
    ),
    (
        "unknown-type",
        "Service",
        edited(SERVICE, "spec.type", "Magic"),
        "field spec.type: Invalid enum value 'Magic'",
    ),
    (
        "bad-cluster-ip",
        "Service",
        edited(SERVICE, "spec.clusterIP", "10.96.0.300"),
        "field spec.clusterIP: '10.96.0.300' is not an IP address",
    ),
    (
        "leading-zero-ip",
        "Service",
        edited(SERVICE, "spec.clusterIP", "010.96.0.1"),
        "field spec.clusterIP: '010.96.0.1' is not an IP address",
    ),
    (
        "cluster-ips-disagree",
        "Service",
        edited(SERVICE, "spec.clusterIPs", ["10.96.0.11"]),
        "field spec.clusterIPs[0]: must equal spec.clusterIP",
    ),
    (
        "bad-external-ip",
        "Service",
        edited(SERVICE, "spec.externalIPs", ["1.2.3.4", "x"]),
        "field spec.externalIPs[1]: 'x' is not an IP address",
    ),
    (
        "bad-lb-ip",
        "Service",
        edited(SERVICE, "status", {"loadBalancer": {"ingress": [{"ip": "nope"}]}}),
        "field status.loadBalancer.ingress[0].ip: 'nope' is not an IP address",
    ),
    (
        "no-name",
        "Service",
        edited(SERVICE, "metadata.name", DELETE),
        "field metadata.name: required",
    ),
    (
        "no-namespace",
        "Service",
        edited(SERVICE, "metadata.namespace", DELETE),
        "invalid Service /web: field metadata.namespace: required",
    ),
    (
        "unnamed-second-port",
        "Service",
        edited(SERVICE, "spec.ports", [{"name": "a", "port": 1}, {"port": 2}]),
        "field spec.ports[1].name: required when a Service has several ports",
    ),
    (
        "duplicate-port-name",
        "Service",
        edited(SERVICE, "spec.ports", [{"name": "a", "port": 1}, {"name": "a", "port": 2}]),
        "field spec.ports[1].name: duplicate port name 'a'/TCP",
    ),
    (
        "external-name-missing",
        "Service",
        edited(edited(SERVICE, "spec.type", "ExternalName"), "spec.clusterIP", ""),
        "field spec.externalName: required for type ExternalName",
    ),
    (
        "affinity-timeout-zero",
        "Service",
        edited(SERVICE, "spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 0}}),
        "field spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 not in 1..86400",
    ),
    (
        "affinity-timeout-too-long",
        "Service",
        edited(SERVICE, "spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 86401}}),
        "field spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 not in 1..86400",
    ),
    (
        "labels-not-strings",
        "Service",
        edited(SERVICE, "metadata.labels", {"a": ["b"]}),
        "field metadata.labels[...]: Expected `str`, got `array`",
    ),
    (
        "slice-no-address-type",
        "EndpointSlice",
        edited(SLICE, "addressType", DELETE),
        "invalid EndpointSlice default/web-abc: Object missing required field `addressType`",
    ),
    (
        "slice-unknown-address-type",
        "EndpointSlice",
        edited(SLICE, "addressType", "IPv5"),
        "field addressType: Invalid enum value 'IPv5'",
    ),
    (
        "slice-wrong-family",
        "EndpointSlice",
        edited(SLICE, "endpoints.0.addresses", ["fd00::1"]),
        "field endpoints[0].addresses[0]: 'fd00::1' is not an IPv4",
    ),
    (
        "slice-not-an-ip",
        "EndpointSlice",
        edited(SLICE, "endpoints.0.addresses", ["pod-1"]),
        "field endpoints[0].addresses[0]: 'pod-1' is not an IPv4",
    ),
    (
        "slice-no-addresses",
        "EndpointSlice",
        edited(SLICE, "endpoints.0.addresses", []),
        "field endpoints[0].addresses: at least one address is required",
    ),
    (
        "slice-endpoint-without-addresses",
        "EndpointSlice",
        edited(SLICE, "endpoints.0", {}),
        "field endpoints[0]: Object missing required field `addresses`",
    ),
    (
        "slice-port-out-of-range",
        "EndpointSlice",
        edited(SLICE, "ports.0.port", 0),
        "field ports[0].port: 0 is not a valid port number",
    ),
    (
        "slice-ready-not-bool",
        "EndpointSlice",
        edited(SLICE, "endpoints.0.conditions", {"ready": "yes"}),
        "field endpoints[0].conditions.ready: Expected `bool | null`, got `str`",
    ),
]


@pytest.mark.parametrize(
    "kind, obj, message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
@pytest.mark.parametrize("form", ["mapping", "json"])
def test_invalid_objects_name_the_field(
    kind: str, obj: dict[str, Any], message: str, form: str
) -> None:
    raw: Any = obj if form == "mapping" else json.dumps(obj).encode()
    with pytest.raises(InvalidObject) as info:
        decode(kind, raw)
    assert message in str(info.value)
    assert info.value.kind == kind


def test_not_json_is_reported() -> None:
    with pytest.raises(InvalidObject, match="invalid Service <unnamed>: not valid JSON"):
        decode("Service", b'{"metadata": ')


@pytest.mark.parametrize(
    "raw",
    [SERVICE, json.dumps(SERVICE).encode(), msgspec.Raw(json.dumps(SERVICE).encode())],
    ids=["mapping", "bytes", "msgspec.Raw"],
)
def test_decode_forms_agree(raw: Any) -> None:
    svc = decode("Service", raw)
    assert isinstance(svc, Service)
    assert str(svc.key) == "default/web"
    assert svc.metadata.resource_version == "7"
    assert svc.ports[0].target_port == "http"


def test_unknown_fields_are_ignored() -> None:
    obj = edited(SLICE, "endpoints.0.deprecatedTopology", {"x": "y"})
    obj["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    eps = decode("EndpointSlice", obj)
    assert isinstance(eps, EndpointSlice) and eps.endpoints is not None


# (id, conditions, ready, serving, terminating): nil ready/serving mean true, nil terminating
# means false (discovery/v1 EndpointConditions; kube-proxy endpointslicecache.go).
CONDITIONS = [
    ("all-unset", {}, True, True, False),
    ("ready", {"ready": True}, True, True, False),
    ("not-ready-serving-unset", {"ready": False}, False, True, False),
    (
        "terminating-serving",
        {"ready": False, "serving": True, "terminating": True},
        False,
        True,
        True,
    ),
    (
        "terminating-not-serving",
        {"ready": False, "serving": False, "terminating": True},
        False,
        False,
        True,
    ),
    ("explicit-nulls", {"ready": None, "serving": None, "terminating": None}, True, True, False),
]


@pytest.mark.parametrize(
    "conditions, ready, serving, terminating",
    [c[1:] for c in CONDITIONS],
    ids=[c[0] for c in CONDITIONS],
)
def test_condition_defaults(
    conditions: dict[str, Any], ready: bool, serving: bool, terminating: bool
) -> None:
    ep = msgspec.convert({"addresses": ["10.0.0.1"], "conditions": conditions}, Endpoint)
    assert (ep.ready, ep.serving, ep.terminating) == (ready, serving, terminating)


def test_conditions_missing_entirely_default_to_ready() -> None:
    ep = msgspec.convert({"addresses": ["10.0.0.1"]}, Endpoint)
    assert (ep.ready, ep.serving, ep.terminating) == (True, True, False)


SERVICE_VIEWS = [
    ("cluster-ip", {}, ["10.96.0.10"], 0, False),
    ("headless", {"clusterIP": "None", "clusterIPs": ["None"]}, [], 0, False),
    (
        "external-name",
        {
            "type": "ExternalName",
            "externalName": "x.example.org",
            "clusterIP": "",
            "clusterIPs": [],
        },
        [],
        0,
        False,
    ),
    (
        "dual-stack",
        {"clusterIPs": ["10.96.0.10", "fd00::10"]},
        ["10.96.0.10", "fd00::10"],
        0,
        False,
    ),
    (
        "affinity-default-timeout",
        {"sessionAffinity": "ClientIP"},
        ["10.96.0.10"],
        DEFAULT_AFFINITY_TIMEOUT,
        False,
    ),
    (
        "affinity-timeout",
        {
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        },
        ["10.96.0.10"],
        60,
        False,
    ),
    (
        "affinity-config-without-affinity",
        {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
        ["10.96.0.10"],
        0,
        False,
    ),
    (
        "external-local-nodeport",
        {"type": "NodePort", "externalTrafficPolicy": "Local"},
        ["10.96.0.10"],
        0,
        True,
    ),
    (
        "external-local-ignored-for-clusterip",
        {"externalTrafficPolicy": "Local"},
        ["10.96.0.10"],
        0,
        False,
    ),
]


@pytest.mark.parametrize(
    "spec, cluster_ips, affinity, external_local",
    [c[1:] for c in SERVICE_VIEWS],
    ids=[c[0] for c in SERVICE_VIEWS],
)
def test_service_views(
    spec: dict[str, Any], cluster_ips: list[str], affinity: int, external_local: bool
) -> None:
    obj = copy.deepcopy(SERVICE)
    obj["spec"].update(spec)
    svc = decode("Service", obj)
    assert isinstance(svc, Service)
    assert svc.cluster_ips == cluster_ips
    assert svc.affinity_timeout == affinity
    assert svc.external_local is external_local


@pytest.mark.parametrize(
    "text, version",
    [
        ("10.0.0.1", 4),
        ("fd00::1", 6),
        ("::ffff:10.0.0.1", 6),
        ("10.0.0", 0),
        ("010.0.0.1", 0),
        ("fe80::1%eth0", 0),
        (" 10.0.0.1", 0),
        ("10.0.0.1\x00", 0),
        ("", 0),
        ("é", 0),
    ],
)
def test_ip_version(text: str, version: int) -> None:
    assert ip_version(text) == version


@pytest.mark.parametrize("spec, accessible, local", [
    ({"type": "ClusterIP"}, False, False),
    ({"type": "ClusterIP", "externalTrafficPolicy": "Local"}, False, False),
    ({"type": "ClusterIP", "externalIPs": ["192.0.2.1"], "externalTrafficPolicy": "Local"},
     True, True),
    ({"type": "ClusterIP", "externalIPs": ["192.0.2.1"]}, True, False),
    ({"type": "NodePort", "externalTrafficPolicy": "Local"}, True, True),
    ({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster"}, True, False),
    ({"type": "ExternalName", "externalName": "x.example", "externalIPs": ["192.0.2.1"],
      "externalTrafficPolicy": "Local"}, False, False),
], ids=["clusterip", "clusterip-local-without-externalips", "clusterip-externalips-local",
        "clusterip-externalips-cluster", "nodeport-local", "lb-cluster", "externalname"])
def test_external_policy_local_as_pkg_api_v1_service_util(
        spec: dict[str, object], accessible: bool, local: bool) -> None:
    svc = decode("Service", {"metadata": {"name": "s", "namespace": "d"}, "spec": spec})
    assert isinstance(svc, Service)
    assert (svc.externally_accessible, svc.external_local) == (accessible, local)


def test_load_balancer_ips_leave_out_ip_mode_proxy() -> None:
    # KEP-1860: with ipMode Proxy the load balancer itself delivers to the node, so the proxy
    # does not capture that IP (kube-proxy serviceport.go, IsVIPMode).
    svc = decode("Service", {"metadata": {"name": "s", "namespace": "d"}, "spec": {
        "type": "LoadBalancer", "clusterIP": "10.96.0.1"}, "status": {"loadBalancer": {
            "ingress": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2", "ipMode": "VIP"},
                        {"ip": "192.0.2.3", "ipMode": "Proxy"}, {"hostname": "lb.example"}]}}})
    assert isinstance(svc, Service)
    assert svc.load_balancer_ips == ["192.0.2.1", "192.0.2.2"]
    with pytest.raises(InvalidObject, match=r"ingress\[1\].ip"):
        decode("Service", {"metadata": {"name": "s", "namespace": "d"}, "status": {
            "loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "Proxy"},
                                         {"ip": "x", "ipMode": "Proxy"}]}}})
