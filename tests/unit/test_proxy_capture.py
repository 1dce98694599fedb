"""The capture builder: Service ports -> tuples and verdicts -> nft text, without a kernel."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from kubeshim.cluster.model import NamespacedName, ServicePortName
from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.capture import (
    CaptureEntry,
    ElementStore,
    ListenPorts,
    PortEndpoints,
    Ruleset,
    Verdict,
    capture_entries,
    elements_of,
)
from kubeshim.proxy.conntrack import get_request, original_of
from tests.objects import synced_state
from tests.proxy_helpers import endpoint, endpoint_slice, service

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
EPS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def info_of(svc: Any, *slices: Any) -> ServiceInfo:
    return synced_state(svc, *slices).services[svc.key]


def ends(any_: bool = True, internal: bool = True, external: bool = True) -> Any:
    return lambda name, family: PortEndpoints(any_, internal, external)


def verdicts(entries: list[CaptureEntry]) -> dict[str, tuple[str, Verdict]]:
    return {str(e): (e.kind, e.verdict) for e in entries}


LB = {"type": "LoadBalancer", "externalIPs": ["192.168.77.7"],
      "status": {"loadBalancer": {"ingress": [{"ip": "192.168.77.8"},
                                              {"ip": "192.168.77.9", "ipMode": "Proxy"}]}}}


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        pytest.param(ends(), {"ClusterIP": Verdict.CAPTURED, "ExternalIP": Verdict.CAPTURED,
                              "LoadBalancer": Verdict.CAPTURED, "NodePort": Verdict.CAPTURED},
                     id="endpoints"),
        pytest.param(ends(False, False, False),
                     {"ClusterIP": Verdict.REJECTED, "ExternalIP": Verdict.REJECTED,
                      "LoadBalancer": Verdict.REJECTED, "NodePort": Verdict.REJECTED},
                     id="no endpoints anywhere: reject"),
        pytest.param(ends(True, True, False),
                     {"ClusterIP": Verdict.CAPTURED, "ExternalIP": Verdict.LOCAL_ONLY,
                      "LoadBalancer": Verdict.LOCAL_ONLY, "NodePort": Verdict.LOCAL_ONLY},
                     id="external Local without a local endpoint"),
        pytest.param(ends(True, False, True),
                     {"ClusterIP": Verdict.DROPPED, "ExternalIP": Verdict.CAPTURED,
                      "LoadBalancer": Verdict.CAPTURED, "NodePort": Verdict.CAPTURED},
                     id="internal Local without a local endpoint: drop"),
    ],
)
def test_verdict_per_kind_of_address(endpoints: Any, expected: dict[str, Verdict]) -> None:
    svc = service("web", "10.96.0.10", [{**HTTP[0], "nodePort": 30080}], **LB)
    got = verdicts(capture_entries(info_of(svc), endpoints))
    by_kind = {kind: v for _, (kind, v) in got.items() if "192.168.77.9" not in _}
    assert by_kind == expected
    assert set(got) == {"10.96.0.10:80/TCP", "192.168.77.7:80/TCP", "192.168.77.8:80/TCP",
                        "192.168.77.9:80/TCP", "*:30080/TCP"}
    # ipMode Proxy is left to the load balancer, whatever the endpoints.
    assert got["192.168.77.9:80/TCP"] == ("LoadBalancer", Verdict.NOT_CAPTURED)


def test_source_ranges_apply_to_load_balancer_ips_only() -> None:
    svc = service("web", "10.96.0.10", [{**HTTP[0], "nodePort": 30080}], **LB,
                  loadBalancerSourceRanges=["10.0.0.0/8", " 192.168.1.0/24", "fd00::/8"])
    entries = {str(e): e for e in capture_entries(info_of(svc), ends())}
    assert entries["192.168.77.8:80/TCP"].source_ranges == ("10.0.0.0/8", "192.168.1.0/24")
    assert entries["10.96.0.10:80/TCP"].source_ranges == ()
    assert entries["192.168.77.7:80/TCP"].source_ranges == ()
    assert entries["*:30080/TCP"].source_ranges == ()
    el = elements_of(entries.values(), ["10.96.0.10"]).items
    assert el["firewall4"] == {"192.168.77.8 . tcp . 80"}
    assert el["firewall-allow4"] == {"192.168.77.8 . tcp . 80 . 10.0.0.0/8",
                                     "192.168.77.8 . tcp . 80 . 192.168.1.0/24"}
    assert "192.168.77.9 . tcp . 80" not in el["tuples4"]  # ipMode Proxy: no element at all


def test_sctp_unproxied_and_wrong_family_addresses_are_left_out() -> None:
    svc = service("mixed", "10.96.0.20", [HTTP[0], {"name": "s", "port": 9, "protocol": "SCTP"}],
                  externalIPs=["fd00::7"])
    assert set(verdicts(capture_entries(info_of(svc), ends()))) == {"10.96.0.20:80/TCP"}
    headless = service("h", "None", HTTP)
    assert capture_entries(info_of(headless), ends()) == []


def test_dual_stack_node_port_per_family() -> None:
    svc = service("dual", "10.96.0.18", [{**HTTP[0], "nodePort": 30082}], type="NodePort",
                  clusterIPs=["10.96.0.18", "fd00:96::18"], ipFamilies=["IPv4", "IPv6"],
                  ipFamilyPolicy="RequireDualStack")

    def per_family(name: ServicePortName, family: int) -> PortEndpoints:
        return PortEndpoints(family == 4, family == 4, family == 4)

    got = verdicts(capture_entries(info_of(svc), per_family))
    assert got == {"10.96.0.18:80/TCP": ("ClusterIP", Verdict.CAPTURED),
                   "[fd00:96::18]:80/TCP": ("ClusterIP", Verdict.REJECTED),
                   "*:30082/TCP": ("NodePort", Verdict.CAPTURED),
                   "[*]:30082/TCP": ("NodePort", Verdict.REJECTED)}
    el = elements_of(capture_entries(info_of(svc), per_family), ["10.96.0.18", "fd00:96::18"])
    assert el.items["services6"] == {"fd00:96::18 . tcp . 80 : goto reject-chain"}
    assert el.items["nodeports4"] == {"tcp . 30082 : goto capture-chain"}
    assert el.items["cluster-ips6"] == {"fd00:96::18"}


def test_real_endpoints_decide_through_the_proxier_tables() -> None:
    # The same decision from real EndpointSlices (ready / terminating / node), via PortTable.
    from kubeshim.proxy.table import PortTable

    svc = service("web", "10.96.0.10", [{**HTTP[0], "nodePort": 30080}], type="NodePort",
                  externalTrafficPolicy="Local")
    info = info_of(svc, endpoint_slice("web", [endpoint("10.244.1.2", node="other")], EPS))
    tables = {}
    for spi in info.ports:
        t = PortTable(spi, 4, "round-robin", lambda: 0.0)
        t.update(info.service, spi, "me")
        tables[spi.name] = t

    def from_tables(name: ServicePortName, family: int) -> PortEndpoints:
        t = tables[name]
        return PortEndpoints(t.categorized.has_any, bool(t.internal), bool(t.external))

    assert verdicts(capture_entries(info, from_tables)) == {
        "10.96.0.10:80/TCP": ("ClusterIP", Verdict.CAPTURED),
        "*:30080/TCP": ("NodePort", Verdict.LOCAL_ONLY)}


def test_element_store_applies_only_changes_and_counts_shared_elements() -> None:
    store = ElementStore()
    name = ServicePortName(NamespacedName("default", "a"), "", "TCP")
    a = elements_of([CaptureEntry("ClusterIP", 4, "10.96.0.10", "TCP", 80, Verdict.CAPTURED,
                                  name)], ["10.96.0.10"])
    store.replace("a", a)
    first = store.pending()
    assert ("add element inet kubeshim services4 { 10.96.0.10 . tcp . 80 : goto capture-chain }"
            in first)
    assert "add element inet kubeshim cluster-ips4 { 10.96.0.10 }" in first
    store.applied()
    assert store.pending() == ""
    store.replace("a", a)  # nothing changed: no transaction
    assert store.pending() == ""
    # The verdict flips: the map key is deleted and added again, in that order.
    rejected = elements_of([CaptureEntry("ClusterIP", 4, "10.96.0.10", "TCP", 80,
                                         Verdict.REJECTED, name)], ["10.96.0.10"])
    store.replace("a", rejected)
    text = store.pending().splitlines()
    assert text == ["delete element inet kubeshim services4 { 10.96.0.10 . tcp . 80 }",
                    "add element inet kubeshim services4 "
                    "{ 10.96.0.10 . tcp . 80 : goto reject-chain }"]
    store.applied()
    # A shared set element stays until its last owner drops it; a change undone before it is
    # applied makes no transaction.
    store.replace("b", elements_of([], ["10.96.0.10"]))
    store.replace("a", elements_of([], []))
    assert "cluster-ips4" not in store.pending()
    store.replace("c", elements_of([], ["10.96.0.99"]))
    store.replace("c", elements_of([], []))
    assert "10.96.0.99" not in store.pending()


def test_full_ruleset_replaces_the_table_and_hooks_what_it_must() -> None:
    rules = Ruleset(ListenPorts(15001), cluster_cidrs=["10.244.0.0/16"],
                    nodeport_cidrs=["192.168.50.0/24"])
    text = rules.full(elements_of([], ["10.96.0.10"]))
    lines = text.splitlines()
    # One transaction that replaces a stale table: declare, delete, create.
    assert lines[:3] == ["table inet kubeshim", "delete table inet kubeshim",
                         "table inet kubeshim {"]
    assert "elements = { 10.244.0.0/16 }" in text and "elements = { 10.96.0.10 }" in text
    assert "tproxy ip to 127.0.0.1:15001" in text and "tproxy ip6 to [::1]:15001" in text
    # The NodePort's port first, the fib lookup last.
    assert ("meta l4proto . th dport @nodeports4 ip daddr { 192.168.50.0/24 } "
            "ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap "
            "@nodeports4") in text
    # No IPv6 CIDR in --nodeport-addresses: no IPv6 NodePorts.
    assert "vmap @nodeports6" not in text
    assert "reject with tcp reset" in text
    # Captured packets that arrived on a bridge are NATed to the redirect listeners (the next
    # port), which only the NAT reaches.
    assert 'meta iifkind "bridge" meta mark set 0x4b55 accept' in text
    assert "meta mark 0x4b55 meta l4proto { tcp, udp } redirect to :15002" in text
    assert text.index("th dport 15002 ct status dnat accept") < text.index(
        "th dport 15002 meta mark != 0x4b53 goto reject-chain")


def test_conntrack_answers_that_are_not_entries_give_no_destination() -> None:
    request = get_request(7, 17, ("10.244.0.1", 15002), ("10.244.0.2", 40000))
    assert struct.unpack_from("=IHHI", request) == (len(request), 0x101, 1, 7)
    error = struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", -2) + request[:16]
    for message in (b"", error, request[:20], request):  # no CTA_TUPLE_ORIG in a request
        assert original_of(message) is None


def test_dns_transparent_binds_come_before_any_service_verdict() -> None:
    text = Ruleset(ListenPorts(15001), dns_binds=[("10.96.0.10", 53), ("fd00::a", 53)]).full(
        elements_of([], []))
    services = text[text.index("chain services {"):]
    first = services.splitlines()[1:3]
    assert first == [
        "    ip daddr 10.96.0.10 meta l4proto { tcp, udp } th dport 53 meta mark set 0x4b53 "
        "tproxy ip to 10.96.0.10:53 accept",
        "    ip6 daddr fd00::a meta l4proto { tcp, udp } th dport 53 meta mark set 0x4b53 "
        "tproxy ip6 to [fd00::a]:53 accept"]
    # Queries from the node itself are marked for the policy route too.
    assert "ip daddr 10.96.0.10 meta l4proto { tcp, udp } th dport 53 meta mark set 0x4b53 " \
        "return" in text
