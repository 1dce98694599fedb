"""categorize_endpoints against kube-proxy's topology rules, as a table of named cases."""

from __future__ import annotations

import pytest

from kubeshim.cluster.state import EndpointInfo
from kubeshim.proxy.topology import PortPolicy, categorize_endpoints

NODE = "node-a"


def ep(
    name: str,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node: str | None = NODE,
) -> EndpointInfo:
    # name "a1" -> 10.0.0.1 etc.; the letter is for readability only.
    return EndpointInfo(
        ip=f"10.0.0.{name[1:]}",
        port=80,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=node,
    )


LOCAL_READY = ep("l1")
LOCAL_READY2 = ep("l2")
REMOTE_READY = ep("r3", node="node-b")
LOCAL_TERMINATING = ep("l4", ready=False, serving=True, terminating=True)
REMOTE_TERMINATING = ep("r5", ready=False, serving=True, terminating=True, node="node-b")
LOCAL_NOT_SERVING = ep("l6", ready=False, serving=False, terminating=True)
REMOTE_NOT_READY = ep("r7", ready=False, serving=False, node="node-b")
NO_NODE = ep("n8", node=None)

CLUSTER = PortPolicy()
INTERNAL_LOCAL = PortPolicy(internal_local=True)
EXTERNAL_LOCAL = PortPolicy(external_local=True, externally_accessible=True)
EXTERNAL_LOCAL_NO_EXTERNAL = PortPolicy(external_local=True, externally_accessible=False)
BOTH_LOCAL = PortPolicy(internal_local=True, external_local=True, externally_accessible=True)

CASES = {
    "cluster: ready endpoints on every node": (
        CLUSTER,
        [LOCAL_READY, REMOTE_READY, LOCAL_TERMINATING],
        {"cluster": [LOCAL_READY, REMOTE_READY], "local": [], "has_any": True},
    ),
    "cluster: not-ready endpoints are never used": (
        CLUSTER,
        [REMOTE_NOT_READY, LOCAL_READY],
        {"cluster": [LOCAL_READY], "local": [], "has_any": True},
    ),
    "cluster: none ready falls back to serving-terminating (KEP-1669)": (
        CLUSTER,
        [LOCAL_TERMINATING, REMOTE_TERMINATING, LOCAL_NOT_SERVING],
        {"cluster": [LOCAL_TERMINATING, REMOTE_TERMINATING], "local": [], "has_any": True},
    ),
    "cluster: terminating but not serving is no fallback": (
        CLUSTER,
        [LOCAL_NOT_SERVING, REMOTE_NOT_READY],
        {"cluster": [], "local": [], "has_any": False},
    ),
    "cluster: no endpoints at all": (CLUSTER, [], {"cluster": [], "local": [], "has_any": False}),
    "internal Local: only this node's ready endpoints": (
        INTERNAL_LOCAL,
        [LOCAL_READY, REMOTE_READY, LOCAL_READY2],
        {"cluster": [], "local": [LOCAL_READY, LOCAL_READY2], "has_any": True},
    ),
    "internal Local: remote ready only -> no local endpoints, but has_any": (
        INTERNAL_LOCAL,
        [REMOTE_READY],
        {"cluster": [], "local": [], "has_any": True},
    ),
    "internal Local: local terminating used when no local ready": (
        INTERNAL_LOCAL,
        [REMOTE_READY, LOCAL_TERMINATING],
        {"cluster": [], "local": [LOCAL_TERMINATING], "has_any": True},
    ),
    "internal Local: local ready preferred over local terminating": (
        INTERNAL_LOCAL,
        [LOCAL_TERMINATING, LOCAL_READY],
        {"cluster": [], "local": [LOCAL_READY], "has_any": True},
    ),
    "internal Local: endpoint without nodeName is not local": (
        INTERNAL_LOCAL,
        [NO_NODE],
        {"cluster": [], "local": [], "has_any": True},
    ),
    "external Local: cluster endpoints kept for short-circuit": (
        EXTERNAL_LOCAL,
        [LOCAL_READY, REMOTE_READY],
        {"cluster": [LOCAL_READY, REMOTE_READY], "local": [LOCAL_READY], "has_any": True},
    ),
    "external Local without external access: policy ignored": (
        EXTERNAL_LOCAL_NO_EXTERNAL,
        [LOCAL_READY, REMOTE_READY],
        {"cluster": [LOCAL_READY, REMOTE_READY], "local": [], "has_any": True},
    ),
    "both Local with external access: cluster and local": (
        BOTH_LOCAL,
        [REMOTE_READY, LOCAL_TERMINATING],
        {"cluster": [REMOTE_READY], "local": [LOCAL_TERMINATING], "has_any": True},
    ),
}


