"""Builders of Services and EndpointSlices for proxy tests, decoded through the real wire model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from kubeshim.cluster.model import EndpointSlice, Service, decode
from kubeshim.cluster.state import ClusterState, ServiceInfo

EndpointSpec = tuple[str, dict[str, Any]]  # (ip, extra fields: ready, serving, terminating, node)


def service(
    name: str,
    cluster_ip: str,
    ports: Sequence[dict[str, Any]],
    namespace: str = "default",
    **spec: Any,
) -> Service:
    body = {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": list(ports)}
    status = spec.pop("status", None)
    body.update(spec)
    raw: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace}, "spec": body,
    }
    if status:
        raw["status"] = status
    obj = decode("Service", raw)
    assert isinstance(obj, Service)
    return obj


def endpoint(ip: str, ready: bool = True, serving: bool | None = None,
             terminating: bool = False, node: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready if serving is None else serving,
                       "terminating": terminating},
    }
    if node:
        ep["nodeName"] = node
    return ep


def endpoint_slice(
    service_name: str,
    endpoints: Iterable[dict[str, Any]],
    ports: Sequence[dict[str, Any]],
    namespace: str = "default",
    suffix: str = "abc",
    address_type: str = "IPv4",
) -> EndpointSlice:
    raw = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": list(ports),
    }
    obj = decode("EndpointSlice", raw)
    assert isinstance(obj, EndpointSlice)
    return obj


def one_port_service(protocol: str, port: int, ips: Iterable[str]) -> ServiceInfo:
    """Service default/web with one port ("http" for TCP, "dns" for UDP) whose ready
    endpoints `ips` listen on `port`, as a synced ClusterState merges it."""
    name = "http" if protocol == "TCP" else "dns"
    svc = service("web", "10.96.0.10", [{"name": name, "port": 80, "protocol": protocol}])
    eps = endpoint_slice("web", [endpoint(ip) for ip in ips],
                         [{"name": name, "port": port, "protocol": protocol}])
    state = ClusterState()
    state.replace("Service", [svc])
    state.replace("EndpointSlice", [eps])
    return state.services[svc.key]


# --- tiny backends -----------------------------------------------------------------------------


class NameServer(asyncio.Protocol):
    """A TCP backend that answers every connection with its name and then echoes."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.name + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write(b"bye\n")
        return False


async def name_server(ip: str, port: int, name: str) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: NameServer(name.encode()), ip, port,
                                    reuse_address=True)


class UdpNameServer(asyncio.DatagramProtocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(self.name + b":" + data, addr)


async def udp_name_server(ip: str, port: int, name: str) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpNameServer(name.encode()), local_addr=(ip, port))
    return transport
