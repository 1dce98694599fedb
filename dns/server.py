"""The DNS server's socket shells: UDP, batched UDP and TCP listeners on each bind, the
forwarder's tasks, and the client gate, around the sans-IO `DNSHandler`.

Owns sockets, framing, tasks and timers only; every answer comes from `handler.DNSHandler`
through the `Serving` interface (`answer`, `forward`), which `DNSServer` implements:

- UDP is read and answered in batches (`batch.BatchedUDP`: one recvmmsg and one sendmmsg per
  batch) where libc has the calls, else one datagram per callback (`_UDPProtocol`).
- TCP (RFC 7766): length-prefixed messages, several per connection, answered as each is ready
  (forwarded answers may overtake cluster ones). Bounded: a cap on connections in total and per
  client address, reading paused while too many queries are in flight or while the client's
  unread replies fill the transport's write buffer (write backpressure), a message must arrive
  whole within `tcp_read_timeout`, and an idle connection closes after `tcp_idle_timeout`.
- With an allow-list or a rate limit (`gate.ClientGate`), queries from outside the allowed
  CIDRs get REFUSED and UDP replies are rate limited per client prefix and response.
- A bind may be transparent (IP_TRANSPARENT): the server then answers on an address that is
  not local, such as the kube-dns ClusterIP, for packets a TPROXY rule hands to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from dnslib import RCODE, DNSRecord

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import ip_family, join_host_port, socket_family
from kubeshim.cluster.state import ClusterState
from kubeshim.dns import batch
from kubeshim.dns.batch import BatchedUDP
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.forward import Forwarder, UpstreamError
from kubeshim.dns.gate import DROP, SLIP, ClientGate, slipped_reply
from kubeshim.dns.handler import DNSHandler, ForwardRequest, Outcome
from kubeshim.dns.wire import error_reply

log = get_logger("dns")

UDP_RECEIVE_BUFFER = 4 << 20  # absorb bursts while the loop is busy
TCP_WRITE_HIGH_WATER = 64 << 10  # unread reply bytes per TCP client before its reading pauses


class DNSServer:
    def __init__(
        self,
        state: ClusterState,
        config: DNSConfig,
        address_map: Callable[[str], str] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.handler = DNSHandler(state, config, address_map)
        self.metrics = self.handler.metrics
        self.exact = self.handler.exact
        # The handler's caches (the same objects, never replaced), for status and tests.
        self.records = self.handler.records
        self.answers = self.handler.answers
        self.upstream_cache = self.handler.upstream_cache
        self.relayed = self.handler.relayed
        self.gate = ClientGate(
            config.allowed_clients,
            config.rrl_responses_per_second,
            config.rrl_slip,
            config.rrl_ipv4_prefix,
            config.rrl_ipv6_prefix,
            all_rate=config.rrl_all_per_second,
        )
        self.gated = self.gate.active
        # Without a gate the shells call the handler itself: not one call more per query.
        self.answer: Callable[..., Outcome] = (
            self._gated_answer if self.gated else self.handler.answer
        )
        self.forwarder = Forwarder(
            config.upstreams,
            config.upstream_timeout,
            self.handler.upstream_cache,
            self.metrics,
            sockets=config.upstream_sockets,
            deadline=config.forward_deadline,
            client_timeout=config.serve_stale_client_timeout,
            recheck=config.serve_stale_recheck,
            max_refreshes=config.max_concurrent_forwards,
        )
        self.addresses: list[tuple[str, int]] = []  # bound (host, port), UDP and TCP alike
        self._udp: list[asyncio.DatagramTransport | BatchedUDP] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[_TCPProtocol] = set()
        self._per_client: dict[str, int] = {}
        self.tcp_refused = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.forwarder.upstreams = self._without_self(self.config.upstreams)
        try:
            for host, port in self.config.binds:
                await self._bind(loop, host, port, (host, port) in self.config.transparent_binds)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "dns serving",
            zone=self.config.zone,
            listen=",".join(join_host_port(h, p) for h, p in self.addresses),
            upstreams=",".join(join_host_port(h, p) for h, p in self.config.upstreams) or "none",
            allowed=",".join(self.config.allowed_clients) or "any",
            rrl=self.config.rrl_responses_per_second,
            rrl_all=self.config.rrl_all_per_second,
        )

    def _without_self(self, upstreams: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Upstreams minus our own listening addresses: forwarding to ourselves would loop
        (what CoreDNS's loop plugin guards against), e.g. a resolv.conf naming this node."""
        kept = []
        for host, port in upstreams:
            ours = any(
                port == bport
                and (host == bhost or (bhost in ("0.0.0.0", "::") and _is_local(host)))
                for bhost, bport in self.config.binds
            )
            if ours:
                log.warning(
                    "upstream skipped: it is this server", upstream=join_host_port(host, port)
                )
            else:
                kept.append((host, port))
        return kept

    async def _bind(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, transparent: bool
    ) -> None:
        # Port 0 picks a free port; TCP then takes the same number (retrying if it is taken).
        for _ in range(20):
            reuse = self.config.reuse_port
            udp_sock = _socket(host, port, socket.SOCK_DGRAM, transparent, reuse)
            with contextlib.suppress(OSError):
                udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            transport: asyncio.DatagramTransport | BatchedUDP
            if self.config.udp_batch and batch.available():
                transport = BatchedUDP(self, udp_sock, loop)
            else:
                transport, _proto = await loop.create_datagram_endpoint(
                    lambda: _UDPProtocol(self), sock=udp_sock
                )
            bound = udp_sock.getsockname()[1]
            try:
                tcp_sock = _socket(host, bound, socket.SOCK_STREAM, transparent, reuse)
                server = await loop.create_server(lambda: _TCPProtocol(self), sock=tcp_sock)
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            self._udp.append(transport)
            self._tcp.append(server)
            self.addresses.append((host, bound))
            return
        raise OSError(f"no free port for DNS on {host} for both UDP and TCP")

    async def stop(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._tcp:
            await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if exchanges := self.forwarder.close():  # some may outlive the clients they served
            await asyncio.gather(*exchanges, return_exceptions=True)
        self._udp.clear()
        self._tcp.clear()
        self.addresses.clear()

    def status(self) -> dict[str, Any]:
        """What the DNS server serves and how its caches do (for `kubeshim status`)."""
        up = self.handler.upstream_cache
        return {
            "zone": self.config.zone,
            "listen": [join_host_port(h, p) for h, p in self.addresses],
            "upstreams": [join_host_port(h, p) for h, p in self.config.upstreams],
            "answerCache": {
                "entries": len(self.handler.answers),
                "hits": self.metrics.answer_hits,
                "misses": self.metrics.answer_misses,
            },
            "upstreamCache": {
                "positive": len(up.positive),
                "negative": len(up.negative),
                "hits": sum(up.hits.values()),
                "misses": up.misses,
                "staleServed": up.stale_hits,
            },
            "clients": {
                "allowed": list(self.config.allowed_clients) or ["any"],
                "refused": self.gate.refused,
                "rateLimited": {"slipped": self.gate.slipped, "dropped": self.gate.dropped},
                "tcpConnections": len(self._connections),
                "tcpRefused": self.tcp_refused,
            },
            "upstreamSockets": self.forwarder.descriptors(),
        }

    # --- Serving: what the shells call --------------------------------------------------------

    def _gated_answer(self, data: bytes, tcp: bool, client: bytes | None = None) -> Outcome:
        if client is None:
            return self.handler.answer(data, tcp)
        gate = self.gate
        if not gate.admits(client):
            if len(data) < 12 or data[2] & 0x80:
                return None
            self.metrics.rcodes[RCODE.REFUSED] += 1
            return error_reply(data[0] << 8 | data[1], data[2] << 8 | data[3], RCODE.REFUSED)
        out = self.handler.answer(data, tcp)
        if tcp or type(out) is not bytes or not gate.limiting:
            return out
        return self._limited(data, out, client)

    def _limited(self, query: bytes, reply: bytes, client: bytes) -> bytes | None:
        verdict = self.gate.rate_limit(client, reply)
        if verdict == DROP:
            return None
        if verdict == SLIP:
            return slipped_reply(query)
        return reply

    def forward(
        self, request: ForwardRequest, send: Callable[[bytes], None], client: bytes | None = None
    ) -> None:
        if len(self._tasks) >= self.config.max_concurrent_forwards:
            # CoreDNS forward's max_concurrent: REFUSED instead of piling up tasks.
            send(self.handler.refuse(request))
            return
        if client is not None and not request.tcp and self.gate.limiting:
            inner, query = send, request.query.record

            def send(packet: bytes) -> None:
                out = self._limited(bytes(query.pack()), packet, client)
                if out is not None:
                    inner(out)

        self._spawn(self._forward(request, send))

    async def _forward(self, request: ForwardRequest, send: Callable[[bytes], None]) -> None:
        try:
            upstream: DNSRecord | None = await self.forwarder.resolve(request.question, request.do)
        except UpstreamError as e:
            if log.is_debug():
                log.debug("upstream failed", name=str(request.question.qname), error=str(e))
            upstream = None
        except Exception:
            log.error("dns forward failed", exc_info=True)
            upstream = None
        send(self.handler.complete(request, upstream))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- TCP connection accounting ----------------------------------------------------------

    def _admit_tcp(self, conn: _TCPProtocol) -> bool:
        config = self.config
        held = self._per_client.get(conn.peer, 0)
        if (
            len(self._connections) >= config.tcp_max_connections
            or held >= config.tcp_max_connections_per_client
        ):
            self.tcp_refused += 1
            if self.tcp_refused % 100 == 1:
                log.warning(
                    "dns tcp connection refused: cap reached",
                    client=conn.peer,
                    connections=len(self._connections),
                    refused=self.tcp_refused,
                )
            return False
        self._connections.add(conn)
        self._per_client[conn.peer] = held + 1
        return True

    def _release_tcp(self, conn: _TCPProtocol) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            held = self._per_client.get(conn.peer, 1) - 1
            if held > 0:
                self._per_client[conn.peer] = held
            else:
                self._per_client.pop(conn.peer, None)


def _socket(host: str, port: int, kind: int, transparent: bool,
            reuse_port: bool = False) -> socket.socket:
    """A non-blocking socket bound to (host, port); IP_TRANSPARENT first when asked, so a
    non-local address (a ClusterIP behind a TPROXY rule) can be bound; SO_REUSEPORT when
    worker processes share it. A socket handed over by the process this one took over from is
    used as it is."""
    if (inherited := handover.take(kind, host, port)) is not None:
        return inherited
    family = socket_family(host)
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM or transparent:
            # A transparent bind is reached only through TPROXY, so it may share its port with
            # a host program on the wildcard address that set SO_REUSEADDR too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent:
            level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP
            option = 75 if family == socket.AF_INET6 else socket.IP_TRANSPARENT  # IPV6_TRANSPARENT
            sock.setsockopt(level, option, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _packed(host: str) -> bytes:
    """A peer address string as packed bytes (IPv4-mapped IPv6 as IPv4)."""
    if ip_family(host) == 6:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return raw[12:] if raw[:12] == b"\x00" * 10 + b"\xff\xff" else raw
    return socket.inet_pton(socket.AF_INET, host)


# --- asyncio protocols ------------------------------------------------------------------------


class _UDPProtocol(asyncio.DatagramProtocol):
    """One datagram per callback: the fallback where libc lacks recvmmsg/sendmmsg."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        server.metrics.requests_udp += 1
        client = _packed(addr[0]) if server.gated else None
        out = server.answer(data, False, client)
        if type(out) is bytes:
            self._send(out, addr)
        elif isinstance(out, ForwardRequest):
            server.forward(out, lambda packet: self._send(packet, addr), client)

    def _send(self, packet: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(packet, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for clients that went away; nothing to do


class _TCPProtocol(asyncio.Protocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.client: bytes | None = None
        self.buffer = bytearray()
        self.inflight = 0
        self.paused_for_inflight = False
        self.paused_for_writes = False
        self.reading_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_timer: asyncio.TimerHandle | None = None

    # connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if not self.server._admit_tcp(self):
            transport.abort()  # type: ignore[attr-defined]
            self.transport = None
            return
        if self.server.gated and self.peer:
            self.client = _packed(self.peer)
        # Unread replies above this many bytes pause our reading (pause_writing below).
        self.transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)  # type: ignore[union-attr]
        self._touch()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.idle_timer, self.read_timer):
            if timer is not None:
                timer.cancel()
        self.transport = None
        self.buffer.clear()
        self.server._release_tcp(self)

    def pause_writing(self) -> None:
        self.paused_for_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused_for_writes = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self._touch()
        buf = self.buffer
        buf += data
        server = self.server
        while len(buf) >= 2 and self.transport is not None:
            size = buf[0] << 8 | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            server.metrics.requests_tcp += 1
            out = server.answer(message, True, self.client)
            if type(out) is bytes:
                self._send(out)
            elif isinstance(out, ForwardRequest):
                self.inflight += 1
                server.forward(out, self._forwarded, self.client)
                if self.inflight >= server.config.tcp_max_pipelined:
                    self.paused_for_inflight = True
                    self._update_reading()
            if self.paused_for_writes:
                # The client is not reading its replies: leave the rest of its queries in the
                # kernel's buffer until it does (memory stays bounded by this one buffer).
                break
        self._arm_read_timer()

    # helpers

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self.paused_for_inflight or self.paused_for_writes
        if pause and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not pause and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
            if len(self.buffer) >= 2:
                self.data_received(b"")  # messages already buffered while paused

    def _arm_read_timer(self) -> None:
        """A partly received message must be completed within tcp_read_timeout."""
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        if self.buffer and self.transport is not None and not self.reading_paused:
            loop = asyncio.get_running_loop()
            self.read_timer = loop.call_later(self.server.config.tcp_read_timeout, self._close)

    def _send(self, packet: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(packet).to_bytes(2, "big") + packet)

    def _forwarded(self, packet: bytes) -> None:
        self._send(packet)
        self.inflight -= 1
        if self.paused_for_inflight and self.inflight < self.server.config.tcp_max_pipelined:
            self.paused_for_inflight = False
            self._update_reading()
        self._touch()

    def _touch(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            self.idle_timer = loop.call_later(self.server.config.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.inflight and not self.paused_for_writes:
            self._touch()  # waiting on upstream: not idle yet
        else:
            self._close()  # nothing asked, or replies unread for the whole idle timeout

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _is_local(host: str) -> bool:
    """True when `host` is an address of this network namespace (it can be bound)."""
    family = socket_family(host)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False
