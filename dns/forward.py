"""The upstream forwarder: names outside the cluster go to the node's resolvers.

Owns the exchange with upstreams and its sockets:

- Each upstream has a small pool of connected UDP sockets (`upstream_sockets`, shared by every
  forwarded query, told apart by transaction id), so a flood of names holds a bounded number of
  descriptors. Ids are random and unique per socket, source ports are the kernel's random
  ephemeral ports, and a socket is retired after `_USES` queries so ports keep changing
  (RFC 5452 sections 9.2 and 10). A reply must come from the upstream (the socket is
  connected), carry a pending id and repeat the question (RFC 5452 section 9.1).
- Because the sockets are connected, an ICMP error (port or host unreachable) reaches us as a
  socket error: every query waiting on that socket moves to the next upstream at once instead
  of waiting out the timeout.
- A truncated UDP reply is retried over TCP (RFC 7766 5); a timeout, a network error or a
  SERVFAIL/REFUSED/NOTIMP/FORMERR reply moves to the next upstream, until the overall
  `forward_deadline` (the client's patience) runs out.
- Answers go through `UpstreamCache`; identical questions in flight share one exchange, which
  runs as a task of its own so it outlives the client that started it.
- RFC 8767 serve-stale (section 5's timers), for a question whose expired answer the cache
  still holds (at most `serve_stale_max` past expiry, the maximum stale timer): the upstream
  is always asked first; if no fresh answer has come within `client_timeout` (the client
  response timer, 1.8 s) or every upstream failed, the stale answer is given (TTL 30 s,
  section 4) while the exchange goes on and refreshes the cache when it answers. After a
  failed refresh the name is answered stale without asking upstream again for `recheck`
  seconds (the failure recheck timer, 30 s). Without a stale answer the client waits for the
  exchange; when it fails, UpstreamError (SERVFAIL).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable

from dnslib import EDNS0, RCODE, DNSHeader, DNSQuestion, DNSRecord

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import join_host_port
from kubeshim.dns.cache import UpstreamCache, UpstreamKey
from kubeshim.dns.metrics import DNSMetrics

log = get_logger("dns")

# What we advertise upstream: big enough for most answers without fragmentation (DNS flag day 2020).
UPSTREAM_UDP_SIZE = 1232
_RETRY_NEXT = frozenset({RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR})
_USES = 256  # queries one upstream socket carries before it is replaced by a fresh port
MAX_FAILED = 10000  # remembered failed names (failure recheck timer) before they are forgotten


class UpstreamError(Exception):
    """Every upstream failed for a question."""


class _Channel(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream; queries in flight keyed by transaction id."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future[DNSRecord], DNSQuestion]] = {}
        self.uses = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            return
        waiting = self.pending.get(data[0] << 8 | data[1])
        if waiting is None:
            return  # late or spoofed: not a query in flight here
        future, question = waiting
        reply = _matching_reply(data, question)
        if reply is not None and not future.done():
            future.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable for this upstream: it cannot answer any query waiting here.
        self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("upstream socket closed"))

    def _fail(self, exc: Exception) -> None:
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    def new_id(self) -> int:
        while True:
            qid = secrets.randbits(16)
            if qid not in self.pending:
                return qid


class _Upstream:
    """A bounded pool of channels to one upstream address."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host = host
        self.port = port
        self.size = size
        self.name = join_host_port(host, port)
        self.channels: list[_Channel] = []
        self._opening = asyncio.Lock()

    def _live(self) -> list[_Channel]:
        return [c for c in self.channels if not c.closed and c.uses < _USES]

    async def channel(self) -> _Channel:
        """A random live channel once the pool is full; until then a new one (one at a time,
        so the pool never exceeds its size)."""
        live = self._live()
        if len(live) >= self.size:
            return random.choice(live)
        async with self._opening:
            live = self._live()
            if len(live) >= self.size:
                return random.choice(live)
            _transport, channel = await asyncio.get_running_loop().create_datagram_endpoint(
                _Channel, remote_addr=(self.host, self.port)
            )
            self.channels.append(channel)
            return channel

    def release(self, channel: _Channel) -> None:
        """Close a worn-out or failed channel once nothing waits on it."""
        if channel.pending or not (channel.uses >= _USES or channel.closed):
            return
        if channel.transport is not None:
            channel.transport.close()
        channel.closed = True
        if channel in self.channels:
            self.channels.remove(channel)

    async def query(self, question: DNSQuestion, do: bool) -> DNSRecord:
        channel = await self.channel()
        channel.uses += 1
        qid = channel.new_id()
        future: asyncio.Future[DNSRecord] = asyncio.get_running_loop().create_future()
        channel.pending[qid] = (future, question)
        try:
            assert channel.transport is not None
            channel.transport.sendto(_query_packet(qid, question, do))
            return await future
        except OSError:
            channel.closed = True  # an ICMP error: the next query gets a fresh socket
            raise
        finally:
            del channel.pending[qid]
            self.release(channel)

    def close(self) -> None:
        for channel in self.channels:
            if channel.transport is not None:
                channel.transport.close()
        self.channels.clear()