@pytest.mark.parametrize("policy,endpoints,want", CASES.values(), ids=CASES.keys())
def test_categorize_endpoints(
    policy: PortPolicy, endpoints: list[EndpointInfo], want: dict[str, object]
) -> None:
    got = categorize_endpoints(endpoints, policy, NODE)
    assert list(got.cluster) == want["cluster"]
    assert list(got.local) == want["local"]
    assert got.has_any is want["has_any"]


def test_empty_node_name_has_no_local_endpoints() -> None:
    got = categorize_endpoints([LOCAL_READY], INTERNAL_LOCAL, "")
    assert got.local == () and got.has_any


def test_traffic_selects_set_by_policy() -> None:
    got = categorize_endpoints([LOCAL_READY, REMOTE_READY], EXTERNAL_LOCAL, NODE)
    assert got.for_traffic(local_policy=True) == (LOCAL_READY,)
    assert got.for_traffic(local_policy=False) == (LOCAL_READY, REMOTE_READY)


# --- topology-aware routing (topologyModeFromHints / availableForTopology) ----------------------

ZONE = "zone-a"


def hinted(n: int, zones: tuple[str, ...] = (), nodes: tuple[str, ...] = (), ready: bool = True,
           terminating: bool = False, node: str | None = "node-x") -> EndpointInfo:
    """An endpoint with forZones / forNodes hints (empty tuple: no such hint)."""
    return EndpointInfo(
        ip=f"10.1.2.{n}", port=80, ready=ready, serving=ready or terminating,
        terminating=terminating, node_name=node,
        zone_hints=frozenset(zones) or None, node_hints=frozenset(nodes) or None)


Z_A1, Z_B2, Z_C3, Z_A4 = (hinted(1, ("zone-a",)), hinted(2, ("zone-b",)),
                          hinted(3, ("zone-c",)), hinted(4, ("zone-a",)))
Z_NONE5 = hinted(5)
Z_A6_NOT_READY = hinted(6, ("zone-a",), ready=False)
Z_A7_TERMINATING = hinted(7, ("zone-a",), ready=False, terminating=True)
Z_B8_TERMINATING = hinted(8, ("zone-b",), ready=False, terminating=True)
Z_ABC9 = hinted(9, ("zone-a", "zone-b", "zone-c"))
N_THIS1 = hinted(1, ("zone-a",), (NODE,))
N_OTHER2 = hinted(2, ("zone-a",), ("node-b",))
N_OTHER3 = hinted(3, ("zone-b",), ("node-c",))
N_NONE4 = hinted(4, ("zone-a",))
L_A1 = hinted(1, ("zone-a",), node=NODE)
L_B2 = hinted(2, ("zone-b",), node=NODE)
R_A3 = hinted(3, ("zone-a",))
R_B4 = hinted(4, ("zone-b",))

