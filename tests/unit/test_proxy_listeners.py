"""Desired listeners from a Service, their diff, the loopback VIP mapping and port tables."""

from __future__ import annotations

import ipaddress

import pytest

from kubeshim.cluster.state import build_service_info
from kubeshim.proxy.listeners import (
    ListenerKey,
    desired_listeners,
    diff_listeners,
    leave_to_dns,
    vips_of,
)
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.vip import LoopbackMapper, VipError
from tests.proxy_helpers import endpoint, endpoint_slice, service

MAPPER = LoopbackMapper()
NODE_IPS = ["192.0.2.10", "2001:db8::10"]


def identity(ip: str) -> str:
    return ip


def keys(
    svc_kwargs: dict[str, object], ports: list[dict[str, object]], bind: object = identity
) -> set[str]:
    info = build_service_info(service("web", "10.96.0.20", ports, **svc_kwargs), [], "kubeshim")
    got, _ = desired_listeners(info, NODE_IPS, bind)  # type: ignore[arg-type]
    return {f"{s.kind} {s.key}" for s in got.values()}


HTTP = {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}
DNS = {"name": "dns", "port": 53, "protocol": "UDP"}

CASES = {
    "ClusterIP only": ({}, [HTTP], {"ClusterIP 10.96.0.20:80/TCP"}),
    "NodePort on IPv4 node addresses of the service's family": (
        {"type": "NodePort"},
        [HTTP],
        {"ClusterIP 10.96.0.20:80/TCP", "NodePort 192.0.2.10:30080/TCP"},
    ),
    "nodePort ignored for type ClusterIP": (
        {"type": "ClusterIP"},
        [HTTP],
        {"ClusterIP 10.96.0.20:80/TCP"},
    ),
    "externalIPs and LoadBalancer ingress": (
        {
            "type": "LoadBalancer",
            "externalIPs": ["198.51.100.1"],
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb"}]}},
        },
        [HTTP],
        {
            "ClusterIP 10.96.0.20:80/TCP",
            "NodePort 192.0.2.10:30080/TCP",
            "ExternalIP 198.51.100.1:80/TCP",
            "LoadBalancer 203.0.113.7:80/TCP",
        },
    ),
    "UDP and TCP ports": (
        {},
        [{**HTTP, "nodePort": 0}, DNS],
        {"ClusterIP 10.96.0.20:80/TCP", "ClusterIP 10.96.0.20:53/UDP"},
    ),
}


@pytest.mark.parametrize("spec,ports,want", CASES.values(), ids=CASES.keys())
def test_desired_listeners(
    spec: dict[str, object], ports: list[dict[str, object]], want: set[str]
) -> None:
    assert keys(spec, ports) == want


def test_sctp_port_reported_and_skipped() -> None:
    sctp = {"name": "sig", "port": 3868, "protocol": "SCTP"}
    info = build_service_info(service("web", "10.96.0.20", [HTTP, sctp]), [], "kubeshim")
    got, problems = desired_listeners(info, NODE_IPS, identity)
    assert [str(k) for k in got] == ["10.96.0.20:80/TCP"]
    assert [(p.port, "SCTP" in why) for p, why in problems] == [("sig", True)]


def test_headless_service_gets_no_listeners() -> None:
    info = build_service_info(service("db", "None", [HTTP]), [], "kubeshim")
    assert desired_listeners(info, NODE_IPS, identity) == ({}, [])


def test_loopback_mode_binds_mapped_addresses() -> None:
    assert keys({}, [HTTP], MAPPER.address) == {"ClusterIP 127.96.0.20:80/TCP"}


def test_tuples_of_the_dns_server_are_left_to_it_but_keep_their_address() -> None:
    dns_tcp = {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053}
    info = build_service_info(service("kube-dns", "10.96.0.20", [DNS, dns_tcp, HTTP],
                                      type="NodePort"), [], "kubeshim")
    desired, _ = desired_listeners(info, NODE_IPS, identity)
    kept, vips = leave_to_dns(desired, [("10.96.0.20", 53)])
    # Both protocols of the ClusterIP tuple go to DNS; other ports and NodePorts stay.
    assert sorted(str(k) for k in kept) == [
        "10.96.0.20:80/TCP", "192.0.2.10:30053/TCP", "192.0.2.10:30080/TCP"]
    assert vips == {"10.96.0.20"}
    only_dns, vips = leave_to_dns({k: s for k, s in desired.items() if s.port_name.port != "http"
                                   and s.kind != "NodePort"}, [("10.96.0.20", 53)])
    assert only_dns == {} and vips == {"10.96.0.20"}  # the address stays for the DNS sockets
    assert leave_to_dns(desired, [("10.96.0.21", 53)]) == (desired, set())


def test_diff_opens_new_closes_gone_and_reopens_changed() -> None:
    info_a = build_service_info(
        service("web", "10.96.0.20", [HTTP], type="NodePort"), [], "kubeshim"
    )
    changed = {**HTTP, "name": "web"}
    info_b = build_service_info(
        service("web", "10.96.0.20", [changed, DNS], externalIPs=["198.51.100.1"]), [], "kubeshim"
    )
    a, _ = desired_listeners(info_a, NODE_IPS, identity)
    b, _ = desired_listeners(info_b, NODE_IPS, identity)
    close, open_ = diff_listeners(a, b)
    assert {str(k) for k in close} == {"10.96.0.20:80/TCP", "192.0.2.10:30080/TCP"}
    assert {str(s.key) for s in open_} == {
        "10.96.0.20:80/TCP",
        "10.96.0.20:53/UDP",
        "198.51.100.1:80/TCP",
        "198.51.100.1:53/UDP",
    }
    assert diff_listeners(b, b) == ([], [])
    assert vips_of(b) == {"10.96.0.20", "198.51.100.1"}


