"""The UDP flow lifecycle with real sockets on loopback, for both listener kinds that share it:
the plain listener (UdpFrontend) and tproxy mode's transparent listener (CaptureUdp, fed
directly: a datagram sent to the listener's own address carries that address as its original
destination). A flow opens on a client's first datagram, carries replies back, ends when idle
or when its endpoint goes, and gives back its budget, table count and sockets each time."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import pytest

from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.budget import LIMIT_CLIENT, Budget
from kubeshim.proxy.capture import CaptureEntry, Verdict
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.metrics import UDP_FLOW_EVICTED
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.transparent import Capture, CaptureUdp, Target, transparent_listener
from kubeshim.proxy.udp import FlowTable, UdpFrontend, bind_socket
from tests.ports import free_port
from tests.proxy_helpers import one_port_service, udp_name_server

NODE = "node-a"
ENDPOINTS = {"127.0.0.2": b"a", "127.0.0.3": b"b"}
TIMEOUT = 0.2  # udp_timeout: an idle flow ends between 1x and 2x this


def service_info(port: int, ips: list[str]) -> ServiceInfo:
    return one_port_service("UDP", port, ips)


@dataclass
class Lab:
    listener: FlowTable
    address: tuple[str, int]
    table: PortTable
    budget: Budget
    port: int  # the endpoints' port

    def remove_endpoint(self, ip: str) -> int:
        """The Service loses `ip` (as a sync applies it); the flows of what went are dropped."""
        info = service_info(self.port, [i for i in ENDPOINTS if i != ip])
        stale = self.table.update(info.service, info.ports[0], NODE)
        return self.listener.drop_endpoints(stale, self.table.name)


class Client:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def ask(self, data: bytes, timeout: float = 2.0) -> bytes:
        self.sock.sendto(data, self.lab.address)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)

    async def unanswered(self, data: bytes) -> bool:
        try:
            await self.ask(data, timeout=0.3)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


async def open_listener(kind: str, table: PortTable, config: ProxyConfig,
                        budget: Budget) -> tuple[FlowTable, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    port = free_port(kind=socket.SOCK_DGRAM)
    if kind == "listener":
        udp = UdpFrontend(table, False, config, budget)
        await loop.create_datagram_endpoint(lambda: udp, sock=bind_socket("127.0.0.1", port))
        return udp, ("127.0.0.1", port)
    if os.geteuid() != 0:
        pytest.skip("transparent sockets (IP_TRANSPARENT) need root")
    capture = Capture(config, set())  # its listeners and index only: no table, no route
    sock = transparent_listener(socket.SOCK_DGRAM, socket.AF_INET, "127.0.0.1", port, 0)
    capture.index.add(CaptureEntry("ClusterIP", 4, "127.0.0.1", "UDP", port, Verdict.CAPTURED,
                                   table.name), Target(table, False))
    return CaptureUdp(capture, sock, config, budget), ("127.0.0.1", port)


@pytest.fixture(params=["listener", "transparent"])
async def make_lab(request: pytest.FixtureRequest) -> Any:
    opened: list[Any] = []

    async def make(per_client: int = 8, max_flows: int = 65536) -> Lab:
        port = free_port("127.0.0.2", kind=socket.SOCK_DGRAM)
        for ip, name in ENDPOINTS.items():
            opened.append(await udp_name_server(ip, port, name.decode()))
        info = service_info(port, list(ENDPOINTS))
        spi = info.ports[0]
        table = PortTable(spi, 4, "round-robin", time.monotonic)
        table.update(info.service, spi, NODE)
        config = ProxyConfig(vip_mode="loopback", udp_timeout=TIMEOUT, udp_max_flows=max_flows)
        budget = Budget("udp flows", 64, per_client)
        listener, address = await open_listener(request.param, table, config, budget)
        opened.append(listener)
        return Lab(listener, address, table, budget, port)

    yield make
    for thing in opened:
        thing.close()


def idle(lab: Lab) -> None:
    """Nothing held: no flow, no budget, no endpoint count."""
    assert lab.listener.flows == {}
    assert (lab.budget.active, lab.budget.by_client) == (0, {})
    assert lab.table.active == {}
    assert lab.table.counters.flows_active == 0


async def until(predicate: Any, timeout: float = 3.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_a_flow_opens_on_the_first_datagram_and_carries_replies(make_lab: Any) -> None:
    lab = await make_lab()
    client = Client(lab)
    first = await client.ask(b"one")
    name = first.split(b":")[0]
    assert first == name + b":one" and name in ENDPOINTS.values()
    assert await client.ask(b"two") == name + b":two"  # the same flow, the same endpoint
    [flow] = lab.listener.flows.values()
    assert (flow.endpoint.ip, flow.endpoint.port) in lab.table.active
    assert lab.table.active == {(flow.endpoint.ip, lab.port): 1}
    assert (lab.budget.active, lab.budget.by_client) == (1, {"127.0.0.1": 1})
    c = lab.table.counters
    assert (c.flows_active, c.connections_total, c.datagrams_in, c.datagrams_out) == (1, 1, 2, 2)
    assert (c.bytes_in, c.bytes_out) == (6, 10)  # "one" "two" in, "a:one" "a:two" out
    client.close()


async def test_an_idle_flow_ends_and_gives_everything_back(make_lab: Any) -> None:
    lab = await make_lab()
    client = Client(lab)
    await client.ask(b"hi")
    [flow] = lab.listener.flows.values()
    took = await until(lambda: not lab.listener.flows)
    assert TIMEOUT * 0.9 <= took <= TIMEOUT * 2 + 0.3
    idle(lab)
    assert flow.up.fileno() == -1  # its sockets are closed
    assert flow.timer is None
    assert await client.ask(b"again")  # a new flow
    assert len(lab.listener.flows) == 1
    client.close()


async def test_traffic_keeps_a_flow_alive_past_its_timeout(make_lab: Any) -> None:
    lab = await make_lab()
    client = Client(lab)
    await client.ask(b"0")
    [flow] = lab.listener.flows.values()
    deadline = time.monotonic() + TIMEOUT * 4
    while time.monotonic() < deadline:
        await client.ask(b"x")
        await asyncio.sleep(TIMEOUT / 4)
        assert list(lab.listener.flows.values()) == [flow]
    client.close()


async def test_a_removed_endpoint_ends_its_flows_and_the_next_datagram_picks_another(
        make_lab: Any) -> None:
    lab = await make_lab()
    client = Client(lab)
    name = (await client.ask(b"q")).split(b":")[0]
    ip = next(ip for ip, n in ENDPOINTS.items() if n == name)
    [flow] = lab.listener.flows.values()
    assert lab.remove_endpoint(ip) == 1
    idle(lab)
    assert flow.up.fileno() == -1
    other = next(n for n in ENDPOINTS.values() if n != name)
    assert await client.ask(b"q") == other + b":q"
    client.close()


async def test_removing_another_endpoint_leaves_the_flow_alone(make_lab: Any) -> None:
    lab = await make_lab()
    client = Client(lab)
    name = (await client.ask(b"q")).split(b":")[0]
    other_ip = next(ip for ip, n in ENDPOINTS.items() if n != name)
    assert lab.remove_endpoint(other_ip) == 0
    assert len(lab.listener.flows) == 1
    assert await client.ask(b"still") == name + b":still"
    client.close()


async def test_the_per_client_budget_refuses_and_is_released(make_lab: Any) -> None:
    lab = await make_lab(per_client=2)
    clients = [Client(lab) for _ in range(3)]  # three source ports of one client address
    assert await clients[0].ask(b"1") and await clients[1].ask(b"2")
    assert await clients[2].unanswered(b"3")  # dropped, counted
    assert lab.table.counters.errors[LIMIT_CLIENT] >= 1
    assert lab.budget.active == 2 and len(lab.listener.flows) == 2
    await until(lambda: not lab.listener.flows)  # both go idle
    idle(lab)
    assert await clients[2].ask(b"3")  # the budget came back
    for client in clients:
        client.close()


async def test_a_full_flow_table_evicts_the_oldest_flow(make_lab: Any) -> None:
    lab = await make_lab(max_flows=2)
    clients = [Client(lab) for _ in range(3)]
    await clients[0].ask(b"1")
    oldest = next(iter(lab.listener.flows.values()))
    await clients[1].ask(b"2")
    await clients[2].ask(b"3")
    assert lab.table.counters.errors[UDP_FLOW_EVICTED] == 1
    assert oldest not in lab.listener.flows.values() and oldest.up.fileno() == -1
    assert len(lab.listener.flows) == 2 and lab.budget.active == 2
    assert sum(lab.table.active.values()) == 2
    for client in clients:
        client.close()


async def test_closing_the_listener_ends_every_flow(make_lab: Any) -> None:
    lab = await make_lab()
    clients = [Client(lab) for _ in range(2)]
    for client in clients:
        await client.ask(b"x")
    flows = list(lab.listener.flows.values())
    lab.listener.drop_all()
    idle(lab)
    assert all(f.up.fileno() == -1 and f.timer is not None and f.timer.cancelled()
               for f in flows)
    for client in clients:
        client.close()