TOPOLOGY = {
    # (policy, node zone, endpoints) -> (cluster, local, topology mode)
    "PreferSameZone: only the endpoints hinted for this node's zone": (
        CLUSTER, ZONE, [Z_A1, Z_B2, Z_C3, Z_A4], ([Z_A1, Z_A4], [], "PreferSameZone")),
    "PreferSameZone: an endpoint hinted for several zones serves each of them": (
        CLUSTER, "zone-c", [Z_ABC9, Z_A1, Z_B2, Z_C3], ([Z_ABC9, Z_C3], [], "PreferSameZone")),
    "zone hints incomplete: one ready endpoint without a hint -> every endpoint": (
        CLUSTER, ZONE, [Z_A1, Z_B2, Z_NONE5], ([Z_A1, Z_B2, Z_NONE5], [], "")),
    "zone hints: a not-ready endpoint without hints does not make them incomplete": (
        CLUSTER, ZONE, [Z_A1, Z_B2, hinted(5, ready=False)], ([Z_A1], [], "PreferSameZone")),
    "zone hints: none for this zone -> every endpoint": (
        CLUSTER, "zone-d", [Z_A1, Z_B2, Z_C3], ([Z_A1, Z_B2, Z_C3], [], "")),
    "zone hints: the Node has no zone label -> every endpoint": (
        CLUSTER, "", [Z_A1, Z_B2], ([Z_A1, Z_B2], [], "")),
    "zone hints: this zone's endpoints are all not ready -> every ready endpoint": (
        CLUSTER, ZONE, [Z_A6_NOT_READY, Z_B2, Z_C3], ([Z_B2, Z_C3], [], "")),
    "zone hints: a not-ready endpoint of this zone is left out": (
        CLUSTER, ZONE, [Z_A1, Z_A6_NOT_READY, Z_B2], ([Z_A1], [], "PreferSameZone")),
    "zone hints: ready endpoints win over this zone's serving-terminating ones": (
        CLUSTER, ZONE, [Z_A7_TERMINATING, Z_B2, Z_A1], ([Z_A1], [], "PreferSameZone")),
    "no endpoint ready: hints ignored, every serving-terminating endpoint": (
        CLUSTER, ZONE, [Z_A7_TERMINATING, Z_B8_TERMINATING, Z_A6_NOT_READY],
        ([Z_A7_TERMINATING, Z_B8_TERMINATING], [], "")),
    "PreferSameNode: only the endpoints hinted for this node": (
        CLUSTER, ZONE, [N_THIS1, N_OTHER2, N_OTHER3], ([N_THIS1], [], "PreferSameNode")),
    "PreferSameNode: none hinted for this node -> zone hints apply": (
        CLUSTER, ZONE, [N_OTHER2, N_OTHER3, hinted(5, ("zone-a",), ("node-d",))],
        ([N_OTHER2, hinted(5, ("zone-a",), ("node-d",))], [], "PreferSameZone")),
    "PreferSameNode: one ready endpoint without a node hint -> zone hints apply": (
        CLUSTER, ZONE, [N_THIS1, N_OTHER2, N_OTHER3, N_NONE4],
        ([N_THIS1, N_OTHER2, N_NONE4], [], "PreferSameZone")),
    "PreferSameNode: node and zone hints both unusable -> every endpoint": (
        CLUSTER, "zone-d", [N_OTHER2, N_OTHER3], ([N_OTHER2, N_OTHER3], [], "")),
    "PreferSameNode: a node hint alone, without zone hints, is enough": (
        CLUSTER, "", [hinted(1, nodes=(NODE,)), hinted(2, nodes=("node-b",))],
        ([hinted(1, nodes=(NODE,))], [], "PreferSameNode")),
    "externalTrafficPolicy Local: zone narrows cluster endpoints, never local ones": (
        EXTERNAL_LOCAL, ZONE, [L_A1, L_B2, R_A3, R_B4], ([L_A1, R_A3], [L_A1, L_B2],
                                                         "PreferSameZone")),
    "internalTrafficPolicy Local: topology ignored, this node's endpoints": (
        INTERNAL_LOCAL, ZONE, [L_A1, L_B2, R_A3, R_B4], ([], [L_A1, L_B2], "")),
    "both Local with external access: zone for cluster, local kept whole": (
        BOTH_LOCAL, "zone-b", [L_A1, R_A3, R_B4], ([R_B4], [L_A1], "PreferSameZone")),
}


@pytest.mark.parametrize("policy,zone,endpoints,want", TOPOLOGY.values(), ids=TOPOLOGY.keys())
def test_topology_hints(policy: PortPolicy, zone: str, endpoints: list[EndpointInfo],
                        want: tuple[list[EndpointInfo], list[EndpointInfo], str]) -> None:
    got = categorize_endpoints(endpoints, policy, NODE, zone)
    assert (list(got.cluster), list(got.local), got.topology) == want
    assert got.has_any


def test_hints_mean_nothing_without_a_node_name() -> None:
    got = categorize_endpoints([N_THIS1, N_OTHER2], CLUSTER, "", "")
    assert got.cluster == (N_THIS1, N_OTHER2) and got.topology == ""
