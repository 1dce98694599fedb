"""Batched UDP serving (recvmmsg/sendmmsg) on real sockets: many queries in flight from many
clients at once, hits / misses / malformed / forwarded queries mixed in one batch answered byte
for byte as the one-datagram-per-callback path answers them, IPv6, and clients that vanish."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from test_dns_server import synced_state

from kubeshim.dns import batch
from kubeshim.dns.batch import BatchedUDP
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

pytestmark = pytest.mark.skipif(not batch.available(), reason="libc without recvmmsg/sendmmsg")

Z = "cluster.local"
WEB = f"web.default.svc.{Z}"  # ClusterIP 10.96.0.20 (and fd00::20)
DB = f"db.default.svc.{Z}"  # headless: 10.244.0.5, 10.244.0.6 ready


@asynccontextmanager
async def serving(
    udp_batch: bool = True,
    host: str = "127.0.0.1",
    upstreams: list[tuple[str, int]] | None = None,
    zone: str = Z,
    **options: Any,
) -> AsyncIterator[DNSServer]:
    """A DNSServer on an ephemeral port of `host`; other DNSConfig fields from `options`."""
    config = DNSConfig(
        zone=zone, binds=[(host, 0)], upstreams=upstreams or [], udp_batch=udp_batch, **options
    )
    server = DNSServer(synced_state(), config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def batched(server: DNSServer) -> BatchedUDP:
    [udp] = server._udp
    assert isinstance(udp, BatchedUDP)
    return udp


def query(name: str, qid: int, qtype: str = "A", edns: bool = False) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    return bytes(q.pack())


def client(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    return s


async def collect(
    socks: list[socket.socket], expected: int, quiet: float = 0.3, timeout: float = 10
) -> list[list[bytes]]:
    """Replies per socket: until `expected` arrived in all and then `quiet` passed without more."""
    got: list[list[bytes]] = [[] for _ in socks]
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        for s, replies in zip(socks, got, strict=True):
            while True:
                try:
                    replies.append(s.recv(65535))
                    last = time.monotonic()
                except BlockingIOError:
                    break
        if sum(map(len, got)) >= expected and time.monotonic() - last >= quiet:
            break
    return got


def addresses(reply: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


# --- many in flight -------------------------------------------------------------------------


async def burst(
    server: DNSServer, family: int, host: str, clients: int, per_client: int, waves: int
) -> None:
    """`waves` bursts of clients x per_client queries, each burst sent before the server reads."""
    port = server.addresses[0][1]
    names = [(WEB, {"10.96.0.20"}), (DB, {"10.244.0.5", "10.244.0.6"}), (f"x.{Z}", set())]
    for wave in range(waves):
        socks = [client(family) for _ in range(clients)]
        try:
            asked: list[dict[int, str]] = [{} for _ in socks]
            for c, s in enumerate(socks):
                for k in range(per_client):
                    qid = (wave * clients * per_client + c * per_client + k) & 0xFFFF
                    name = names[(c + k) % len(names)][0]
                    # Mixed case (0x20): the reply must echo this client's spelling.
                    asked[c][qid] = name.upper() if k % 2 else name
                    s.sendto(query(asked[c][qid], qid), (host, port))
            got = await collect(socks, clients * per_client, quiet=0.05)
            for c, replies in enumerate(got):
                assert len(replies) == per_client, f"client {c} got {len(replies)} replies"
                for raw in replies:
                    reply = DNSRecord.parse(raw)
                    spelled = asked[c].pop(reply.header.id)
                    expect = dict(names)[spelled.lower()]
                    want = RCODE.NOERROR if expect else RCODE.NXDOMAIN
                    assert reply.header.rcode == want, spelled
                    assert addresses(reply) == expect
                    assert str(reply.q.qname) == spelled + "."
                assert not asked[c], f"client {c}: no reply to ids {sorted(asked[c])}"
        finally:
            for s in socks:
                s.close()


async def test_many_clients_many_queries_in_flight() -> None:
    async with serving() as server:
        await burst(server, socket.AF_INET, "127.0.0.1", clients=16, per_client=8, waves=4)
        udp = batched(server)
        assert udp.largest_batch > 1, "queued datagrams were read one per call"
        assert server.metrics.requests_udp == 16 * 8 * 4


async def test_ipv6_clients_in_batches() -> None:
    async with serving(host="::1") as server:
        await burst(server, socket.AF_INET6, "::1", clients=8, per_client=8, waves=2)
        assert batched(server).largest_batch > 1


async def test_dual_stack_bind_answers_ipv4_clients() -> None:
    async with serving(host="::") as server:
        port = server.addresses[0][1]
        socks = [client() for _ in range(4)]
        try:
            for i, s in enumerate(socks):
                s.sendto(query(WEB, i), ("127.0.0.1", port))
            got = await collect(socks, 4, quiet=0.05)
        finally:
            for s in socks:
                s.close()
        for i, replies in enumerate(got):
            [raw] = replies
            reply = DNSRecord.parse(raw)
            assert reply.header.id == i and addresses(reply) == {"10.96.0.20"}


# --- one batch, every kind of datagram ------------------------------------------------------


def mixed_packets(upstream_zone: str) -> list[tuple[str, bytes]]:
    """(what it is, datagram); drops and slow answers sit between hits in one batch."""
    notimp = bytearray(query(WEB, 7))
    notimp[2] = (notimp[2] & 0x87) | (2 << 3)  # opcode STATUS
    response = bytearray(query(WEB, 8))
    response[2] |= 0x80  # QR: a response, never answered
    formerr = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0) + b"\x03web\x07default"  # cut name
    return [
        ("short", b"\x00\x01\x02"),
        ("hit", query(WEB, 1)),
        ("forwarded", query(f"web.default.svc.{upstream_zone}", 2)),
        ("miss", query(f"db.default.svc.{Z}", 3, "SRV")),
        ("formerr", formerr),
        ("hit-0x20", query(WEB.upper(), 4)),
        ("response", bytes(response)),
        ("notimp", bytes(notimp)),
        ("truncated", query(f"big.default.svc.{Z}", 5)),
        ("edns-miss", query(f"db.default.svc.{Z}", 6, edns=True)),
        ("nxdomain", query(f"nope.default.svc.{Z}", 10)),
        ("hit", query(WEB, 11)),
    ]


async def answers_to_mixed(udp_batch: bool, upstream: tuple[str, int], zone: str) -> tuple:
    async with serving(udp_batch, upstreams=[upstream]) as server:
        # The SOA serial is the second the server started; the two servers compared may
        # start a second apart, so both get the same one.
        server.records._serial = 1
        port = server.addresses[0][1]
        warm = client()
        warm.sendto(query(WEB, 0), ("127.0.0.1", port))
        assert len((await collect([warm], 1, quiet=0))[0]) == 1
        warm.close()
        packets = mixed_packets(zone)
        socks = [client() for _ in packets]
        try:
            for s, (_kind, data) in zip(socks, packets, strict=True):
                s.sendto(data, ("127.0.0.1", port))
            got = await collect(socks, len(packets) - 2)  # two are dropped
        finally:
            for s in socks:
                s.close()
        m = server.metrics
        counters = (m.requests_udp, list(m.rcodes), m.dropped, server.metrics.answer_hits)
        if udp_batch:
            assert batched(server).largest_batch > 1
        return {kind: replies for (kind, _), replies in zip(packets, got, strict=True)}, counters


async def test_mixed_batch_answers_as_the_datagram_path() -> None:
    zone = "upstream.test"
    async with serving(zone=zone) as upstream:
        up = upstream.addresses[0]
        batched_replies, batched_counters = await answers_to_mixed(True, up, zone)
        plain_replies, plain_counters = await answers_to_mixed(False, up, zone)
    assert batched_replies == plain_replies
    assert batched_counters == plain_counters

    r = batched_replies
    assert r["short"] == [] and r["response"] == []
    rcode = {k: DNSRecord.parse(v[0]).header.rcode for k, v in r.items() if v}
    assert rcode == {
        "hit": RCODE.NOERROR,
        "forwarded": RCODE.NOERROR,
        "miss": RCODE.NOERROR,
        "formerr": RCODE.FORMERR,
        "hit-0x20": RCODE.NOERROR,
        "notimp": RCODE.NOTIMP,
        "truncated": RCODE.NOERROR,
        "edns-miss": RCODE.NOERROR,
        "nxdomain": RCODE.NXDOMAIN,
    }
    assert all(len(v) == 1 for k, v in r.items() if k not in ("short", "response"))
    assert addresses(DNSRecord.parse(r["forwarded"][0])) == {"10.96.0.20"}  # from upstream
    hit = DNSRecord.parse(r["hit-0x20"][0])
    assert str(hit.q.qname) == WEB.upper() + "." and hit.header.id == 4
    assert DNSRecord.parse(r["truncated"][0]).header.tc == 1
    assert len(DNSRecord.parse(r["miss"][0]).rr) == 2  # SRV per ready endpoint


# --- clients that vanish ----------------------------------------------------------------------


async def test_vanished_client_does_not_cost_others_their_answers() -> None:
    zone = "upstream.test"
    async with serving(zone=zone) as upstream, serving(upstreams=[upstream.addresses[0]]) as server:
        port = server.addresses[0][1]
        gone, stays = client(), client()
        for i in range(20):
            gone.sendto(query(WEB if i % 2 else f"web.default.svc.{zone}", i), ("127.0.0.1", port))
            stays.sendto(query(WEB, 100 + i), ("127.0.0.1", port))
        gone.close()  # before the server has read a byte: its replies meet a closed port
        got = await collect([stays], 20)
        assert sorted(DNSRecord.parse(raw).header.id for raw in got[0]) == list(range(100, 120))
        # The server keeps answering, on the batched and the forwarded path alike.
        again = client()
        try:
            again.sendto(query(WEB, 1), ("127.0.0.1", port))
            again.sendto(query(f"web.default.svc.{zone}", 2), ("127.0.0.1", port))
            [replies] = await collect([again], 2)
            assert sorted(DNSRecord.parse(raw).header.id for raw in replies) == [1, 2]
        finally:
            again.close()
            stays.close()
        assert server.metrics.requests_udp == 42