class Forwarder:
    def __init__(
        self,
        upstreams: list[tuple[str, int]],
        timeout: float,
        cache: UpstreamCache,
        metrics: DNSMetrics,
        sockets: int = 8,
        deadline: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client_timeout: float = 1.8,
        recheck: float = 30.0,
        max_refreshes: int = 1000,
    ) -> None:
        self.timeout = timeout
        self.deadline = deadline
        self.cache = cache
        self.metrics = metrics
        self.sockets = sockets
        self.clock = clock
        self.client_timeout = client_timeout  # RFC 8767 5: the client response timer
        self.recheck = recheck  # RFC 8767 5: the failure recheck timer
        # Exchanges in flight beyond which a stale answer is given without a refresh (clients
        # that already left do not hold server tasks, so this bounds their exchanges).
        self.max_refreshes = max_refreshes
        self._pools: dict[tuple[str, int], _Upstream] = {}
        self.upstreams = list(upstreams)
        self._inflight: dict[UpstreamKey, asyncio.Task[DNSRecord]] = {}
        self._failed: dict[UpstreamKey, float] = {}  # when the last exchange for a key failed

    @property
    def upstreams(self) -> list[tuple[str, int]]:
        return [(u.host, u.port) for u in self._order]

    @upstreams.setter
    def upstreams(self, addresses: list[tuple[str, int]]) -> None:
        keep = {a: self._pools.get(a) or _Upstream(*a, self.sockets) for a in addresses}
        for address, pool in self._pools.items():
            if address not in keep:
                pool.close()
        self._pools = {a: p for a, p in keep.items() if p is not None}
        self._order = [self._pools[a] for a in addresses]

    def descriptors(self) -> int:
        """Upstream UDP sockets open now (bounded by upstreams x upstream_sockets)."""
        return sum(len(p.channels) for p in self._pools.values())

    async def resolve(self, question: DNSQuestion, do: bool) -> DNSRecord:
        """The upstream reply to `question`: from the cache, from an exchange, or stale from
        the cache (see the module's serve-stale rules); UpstreamError if none.

        The returned record may be shared with the cache: read it, do not change it.
        """
        key = UpstreamCache.key(question.qname, question.qtype, question.qclass, do)
        cache = self.cache
        cached = cache.get(key)
        if cached is not None:
            return cached
        has_stale = cache.has_stale(key)
        exchange = self._inflight.get(key)
        if exchange is None:
            failed_at = self._failed.get(key)
            rechecking = failed_at is not None and self.clock() - failed_at < self.recheck
            if has_stale and (rechecking or len(self._inflight) >= self.max_refreshes):
                return self._stale(key)
            exchange = self._start(key, question, do)
        try:
            if has_stale:
                # Upstream first; the stale answer once the client response timer runs out.
                done, _ = await asyncio.wait({exchange}, timeout=self.client_timeout)
                if not done:
                    return self._stale(key)
            return await asyncio.shield(exchange)
        except UpstreamError:
            if has_stale:
                return self._stale(key)
            raise

    def _stale(self, key: UpstreamKey) -> DNSRecord:
        stale = self.cache.stale(key)
        if stale is None:  # expired past serve_stale_max meanwhile
            raise UpstreamError("no fresh answer in time and none stale")
        return stale

    def _start(self, key: UpstreamKey, question: DNSQuestion, do: bool) -> asyncio.Task[DNSRecord]:
        """The exchange for `key` as a task of its own: it keeps going (and refreshes the
        cache) after a client was answered stale."""
        task = asyncio.get_running_loop().create_task(self._refresh(key, question, do))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return task

    async def _refresh(self, key: UpstreamKey, question: DNSQuestion, do: bool) -> DNSRecord:
        try:
            reply = await self._exchange(question, do)
        except UpstreamError:
            if len(self._failed) >= MAX_FAILED:
                self._failed.clear()
            self._failed[key] = self.clock()
            raise
        self._failed.pop(key, None)
        self.cache.put(key, reply)
        return reply

    def _finished(self, key: UpstreamKey, task: asyncio.Task[DNSRecord]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waited

    async def _exchange(self, question: DNSQuestion, do: bool) -> DNSRecord:
        if not self._order:
            raise UpstreamError("no upstream servers configured")
        last_error = "no answer"
        give_up = self.clock() + self.deadline
        for upstream in self._order:
            left = give_up - self.clock()
            if left <= 0:
                last_error += " (forward deadline reached)"
                break
            stats = self.metrics.upstream(upstream.name)
            stats.requests += 1
            started = time.perf_counter()
            try:
                reply = await asyncio.wait_for(
                    upstream.query(question, do), min(self.timeout, left)
                )
                if reply.header.tc:
                    # RFC 7766 5: a truncated UDP answer is retried over TCP.
                    reply = await asyncio.wait_for(
                        _tcp(upstream.host, upstream.port, question, do), self.timeout
                    )
            except (OSError, TimeoutError, ValueError, EOFError) as e:
                stats.failures += 1
                last_error = f"{upstream.name}: {type(e).__name__} {e}".strip()
                continue
            finally:
                stats.duration.observe(time.perf_counter() - started)
            rcode = reply.header.rcode
            stats.rcodes[rcode] = stats.rcodes.get(rcode, 0) + 1
            if rcode in _RETRY_NEXT:
                last_error = f"{upstream.name}: {RCODE.get(rcode)}"
                continue
            return reply
        raise UpstreamError(last_error)

    def close(self) -> list[asyncio.Task[DNSRecord]]:
        """Close the sockets and cancel the exchanges in flight; returns them (to await)."""
        exchanges = list(self._inflight.values())
        for task in exchanges:
            task.cancel()
        for pool in self._pools.values():
            pool.close()
        return exchanges


def _query_packet(qid: int, question: DNSQuestion, do: bool) -> bytes:
    query = DNSRecord(DNSHeader(id=qid, rd=1), q=question)
    query.add_ar(EDNS0(udp_len=UPSTREAM_UDP_SIZE, flags="do" if do else ""))
    return bytes(query.pack())


async def _tcp(host: str, port: int, question: DNSQuestion, do: bool) -> DNSRecord:
    packet = _query_packet(secrets.randbits(16), question, do)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(packet).to_bytes(2, "big") + packet)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise EOFError("upstream closed the TCP connection early") from e
    finally:
        writer.close()
    reply = _matching_reply(data, question) if data[:2] == packet[:2] else None
    if reply is None:
        raise ValueError("upstream TCP reply does not match the query")
    return reply


def _matching_reply(data: bytes, question: DNSQuestion) -> DNSRecord | None:
    """The reply if it repeats our question (same labels, type, class); else None."""
    try:
        reply = DNSRecord.parse(data)
    except Exception:
        return None
    if len(reply.questions) != 1:
        return None
    q = reply.q
    if q.qtype != question.qtype or q.qclass != question.qclass or q.qname != question.qname:
        return None
    return reply
