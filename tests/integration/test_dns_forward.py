"""Forwarding to real upstream servers on loopback: negative and positive caching counted at the
upstream, TTLs counted down, failover, SERVFAIL when all fail, TCP retry after truncation, and
cluster names never leaving the server.

The upstream is a small counting DNS server (UDP through asyncio-dgram, TCP through asyncio
streams) that answers by name: `nx-*` and names with a dot inside a label NXDOMAIN with an
SOA, `big.*` truncated over UDP and whole over TCP, `fail.*` SERVFAIL, anything else one A
record.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncio_dgram
import pytest
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord
from test_dns_server import dig, service  # same directory (rootdir-relative imports)

from kubeshim.cluster.state import ClusterState
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

NEGATIVE_TTL = 2  # the SOA minimum the upstream hands out


class CountingUpstream:
    def __init__(self) -> None:
        self.udp: Counter[str] = Counter()
        self.tcp: Counter[str] = Counter()
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stream: asyncio_dgram.DatagramServer | None = None
        self._server: asyncio.Server | None = None

    def answer(self, query: DNSRecord, tcp: bool) -> bytes:
        name = str(query.q.qname).rstrip(".").lower()
        reply = query.reply()
        dotted = any(b"." in label for label in query.q.qname.label)  # `www\\.example`
        if name.startswith("nx-") or dotted:
            reply.header.rcode = RCODE.NXDOMAIN
            soa = SOA("ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, NEGATIVE_TTL))
            reply.add_auth(RR("example.", QTYPE.SOA, rdata=soa, ttl=300))
        elif name.startswith("fail."):
            reply.header.rcode = RCODE.SERVFAIL
        elif name.startswith("big.") and not tcp:
            reply.header.tc = 1
        elif name.startswith("big."):
            for i in range(60):
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(f"192.0.2.{i}"), ttl=60))
        else:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        return bytes(reply.pack())

    async def start(self) -> None:
        for _ in range(20):  # a UDP port whose TCP twin is free too
            self._stream = await asyncio_dgram.bind(("127.0.0.1", 0))
            self.port = self._stream.sockname[1]
            try:
                self._server = await asyncio.start_server(self._tcp_client, "127.0.0.1", self.port)
                break
            except OSError:
                self._stream.close()
        else:
            raise OSError("no loopback port free for both UDP and TCP")
        self._tasks.append(asyncio.create_task(self._serve_udp()))

    async def _serve_udp(self) -> None:
        assert self._stream is not None
        while True:
            data, addr = await self._stream.recv()
            query = DNSRecord.parse(data)
            self.udp[str(query.q.qname).rstrip(".").lower()] += 1
            await self._stream.send(self.answer(query, tcp=False), addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            query = DNSRecord.parse(await reader.readexactly(size))
            self.tcp[str(query.q.qname).rstrip(".").lower()] += 1
            packet = self.answer(query, tcp=True)
            writer.write(len(packet).to_bytes(2, "big") + packet)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._stream is not None:
            self._stream.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def closed_port() -> int:
    """A loopback UDP port nobody listens on (queries there get ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def upstream() -> AsyncIterator[CountingUpstream]:
    up = CountingUpstream()
    await up.start()
    yield up
    await up.stop()


async def start_server(
    upstreams: list[tuple[str, int]], synced: bool = True, services: list[Any] | None = None
) -> DNSServer:
    state = ClusterState()
    if synced:
        state.replace("Service", services or [])
        state.replace("EndpointSlice", [])
    config = DNSConfig(binds=[("127.0.0.1", 0)], upstreams=upstreams, upstream_timeout=0.5)
    srv = DNSServer(state, config)
    await srv.start()
    return srv


@pytest.fixture
async def server(upstream: CountingUpstream) -> AsyncIterator[DNSServer]:
    srv = await start_server([("127.0.0.1", upstream.port)])
    yield srv
    await srv.stop()


def port_of(server: DNSServer) -> int:
    return server.addresses[0][1]


async def test_nxdomain_cached_for_the_soa_minimum(
    server: DNSServer, upstream: CountingUpstream
) -> None:
    p = port_of(server)
    name = "nx-missing.example"
    first = await dig(p, name)
    assert first.status == "NXDOMAIN" and "aa" not in first.flags
    assert first.authority[0][2] == "SOA"
    for _ in range(3):
        assert (await dig(p, name)).status == "NXDOMAIN"
    assert upstream.udp[name] == 1  # within min(SOA TTL 300, minimum 2): from the cache
    await asyncio.sleep(NEGATIVE_TTL + 0.2)
    assert (await dig(p, name)).status == "NXDOMAIN"
    assert upstream.udp[name] == 2  # expired: asked again


async def test_a_dot_inside_a_label_never_shares_the_real_names_cache_entry(
    server: DNSServer, upstream: CountingUpstream
) -> None:
    p = port_of(server)
    # One label `www.example` (NXDOMAIN upstream, cached negatively for every client)...
    r = await dig(p, "www\\.example")
    assert r.status == "NXDOMAIN"
    # ...leaves the two-label name it spells as text alone: asked upstream, answered.
    r = await dig(p, "www.example")
    assert r.status == "NOERROR" and r.answer == [("www.example.", 60, "A", "192.0.2.1")]
    assert upstream.udp["www.example"] == 2  # both went upstream: two cache entries
    r = await dig(p, "WWW.Example")  # case still shares the entry
    assert r.answer == [("WWW.Example.", 60, "A", "192.0.2.1")]
    assert upstream.udp["www.example"] == 2


async def test_positive_answers_cached_with_ttl_counting_down(
    server: DNSServer, upstream: CountingUpstream
) -> None:
    p = port_of(server)
    first = await dig(p, "www.example")
    assert first.answer == [("www.example.", 60, "A", "192.0.2.1")] and "ra" in first.flags
    await asyncio.sleep(1.1)
    again = await dig(p, "WWW.example")
    assert again.answer[0][0] == "WWW.example." and again.answer[0][1] in (58, 59)
    assert upstream.udp["www.example"] == 1
    # The repeat was served from the packed relayed reply, not re-packed from the record.
    assert len(server.relayed) == 1 and server.upstream_cache.hits["success"] >= 1


async def test_truncated_upstream_answer_is_fetched_over_tcp(
    server: DNSServer, upstream: CountingUpstream
) -> None:
    p = port_of(server)
    r = await dig(p, "+bufsize=4096", "big.example")
    assert len(r.answer) == 60 and "tc" not in r.flags
    assert upstream.udp["big.example"] == 1 and upstream.tcp["big.example"] == 1
    # A client without EDNS cannot take 60 records over UDP: the 30 that fit 512 bytes and TC,
    # then dig asks us over TCP.
    r = await dig(p, "+noedns", "+ignore", "big.example")
    assert "tc" in r.flags and len(r.answer) == 30
    r = await dig(p, "+noedns", "big.example")
    assert len(r.answer) == 60
    assert upstream.tcp["big.example"] == 1  # served from our cache


async def test_failover_to_the_next_upstream(upstream: CountingUpstream) -> None:
    srv = await start_server([("127.0.0.1", closed_port()), ("127.0.0.1", upstream.port)])
    try:
        r = await dig(port_of(srv), "www.example")
        assert r.answer == [("www.example.", 60, "A", "192.0.2.1")]
        r = await dig(port_of(srv), "fail.example")  # first SERVFAILs here too: next one...
        assert r.status == "SERVFAIL"  # ...also fails, so the client gets SERVFAIL
        assert upstream.udp["fail.example"] == 1
    finally:
        await srv.stop()


async def test_servfail_when_every_upstream_fails() -> None:
    srv = await start_server([("127.0.0.1", closed_port()), ("127.0.0.1", closed_port())])
    try:
        r = await dig(port_of(srv), "www.example")
        assert r.status == "SERVFAIL" and not r.answer
        stats = srv.metrics.forward
        assert sum(s.failures for s in stats.values()) == 2
    finally:
        await srv.stop()


async def test_silent_upstream_times_out_then_next(upstream: CountingUpstream) -> None:
    silent = await asyncio_dgram.bind(("127.0.0.1", 0))  # receives, never answers
    try:
        srv = await start_server([("127.0.0.1", silent.sockname[1]), ("127.0.0.1", upstream.port)])
        try:
            r = await dig(port_of(srv), "www.example")
            assert r.answer and upstream.udp["www.example"] == 1
        finally:
            await srv.stop()
    finally:
        silent.close()


async def test_cluster_names_are_never_forwarded(upstream: CountingUpstream) -> None:
    unsynced = await start_server([("127.0.0.1", upstream.port)], synced=False)
    synced = await start_server([("127.0.0.1", upstream.port)])
    try:
        r = await dig(port_of(unsynced), "web.default.svc.cluster.local")
        assert r.status == "SERVFAIL"
        r = await dig(port_of(synced), "web.default.svc.cluster.local")
        assert r.status == "NXDOMAIN" and "aa" in r.flags
        r = await dig(port_of(synced), "-x", "10.96.0.1")  # not a cluster address: forwarded
        assert not upstream.udp["web.default.svc.cluster.local"]
        assert upstream.udp["1.0.96.10.in-addr.arpa"] == 1
    finally:
        await unsynced.stop()
        await synced.stop()


async def test_external_name_target_is_chased(upstream: CountingUpstream) -> None:
    services = [
        service("ext", ip=None, type="ExternalName", externalName="www.example", ports=[]),
        service(
            "alias",
            ip=None,
            type="ExternalName",
            externalName="web.default.svc.cluster.local",
            ports=[],
        ),
        service("web", ip="10.96.0.20"),
    ]
    srv = await start_server([("127.0.0.1", upstream.port)], services=services)
    try:
        p = port_of(srv)
        r = await dig(p, "ext.default.svc.cluster.local", "A")
        assert r.answer == [
            ("ext.default.svc.cluster.local.", 30, "CNAME", "www.example."),
            ("www.example.", 60, "A", "192.0.2.1"),
        ]
        assert "aa" in r.flags
        r = await dig(p, "alias.default.svc.cluster.local", "A")
        assert r.answer == [
            ("alias.default.svc.cluster.local.", 30, "CNAME", "web.default.svc.cluster.local."),
            ("web.default.svc.cluster.local.", 30, "A", "10.96.0.20"),
        ]
        r = await dig(p, "ext.default.svc.cluster.local", "CNAME")  # asked for the CNAME itself
        assert r.answer == [("ext.default.svc.cluster.local.", 30, "CNAME", "www.example.")]
        assert upstream.udp["www.example"] == 1
    finally:
        await srv.stop()


async def test_queries_beyond_the_forwarding_limit_are_refused() -> None:
    silent = await asyncio_dgram.bind(("127.0.0.1", 0))  # holds every forwarded query
    state = ClusterState()
    state.replace("Service", [])
    state.replace("EndpointSlice", [])
    config = DNSConfig(
        binds=[("127.0.0.1", 0)],
        upstreams=[("127.0.0.1", silent.sockname[1])],
        upstream_timeout=1.0,
        max_concurrent_forwards=2,
    )
    srv = DNSServer(state, config)
    await srv.start()
    try:
        p = port_of(srv)
        slow = [asyncio.create_task(dig(p, f"slow{i}.example")) for i in range(2)]
        await asyncio.sleep(0.3)
        r = await dig(p, "third.example")
        assert r.status == "REFUSED"
        assert (await dig(p, "web.default.svc.cluster.local")).status == "NXDOMAIN"  # cluster ok
        assert [x.status for x in await asyncio.gather(*slow)] == ["SERVFAIL", "SERVFAIL"]
    finally:
        await srv.stop()
        silent.close()


async def test_own_address_is_never_an_upstream(upstream: CountingUpstream) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    state = ClusterState()
    state.replace("Service", [])
    state.replace("EndpointSlice", [])
    # resolv.conf naming this very server (same port on a wildcard bind) must not loop.
    config = DNSConfig(
        binds=[("0.0.0.0", port)],
        upstreams=[("127.0.0.1", port), ("127.0.0.1", upstream.port)],
        upstream_timeout=0.5,
    )
    srv = DNSServer(state, config)
    await srv.start()
    try:
        assert srv.forwarder.upstreams == [("127.0.0.1", upstream.port)]
        r = await dig(port, "www.example")
        assert r.answer == [("www.example.", 60, "A", "192.0.2.1")]
    finally:
        await srv.stop()
