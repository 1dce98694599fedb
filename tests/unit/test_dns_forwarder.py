"""The upstream forwarder (dns/forward.py) against real DNS servers on loopback.

`Upstream` is a small DNS server written here with dnslib on a loopback port (UDP and TCP)
that remembers every query it gets (transport, the forwarder's source port, transaction id,
name) and answers as the test sets it: one A record per name, an rcode, silence, truncation,
replies held back until released, or wrong replies sent first. Each test runs on asyncio's
own loop and on uvloop (the daemon's), since both deliver the ICMP errors.
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest
import uvloop
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord

from kubeshim.dns.cache import UpstreamCache
from kubeshim.dns.forward import Forwarder, UpstreamError
from kubeshim.dns.metrics import DNSMetrics
from tests.ports import free_dns_port, free_port


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


def address_of(name: str) -> str:
    """The address the upstream gives `name` unless the test set another."""
    return str(IPv4Address(0xC6120000 | zlib.crc32(name.encode()) & 0xFFFF))  # 198.18.x.y


@dataclass
class Seen:
    tcp: bool
    port: int  # the forwarder's source port
    qid: int
    name: str


class Upstream(asyncio.DatagramProtocol):
    """A DNS server on 127.0.0.1 (UDP and TCP on one port).

    Answers by name: `big.*` truncated over UDP and 60 records over TCP, `badtcp.*` truncated
    over UDP and with a wrong id over TCP, `mismatch.*` first a reply with a wrong id and one
    with another question, `held.*` only when `release()` is called; anything else one A
    record (`addresses`, else `address_of`). `rcode` answers everything with that rcode,
    `silent` answers nothing.
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.addresses: dict[str, str] = {}
        self.ttl = 60
        self.rcode: int | None = None
        self.silent = False
        self.on_query: Callable[[], object] = lambda: None
        self.held: list[tuple[bytes, Any]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Upstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # a UDP port whose TCP twin is free too
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=("127.0.0.1", port))
            self.port = transport.get_extra_info("sockname")[1]
            try:
                self.server = await asyncio.start_server(self._tcp, "127.0.0.1", self.port)
                return self
            except OSError:
                transport.close()
                if port:
                    raise
        raise OSError("no loopback port free for both UDP and TCP")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def names(self, tcp: bool = False) -> list[str]:
        return [s.name for s in self.seen if s.tcp == tcp]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def reply(self, query: DNSRecord, tcp: bool) -> DNSRecord:
        name = str(query.q.qname).rstrip(".")
        reply = query.reply()
        if self.rcode is not None:
            reply.header.rcode = self.rcode
        elif name.startswith(("big.", "badtcp.")) and not tcp:
            reply.header.tc = 1
        elif name.startswith("big."):
            for i in range(60):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(f"192.0.2.{i}"), ttl=self.ttl))
        elif name.startswith("nx."):
            reply.header.rcode = RCODE.NXDOMAIN
            soa = SOA("ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, 30))
            reply.add_auth(RR("example.", QTYPE.SOA, rdata=soa, ttl=300))
        else:
            address = self.addresses.get(name, address_of(name))
            reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=self.ttl))
        if name.startswith("badtcp.") and tcp:
            reply.header.id ^= 1
        return reply

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).rstrip(".")
        self.seen.append(Seen(False, addr[1], query.header.id, name))
        self.on_query()
        if self.silent:
            return
        assert self.transport is not None
        reply = self.reply(query, tcp=False)
        if name.startswith("mismatch."):
            wrong_id = self.reply(query, tcp=False)
            wrong_id.header.id ^= 0x8000
            wrong_id.rr[0].rdata = A("192.0.2.66")
            other = DNSRecord.question("other." + name)
            other.header.id = query.header.id
            wrong_question = other.reply()
            wrong_question.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.67")))
            self.transport.sendto(wrong_id.pack(), addr)
            self.transport.sendto(wrong_question.pack(), addr)
        if name.startswith("held."):
            self.held.append((reply.pack(), addr))
            return
        self.transport.sendto(reply.pack(), addr)

    def release(self) -> None:
        assert self.transport is not None
        for packet, addr in self.held:
            self.transport.sendto(packet, addr)
        self.held.clear()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            query = DNSRecord.parse(await reader.readexactly(size))
            port = writer.get_extra_info("peername")[1]
            self.seen.append(Seen(True, port, query.header.id, str(query.q.qname).rstrip(".")))
            packet = self.reply(query, tcp=True).pack()
            writer.write(len(packet).to_bytes(2, "big") + packet)
            await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    """The upstreams a test starts (see `start`), stopped afterwards."""
    started: list[Upstream] = []
    yield started
    for up in started:
        up.stop()


