"""The DNS server's serving shell: UDP and TCP listeners on each bind, wired to the cores.

Owns sockets, framing and tasks only. A query's path:

1. `wire.question_key` reads the header and question bytes; a hit in the `AnswerCache` is
   answered by splicing the client's transaction id and question bytes (its qname case) into
   the cached packet. No parsing, no packing, no logging.
2. Otherwise `wire.parse_query` (dnslib) validates it (drop / FORMERR / NOTIMP / BADVERS),
   `ClusterRecords.resolve` answers cluster names, and the packed answer is cached with the
   state it depends on; a ServiceChange drops those entries before the next query is read.
3. Names that are not ours go to the `Forwarder` in a task; the reply is sent when it comes.

UDP is read and answered in batches (`batch.BatchedUDP`: one recvmmsg and one sendmmsg per batch)
where libc has the calls, else one datagram per callback (`_UDPProtocol`); both answer alike.

TCP (RFC 7766): length-prefixed messages, several per connection, answered as each is ready
(forwarded answers may overtake cluster ones), reading paused while too many are in flight,
closed after an idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from dnslib import RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import join_host_port, socket_family
from kubeshim.cluster.state import ClusterState, ServiceChange
from kubeshim.dns import batch
from kubeshim.dns.batch import BatchedUDP
from kubeshim.dns.cache import AnswerCache, RelayedAnswers, UpstreamCache
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.forward import Forwarder, UpstreamError
from kubeshim.dns.metrics import DNSMetrics
from kubeshim.dns.records import ClusterRecords
from kubeshim.dns.wire import AnswerKey, Query, error_reply, finish, parse_query, question_key

log = get_logger("dns")

UDP_RECEIVE_BUFFER = 4 << 20  # absorb bursts while the loop is busy


class DNSServer:
    def __init__(
        self,
        state: ClusterState,
        config: DNSConfig,
        address_map: Callable[[str], str] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.records = ClusterRecords(state, config, address_map)
        self.answers = AnswerCache(config.answer_cache_size)
        self.upstream_cache = UpstreamCache(
            config.upstream_cache_size,
            config.upstream_negative_cache_size,
            config.upstream_max_ttl,
        )
        self.relayed = RelayedAnswers(config.upstream_cache_size)
        self.metrics = DNSMetrics()
        self.forwarder = Forwarder(
            config.upstreams, config.upstream_timeout, self.upstream_cache, self.metrics
        )
        self.answer_hits = 0
        self.answer_misses = 0
        self.addresses: list[tuple[str, int]] = []  # bound (host, port), UDP and TCP alike
        self._udp: list[asyncio.DatagramTransport | BatchedUDP] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[_TCPProtocol] = set()
        self._internal_errors = 0
        state.subscribe(self._on_changes)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.forwarder.upstreams = self._without_self(self.config.upstreams)
        try:
            for host, port in self.config.binds:
                await self._bind(loop, host, port)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "dns serving",
            zone=self.config.zone,
            listen=",".join(join_host_port(h, p) for h, p in self.addresses),
            upstreams=",".join(join_host_port(h, p) for h, p in self.config.upstreams) or "none",
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
                log.warning("upstream skipped: it is this server",
                            upstream=join_host_port(host, port))
            else:
                kept.append((host, port))
        return kept

    async def _bind(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        # Port 0 picks a free port; TCP then takes the same number (retrying if it is taken).
        for _ in range(20):
            transport: asyncio.DatagramTransport | BatchedUDP
            if self.config.udp_batch and batch.available():
                transport = await batch.open_batched(self, host, port)
            else:
                transport, _proto = await loop.create_datagram_endpoint(
                    lambda: _UDPProtocol(self), local_addr=(host, port)
                )
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            bound = sock.getsockname()[1]
            try:
                server = await loop.create_server(
                    lambda: _TCPProtocol(self), host, bound, reuse_address=True
                )
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
        self._udp.clear()
        self._tcp.clear()
        self.addresses.clear()

    def status(self) -> dict[str, Any]:
        """What the DNS server serves and how its caches do (for `kubeshim status`)."""
        return {
            "zone": self.config.zone,
            "listen": [join_host_port(h, p) for h, p in self.addresses],
            "upstreams": [join_host_port(h, p) for h, p in self.config.upstreams],
            "answerCache": {
                "entries": len(self.answers),
                "hits": self.answer_hits,
                "misses": self.answer_misses,
            },
            "upstreamCache": {
                "positive": len(self.upstream_cache.positive),
                "negative": len(self.upstream_cache.negative),
                "hits": sum(self.upstream_cache.hits.values()),
                "misses": self.upstream_cache.misses,
            },
        }

    # --- following the state ----------------------------------------------------------------

    def _on_changes(self, changes: Sequence[ServiceChange]) -> None:
        self.answers.invalidate(self.records.apply(changes))

    # --- answering ----------------------------------------------------------------------------

    def answer(self, data: bytes, tcp: bool) -> bytes | Query | None:
        """Reply bytes, a Query to forward (see `forward`), or None to drop the packet."""
        entries = self.answers.entries
        if not tcp:
            # First level: the exact bytes after the transaction id (flags, question with its
            # case, OPT) of a UDP query answered before; the reply is that answer with this id.
            entry = entries.get(data[2:])
            if entry is not None:
                self.answer_hits += 1
                self.metrics.rcodes[entry[1]] += 1
                return data[:2] + entry[0]
        # Second level: the question's shape (lower-cased name, type, RD, size limit, DO).
        found = question_key(data, tcp, self.config.max_udp_payload)
        if found is not None:
            entry = entries.get(found[0])
            if entry is not None:
                self.answer_hits += 1
                self.metrics.rcodes[entry[1]] += 1
                packet = entry[0]
                qend = found[1]
                reply = data[:2] + packet[2:12] + data[12:qend] + packet[qend:]
                if not tcp:
                    self.answers.put(data[2:], reply[2:], entry[1], entry[2])
                return reply
            # A forwarded name answered before and still fresh upstream (never a cluster
            # name: those are not forwarded, so the two stores cannot disagree).
            relayed = self.relayed.get(found[0])
            if relayed is not None:
                packet, rcode, kind = relayed
                self.upstream_cache.hits[kind] += 1
                self.metrics.rcodes[rcode] += 1
                qend = found[1]
                return data[:2] + packet[2:12] + data[12:qend] + packet[qend:]
        self.answer_misses += 1
        try:
            return self._answer_full(data, tcp, found)
        except Exception:
            # A bug must not stop the server: answer SERVFAIL, log once per hundred.
            self._internal_errors += 1
            if self._internal_errors % 100 == 1:
                log.error("dns answer failed", exc_info=True, count=self._internal_errors)
            if len(data) < 12:
                return None
            self.metrics.rcodes[RCODE.SERVFAIL] += 1
            return error_reply(data[0] << 8 | data[1], data[2] << 8 | data[3], RCODE.SERVFAIL)

    def _answer_full(
        self, data: bytes, tcp: bool, found: tuple[AnswerKey, int] | None
    ) -> bytes | Query | None:
        started = time.perf_counter()
        max_udp = self.config.max_udp_payload
        parsed = parse_query(data, max_udp)
        if parsed is None:
            self.metrics.dropped += 1
            return None
        if isinstance(parsed, bytes):
            self.metrics.rcodes[parsed[3] & 0xF] += 1
            return parsed
        resolution = self.records.resolve(parsed.record)
        if resolution is None:
            parsed.key = found
            return parsed
        if resolution.chase is not None:
            parsed.partial, parsed.chase = resolution.reply, resolution.chase
            return parsed
        rcode = resolution.reply.header.rcode
        packet = finish(resolution.reply, parsed, parsed.size_limit(tcp, max_udp), max_udp)
        if found is not None and resolution.cacheable:
            key, qend = found
            # Cache only when the reply's question is byte for byte the query's (but for case):
            # the hit path splices the client's question bytes over it.
            if packet[12:qend].lower() == key[0] and packet[qend : qend + 4] == key[1]:
                self.answers.put(key, packet, rcode, resolution.deps)
        if not tcp and resolution.cacheable:
            self.answers.put(data[2:], packet[2:], rcode, resolution.deps)
        self.metrics.rcodes[rcode] += 1
        self.metrics.duration.observe(time.perf_counter() - started)
        return packet

    async def forward(self, query: Query, tcp: bool) -> bytes:
        """The reply to a query for a name outside the cluster: upstream's answer or SERVFAIL."""
        try:
            return await self._forward(query, tcp)
        except Exception:
            self._internal_errors += 1
            if self._internal_errors % 100 == 1:
                log.error("dns forward failed", exc_info=True, count=self._internal_errors)
            self.metrics.rcodes[RCODE.SERVFAIL] += 1
            return error_reply(query.id, query.record.header.bitmap, RCODE.SERVFAIL)

    async def _forward(self, query: Query, tcp: bool) -> bytes:
        if query.partial is not None and query.chase is not None:
            return await self._chase(query, query.partial, query.chase, tcp)
        started = time.perf_counter()
        request = query.record
        max_udp = self.config.max_udp_payload
        try:
            upstream = await self.forwarder.resolve(
                request.q, query.edns.do if query.edns else False
            )
            header = DNSHeader(id=query.id, bitmap=upstream.header.bitmap)
            header.rd = request.header.rd
            header.ra = 1
            header.aa = 0  # relayed, not ours: only an authority sets AA (RFC 1035 4.1.1)
            reply = DNSRecord(
                header,
                questions=[request.q],
                rr=_in_client_case(upstream.rr, request.q.qname),
                auth=list(upstream.auth),
                ar=list(upstream.ar),
            )
        except UpstreamError as e:
            if log.is_debug():
                log.debug("upstream failed", name=str(request.q.qname), error=str(e))
            reply = DNSRecord(DNSHeader(id=query.id, qr=1, rd=request.header.rd, ra=1), q=request.q)
            reply.header.rcode = RCODE.SERVFAIL
        packet = finish(reply, query, query.size_limit(tcp, max_udp), max_udp)
        self._keep_relayed(query, packet, reply.header.rcode)
        self.metrics.rcodes[reply.header.rcode] += 1
        self.metrics.duration.observe(time.perf_counter() - started)
        return packet

    def _keep_relayed(self, query: Query, packet: bytes, rcode: int) -> None:
        """Keep the packed reply while the upstream answer it carries is cached.

        Reverse names are left out: a PTR forwarded today may be a ClusterIP's tomorrow, and
        only the cluster store is invalidated by state changes.
        """
        if query.key is None or packet[2] & 0x02:  # not a plain query, or truncated
            return
        q = query.record.q
        name = str(q.qname).lower()
        if name.endswith(("in-addr.arpa.", "ip6.arpa.")):
            return
        stored = self.upstream_cache.expires_at(
            UpstreamCache.key(name, q.qtype, q.qclass, query.edns.do if query.edns else False)
        )
        if stored is not None:
            self.relayed.put(query.key[0], packet, stored[0], rcode, stored[1])

    async def _chase(self, query: Query, reply: DNSRecord, target: str, tcp: bool) -> bytes:
        """Complete a cluster CNAME (ExternalName) with the target's records of the asked type.

        A target in the cluster zone is answered here; any other goes upstream. When the target
        cannot be resolved the CNAME alone is the answer (the client may follow it itself).
        """
        request = query.record
        question = DNSQuestion(target, request.q.qtype, request.q.qclass)
        inner = self.records.resolve(DNSRecord(DNSHeader(rd=1), q=question))
        found: DNSRecord | None
        if inner is not None:
            found = inner.reply if inner.chase is None else None  # one link only
        else:
            try:
                found = await self.forwarder.resolve(
                    question, query.edns.do if query.edns else False
                )
            except UpstreamError:
                found = None
        if found is not None:
            for rr in found.rr:
                reply.add_answer(rr)
            if found.header.rcode == RCODE.NXDOMAIN:
                reply.header.rcode = RCODE.NXDOMAIN  # RFC 6604: the rcode of the chain's end
        max_udp = self.config.max_udp_payload
        packet = finish(reply, query, query.size_limit(tcp, max_udp), max_udp)
        self.metrics.rcodes[reply.header.rcode] += 1
        return packet

    def saturated(self) -> bool:
        return len(self._tasks) >= self.config.max_concurrent_forwards

    def refuse(self, query: Query) -> bytes:
        """REFUSED for a query that would exceed the forwarding limit."""
        self.metrics.rcodes[RCODE.REFUSED] += 1
        return error_reply(query.id, query.record.header.bitmap, RCODE.REFUSED)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- asyncio protocols ------------------------------------------------------------------------


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        server.metrics.requests_udp += 1
        out = server.answer(data, False)
        if out.__class__ is bytes:
            self.transport.sendto(out, addr)  # type: ignore[union-attr]
        elif out is not None:
            if server.saturated():
                self.transport.sendto(server.refuse(out), addr)  # type: ignore[union-attr,arg-type]
            else:
                server.spawn(self._forward(out, addr))  # type: ignore[arg-type]

    async def _forward(self, query: Query, addr: tuple[str, int]) -> None:
        packet = await self.server.forward(query, False)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(packet, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for clients that went away; nothing to do


class _TCPProtocol(asyncio.Protocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.inflight = 0
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None

    # connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)
        self._touch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        self.server._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self._touch()
        buf = self.buffer
        buf += data
        server = self.server
        while len(buf) >= 2:
            size = buf[0] << 8 | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            server.metrics.requests_tcp += 1
            out = server.answer(message, True)
            if out.__class__ is bytes:
                self._send(out)
            elif out is not None:
                if server.saturated():
                    self._send(server.refuse(out))  # type: ignore[arg-type]
                    continue
                self.inflight += 1
                server.spawn(self._forward(out))  # type: ignore[arg-type]
                if self.inflight >= server.config.tcp_max_pipelined and not self.paused:
                    self.paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]

    # helpers

    def _send(self, packet: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(packet).to_bytes(2, "big") + packet)

    async def _forward(self, query: Query) -> None:
        try:
            self._send(await self.server.forward(query, True))
        finally:
            self.inflight -= 1
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            self._touch()

    def _touch(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.server.config.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.inflight:
            self._touch()
        elif self.transport is not None:
            self.transport.close()


def _in_client_case(records: list[RR], qname: DNSLabel) -> list[RR]:
    """Records owned by the question name carry the client's spelling of it (for 0x20 clients)."""
    want = str(qname).lower()
    return [
        RR(qname, rr.rtype, rr.rclass, rr.ttl, rr.rdata) if str(rr.rname).lower() == want else rr
        for rr in records
    ]


def _is_local(host: str) -> bool:
    """True when `host` is an address of this network namespace (it can be bound)."""
    family = socket_family(host)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False

