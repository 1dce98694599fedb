"""Health-check nodePorts through curl: listeners follow the Services, answers follow endpoints.

The server is fed each state change as the proxy's sync feeds it the changes it applied."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from kubeshim.cluster.model import decode
from kubeshim.cluster.state import ClusterState, EventType, WatchEvent
from kubeshim.proxy.healthcheck import ServiceHealthServer, wanted_health_check
from tests.ports import free_port

NODE = "node-a"


def service(name: str, hc_port: int, policy: str = "Local", labels: dict[str, str] | None = None,
            ) -> Any:
    return decode("Service", {
        "metadata": {"name": name, "namespace": "shop", "labels": labels or {}},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.7.1", "externalTrafficPolicy": policy,
                 "healthCheckNodePort": hc_port,
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                           {"name": "https", "port": 443, "nodePort": 30443}]},
    })


def endpoint(ip: str, node: str, ready: bool = True, terminating: bool = False) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready, "serving": True, "terminating": terminating}}


def endpoint_slice(name: str, *endpoints: dict[str, Any]) -> Any:
    return decode("EndpointSlice", {
        "metadata": {"name": f"{name}-x1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
        "endpoints": list(endpoints),
    })


async def curl(port: int) -> tuple[int, dict[str, str], Any]:
    """(HTTP status or -exit code, headers, parsed body) as curl sees them."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "3", "-D", "-", f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        return -(proc.returncode or 0), {}, None
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


async def until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def lab() -> Any:
    state = ClusterState()
    healthy = {"proxy": True}
    server = ServiceHealthServer(NODE, ["127.0.0.0/8"], lambda: healthy["proxy"])
    await server.start()
    state.subscribe(lambda changes: server.update((c.key, c.current) for c in changes))
    try:
        yield state, server, healthy
    finally:
        await server.stop()


def apply(state: ClusterState, *objects: Any, deleted: bool = False) -> None:
    kind = EventType.DELETED if deleted else EventType.MODIFIED
    state.apply([WatchEvent(kind, obj) for obj in objects])


async def status_of(port: int) -> int:
    return (await curl(port))[0]


async def test_answers_like_kube_proxy(lab: Any) -> None:
    state, _, healthy = lab
    port = free_port()
    apply(state, service("web", port), endpoint_slice(
        "web", endpoint("10.244.0.2", NODE), endpoint("10.244.0.3", NODE),
        endpoint("10.244.0.4", "node-b"), endpoint("10.244.0.5", NODE, ready=False),
        endpoint("10.244.0.6", NODE, ready=False, terminating=True)))
    await until(lambda: _listening(port))
    status, headers, body = await curl(port)
    assert status == 200
    # Two ports per endpoint, yet two local ready Pods: counted by IP.
    assert body == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
                    "serviceProxyHealthy": True}
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-load-balancing-endpoint-weight"] == "2"

    healthy["proxy"] = False
    status, _, body = await curl(port)
    assert (status, body["serviceProxyHealthy"], body["localEndpoints"]) == (503, False, 2)


async def test_no_local_ready_endpoint_is_503(lab: Any) -> None:
    state, _, _ = lab
    port = free_port()
    apply(state, service("api", port), endpoint_slice(
        "api", endpoint("10.244.0.2", NODE), endpoint("10.244.0.4", "node-b")))
    await until(lambda: _listening(port))
    assert await status_of(port) == 200
    # The local Pod starts terminating: still serving, but the node must fail the check.
    apply(state, endpoint_slice("api", endpoint("10.244.0.2", NODE, ready=False, terminating=True),
                                endpoint("10.244.0.4", "node-b")))
    status, headers, body = await curl(port)
    assert (status, body["localEndpoints"], headers["x-load-balancing-endpoint-weight"]) == (
        503, 0, "0")
    apply(state, endpoint_slice("api", endpoint("10.244.0.2", NODE, ready=False, terminating=True),
                                endpoint("10.244.0.4", "node-b")), deleted=True)
    assert (await curl(port))[2]["localEndpoints"] == 0
    apply(state, endpoint_slice("api", endpoint("10.244.0.9", NODE)))
    assert await status_of(port) == 200


async def test_listeners_follow_the_service(lab: Any) -> None:
    state, server, _ = lab
    first, second = free_port(), free_port()
    apply(state, service("pay", first), endpoint_slice("pay", endpoint("10.244.0.2", NODE)))
    await until(lambda: _listening(first))
    assert server.status() == [{"service": "shop/pay", "port": first, "localEndpoints": 1}]

    apply(state, service("pay", second))  # the health check moves to another port
    await until(lambda: _listening(second))
    assert await status_of(first) == -7  # curl: connection refused

    apply(state, service("pay", second, policy="Cluster"))  # no health check for Cluster
    await until(lambda: _refused(second))
    assert server.status() == []

    apply(state, service("pay", first))
    await until(lambda: _listening(first))
    apply(state, service("pay", first), deleted=True)
    await until(lambda: _refused(first))


async def test_services_of_another_proxy_get_no_listener(lab: Any) -> None:
    state, server, _ = lab
    theirs, ours = free_port(), free_port()
    apply(state, service("theirs", theirs, labels={
        "service.kubernetes.io/service-proxy-name": "other-proxy"}))
    apply(state, service("ours", ours))
    await until(lambda: _listening(ours))
    assert await status_of(theirs) == -7
    assert [s["service"] for s in server.status()] == ["shop/ours"]


async def test_a_taken_port_is_retried(lab: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubeshim.proxy.healthcheck as hc

    monkeypatch.setattr(hc, "RETRY_SECONDS", 0.2)
    state, _, _ = lab
    port = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    apply(state, service("late", port), endpoint_slice("late", endpoint("10.244.0.2", NODE)))
    await asyncio.sleep(0.3)
    squatter.close()
    await until(lambda: _listening(port), timeout=5)
    assert await status_of(port) == 200


async def test_stop_closes_every_listener() -> None:
    state = ClusterState()
    port = free_port()
    apply(state, service("web", port), endpoint_slice("web", endpoint("10.244.0.2", NODE)))
    server = ServiceHealthServer(NODE, [], lambda: True)  # every address
    await server.start()
    server.update(state.services.items())
    await until(lambda: _listening(port))
    await server.stop()
    assert await status_of(port) == -7


@pytest.mark.parametrize(("svc_type", "policy", "hc_port", "wanted"), [
    ("LoadBalancer", "Local", 32000, 32000),
    ("NodePort", "Local", 32000, 32000),
    ("LoadBalancer", "Cluster", 32000, None),
    ("LoadBalancer", "Local", 0, None),
    ("ClusterIP", "Local", 32000, None),
], ids=["lb-local", "nodeport-local", "cluster-policy", "no-port", "clusterip"])
def test_which_services_get_a_health_check(svc_type: str, policy: str, hc_port: int,
                                           wanted: int | None) -> None:
    state = ClusterState()
    svc = decode("Service", {
        "metadata": {"name": "s", "namespace": "n"},
        "spec": {"type": svc_type, "clusterIP": "10.96.0.9", "externalTrafficPolicy": policy,
                 "healthCheckNodePort": hc_port, "ports": [{"port": 80}]}})
    state.apply([WatchEvent(EventType.ADDED, svc)])
    check = wanted_health_check(state.services[svc.key], NODE)
    assert (check.port if check else None) == wanted


async def _listening(port: int) -> bool:
    return await status_of(port) > 0


async def _refused(port: int) -> bool:
    return await status_of(port) == -7