async def start(started: list[Upstream], count: int = 1) -> list[Upstream]:
    for _ in range(count):
        started.append(await Upstream().start())
    return started[-count:]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def forwarder(addresses: list[tuple[str, int]], timeout: float = 2.0, sockets: int = 8,
              deadline: float = 5.0, cache: UpstreamCache | None = None,
              clock: Callable[[], float] = time.monotonic) -> Forwarder:
    cache = UpstreamCache(1000, 1000) if cache is None else cache  # an empty cache is falsy
    return Forwarder(addresses, timeout, cache, DNSMetrics(),
                     sockets=sockets, deadline=deadline, clock=clock)


@pytest.fixture
def closed() -> Iterator[tuple[str, int]]:
    """A loopback port nobody listens on: queries there get ICMP port unreachable. Free for
    TCP too, so that an upstream can be started there later."""
    yield ("127.0.0.1", free_dns_port())


def q(name: str, qtype: str = "A") -> Any:
    return DNSRecord.question(name, qtype).q


def answers(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


# --- answers, failover ------------------------------------------------------------------------


async def test_answer_from_the_upstream_with_edns_and_the_question_repeated(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address])
    try:
        reply = await fwd.resolve(q("www.example"), do=False)
        assert answers(reply) == [address_of("www.example")]
        assert str(reply.q.qname) == "www.example."
        assert up.names() == ["www.example"]
        stats = fwd.metrics.forward[f"127.0.0.1:{up.port}"]
        assert (stats.requests, stats.failures, stats.rcodes) == (1, 0, {RCODE.NOERROR: 1})
    finally:
        fwd.close()


async def test_icmp_port_unreachable_moves_to_the_next_upstream_without_waiting(
        upstreams: list[Upstream], closed: tuple[str, int]) -> None:
    (up,) = await start(upstreams)
    # A timeout far beyond the test's own bound: only the ICMP error can move on in time.
    fwd = forwarder([closed, up.address], timeout=60, deadline=60, sockets=1)
    try:
        names = [f"n{i}.example" for i in range(5)]
        replies = await asyncio.wait_for(
            asyncio.gather(*(fwd.resolve(q(n), do=False) for n in names)), 10)
        assert [answers(r) for r in replies] == [[address_of(n)] for n in names]
        assert sorted(up.names()) == names
        dead = fwd.metrics.forward[f"127.0.0.1:{closed[1]}"]
        assert dead.requests == 5 and dead.failures == 5
        # The failed socket is closed; the next query to that upstream gets a fresh one.
        assert fwd.descriptors() == 1
    finally:
        fwd.close()


async def test_every_upstream_refused_is_an_upstream_error_naming_the_icmp_error(
        closed: tuple[str, int]) -> None:
    other = ("127.0.0.1", free_port(kind=socket.SOCK_DGRAM))
    fwd = forwarder([closed, other], timeout=60, deadline=60)
    try:
        with pytest.raises(UpstreamError, match="ConnectionRefusedError"):
            await asyncio.wait_for(fwd.resolve(q("www.example"), do=False), 10)
        assert fwd.descriptors() == 0
    finally:
        fwd.close()


