"""UDP forwarding: a flow per client address, each with its own connected upstream socket.

The flow lifecycle (`Flow`, `FlowTable`) serves both listener kinds: the plain listener here (an
asyncio DatagramProtocol, replies through its own socket) and tproxy mode's transparent
listener (proxy/transparent.py, replies from a socket bound to the Service address). A flow's
upstream is a plain non-blocking socket connected to the chosen endpoint and watched with
`add_reader`, so creating a flow needs no await. Flows end
after `udp_timeout` without traffic (kube-proxy's --udp-timeout / conntrack UDP timeout), when
the table is full (the oldest goes), or when their endpoint stops being usable — like
kube-proxy's conntrack cleanup for UDP, so the next datagram picks a live endpoint.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Collection
from typing import Any

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import ServicePortName
from kubeshim.cluster.netaddr import socket_family
from kubeshim.cluster.state import EndpointInfo
from kubeshim.proxy.balancer import EndpointKey
from kubeshim.proxy.budget import Budget
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.metrics import (
    NO_ENDPOINTS,
    UDP_FLOW_EVICTED,
    UDP_NO_SOCKET,
    UDP_SEND_FAILED,
)
from kubeshim.proxy.table import PortTable

log = get_logger("proxy")

MAX_DATAGRAM = 65535
# Replies read per readiness callback before yielding to the loop.
READ_BATCH = 32


class _Episode:
    """Whether a failure is in progress and already logged (one line per episode)."""

    reported = False


_no_socket = _Episode()


class Flow:
    """One UDP flow's lifecycle, the same for both flow kinds: a socket connected to the chosen
    endpoint (`up`), replies read from it in batches and sent back to the client (`reply`, the
    one step each kind does its own way), an idle timer re-armed only when it fires (the data
    path just sets `active`, so an idle flow ends between 1x and 2x udp_timeout), and the end
    (`FlowTable.drop`): sockets closed, budget released, the endpoint's count returned."""

    __slots__ = ("owner", "key", "client_ip", "table", "endpoint", "up", "active", "timer")

    def __init__(self, owner: FlowTable, key: Any, client_ip: str, table: PortTable,
                 endpoint: EndpointInfo, up: socket.socket) -> None:
        self.owner = owner
        self.key = key
        self.client_ip = client_ip
        self.table = table
        self.endpoint = endpoint
        self.up = up
        self.active = False
        self.timer: asyncio.TimerHandle | None = None

    def reply(self, data: bytes) -> None:
        """Send the endpoint's datagram back to the client."""
        raise NotImplementedError

    def readers(self) -> list[tuple[socket.socket, Callable[[], None]]]:
        """The sockets the loop watches for this flow, with their callbacks."""
        return [(self.up, self.from_endpoint)]

    def to_endpoint(self, data: bytes) -> None:
        counters = self.table.counters
        try:
            self.up.send(data)
        except OSError:
            counters.error(UDP_SEND_FAILED)
            return
        counters.bytes_in += len(data)
        counters.datagrams_in += 1
        self.active = True

    def from_endpoint(self) -> None:
        counters = self.table.counters
        recv = self.up.recv
        reply = self.reply
        for _ in range(READ_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
                reply(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP port unreachable from the endpoint surfaces here (ECONNREFUSED).
                counters.error(UDP_SEND_FAILED)
                return
            counters.bytes_out += len(data)
            counters.datagrams_out += 1
            self.active = True

    def idle_check(self) -> None:
        if self.active:
            self.active = False
            self.timer = self.owner.loop.call_later(self.owner.config.udp_timeout,
                                                    self.idle_check)
        else:
            self.timer = None
            self.owner.drop(self)


class FlowTable:
    """The flows of one UDP listener, oldest first (for eviction), and their accounting: the
    shared budget of flows in total and per client, and the port tables' active counts."""

    def __init__(self, config: ProxyConfig, budget: Budget | None) -> None:
        self.config = config
        # Shared by every listener: flows in total and per client address.
        self.budget = budget or Budget("udp flows", 1 << 62, 1 << 62)
        self.loop = asyncio.get_running_loop()
        self.flows: dict[Any, Flow] = {}  # insertion order = age, for eviction

    def admit(self, table: PortTable, client_ip: str, external: bool) -> EndpointInfo | None:
        """An endpoint for a new flow from `client_ip`, room in the table (the oldest flow is
        dropped) and the budget's admission; None drops the datagram, counted on the table."""
        ep = table.pick(client_ip, external)
        if ep is None:
            # kube-proxy answers ICMP port unreachable; a user-space socket can only drop.
            table.counters.error(NO_ENDPOINTS)
            return None
        if len(self.flows) >= self.config.udp_max_flows:
            table.counters.error(UDP_FLOW_EVICTED)
            self.drop(next(iter(self.flows.values())))
        refused = self.budget.admit(client_ip)
        if refused is not None:
            table.counters.error(refused)  # dropped, counted; the client retries or times out
            return None
        return ep

    def no_socket(self, table: PortTable, client_ip: str, e: OSError) -> None:
        """An admitted flow that cannot get a socket (out of descriptors or buffers): dropped
        and counted, said once per episode (for every listener)."""
        self.budget.release(client_ip)
        table.counters.error(UDP_NO_SOCKET)
        if not _no_socket.reported:
            _no_socket.reported = True
            log.error("cannot open a socket for a UDP flow; dropping new flows",
                      service=str(table.name), reason=e.strerror or str(e),
                      flows=self.budget.active)

    def have_sockets(self, table: PortTable) -> None:
        if _no_socket.reported:
            _no_socket.reported = False
            log.info("UDP flows get sockets again", service=str(table.name))

    def not_connected(self, table: PortTable, client_ip: str,
                      *socks: socket.socket | None) -> None:
        """An admitted flow whose sockets could not be set up: closed, released, counted."""
        for sock in socks:
            if sock is not None:
                sock.close()
        self.budget.release(client_ip)
        table.counters.error(UDP_SEND_FAILED)

    def start(self, flow: Flow) -> None:
        """An admitted flow with its sockets ready: watch them and start its idle timer."""
        self.flows[flow.key] = flow
        for sock, callback in flow.readers():
            self.loop.add_reader(sock.fileno(), callback)
        flow.timer = self.loop.call_later(self.config.udp_timeout, flow.idle_check)
        table, ep = flow.table, flow.endpoint
        table.opened(ep)
        table.counters.connections_total += 1
        table.counters.flows_active += 1

    def drop(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is not flow:
            return
        del self.flows[flow.key]
        for sock, _ in flow.readers():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        if flow.timer is not None:
            flow.timer.cancel()
        self.budget.release(flow.client_ip)
        flow.table.closed(flow.endpoint)
        flow.table.counters.flows_active -= 1

    def drop_endpoints(self, stale: Collection[EndpointKey],
                       name: ServicePortName | None = None) -> int:
        """Drop the flows (of service port `name`, if given) whose endpoint is no longer
        usable; returns how many."""
        gone = [f for f in self.flows.values()
                if (f.endpoint.ip, f.endpoint.port) in stale
                and (name is None or f.table.name == name)]
        for flow in gone:
            self.drop(flow)
        return len(gone)

    def drop_all(self) -> None:
        for flow in list(self.flows.values()):
            self.drop(flow)


class UdpFlow(Flow):
    """A flow of a plain listener: replies leave through the listener's own socket."""

    __slots__ = ("transport",)

    def __init__(self, owner: UdpFrontend, client: Any, endpoint: EndpointInfo,
                 up: socket.socket) -> None:
        super().__init__(owner, client, client[0], owner.table, endpoint, up)
        self.transport = owner.transport

    def reply(self, data: bytes) -> None:
        self.transport.sendto(data, self.key)


class UdpFrontend(FlowTable, asyncio.DatagramProtocol):
    """One UDP listener of a service port and its flows, one per client address."""

    def __init__(self, table: PortTable, external: bool, config: ProxyConfig,
                 budget: Budget | None = None) -> None:
        super().__init__(config, budget)
        self.table = table
        self.external = external
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self._new_flow(addr)
            if flow is None:
                return
        flow.to_endpoint(data)

    def error_received(self, exc: Exception) -> None:
        self.table.counters.error(UDP_SEND_FAILED)

    def _new_flow(self, addr: Any) -> Flow | None:
        table = self.table
        ep = self.admit(table, addr[0], self.external)
        if ep is None:
            return None
        try:
            sock = socket.socket(socket_family(ep.ip), socket.SOCK_DGRAM)
        except OSError as e:
            self.no_socket(table, addr[0], e)
            return None
        self.have_sockets(table)
        sock.setblocking(False)
        try:
            sock.connect((ep.ip, ep.port))
        except OSError:
            self.not_connected(table, addr[0], sock)
            return None
        flow = UdpFlow(self, addr, ep, sock)
        self.start(flow)
        return flow

    def close(self) -> None:
        self.drop_all()
        if self.transport is not None:
            self.transport.close()


def bind_socket(ip: str, port: int) -> socket.socket:
    if (inherited := handover.take(socket.SOCK_DGRAM, ip, port)) is not None:
        return inherited
    family = socket_family(ip)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
