"""The TCP connection lifecycle with real sockets on loopback: a connection opens to an
endpoint, carries data both ways, keeps half-close, closes when idle, outlives the removal of
its endpoint (kube-proxy leaves established TCP alone), retries a dead endpoint, and gives back
its budget, table count and place in the connection set however it ends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.budget import LIMIT_CLIENT, Budget
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.metrics import CONNECT_FAILED, NO_ENDPOINTS
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.tcp import IDLE_TIMEOUT, ClientSide, TcpFrontend, listen_socket
from tests.ports import free_port
from tests.proxy_helpers import one_port_service

NODE = "node-a"
ENDPOINTS = {"127.0.0.2": b"a", "127.0.0.3": b"b"}
IDLE = 0.2  # tcp_idle_timeout: an idle connection closes between 1x and 2x this


class Endpoint(asyncio.Protocol):
    """Says its name, echoes; on the client's EOF it answers how much it got, then closes."""

    def __init__(self, name: bytes, seen: list[Endpoint]) -> None:
        self.name = name
        self.got = 0
        self.eof = False
        seen.append(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.name + b"\n")

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.transport.write(b"got %d\n" % self.got)
        self.transport.close()
        return True


def service_info(port: int, ips: list[str]) -> ServiceInfo:
    return one_port_service("TCP", port, ips)


@dataclass
class Lab:
    frontend: TcpFrontend
    address: tuple[str, int]
    table: PortTable
    budget: Budget
    port: int
    connections: set[ClientSide]
    seen: list[Endpoint] = field(default_factory=list)

    def set_endpoints(self, ips: list[str]) -> None:
        info = service_info(self.port, ips)
        self.table.update(info.service, info.ports[0], NODE)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection(*self.address)
        name = await asyncio.wait_for(reader.readline(), 2)
        return reader, writer, name.strip()


@pytest.fixture
async def make_lab() -> Any:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []

    async def make(per_client: int = 8, ips: list[str] | None = None,
                   live: list[str] | None = None) -> Lab:
        port = free_port("127.0.0.2")
        seen: list[Endpoint] = []
        for ip in ENDPOINTS if live is None else live:
            servers.append(await loop.create_server(
                lambda ip=ip: Endpoint(ENDPOINTS[ip], seen), ip, port))
        config = ProxyConfig(vip_mode="loopback", tcp_idle_timeout=IDLE, tcp_connect_timeout=1.0)
        info = service_info(port, list(ENDPOINTS) if ips is None else ips)
        spi = info.ports[0]
        table = PortTable(spi, 4, "round-robin", time.monotonic)
        table.update(info.service, spi, NODE)
        budget = Budget("connections", 64, per_client)
        connections: set[ClientSide] = set()
        frontend = TcpFrontend(table, False, config, connections, budget)
        lport = free_port()
        servers.append(await loop.create_server(
            frontend, sock=listen_socket("127.0.0.1", lport, 128)))
        return Lab(frontend, ("127.0.0.1", lport), table, budget, port, connections, seen)

    yield make
    for server in servers:
        server.close()


def released(lab: Lab) -> bool:
    return (not lab.connections and lab.budget.active == 0 and not lab.table.active
            and lab.table.counters.connections_active == 0)


async def until(predicate: Any, timeout: float = 3.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the proxy ended the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 3) == b""
    except ConnectionResetError:
        return True


async def test_a_connection_carries_both_ways_and_closing_it_releases_everything(
        make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, name = await lab.connect()
    assert name in ENDPOINTS.values()
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readline(), 2) == b"ping\n"
    assert len(lab.connections) == 1
    assert (lab.budget.active, lab.budget.by_client) == (1, {"127.0.0.1": 1})
    assert sum(lab.table.active.values()) == 1
    c = lab.table.counters
    assert (c.connections_total, c.connections_active, c.bytes_in) == (1, 1, 5)
    writer.close()
    await until(lambda: released(lab))