async def test_an_upstream_that_comes_back_answers_the_next_query(
        upstreams: list[Upstream], closed: tuple[str, int]) -> None:
    fwd = forwarder([closed], timeout=60, deadline=60)
    try:
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(fwd.resolve(q("early.example"), do=False), 10)
        assert fwd.descriptors() == 0  # the socket that got the error is closed
        upstreams.append(await Upstream().start(port=closed[1]))
        reply = await fwd.resolve(q("late.example"), do=False)
        assert answers(reply) == [address_of("late.example")]
    finally:
        fwd.close()


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR])
async def test_a_failing_rcode_moves_to_the_next_upstream(
        upstreams: list[Upstream], rcode: int) -> None:
    first, second = await start(upstreams, 2)
    first.rcode = rcode
    fwd = forwarder([first.address, second.address])
    try:
        reply = await fwd.resolve(q("www.example"), do=False)
        assert reply.header.rcode == RCODE.NOERROR
        assert answers(reply) == [address_of("www.example")]
        assert first.names() == second.names() == ["www.example"]
        assert fwd.metrics.forward[f"127.0.0.1:{first.port}"].rcodes == {rcode: 1}
        # When the last one fails that way too, the error names it.
        second.rcode = rcode
        with pytest.raises(UpstreamError, match=f"{second.port}: {RCODE.get(rcode)}"):
            await fwd.resolve(q("other.example"), do=False)
    finally:
        fwd.close()


async def test_nxdomain_is_an_answer_not_a_failure(upstreams: list[Upstream]) -> None:
    first, second = await start(upstreams, 2)
    fwd = forwarder([first.address, second.address])
    try:
        reply = await fwd.resolve(q("nx.example"), do=False)
        assert reply.header.rcode == RCODE.NXDOMAIN and reply.auth[0].rtype == QTYPE.SOA
        assert first.names() == ["nx.example"] and second.names() == []
    finally:
        fwd.close()


async def test_a_silent_upstream_times_out_then_the_next_answers(
        upstreams: list[Upstream]) -> None:
    silent, good = await start(upstreams, 2)
    silent.silent = True
    fwd = forwarder([silent.address, good.address], timeout=0.3)
    try:
        reply = await fwd.resolve(q("www.example"), do=False)
        assert answers(reply) == [address_of("www.example")]
        stats = fwd.metrics.forward[f"127.0.0.1:{silent.port}"]
        assert (stats.requests, stats.failures) == (1, 1)
    finally:
        fwd.close()


async def test_the_forward_deadline_stops_the_walk_through_upstreams(
        upstreams: list[Upstream]) -> None:
    ups = await start(upstreams, 3)
    clock = Clock()  # the forwarder's clock, moved on by 0.3 s whenever an upstream is asked
    for up in ups:
        up.rcode = RCODE.SERVFAIL
        up.on_query = lambda: setattr(clock, "now", clock.now + 0.3)
    fwd = forwarder([up.address for up in ups], deadline=0.5, clock=clock)
    try:
        # Asked at 0 and 0.3; at 0.6 the deadline has passed: the third is never asked.
        with pytest.raises(UpstreamError, match="SERVFAIL \\(forward deadline reached\\)"):
            await fwd.resolve(q("www.example"), do=False)
        assert [len(up.seen) for up in ups] == [1, 1, 0]
    finally:
        fwd.close()


async def test_no_upstreams_is_an_upstream_error() -> None:
    fwd = forwarder([])
    with pytest.raises(UpstreamError, match="no upstream servers configured"):
        await fwd.resolve(q("www.example"), do=False)


# --- truncation --------------------------------------------------------------------------------


async def test_a_truncated_reply_is_asked_again_over_tcp(upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address])
    try:
        reply = await fwd.resolve(q("big.example"), do=False)
        assert not reply.header.tc and len(reply.rr) == 60
        assert up.names() == ["big.example"] and up.names(tcp=True) == ["big.example"]
        # The TCP query carries its own random id, not the UDP one.
        udp, tcp = up.seen
        assert (udp.tcp, tcp.tcp) == (False, True)
    finally:
        fwd.close()


async def test_a_tcp_reply_to_another_query_moves_to_the_next_upstream(
        upstreams: list[Upstream]) -> None:
    first, second = await start(upstreams, 2)
    fwd = forwarder([first.address, second.address])
    try:
        # Both answer truncated over UDP and with a wrong id over TCP: nothing that matches
        # anywhere is an error, never a wrong answer.
        with pytest.raises(UpstreamError, match="ValueError upstream TCP reply does not match"):
            await fwd.resolve(q("badtcp.example"), do=False)
        assert first.names(tcp=True) == second.names(tcp=True) == ["badtcp.example"]
    finally:
        fwd.close()


