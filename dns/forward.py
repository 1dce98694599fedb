"""The upstream forwarder: names outside the cluster go to the node's resolvers.

Owns the exchange with upstreams: a UDP query per attempt from a fresh socket (random source
port and transaction id), retried over TCP when the reply is truncated, failing over to the next
upstream on a timeout, a network error or a SERVFAIL/REFUSED/NOTIMP/FORMERR reply; when every
upstream fails the caller answers SERVFAIL. Answers go through `UpstreamCache`; identical
questions in flight share one exchange.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import asyncio_dgram
from dnslib import EDNS0, RCODE, DNSHeader, DNSQuestion, DNSRecord

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import join_host_port
from kubeshim.dns.cache import UpstreamCache, UpstreamKey
from kubeshim.dns.metrics import DNSMetrics

log = get_logger("dns")

# What we advertise upstream: big enough for most answers without fragmentation (DNS flag day 2020).
UPSTREAM_UDP_SIZE = 1232
_RETRY_NEXT = frozenset({RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR})


class UpstreamError(Exception):
    """Every upstream failed for a question."""


class Forwarder:
    def __init__(
        self,
        upstreams: list[tuple[str, int]],
        timeout: float,
        cache: UpstreamCache,
        metrics: DNSMetrics,
    ) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.cache = cache
        self.metrics = metrics
        self._inflight: dict[UpstreamKey, asyncio.Future[DNSRecord]] = {}

    async def resolve(self, question: DNSQuestion, do: bool) -> DNSRecord:
        """The upstream reply to `question` (from the cache or an exchange); UpstreamError if none.

        The returned record may be shared with the cache: read it, do not change it.
        """
        key = UpstreamCache.key(str(question.qname), question.qtype, question.qclass, do)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[DNSRecord] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._exchange(question, do)
            self.cache.put(key, reply)
            future.set_result(reply)
            return reply
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else UpstreamError("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._inflight[key]

    async def _exchange(self, question: DNSQuestion, do: bool) -> DNSRecord:
        if not self.upstreams:
            raise UpstreamError("no upstream servers configured")
        last_error = "no answer"
        for host, port in self.upstreams:
            address = join_host_port(host, port)
            stats = self.metrics.upstream(address)
            qid = secrets.randbits(16)
            query = DNSRecord(DNSHeader(id=qid, rd=1), q=question)
            query.add_ar(EDNS0(udp_len=UPSTREAM_UDP_SIZE, flags="do" if do else ""))
            packet = query.pack()
            stats.requests += 1
            started = time.perf_counter()
            try:
                reply = await asyncio.wait_for(
                    self._udp(host, port, packet, question), self.timeout
                )
                if reply.header.tc:
                    # RFC 7766 5: a truncated UDP answer is retried over TCP.
                    reply = await asyncio.wait_for(
                        self._tcp(host, port, packet, question), self.timeout
                    )
            except (OSError, TimeoutError, ValueError, EOFError) as e:
                stats.failures += 1
                last_error = f"{address}: {type(e).__name__} {e}".strip()
                continue
            finally:
                stats.duration.observe(time.perf_counter() - started)
            rcode = reply.header.rcode
            stats.rcodes[rcode] = stats.rcodes.get(rcode, 0) + 1
            if rcode in _RETRY_NEXT:
                last_error = f"{address}: {RCODE.get(rcode)}"
                continue
            return reply
        raise UpstreamError(last_error)

    async def _udp(self, host: str, port: int, packet: bytes, question: DNSQuestion) -> DNSRecord:
        stream = await asyncio_dgram.connect((host, port))
        try:
            await stream.send(packet)
            while True:
                data, _ = await stream.recv()
                reply = _matching_reply(data, packet, question)
                if reply is not None:
                    return reply
                # Not ours (stale or spoofed): keep waiting until the timeout.
        finally:
            stream.close()

    async def _tcp(self, host: str, port: int, packet: bytes, question: DNSQuestion) -> DNSRecord:
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
        reply = _matching_reply(data, packet, question)
        if reply is None:
            raise ValueError("upstream TCP reply does not match the query")
        return reply


def _matching_reply(data: bytes, packet: bytes, question: DNSQuestion) -> DNSRecord | None:
    """The reply if it answers our query (same id, QR set, same question); else None."""
    if len(data) < 12 or data[:2] != packet[:2] or not data[2] & 0x80:
        return None
    try:
        reply = DNSRecord.parse(data)
    except Exception:
        return None
    if len(reply.questions) != 1:
        return None
    q = reply.q
    if q.qtype != question.qtype or q.qclass != question.qclass:
        return None
    if str(q.qname).lower() != str(question.qname).lower():
        return None
    return reply
