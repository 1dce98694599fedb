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