# --- spoofing (RFC 5452) -----------------------------------------------------------------------


async def test_replies_with_another_id_or_question_are_ignored(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address])
    try:
        reply = await fwd.resolve(q("mismatch.example"), do=False)
        assert answers(reply) == [address_of("mismatch.example")]
    finally:
        fwd.close()


async def test_a_reply_from_another_address_never_reaches_the_query(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address])
    try:
        pending = asyncio.create_task(fwd.resolve(q("held.example"), do=False))
        while not up.seen:
            await asyncio.sleep(0.01)
        (seen,) = up.seen
        # A forged reply, right id and question, from another port of the same host.
        forged = DNSRecord.question("held.example")
        forged.header.id = seen.qid
        forged = forged.reply()
        forged.add_answer(RR("held.example", QTYPE.A, rdata=A("192.0.2.99")))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.sendto(forged.pack(), ("127.0.0.1", seen.port))
        await asyncio.sleep(0.1)
        assert not pending.done()
        up.release()
        assert answers(await pending) == [address_of("held.example")]
    finally:
        fwd.close()


# --- the socket pool ---------------------------------------------------------------------------


async def test_a_flood_of_names_holds_a_bounded_pool_and_every_reply_finds_its_query(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address], sockets=3)
    try:
        names = [f"held.{i}.example" for i in range(60)]
        tasks = [asyncio.create_task(fwd.resolve(q(n), do=False)) for n in names]
        while len(up.seen) < len(names):
            await asyncio.sleep(0.01)
        assert fwd.descriptors() == 3
        assert len({s.port for s in up.seen}) == 3
        for port in {s.port for s in up.seen}:  # ids in flight are unique per socket
            ids = [s.qid for s in up.seen if s.port == port]
            assert len(set(ids)) == len(ids)
        up.release()
        replies = await asyncio.gather(*tasks)
        assert [answers(r) for r in replies] == [[address_of(n)] for n in names]
    finally:
        fwd.close()


async def test_sockets_are_retired_after_256_queries_and_ids_are_random(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address], sockets=1)
    try:
        for i in range(600):
            await fwd.resolve(q(f"n{i}.example"), do=False)
        runs: list[list[int]] = []  # consecutive queries from one source port
        for s in up.seen:
            if runs and runs[-1][0] == s.port:
                runs[-1].append(s.port)
            else:
                runs.append([s.port])
        assert [len(r) for r in runs] == [256, 256, 88]
        assert fwd.descriptors() == 1  # the worn-out sockets are closed
        ids = [s.qid for s in up.seen]
        assert len(set(ids)) > 570  # 600 draws of 16 bits: a handful of repeats at most
        assert sum(b - a == 1 for a, b in zip(ids, ids[1:], strict=False)) < 5  # no counter
    finally:
        fwd.close()


async def test_upstreams_replaced_close_the_removed_pools(upstreams: list[Upstream]) -> None:
    first, second = await start(upstreams, 2)
    fwd = forwarder([first.address, second.address], sockets=2)
    try:
        first.rcode = RCODE.SERVFAIL
        await fwd.resolve(q("a.example"), do=False)
        assert fwd.descriptors() == 2  # one socket to each
        fwd.upstreams = [second.address]
        assert fwd.upstreams == [second.address] and fwd.descriptors() == 1
        await fwd.resolve(q("b.example"), do=False)
        assert first.names() == ["a.example"] and second.names() == ["a.example", "b.example"]
    finally:
        fwd.close()


# --- cache, shared exchanges, serve-stale ------------------------------------------------------


