"""This node's Node object: decoding, eligibility, zone, and how ClusterState keeps it."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kubeshim.cluster.model import InvalidObject, Node, decode
from kubeshim.cluster.state import ClusterState, EventType, WatchEvent

NAME = "node-a"


def node(name: str = NAME, labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None, deleting: bool = False) -> Node:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-30T20:00:00Z"
    obj = decode("Node", {"apiVersion": "v1", "kind": "Node", "metadata": meta,
                          "spec": {"taints": taints or []}, "status": {"phase": "Running"}})
    assert isinstance(obj, Node)
    return obj


CA_TAINT = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}


@pytest.mark.parametrize("obj, eligible", [
    (node(), True),
    (node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]), True),
    (node(taints=[CA_TAINT]), False),
    (node(deleting=True), False),
], ids=["plain", "other taint", "autoscaler taint", "being deleted"])
def test_eligibility_follows_proxy_health_sync_node(obj: Node, eligible: bool) -> None:
    assert obj.eligible is eligible


def test_zone_from_the_topology_label() -> None:
    assert node(labels={"topology.kubernetes.io/zone": "z1"}).zone == "z1"
    assert node(labels={"failure-domain.beta.kubernetes.io/zone": "z1"}).zone == ""


def test_a_node_without_a_name_is_invalid() -> None:
    with pytest.raises(InvalidObject, match="metadata.name"):
        decode("Node", {"metadata": {"labels": {}}})
    with pytest.raises(InvalidObject, match="taints"):
        decode("Node", {"metadata": {"name": "x"}, "spec": {"taints": "no"}})


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Node | None, Node | None]] = []

    def __call__(self, before: Node | None, after: Node | None) -> None:
        self.calls.append((before, after))


def test_state_keeps_only_this_nodes_object_and_reports_changes() -> None:
    state = ClusterState(node_name=NAME)
    seen = Recorder()
    state.subscribe_node(seen)
    assert state.node is None and state.node_eligible and state.node_zone == ""

    state.apply([WatchEvent(EventType.ADDED, node("node-b", taints=[CA_TAINT]))])
    assert state.node is None and seen.calls == []  # another node's object

    plain = node(labels={"topology.kubernetes.io/zone": "z1"})
    state.apply([WatchEvent(EventType.ADDED, plain)])
    assert state.node_zone == "z1" and state.node_eligible and seen.calls == [(None, plain)]

    state.apply([WatchEvent(EventType.MODIFIED, plain)])
    assert len(seen.calls) == 1  # no change, no notification
    heartbeat = decode("Node", {**msgspec.to_builtins(plain),
                                "metadata": {**msgspec.to_builtins(plain.metadata),
                                             "resourceVersion": "99"}})
    state.apply([WatchEvent(EventType.MODIFIED, heartbeat)])
    assert len(seen.calls) == 1 and state.node == heartbeat  # kept, but nothing to redo

    tainted = node(labels={"topology.kubernetes.io/zone": "z2"}, taints=[CA_TAINT])
    state.apply([WatchEvent(EventType.MODIFIED, tainted)])
    assert not state.node_eligible and state.node_zone == "z2"
    assert seen.calls[-1] == (heartbeat, tainted)

    state.apply([WatchEvent(EventType.DELETED, tainted)])
    assert state.node is None and state.node_deleted and not state.node_eligible
    assert state.node_zone == "" and seen.calls[-1] == (tainted, None)
    assert state.generation == 0  # no Service changed

    state.apply([WatchEvent(EventType.ADDED, plain)])
    assert state.node_eligible and not state.node_deleted


def test_nodes_are_optional_for_sync_and_a_relist_without_it_deletes_it() -> None:
    state = ClusterState(node_name=NAME)
    state.replace("Service", [])
    state.replace("EndpointSlice", [])
    assert state.synced  # no Node listed: served all the same
    state.replace("Node", [node(), node("node-b")])
    assert state.objects("Node") == {node().key: node()}
    state.replace("Node", [])
    assert state.node is None and state.node_deleted


def test_without_a_node_name_no_node_is_kept() -> None:
    state = ClusterState()
    state.apply([WatchEvent(EventType.ADDED, node())])
    assert state.node is None and state.node_eligible
