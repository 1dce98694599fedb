"""UDP forwarding: a flow per client address, each with its own connected upstream socket.

The listener is an asyncio DatagramProtocol; a flow is a plain non-blocking socket connected to
the chosen endpoint and watched with `add_reader`, so creating a flow needs no await. Flows end
after `udp_timeout` without traffic (kube-proxy's --udp-timeout / conntrack UDP timeout), when
the table is full (the oldest goes), or when their endpoint stops being usable — like
kube-proxy's conntrack cleanup for UDP, so the next datagram picks a live endpoint.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger
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


# --- the steps every new UDP flow takes, here and in tproxy mode (proxy/transparent.py) ----


def admit_flow(table: PortTable, client_ip: str, external: bool, flows: Mapping[Any, Any],
               config: ProxyConfig, budget: Budget, drop: Callable[[Any], None]
               ) -> EndpointInfo | None:
    """An endpoint for a new flow from `client_ip`, room in the flow table (the oldest flow is
    dropped) and the budget's admission; None drops the datagram, counted on the table."""
    ep = table.pick(client_ip, external)
    if ep is None:
        # kube-proxy answers ICMP port unreachable; a user-space socket can only drop.
        table.counters.error(NO_ENDPOINTS)
        return None
    if len(flows) >= config.udp_max_flows:
        table.counters.error(UDP_FLOW_EVICTED)
        drop(next(iter(flows.values())))
    refused = budget.admit(client_ip)
    if refused is not None:
        table.counters.error(refused)  # dropped, counted; the client retries or times out
        return None
    return ep


def no_socket(table: PortTable, budget: Budget, client_ip: str, e: OSError) -> None:
    """A flow that cannot get a socket (out of descriptors or buffers): dropped and counted,
    said once per episode."""
    budget.release(client_ip)
    table.counters.error(UDP_NO_SOCKET)
    if not _no_socket.reported:
        _no_socket.reported = True
        log.error("cannot open a socket for a UDP flow; dropping new flows",
                  service=str(table.name), reason=e.strerror or str(e), flows=budget.active)


def have_sockets(table: PortTable) -> None:
    if _no_socket.reported:
        _no_socket.reported = False
        log.info("UDP flows get sockets again", service=str(table.name))


def flow_opened(table: PortTable, ep: EndpointInfo) -> None:
    table.opened(ep)
    table.counters.connections_total += 1
    table.counters.flows_active += 1


def flow_closed(table: PortTable, ep: EndpointInfo) -> None:
    table.closed(ep)
    table.counters.flows_active -= 1


class UdpFlow:
    __slots__ = ("frontend", "client", "endpoint", "sock", "fd", "active", "timer")

    def __init__(self, frontend: UdpFrontend, client: Any, endpoint: EndpointInfo,
                 sock: socket.socket) -> None:
        self.frontend = frontend
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.fd = sock.fileno()
        self.active = False
        self.timer: asyncio.TimerHandle | None = None

    def readable(self) -> None:
        fe = self.frontend
        transport = fe.transport
        counters = fe.table.counters
        recv = self.sock.recv
        for _ in range(READ_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP port unreachable from the endpoint surfaces here (ECONNREFUSED).
                counters.error(UDP_SEND_FAILED)
                return
            transport.sendto(data, self.client)
            counters.bytes_out += len(data)
            counters.datagrams_out += 1
            self.active = True

    def idle_check(self) -> None:
        if self.active:
            self.active = False
            self.timer = self.frontend.loop.call_later(self.frontend.config.udp_timeout,
                                                       self.idle_check)
        else:
            self.timer = None
            self.frontend.drop(self)


class UdpFrontend(asyncio.DatagramProtocol):
    """One UDP listener of a service port and its flow table."""

    def __init__(self, table: PortTable, external: bool, config: ProxyConfig,
                 budget: Budget | None = None) -> None:
        self.table = table
        self.external = external
        self.config = config
        # Shared by every listener: flows in total and per client address.
        self.budget = budget or Budget("udp flows", 1 << 62, 1 << 62)
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.flows: dict[Any, UdpFlow] = {}  # insertion order = age, for eviction

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self._new_flow(addr)
            if flow is None:
                return
        counters = self.table.counters
        try:
            flow.sock.send(data)
        except OSError:
            counters.error(UDP_SEND_FAILED)
            return
        counters.bytes_in += len(data)
        counters.datagrams_in += 1
        flow.active = True

    def error_received(self, exc: Exception) -> None:
        self.table.counters.error(UDP_SEND_FAILED)

    def _new_flow(self, addr: Any) -> UdpFlow | None:
        table = self.table
        ep = admit_flow(table, addr[0], self.external, self.flows, self.config, self.budget,
                        self.drop)
        if ep is None:
            return None
        try:
            sock = socket.socket(socket_family(ep.ip), socket.SOCK_DGRAM)
        except OSError as e:
            no_socket(table, self.budget, addr[0], e)
            return None
        have_sockets(table)
        sock.setblocking(False)
        try:
            sock.connect((ep.ip, ep.port))
        except OSError:
            sock.close()
            self.budget.release(addr[0])
            table.counters.error(UDP_SEND_FAILED)
            return None
        flow = UdpFlow(self, addr, ep, sock)
        self.flows[addr] = flow
        self.loop.add_reader(flow.fd, flow.readable)
        flow.timer = self.loop.call_later(self.config.udp_timeout, flow.idle_check)
        flow_opened(table, ep)
        return flow

    def drop(self, flow: UdpFlow) -> None:
        if self.flows.get(flow.client) is not flow:
            return
        del self.flows[flow.client]
        self.loop.remove_reader(flow.fd)
        if flow.timer is not None:
            flow.timer.cancel()
        flow.sock.close()
        self.budget.release(flow.client[0])
        flow_closed(self.table, flow.endpoint)

    def drop_endpoints(self, stale: Collection[EndpointKey]) -> int:
        """Drop the flows of endpoints that are no longer usable; returns how many."""
        gone = [f for f in self.flows.values() if (f.endpoint.ip, f.endpoint.port) in stale]
        for flow in gone:
            self.drop(flow)
        return len(gone)

    def drop_all(self) -> None:
        for flow in list(self.flows.values()):
            self.drop(flow)

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