async def test_half_close_keeps_the_other_direction_open(make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, _ = await lab.connect()
    writer.write(b"12345")
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"12345"
    writer.write_eof()  # the client is done sending, not receiving
    assert await asyncio.wait_for(reader.readline(), 2) == b"got 5\n"  # sent after our FIN
    assert await asyncio.wait_for(reader.read(), 2) == b""  # then the endpoint's FIN
    assert lab.seen[0].eof
    await until(lambda: released(lab))
    writer.close()


async def test_an_idle_connection_is_closed_and_released(make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, _ = await lab.connect()
    start = time.monotonic()
    assert await closed_by_peer(reader)
    took = time.monotonic() - start
    assert IDLE * 0.9 <= took <= IDLE * 2 + 0.3
    assert lab.table.counters.errors[IDLE_TIMEOUT] == 1
    await until(lambda: released(lab))
    writer.close()


async def test_traffic_keeps_a_connection_open_past_the_idle_timeout(make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, _ = await lab.connect()
    deadline = time.monotonic() + IDLE * 4
    while time.monotonic() < deadline:
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 2) == b"x"
        await asyncio.sleep(IDLE / 4)
    assert len(lab.connections) == 1 and IDLE_TIMEOUT not in lab.table.counters.errors
    writer.close()
    await until(lambda: released(lab))


async def test_a_removed_endpoint_keeps_its_open_connections(make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, name = await lab.connect()
    ip = next(ip for ip, n in ENDPOINTS.items() if n == name)
    lab.set_endpoints([i for i in ENDPOINTS if i != ip])
    writer.write(b"still\n")
    assert await asyncio.wait_for(reader.readline(), 2) == b"still\n"
    r2, w2, name2 = await lab.connect()  # new connections go to what is left
    assert name2 != name
    writer.close()
    w2.close()
    await until(lambda: released(lab))  # the removed endpoint's count came back to zero


async def test_the_per_client_budget_refuses_and_is_released(make_lab: Any) -> None:
    lab = await make_lab(per_client=1)
    reader, writer, _ = await lab.connect()
    r2, w2 = await asyncio.open_connection(*lab.address)
    assert await closed_by_peer(r2)  # refused with a reset, nothing held for it
    assert lab.table.counters.errors[LIMIT_CLIENT] == 1
    assert lab.budget.active == 1 and len(lab.connections) == 1
    w2.close()
    writer.close()
    await until(lambda: released(lab))
    r3, w3, name = await lab.connect()  # the budget came back
    assert name in ENDPOINTS.values()
    w3.close()
    await until(lambda: released(lab))


async def test_no_endpoints_is_a_reset_that_holds_nothing(make_lab: Any) -> None:
    lab = await make_lab(ips=[])
    reader, writer = await asyncio.open_connection(*lab.address)
    assert await closed_by_peer(reader)
    assert lab.table.counters.errors[NO_ENDPOINTS] == 1
    assert released(lab)
    writer.close()


async def test_a_dead_endpoint_is_retried_on_the_next_and_its_count_returned(
        make_lab: Any) -> None:
    lab = await make_lab(live=["127.0.0.3"])  # 127.0.0.2 refuses connections
    names = set()
    for _ in range(2):  # round robin: at least one of the two tries the dead endpoint first
        reader, writer, name = await lab.connect()
        names.add(name)
        writer.close()
    assert names == {b"b"}
    assert lab.table.counters.errors[CONNECT_FAILED] >= 1
    await until(lambda: released(lab))


async def test_abort_resets_both_sides(make_lab: Any) -> None:
    lab = await make_lab()
    reader, writer, _ = await lab.connect()
    [conn] = lab.connections
    conn.abort()
    assert await closed_by_peer(reader)
    await until(lambda: released(lab))
    writer.close()


def test_listen_socket_refuses_a_taken_port() -> None:
    port = free_port()
    first = listen_socket("127.0.0.1", port, 16)
    try:
        with pytest.raises(OSError):
            listen_socket("127.0.0.1", port, 16)
    finally:
        first.close()