def test_listener_key_formats_ipv6() -> None:
    assert str(ListenerKey("TCP", "2001:db8::1", 80)) == "[2001:db8::1]:80/TCP"


@pytest.mark.parametrize(
    "ip,want",
    [
        ("10.96.0.10", "127.96.0.10"),
        ("10.96.0.1", "127.96.0.1"),
        ("10.111.255.254", "127.111.255.254"),
        ("172.20.3.4", "127.84.3.4"),
        ("127.0.0.5", "127.0.0.5"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_loopback_mapping(ip: str, want: str) -> None:
    assert MAPPER.address(ip) == want


def test_loopback_mapping_is_collision_free_within_a_slash_12() -> None:
    net = ipaddress.ip_network("10.96.0.0/12")
    seen: set[str] = set()
    for i in range(0, net.num_addresses, 997):  # a spread sample across the whole range
        mapped = MAPPER.address(str(net[i]))
        assert mapped not in seen and ipaddress.ip_address(mapped) in ipaddress.ip_network(
            "127.64.0.0/10"
        )
        seen.add(mapped)
    assert MAPPER.address(str(net[0])) != MAPPER.address(str(net[-1]))


def test_loopback_mode_refuses_ipv6_with_a_reason() -> None:
    with pytest.raises(VipError, match="IPv6 address 2001:db8::1 .*--vip-mode interface"):
        MAPPER.check("2001:db8::1")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(
    svc_kwargs: dict[str, object],
    eps: list[dict[str, object]],
    node: str = "node-a",
    clock: Clock | None = None,
) -> PortTable:
    svc = service("web", "10.96.0.20", [HTTP], **svc_kwargs)
    info = build_service_info(
        svc, [endpoint_slice("web", eps, [{"name": "http", "port": 8080}])], "kubeshim"
    )
    table = PortTable(info.ports[0], 4, "round-robin", clock or Clock())
    table.update(svc, info.ports[0], node)
    return table


def test_port_table_external_local_uses_node_local_endpoints() -> None:
    t = _table(
        {"type": "NodePort", "externalTrafficPolicy": "Local"},
        [endpoint("10.244.0.2", node="node-a"), endpoint("10.244.0.3", node="node-b")],
    )
    assert {t.pick("198.51.100.9", True).ip for _ in range(4)} == {"10.244.0.2"}  # type: ignore[union-attr]
    assert {t.pick("198.51.100.9", False).ip for _ in range(4)} == {"10.244.0.2", "10.244.0.3"}  # type: ignore[union-attr]
    # A client on the node itself short-circuits to cluster endpoints.
    t.node_addresses = {"192.0.2.10"}
    assert {t.pick("192.0.2.10", True).ip for _ in range(4)} == {"10.244.0.2", "10.244.0.3"}  # type: ignore[union-attr]


def test_port_table_update_reports_stale_endpoints_and_affinity_expires() -> None:
    clock = Clock()
    kw = {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}},
    }
    t = _table(kw, [endpoint("10.244.0.2"), endpoint("10.244.0.3")], clock=clock)
    first = t.pick("192.0.2.1", False)
    assert all(t.pick("192.0.2.1", False) == first for _ in range(5))
    clock.now += 6
    assert t.pick("192.0.2.1", False) != first  # expired: round robin moves on
    svc = service("web", "10.96.0.20", [HTTP], **kw)
    info = build_service_info(
        svc,
        [endpoint_slice("web", [endpoint("10.244.0.3")], [{"name": "http", "port": 8080}])],
        "kubeshim",
    )
    assert t.update(svc, info.ports[0], "node-a") == {("10.244.0.2", 8080)}


def test_dual_stack_listeners_and_family_tables() -> None:
    svc = service("web", "10.96.0.20", [HTTP], type="NodePort", ipFamilies=["IPv4", "IPv6"],
                  clusterIPs=["10.96.0.20", "fd00:96::20"],
                  externalIPs=["198.51.100.1", "2001:db8:1::1"])
    v4 = endpoint_slice("web", [endpoint("10.244.0.2")], [{"name": "http", "port": 8080}])
    v6 = endpoint_slice("web", [endpoint("fd00:244::2")], [{"name": "http", "port": 8080}],
                        suffix="v6", address_type="IPv6")
    info = build_service_info(svc, [v4, v6], "kubeshim")
    got, _ = desired_listeners(info, NODE_IPS, identity)
    assert {f"{s.kind} {s.key} {s.family}" for s in got.values()} == {
        "ClusterIP 10.96.0.20:80/TCP 4", "ClusterIP [fd00:96::20]:80/TCP 6",
        "ExternalIP 198.51.100.1:80/TCP 4", "ExternalIP [2001:db8:1::1]:80/TCP 6",
        "NodePort 192.0.2.10:30080/TCP 4", "NodePort [2001:db8::10]:30080/TCP 6"}
    tables = {f: PortTable(info.ports[0], f, "round-robin", Clock()) for f in (4, 6)}
    for table in tables.values():
        table.update(svc, info.ports[0], "node-a")
    assert [e.ip for e in tables[4].internal] == ["10.244.0.2"]
    assert [e.ip for e in tables[6].internal] == ["fd00:244::2"]


def test_external_ip_of_a_missing_family_is_ignored() -> None:
    assert keys({"externalIPs": ["2001:db8:1::1"]}, [HTTP]) == {"ClusterIP 10.96.0.20:80/TCP"}
