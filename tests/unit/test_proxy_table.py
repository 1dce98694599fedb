"""PortTable: one ServicePort's live endpoints, as ClusterState hands them over.

Services and slices are decoded through the real wire model and merged by the real
ClusterState; each case drives `update` and `pick` the way the listeners do.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.table import PortTable
from tests.objects import endpoint_slice, service, synced_state

NODE = "node-a"
WEB = NamespacedName("default", "web")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ep(ip: str, node: str = NODE, ready: bool = True, serving: bool | None = None,
       terminating: bool = False) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready, "serving": ready if serving is None else serving,
                           "terminating": terminating}}


def info(endpoints: list[dict[str, Any]], v6: list[dict[str, Any]] | None = None,
         **spec: Any) -> ServiceInfo:
    objects = [service("web", **spec), endpoint_slice("web", endpoints)]
    if v6 is not None:
        objects.append(endpoint_slice("web", v6, name="web-v6", address_type="IPv6"))
    return synced_state(*objects).services[WEB]


def table(svc: ServiceInfo, family: int = 4, balance: str = "round-robin",
          clock: Clock | None = None) -> PortTable:
    (spi,) = svc.ports
    t = PortTable(spi, family, balance, clock or Clock())
    t.update(svc.service, spi, NODE)
    return t


def picks(t: PortTable, n: int, client: str = "10.244.0.9", external: bool = False) -> list[str]:
    out = []
    for _ in range(n):
        chosen = t.pick(client, external)
        out.append(chosen.ip if chosen else "-")
    return out


def test_round_robin_over_ready_endpoints_of_the_table_family() -> None:
    svc = info([ep("10.244.0.2"), ep("10.244.0.3")], v6=[ep("fd00::2")],
               clusterIPs=["10.96.0.10", "fd00:96::10"], ipFamilies=["IPv4", "IPv6"],
               ipFamilyPolicy="PreferDualStack")
    assert picks(table(svc), 4) == ["10.244.0.2", "10.244.0.3"] * 2
    assert picks(table(svc, family=6), 2) == ["fd00::2"] * 2


@pytest.mark.parametrize(("endpoints", "expected"), [
    pytest.param([ep("10.244.0.2", ready=False, serving=False)], {"-"}, id="none ready: reject"),
    pytest.param([ep("10.244.0.2", ready=False, serving=True, terminating=True),
                  ep("10.244.0.3")], {"10.244.0.3"}, id="ready wins over terminating"),
    pytest.param([ep("10.244.0.2", ready=False, serving=True, terminating=True)],
                 {"10.244.0.2"}, id="only serving-terminating: used"),
])
def test_ready_then_serving_terminating(endpoints: list[dict[str, Any]],
                                        expected: set[str]) -> None:
    assert set(picks(table(info(endpoints)), 4)) == expected


def test_external_local_policy_and_the_node_short_circuit() -> None:
    node_port = [{"name": "http", "port": 80, "nodePort": 30080}]
    svc = info([ep("10.244.0.2"), ep("10.244.1.2", node="node-b")], type="NodePort",
               externalTrafficPolicy="Local", ports=node_port)
    t = table(svc)
    assert set(picks(t, 4, external=True)) == {"10.244.0.2"}
    assert set(picks(t, 4, external=False)) == {"10.244.0.2", "10.244.1.2"}
    remote_only = table(info([ep("10.244.1.2", node="node-b")], type="NodePort",
                             externalTrafficPolicy="Local", ports=node_port))
    assert picks(remote_only, 1, client="192.0.2.7", external=True) == ["-"]
    # Traffic from the node itself goes to cluster-wide endpoints (kube-proxy short-circuits it).
    remote_only.node_addresses = {"192.0.2.1"}
    assert picks(remote_only, 1, client="192.0.2.1", external=True) == ["10.244.1.2"]


def test_internal_local_policy() -> None:
    t = table(info([ep("10.244.0.2"), ep("10.244.1.2", node="node-b")],
                   internalTrafficPolicy="Local"))
    assert set(picks(t, 4)) == {"10.244.0.2"}


def test_client_ip_affinity_sticks_until_the_timeout() -> None:
    clock = Clock()
    svc = info([ep("10.244.0.2"), ep("10.244.0.3"), ep("10.244.0.4")], sessionAffinity="ClientIP",
               sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    t = table(svc, clock=clock)
    assert picks(t, 5, client="10.244.0.9") == ["10.244.0.2"] * 5
    assert picks(t, 1, client="10.244.0.8") == ["10.244.0.3"]  # another client, next endpoint
    clock.now += 59
    assert picks(t, 1, client="10.244.0.9") == ["10.244.0.2"]  # each use renews the entry
    clock.now += 61
    # Expired: the balancer chooses again, and round robin has moved on.
    assert picks(t, 2, client="10.244.0.9") == ["10.244.0.4"] * 2


def test_update_reports_endpoints_no_longer_usable_and_keeps_the_table() -> None:
    svc = info([ep("10.244.0.2"), ep("10.244.0.3")])
    t = table(svc)
    (spi,) = info([ep("10.244.0.3"), ep("10.244.0.4")]).ports
    gone = t.update(svc.service, spi, NODE)
    assert gone == {("10.244.0.2", 8080)}
    assert t.usable(("10.244.0.4", 8080)) and not t.usable(("10.244.0.2", 8080))
    assert set(picks(t, 4)) == {"10.244.0.3", "10.244.0.4"}


def test_least_connections_counts_open_connections() -> None:
    t = table(info([ep("10.244.0.2"), ep("10.244.0.3")]), balance="least-connections")
    busy = t.pick("10.244.0.9", False)
    assert busy is not None
    t.opened(busy)
    t.opened(busy)
    other = t.pick("10.244.0.9", False)
    assert other is not None and other.ip != busy.ip
    t.closed(busy)
    t.closed(busy)
    assert t.active == {}
