"""SourcePolicy: which client address an endpoint sees (kube-proxy's masquerade decisions),
the same on the first connection of a client and on every later one."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from kubeshim.proxy.transparent import SourcePolicy


@dataclass
class Table:
    external_local: bool


NODE = "192.168.1.10"
POD = "10.244.1.5"  # a pod on this node (in the cluster CIDR)
POD_SAME_LINK = "10.244.0.5"  # a pod on the node's own bridge, like the endpoint below
OUTSIDE = "203.0.113.9"
ENDPOINT = "10.244.0.7"


def policy() -> SourcePolicy:
    p = SourcePolicy(["10.244.0.0/16"])
    p.node_addresses = {NODE}
    p.links = [ipaddress.ip_network("10.244.0.0/24")]
    return p


@pytest.mark.parametrize(("client", "external", "external_local", "expected"), [
    pytest.param(POD, False, False, POD, id="pod to ClusterIP: kept"),
    pytest.param(OUTSIDE, False, False, None, id="not a pod to ClusterIP: masqueraded"),
    pytest.param(NODE, False, False, None, id="the node itself: masqueraded"),
    pytest.param(ENDPOINT, False, False, None, id="hairpin (the endpoint is the client)"),
    pytest.param(POD_SAME_LINK, False, False, None, id="client and endpoint on one link"),
    pytest.param(OUTSIDE, True, False, None, id="external, policy Cluster: masqueraded"),
    pytest.param(OUTSIDE, True, True, OUTSIDE, id="external, policy Local: kept"),
    pytest.param("", False, False, None, id="no client address"),
])
def test_source_address(client: str, external: bool, external_local: bool,
                        expected: str | None) -> None:
    p = policy()
    table = Table(external_local)
    # The first answer is computed, the later ones remembered: they must agree.
    assert [p.source(client, ENDPOINT, external, table) for _ in range(3)] == [expected] * 3  # type: ignore[arg-type]


def test_new_links_are_not_answered_from_memory() -> None:
    p = policy()
    table = Table(False)
    assert p.source(POD_SAME_LINK, ENDPOINT, False, table) is None  # type: ignore[arg-type]
    p.links = []  # the bridge went away: the pod now reaches the endpoint through the node
    assert p.source(POD_SAME_LINK, ENDPOINT, False, table) == POD_SAME_LINK  # type: ignore[arg-type]


def test_memory_is_bounded() -> None:
    p = policy()
    table = Table(False)
    clients = [str(ipaddress.ip_address("10.244.128.0") + i)
               for i in range(SourcePolicy.CACHE_SIZE + 10)]
    assert all(p.source(c, "10.244.200.1", False, table) == c for c in clients)  # type: ignore[arg-type]
    assert len(p._local_pod) <= SourcePolicy.CACHE_SIZE
    assert len(p._same_link) <= SourcePolicy.CACHE_SIZE
    assert p.local_pod(POD) and not p.local_pod(OUTSIDE)