async def test_answers_come_from_the_cache_until_their_ttl_runs_out(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    clock = Clock()
    fwd = forwarder([up.address], cache=UpstreamCache(100, 100, clock=clock))
    try:
        await fwd.resolve(q("www.example"), do=False)
        clock.now += 20
        reply = await fwd.resolve(q("WWW.Example"), do=False)
        assert reply.rr[0].ttl == 40
        # The DO bit and the type are part of the question: asked again.
        await fwd.resolve(q("www.example"), do=True)
        await fwd.resolve(q("www.example", "AAAA"), do=False)
        assert len(up.seen) == 3
        clock.now += 41
        await fwd.resolve(q("www.example"), do=False)
        assert len(up.seen) == 4
    finally:
        fwd.close()


async def test_identical_questions_in_flight_share_one_exchange(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    fwd = forwarder([up.address])
    try:
        tasks = [asyncio.create_task(fwd.resolve(q("held.example"), do=False))
                 for _ in range(5)]
        while not up.seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        up.release()
        replies = await asyncio.gather(*tasks)
        assert {tuple(answers(r)) for r in replies} == {(address_of("held.example"),)}
        assert len(up.seen) == 1
    finally:
        fwd.close()


async def test_an_expired_answer_is_served_stale_only_after_the_upstream_failed(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    clock = Clock()  # the cache's and the forwarder's (failure recheck timer)
    cache = UpstreamCache(100, 100, clock=clock, stale_ttl=30, stale_max=600)
    fwd = forwarder([up.address], timeout=0.3, cache=cache, clock=clock)
    try:
        up.addresses["www.example"] = "192.0.2.1"
        await fwd.resolve(q("www.example"), do=False)
        # Expired, upstream answering: the upstream's new answer, not the stale one.
        clock.now += 61
        up.addresses["www.example"] = "192.0.2.2"
        reply = await fwd.resolve(q("www.example"), do=False)
        assert answers(reply) == ["192.0.2.2"] and cache.stale_hits == 0
        # Expired again, upstream failing: the stale answer with the stale TTL (RFC 8767 4).
        clock.now += 61
        up.rcode = RCODE.SERVFAIL
        reply = await fwd.resolve(q("www.example"), do=False)
        assert answers(reply) == ["192.0.2.2"] and reply.rr[0].ttl == 30
        assert len(up.seen) == 3
        # Within the failure recheck timer (30 s, RFC 8767 5) stale without asking again.
        clock.now += 29
        up.rcode, up.addresses["www.example"] = None, "192.0.2.3"
        reply = await fwd.resolve(q("www.example"), do=False)
        assert answers(reply) == ["192.0.2.2"] and cache.stale_hits == 2
        assert len(up.seen) == 3
        # After it, the upstream first again.
        clock.now += 2
        assert answers(await fwd.resolve(q("www.example"), do=False)) == ["192.0.2.3"]
        # Past stale_max: nothing to serve.
        clock.now += 61 + 600
        up.silent = True
        with pytest.raises(UpstreamError, match="TimeoutError"):
            await fwd.resolve(q("www.example"), do=False)
    finally:
        fwd.close()


async def test_a_slow_upstream_gets_the_stale_answer_out_and_still_refreshes_the_cache(
        upstreams: list[Upstream]) -> None:
    (up,) = await start(upstreams)
    clock = Clock()
    cache = UpstreamCache(100, 100, clock=clock, stale_ttl=30, stale_max=600)
    fwd = Forwarder([up.address], 2.0, cache, DNSMetrics(), client_timeout=0.2)
    try:
        up.addresses["held.example"] = "192.0.2.1"
        first = asyncio.create_task(fwd.resolve(q("held.example"), do=False))
        while not up.seen:
            await asyncio.sleep(0.01)
        up.release()
        assert answers(await first) == ["192.0.2.1"]
        clock.now += 61
        up.addresses["held.example"] = "192.0.2.2"
        # No answer within the client response timer: stale (RFC 8767 5) ...
        reply = await fwd.resolve(q("held.example"), do=False)
        assert answers(reply) == ["192.0.2.1"] and reply.rr[0].ttl == 30
        # ... while the exchange goes on: its answer refreshes the cache.
        up.release()
        while cache.get(UpstreamCache.key("held.example", QTYPE.A, 1, False)) is None:
            await asyncio.sleep(0.01)
        assert answers(await fwd.resolve(q("held.example"), do=False)) == ["192.0.2.2"]
        assert len(up.seen) == 2
    finally:
        fwd.close()
