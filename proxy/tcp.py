"""TCP forwarding: one listener per service address, two Protocols per connection.

The hot path is asyncio Protocol callbacks only (no streams, no awaits, no logging): data from
one side is written to the other; when a side's write buffer passes its high-water mark, that
side's `pause_writing` pauses reading on the opposite side, so memory per connection stays
bounded in both directions. Half-close is preserved: one side's EOF becomes `write_eof()` on the
other and the other direction keeps flowing.

The connect to the endpoint is no task either: a non-blocking `connect()` on a socket the
frontend opens (with the options it needs), a writer callback for its completion and one
`call_later` timer for its timeout; a failed connect retries on the next endpoint. Only the
connected socket is handed to the loop (`create_connection(sock=...)`) to become a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from typing import Any

from kubeshim.cluster import handover
from kubeshim.cluster.netaddr import socket_family
from kubeshim.cluster.state import EndpointInfo
from kubeshim.proxy.budget import Budget
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.metrics import CONNECT_FAILED, CONNECT_TIMEOUT, NO_ENDPOINTS, UPSTREAM_RESET
from kubeshim.proxy.table import PortTable

# Per-direction write buffer marks: reading from the peer pauses above HIGH, resumes below LOW.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
IDLE_TIMEOUT = "idle_timeout"


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a RST (SO_LINGER 0): like kube-proxy REJECTing a port without endpoints."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class TcpFrontend:
    """The protocol factory of one listener: which port table, and whether traffic is external."""

    def __init__(self, table: PortTable, external: bool, config: ProxyConfig,
                 connections: set[ClientSide], budget: Budget | None = None) -> None:
        self.table = table
        self.external = external
        self.config = config
        self.connections = connections
        # Shared by every listener: connections in total and per client address.
        self.budget = budget or Budget("connections", 1 << 62, 1 << 62)
        self.loop = asyncio.get_running_loop()
        # This listener's open connections and their idle sweep: one timer for all of them,
        # running while there are any (ClientSide.idle_sweep).
        self.live: set[ClientSide] = set()
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> ClientSide:
        return ClientSide(self)

    def opened(self, conn: ClientSide) -> None:
        self.connections.add(conn)
        self.live.add(conn)
        if self._sweep is None and self.config.tcp_idle_timeout > 0:
            self._sweep = self.loop.call_later(self.config.tcp_idle_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        for conn in list(self.live):
            conn.idle_sweep()
        if self.live:
            self._sweep = self.loop.call_later(self.config.tcp_idle_timeout, self._sweep_idle)

    def open(self, client: ClientSide, ep: EndpointInfo) -> socket.socket:
        """A non-blocking, not yet connected socket to `ep`."""
        return socket.socket(socket_family(ep.ip), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


class ClientSide(asyncio.Protocol):
    """The accepted connection; owns the connection's lifecycle and accounting."""

    __slots__ = ("fe", "table", "counters", "external", "transport", "upstream", "endpoint",
                 "client_ip", "_eofs", "_client_eof", "_active", "_closed", "_early",
                 "_sock", "_timer", "_tried")

    def __init__(self, fe: TcpFrontend) -> None:
        self.fe = fe
        self.table = fe.table
        self.counters = fe.table.counters
        self.external = fe.external
        self.transport: Any = None
        self.upstream: Any = None
        self.endpoint: EndpointInfo | None = None
        self.client_ip = ""
        self._eofs = 0
        self._client_eof = False
        self._active = False  # data either way since the listener's last idle sweep
        self._closed = False
        self._early: list[bytes] = []
        # The connect in progress: its socket, its timeout, the endpoints that failed.
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tried: list[EndpointInfo] | None = None

    # --- asyncio.Protocol callbacks (client side) --------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        fe = self.fe
        counters = self.counters
        counters.connections_total += 1
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        ep = self.table.pick(self.client_ip, self.external)
        if ep is None:
            counters.error(NO_ENDPOINTS)
            self._closed = True
            reset(transport)
            return
        refused = fe.budget.admit(self.client_ip)
        if refused is not None:
            # At the cap: refuse this one cleanly, the others keep their descriptors.
            counters.error(refused)
            self._closed = True
            reset(transport)
            return
        counters.connections_active += 1
        fe.opened(self)
        transport.pause_reading()  # until the endpoint answers; the kernel buffers meanwhile
        # TCP_NODELAY: uvloop and asyncio both set it on every TCP transport already.
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._dial(ep)

    def data_received(self, data: bytes) -> None:
        up = self.upstream
        if up is None:
            # uvloop may deliver data before the pause in connection_made takes effect: keep
            # it for the endpoint, and pause now (reading resumes once the endpoint answers).
            self._early.append(data)
            self.transport.pause_reading()
        else:
            up.write(data)
        self.counters.bytes_in += len(data)
        self._active = True

    def eof_received(self) -> bool:
        if self._client_eof:
            return True  # resuming a transport after EOF may report it again
        self._client_eof = True
        if self.upstream is not None:
            self.upstream.write_eof()
            self._half_closed()
        return True  # keep our sending side open: the endpoint may still answer

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._abandon_connect()
        up = self.upstream
        if up is not None and not up.is_closing():
            if exc is None:
                up.close()
            else:
                reset(up)
        self.counters.connections_active -= 1
        self.fe.budget.release(self.client_ip)
        if self.endpoint is not None:
            self.table.closed(self.endpoint)
        self.fe.connections.discard(self)
        self.fe.live.discard(self)

    # --- the endpoint side -------------------------------------------------------------------

    def _dial(self, ep: EndpointInfo) -> None:
        """Start a non-blocking connect to `ep`; `_writable` or `_connect_timeout` follows."""
        self.endpoint = ep
        self.table.opened(ep)
        try:
            sock = self.fe.open(self, ep)
        except OSError:
            self._connect_failed(CONNECT_FAILED)
            return
        address = (ep.ip, ep.port)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            # To a local endpoint the handshake is usually over when connect() returns: asking
            # again says so (0, or EISCONN) and saves waiting for writability (EALREADY: not
            # yet; an error: it failed).
            err = sock.connect_ex(address)
            if err == 0 or err == errno.EISCONN:
                self._connected(sock)
                return
        elif err == 0:
            self._connected(sock)
            return
        if err not in (errno.EALREADY, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(CONNECT_FAILED)
            return
        self._sock = sock
        loop = self.fe.loop
        loop.add_writer(sock.fileno(), self._writable)
        self._timer = loop.call_later(self.fe.config.tcp_connect_timeout, self._connect_timeout)

    def _writable(self) -> None:
        sock = self._sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.EINPROGRESS:
            return
        self._abandon_connect(close=bool(err))
        if err:
            self._connect_failed(CONNECT_FAILED)
            return
        self._connected(sock)

    def _connected(self, sock: socket.socket) -> None:
        # The transport calls UpstreamSide.connection_made -> upstream_made on its own.
        self.fe.loop.create_task(self.fe.loop.create_connection(
            lambda: UpstreamSide(self), sock=sock))

    def _connect_timeout(self) -> None:
        self._timer = None
        self._abandon_connect()
        self._connect_failed(CONNECT_TIMEOUT)

    def _abandon_connect(self, close: bool = True) -> None:
        """Stop waiting for the connect in progress (and close its socket unless kept)."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self.fe.loop.remove_writer(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if close:
            sock.close()

    def _connect_failed(self, reason: str) -> None:
        """A failed connect retries the next endpoint, a bounded number of times."""
        self.counters.error(reason)
        ep = self.endpoint
        assert ep is not None
        self.table.closed(ep)
        self.endpoint = None
        if self._closed:
            return
        tried = self._tried
        if tried is None:
            tried = self._tried = []
        tried.append(ep)
        next_ep = (self.table.pick(self.client_ip, self.external, tried)
                   if len(tried) <= self.fe.config.connect_retries else None)
        if next_ep is None:
            reset(self.transport)
            return
        self._dial(next_ep)

    def upstream_made(self, transport: Any) -> None:
        if self._closed:
            transport.close()
            return
        self.upstream = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self._early:
            transport.writelines(self._early)
            self._early.clear()
        if self._client_eof:
            transport.write_eof()
            self._half_closed()
        else:
            self.transport.resume_reading()
        self._active = True  # the idle time counts from here

    def upstream_eof(self) -> None:
        if not self.transport.is_closing():
            self.transport.write_eof()
        self._half_closed()

    def upstream_lost(self, exc: Exception | None) -> None:
        t = self.transport
        if t.is_closing():
            return
        if exc is None:
            t.close()  # flushes what the endpoint sent, then FIN
        else:
            self.counters.error(UPSTREAM_RESET)
            reset(t)

    def _half_closed(self) -> None:
        self._eofs += 1
        if self._eofs >= 2:  # both directions finished
            self.transport.close()
            self.upstream.close()

    def idle_sweep(self) -> None:
        """The listener's idle sweep (every tcp_idle_timeout) looks at each connection: one with no
        data either way since the previous look is closed. The data path only sets a flag and
        no connection holds a timer of its own, so an idle connection closes between 1x and 2x
        the idle timeout. A connect in progress has its own timeout."""
        if self._closed or self.upstream is None:
            return
        if self._active:
            self._active = False
            return
        self.counters.error(IDLE_TIMEOUT)
        self.transport.close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        """Reset both sides now (shutdown after the drain deadline): a RST tells the client at
        once, where a FIN could still sit unsent when the VIP is removed a moment later."""
        if self.upstream is not None:
            reset(self.upstream)
        reset(self.transport)


class UpstreamSide(asyncio.Protocol):
    """The connection to the endpoint; forwards to its ClientSide."""

    __slots__ = ("client", "peer", "counters", "eof")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.counters = client.counters
        self.peer: Any = None
        self.eof = False

    def connection_made(self, transport: Any) -> None:
        self.peer = self.client.transport
        self.client.upstream_made(transport)

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        self.counters.bytes_out += len(data)
        self.client._active = True

    def eof_received(self) -> bool:
        if not self.eof:
            self.eof = True
            self.client.upstream_eof()
        return True

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)


def listen_socket(ip: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket; raises OSError (EADDRINUSE, EADDRNOTAVAIL, EACCES)."""
    if (inherited := handover.take(socket.SOCK_STREAM, ip, port)) is not None:
        return inherited
    family = socket_family(ip)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
