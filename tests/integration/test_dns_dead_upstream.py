"""A dead upstream on real sockets: an upstream answering ICMP port unreachable is left at
once (failover or SERVFAIL well under 100 ms, not the 2 s timeout), and a flood of 10,000
names with a dead upstream keeps the server's descriptors bounded while cluster names keep
their correct answers. Also RFC 8767 serve-stale: the upstream is asked first, and a stale
answer comes only when it fails."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from dnslib import DNSRecord
from test_dns_forward import CountingUpstream, closed_port, start_server, upstream  # noqa: F401
from test_dns_server import service

from kubeshim.dns.server import DNSServer

WEB = "web.default.svc.cluster.local"


def query(name: str, qid: int) -> bytes:
    q = DNSRecord.question(name)
    q.header.id = qid
    return bytes(q.pack())


async def ask(port: int, name: str, qid: int = 1) -> tuple[DNSRecord, float]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        started = time.perf_counter()
        await loop.sock_sendall(sock, query(name, qid))
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
        return DNSRecord.parse(data), time.perf_counter() - started
    finally:
        sock.close()


async def serving(upstreams: list[tuple[str, int]]) -> DNSServer:
    srv = await start_server(upstreams, services=[service("web", ip="10.96.0.20")])
    srv.forwarder.timeout = 2.0  # the default: an ICMP error must not wait for it
    return srv


async def test_icmp_unreachable_upstream_is_left_at_once(upstream: CountingUpstream) -> None:  # noqa: F811
    srv = await serving([("127.0.0.1", closed_port()), ("127.0.0.1", upstream.port)])
    try:
        port = srv.addresses[0][1]
        for i in range(5):  # every time, not only the first
            reply, took = await ask(port, f"name{i}.example", i)
            assert str(reply.rr[0].rdata) == "192.0.2.1"
            assert took < 0.1, f"failover took {took * 1000:.0f} ms"
    finally:
        await srv.stop()
    srv = await serving([("127.0.0.1", closed_port())])
    try:
        reply, took = await ask(srv.addresses[0][1], "alone.example")
        assert reply.header.rcode == 2 and took < 0.1  # SERVFAIL at once
    finally:
        await srv.stop()


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_flood_with_dead_upstream_keeps_descriptors_bounded() -> None:
    srv = await serving([("127.0.0.1", closed_port())])
    try:
        port = srv.addresses[0][1]
        before = descriptors()
        loop = asyncio.get_running_loop()
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        flood.setblocking(False)
        flood.connect(("127.0.0.1", port))
        answered: dict[int, int] = {}
        peak = before

        def read() -> None:
            while True:
                try:
                    data = flood.recv(65535)
                except BlockingIOError:
                    return
                answered[data[0] << 8 | data[1]] = data[3] & 0xF

        loop.add_reader(flood.fileno(), read)
        cluster_ok = 0
        try:
            for wave in range(20):
                for i in range(500):
                    qid = wave * 500 + i
                    flood.send(query(f"flood{qid}.example", qid))
                peak = max(peak, descriptors())
                reply, _ = await ask(port, WEB, 60000 + wave)
                if reply.rr and str(reply.rr[0].rdata) == "10.96.0.20":
                    cluster_ok += 1
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 10
            while len(answered) < 10000 and time.monotonic() < deadline:
                peak = max(peak, descriptors())
                await asyncio.sleep(0.05)
        finally:
            loop.remove_reader(flood.fileno())
            flood.close()
        assert cluster_ok == 20  # cluster names answered correctly all along, never NXDOMAIN
        assert len(answered) >= 9900  # a datagram or two may be lost on a full buffer
        assert set(answered.values()) <= {2, 5}  # SERVFAIL, or REFUSED past the forward cap
        # One pool of upstream sockets, whatever the number of names.
        assert peak - before <= srv.config.upstream_sockets + 8, (before, peak)
    finally:
        await srv.stop()


async def test_stale_answer_only_after_the_upstream_fails(upstream: CountingUpstream) -> None:  # noqa: F811
    srv = await serving([("127.0.0.1", upstream.port)])
    try:
        port = srv.addresses[0][1]
        reply, _ = await ask(port, "www.example")
        assert reply.rr[0].ttl == 60 and upstream.udp["www.example"] == 1
        cache = srv.upstream_cache
        cache.clock = lambda: time.monotonic() + 61  # the answer has expired
        srv.relayed.clock = cache.clock
        reply, _ = await ask(port, "www.example", 2)
        assert upstream.udp["www.example"] == 2  # asked upstream first, fresh answer
        assert reply.rr[0].ttl == 60
        await upstream.stop()  # now the upstream is gone (ICMP unreachable)
        cache.clock = lambda: time.monotonic() + 200
        srv.relayed.clock = cache.clock
        reply, took = await ask(port, "www.example", 3)
        assert str(reply.rr[0].rdata) == "192.0.2.1" and reply.rr[0].ttl == 30  # RFC 8767 4
        assert took < 0.5 and cache.stale_hits == 1
        reply, _ = await ask(port, "never.example", 4)
        assert reply.header.rcode == 2  # nothing stale to give: SERVFAIL
    finally:
        await srv.stop()
