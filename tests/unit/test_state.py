"""ClusterState: merging slices into service ports, what is proxied, and the diffs it reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kubeshim.cluster.model import EndpointSlice, NamespacedName, Service, decode
from kubeshim.cluster.state import (
    ClusterState,
    EventType,
    ServiceChange,
    WatchEvent,
    build_service_info,
)

WEB = NamespacedName("default", "web")


def svc(name: str = "web", ports: Any = None, labels: Any = None, **spec: Any) -> Service:
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", ports or [{"name": "http", "port": 80, "targetPort": "http"}])
    meta = {"name": name, "namespace": "default", "labels": labels or {}}
    obj = decode("Service", {"metadata": meta, "spec": spec})
    assert isinstance(obj, Service)
    return obj


def eps(
    name: str,
    endpoints: Sequence[Any],
    ports: Any = None,
    service: str | None = "web",
    address_type: str = "IPv4",
    labels: Any = None,
) -> EndpointSlice:
    all_labels = dict(labels or {})
    if service:
        all_labels["kubernetes.io/service-name"] = service
    obj = decode(
        "EndpointSlice",
        {
            "metadata": {"name": name, "namespace": "default", "labels": all_labels},
            "addressType": address_type,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
            if ports is None
            else ports,
            "endpoints": [e if isinstance(e, dict) else {"addresses": [e]} for e in endpoints],
        },
    )
    assert isinstance(obj, EndpointSlice)
    return obj


def addresses(state_or_info: Any, port: int = 0) -> list[str]:
    info = state_or_info.services[WEB] if isinstance(state_or_info, ClusterState) else state_or_info
    return [e.address for e in info.ports[port].endpoints]


# --- merging ------------------------------------------------------------------------------

# (id, service, slices, expected "ip:port" per service port)
MERGES = [
    (
        "one-slice",
        svc(),
        [eps("a", ["10.0.0.1", "10.0.0.2"])],
        [["10.0.0.1:8080", "10.0.0.2:8080"]],
    ),
    (
        "several-slices-in-name-order",
        svc(),
        [eps("b", ["10.0.0.2"]), eps("a", ["10.0.0.1"])],
        [["10.0.0.1:8080", "10.0.0.2:8080"]],
    ),
    (
        "duplicate-across-slices-collapses",
        svc(),
        [eps("a", ["10.0.0.1"]), eps("b", ["10.0.0.1", "10.0.0.2"])],
        [["10.0.0.1:8080", "10.0.0.2:8080"]],
    ),
    (
        "named-target-port-resolved-by-slice-port",
        svc(),
        [eps("a", ["10.0.0.1"], ports=[{"name": "http", "protocol": "TCP", "port": 9090}])],
        [["10.0.0.1:9090"]],
    ),
    (
        "port-name-must-match",
        svc(),
        [eps("a", ["10.0.0.1"], ports=[{"name": "metrics", "protocol": "TCP", "port": 9090}])],
        [[]],
    ),
    (
        "port-protocol-must-match",
        svc(
            ports=[
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]
        ),
        [
            eps(
                "a",
                ["10.0.0.1"],
                ports=[
                    {"name": "dns", "protocol": "UDP", "port": 1053},
                    {"name": "dns-tcp", "protocol": "TCP", "port": 1054},
                ],
            )
        ],
        [["10.0.0.1:1053"], ["10.0.0.1:1054"]],
    ),
    (
        "unnamed-port",
        svc(ports=[{"port": 80}]),
        [eps("a", ["10.0.0.1"], ports=[{"protocol": "TCP", "port": 8080}])],
        [["10.0.0.1:8080"]],
    ),
    (
        "slice-port-without-number-skipped",
        svc(),
        [eps("a", ["10.0.0.1"], ports=[{"name": "http", "protocol": "TCP"}])],
        [[]],
    ),
    (
        "fqdn-slice-ignored",
        svc(),
        [eps("a", ["db.example.org"], address_type="FQDN"), eps("b", ["10.0.0.2"])],
        [["10.0.0.2:8080"]],
    ),
    (
        "first-address-only",
        svc(),
        [eps("a", [{"addresses": ["10.0.0.1", "10.0.0.9"]}])],
        [["10.0.0.1:8080"]],
    ),
    ("ipv6", svc(), [eps("a", ["fd00::1"], address_type="IPv6")], [["[fd00::1]:8080"]]),
    ("no-endpoints", svc(), [eps("a", [])], [[]]),
]


@pytest.mark.parametrize(
    "service, slices, expected", [m[1:] for m in MERGES], ids=[m[0] for m in MERGES]
)
def test_merge(service: Service, slices: list[EndpointSlice], expected: list[list[str]]) -> None:
    ordered = sorted(slices, key=lambda s: s.metadata.name)
    info = build_service_info(service, ordered, "kubeshim")
    assert [[e.address for e in p.endpoints] for p in info.ports] == expected


def test_merge_keeps_conditions_and_topology() -> None:
    slice_ = eps(
        "a",
        [
            {
                "addresses": ["10.0.0.1"],
                "nodeName": "n1",
                "zone": "z1",
                "hints": {"forZones": [{"name": "z1"}]},
            },
            {
                "addresses": ["10.0.0.2"],
                "conditions": {"ready": False, "serving": True, "terminating": True},
            },
        ],
    )
    a, b = build_service_info(svc(), [slice_], "kubeshim").ports[0].endpoints
    assert (a.ready, a.serving, a.terminating, a.node_name, a.zone, a.zone_hints) == (
        True,
        True,
        False,
        "n1",
        "z1",
        frozenset({"z1"}),
    )
    assert (b.ready, b.serving, b.terminating, b.zone_hints) == (False, True, True, None)


# --- proxied or not (kube-proxy ShouldSkipService + its informer label selector) ----------

PROXIED = [
    ("cluster-ip", svc(), [], True),
    ("headless", svc(clusterIP="None"), [], False),
    (
        "external-name",
        svc(type="ExternalName", externalName="x.example.org", clusterIP=""),
        [],
        False,
    ),
    ("no-cluster-ip-yet", svc(clusterIP=""), [], False),
    (
        "service-proxy-name-ours",
        svc(labels={"service.kubernetes.io/service-proxy-name": "kubeshim"}),
        [],
        True,
    ),
    (
        "service-proxy-name-other",
        svc(labels={"service.kubernetes.io/service-proxy-name": "cilium"}),
        [],
        False,
    ),
    (
        "headless-label-on-slice",
        svc(),
        [eps("a", ["10.0.0.1"], labels={"service.kubernetes.io/headless": ""})],
        False,
    ),
]


@pytest.mark.parametrize(
    "service, slices, proxied", [p[1:] for p in PROXIED], ids=[p[0] for p in PROXIED]
)
def test_proxied(service: Service, slices: list[EndpointSlice], proxied: bool) -> None:
    assert build_service_info(service, slices, "kubeshim").proxied is proxied


# --- events, batches and diffs --------------------------------------------------------------


class Recorder:
    def __init__(self, state: ClusterState) -> None:
        self.batches: list[Sequence[ServiceChange]] = []
        state.subscribe(self.batches.append)


def ev(type_: str, obj: Any) -> WatchEvent:
    return WatchEvent(EventType(type_), obj)


def test_slice_before_service_then_service_appears_with_endpoints() -> None:
    state = ClusterState()
    rec = Recorder(state)
    assert state.apply([ev("ADDED", eps("a", ["10.0.0.1"]))]) == []
    assert rec.batches == []  # no Service yet: nothing for consumers
    (change,) = state.apply([ev("ADDED", svc())])
    assert change.previous is None and addresses(change.current) == ["10.0.0.1:8080"]


def test_subscriber_called_once_per_batch() -> None:
    state = ClusterState()
    rec = Recorder(state)
    state.apply(
        [
            ev("ADDED", svc("web")),
            ev("ADDED", svc("api", clusterIP="10.96.0.11")),
            ev("ADDED", eps("a", ["10.0.0.1"])),
        ]
    )
    assert len(rec.batches) == 1
    assert sorted(str(c.key) for c in rec.batches[0]) == ["default/api", "default/web"]
    assert state.generation == 1


def test_change_that_nets_to_nothing_reports_nothing() -> None:
    state = ClusterState()
    state.apply([ev("ADDED", svc()), ev("ADDED", eps("a", ["10.0.0.1"]))])
    rec = Recorder(state)
    generation = state.generation
    changes = state.apply(
        [ev("MODIFIED", eps("a", ["10.0.0.2"])), ev("MODIFIED", eps("a", ["10.0.0.1"]))]
    )
    assert changes == [] and rec.batches == [] and state.generation == generation


def test_added_then_deleted_in_one_batch_reports_nothing() -> None:
    state = ClusterState()
    rec = Recorder(state)
    assert state.apply([ev("ADDED", svc()), ev("DELETED", svc())]) == []
    assert rec.batches == [] and WEB not in state.services


def test_endpoint_change_reports_previous_and_current() -> None:
    state = ClusterState()
    state.apply([ev("ADDED", svc()), ev("ADDED", eps("a", ["10.0.0.1"]))])
    (change,) = state.apply([ev("MODIFIED", eps("a", ["10.0.0.1", "10.0.0.2"]))])
    assert addresses(change.previous) == ["10.0.0.1:8080"]
    assert addresses(change.current) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_slice_moving_to_another_service_updates_both() -> None:
    state = ClusterState()
    state.apply(
        [
            ev("ADDED", svc("web")),
            ev("ADDED", svc("api", clusterIP="10.96.0.11")),
            ev("ADDED", eps("a", ["10.0.0.1"], service="web")),
        ]
    )
    changes = state.apply([ev("MODIFIED", eps("a", ["10.0.0.1"], service="api"))])
    assert sorted(str(c.key) for c in changes) == ["default/api", "default/web"]
    assert addresses(state) == []


def test_deleting_a_service_reports_it_gone_and_keeps_its_slices() -> None:
    state = ClusterState()
    state.apply([ev("ADDED", svc()), ev("ADDED", eps("a", ["10.0.0.1"]))])
    (change,) = state.apply([ev("DELETED", svc())])
    assert change.current is None and change.previous is not None
    (back,) = state.apply([ev("ADDED", svc())])
    assert addresses(back.current) == ["10.0.0.1:8080"]


def test_replace_emits_deletes_for_what_vanished() -> None:
    state = ClusterState()
    state.replace("Service", [svc("web"), svc("api", clusterIP="10.96.0.11")])
    state.replace("EndpointSlice", [eps("a", ["10.0.0.1"]), eps("b", ["10.0.0.2"])])
    assert state.synced
    rec = Recorder(state)
    changes = state.replace("Service", [svc("web")])
    assert [(str(c.key), c.current) for c in changes] == [("default/api", None)]
    changes = state.replace("EndpointSlice", [eps("b", ["10.0.0.2"])])
    assert addresses(changes[0].current) == ["10.0.0.2:8080"]
    assert len(rec.batches) == 2


def test_replace_with_the_same_objects_reports_nothing() -> None:
    state = ClusterState()
    state.replace("Service", [svc()])
    state.replace("EndpointSlice", [eps("a", ["10.0.0.1"])])
    rec = Recorder(state)
    assert state.replace("Service", [svc()]) == []
    assert state.replace("EndpointSlice", [eps("a", ["10.0.0.1"])]) == []
    assert rec.batches == []


def test_synced_needs_both_kinds() -> None:
    state = ClusterState()
    state.replace("Service", [])
    assert state.is_synced("Service") and not state.synced
    state.replace("EndpointSlice", [])
    assert state.synced


def test_zone_and_node_hints_reach_the_endpoints() -> None:
    hints = {"forZones": [{"name": "z1"}, {"name": "z2"}], "forNodes": [{"name": "n1"}]}
    info = build_service_info(svc(), [eps("web-1", [
        {"addresses": ["10.0.0.1"], "hints": hints},
        {"addresses": ["10.0.0.2"], "hints": {"forZones": [{"name": "z1"}]}},
        {"addresses": ["10.0.0.3"]},
    ])], "kubeshim")
    got = [(e.zone_hints, e.node_hints) for e in info.ports[0].endpoints]
    assert got == [(frozenset({"z1", "z2"}), frozenset({"n1"})), (frozenset({"z1"}), None),
                   (None, None)]


def test_a_mirror_follows_every_published_change_through_pickling() -> None:
    # A worker's state (kubeshim/workers.py) takes what the control process's state published,
    # after a trip through pickle, and tells its own subscribers the same.
    import pickle

    from kubeshim.cluster.model import Node

    node = decode("Node", {"metadata": {"name": "n1", "labels": {
        "topology.kubernetes.io/zone": "z1"}}})
    assert isinstance(node, Node)
    control, mirror = ClusterState(node_name="n1"), ClusterState(node_name="n1")
    sent: list[bytes] = []
    seen: list[Sequence[ServiceChange]] = []
    nodes: list[tuple[Any, Any]] = []
    control.subscribe(lambda ch: sent.append(pickle.dumps(
        (list(ch), control.node, control.node_deleted, control.synced))))
    mirror.subscribe(seen.append)
    mirror.subscribe_node(lambda before, after: nodes.append((before, after)))

    control.replace("Service", [svc(), svc("other", clusterIP="10.96.0.11")])
    control.replace("EndpointSlice", [eps("web-1", ["10.0.0.1", "10.0.0.2"])])
    control.apply([WatchEvent(EventType.ADDED, node)])  # no Service changes: nothing sent
    control.apply([WatchEvent(EventType.DELETED, svc("other", clusterIP="10.96.0.11")),
                   WatchEvent(EventType.MODIFIED, eps("web-1", ["10.0.0.3"]))])
    assert not mirror.synced
    for message in sent:
        mirror.mirror(*pickle.loads(message))
    assert mirror.synced
    assert mirror.services == control.services
    assert addresses(mirror) == ["10.0.0.3:8080"]
    assert [sorted(str(c.key) for c in batch) for batch in seen] == [
        ["default/other", "default/web"], ["default/web"], ["default/other", "default/web"]]
    assert seen[-1][0].current is None or seen[-1][1].current is None  # "other" deleted
    assert mirror.node == node and nodes == [(None, node)]
    # A message repeating the current state changes nothing and tells no one.
    mirror.mirror([], node, False, True)
    assert len(seen) == 3 and len(nodes) == 1
