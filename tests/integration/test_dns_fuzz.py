"""Malformed input: thousands of broken DNS packets (scapy-built with bad counts, bad labels,
compression loops, truncated sections; plus random bytes) over UDP and TCP. Every reply must
be a well-formed response to the packet's id, nothing may crash, and the server must still
answer correctly afterwards."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
from collections.abc import AsyncIterator

import asyncio_dgram
import pytest
from dnslib import DNSRecord
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRROPT
from test_dns_server import dig, synced_state

from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

Z = "cluster.local"


def broken_packets(rng: random.Random, count: int) -> list[bytes]:
    names = [f"web.default.svc.{Z}", f"db.default.svc.{Z}", "example.com", f"x.{Z}"]
    out: list[bytes] = []
    while len(out) < count:
        kind = rng.randrange(9)
        qd = DNSQR(qname=rng.choice(names), qtype=rng.choice([1, 28, 33, 12, 16, 255, 65]))
        base = DNS(id=rng.randrange(65536), rd=1, qd=qd)
        if kind == 0:  # counts that lie
            pkt = DNS(
                id=rng.randrange(65536),
                qd=qd,
                qdcount=rng.randrange(65536),
                ancount=rng.randrange(65536),
                nscount=rng.randrange(4),
                arcount=rng.randrange(65536),
            )
            out.append(bytes(pkt))
        elif kind == 1:  # truncated anywhere
            raw = bytes(DNS(id=rng.randrange(65536), qd=qd, ar=DNSRROPT(rclass=4096)))
            out.append(raw[: rng.randrange(len(raw))])
        elif kind == 2:  # compression loops and pointers past the end
            header = struct.pack("!6H", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
            target = rng.choice([12, 13, 0x3FFF, rng.randrange(12, 40)])
            loop = bytes([0xC0 | target >> 8, target & 0xFF])
            out.append(
                header
                + rng.choice([loop, b"\x03abc" + loop, b"\x01a\xc0\x0e"])
                + b"\x00\x01\x00\x01"
            )
        elif kind == 3:  # label lengths beyond 63 and names beyond 255
            header = struct.pack("!6H", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
            label = bytes([rng.choice([64, 100, 0x80, 0x40 | 1])]) + b"a" * rng.randrange(10)
            long = b"".join(b"\x3f" + b"x" * 63 for _ in range(5))
            out.append(header + rng.choice([label, long]) + b"\x00\x00\x01\x00\x01")
        elif kind == 4:  # responses, other opcodes, several questions
            pkt = base.copy()
            choice = rng.randrange(3)
            if choice == 0:
                pkt.qr = 1
            elif choice == 1:
                pkt.opcode = rng.choice([1, 2, 4, 5, 15])
            else:
                pkt.qd = DNSQR(qname=names[0]) / DNSQR(qname=names[1])
            out.append(bytes(pkt))
        elif kind == 5:  # bogus records in other sections, several OPTs, a bad EDNS version
            pkt = base.copy()
            pkt.an = DNSRR(rrname=names[0], rdata="10.0.0.1")
            pkt.ar = rng.choice(
                [
                    DNSRROPT() / DNSRROPT(),
                    DNSRROPT(version=rng.randrange(1, 256)),
                    DNSRR(rrname=".", type=41, rdlen=500),
                ]
            )
            out.append(bytes(pkt))
        elif kind == 6:  # flipped bytes in a good query
            raw = bytearray(bytes(base))
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            out.append(bytes(raw))
        elif kind == 7:  # random bytes
            out.append(rng.randbytes(rng.randrange(0, 600)))
        else:  # trailing garbage after a good query
            out.append(bytes(base) + rng.randbytes(rng.randrange(1, 50)))
    return out


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    srv = DNSServer(synced_state(), DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[]))
    await srv.start()
    yield srv
    await srv.stop()


def check_reply(query: bytes, reply: bytes) -> None:
    assert len(reply) >= 12
    assert reply[:2] == query[:2], "reply to another id"
    assert reply[2] & 0x80, "reply without QR"
    DNSRecord.parse(reply)  # well formed


async def test_thousands_of_broken_udp_packets(server: DNSServer) -> None:
    port = server.addresses[0][1]
    packets = broken_packets(random.Random(1234), 4000)
    client = await asyncio_dgram.connect(("127.0.0.1", port))
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # keep every reply
    replies: list[bytes] = []

    async def receive() -> None:
        while True:
            data, _ = await client.recv()
            replies.append(data)

    receiver = asyncio.create_task(receive())
    try:
        by_id: dict[bytes, list[bytes]] = {}
        for i, packet in enumerate(packets):
            by_id.setdefault(packet[:2], []).append(packet)
            await client.send(packet)
            if i % 50 == 0:
                await asyncio.sleep(0.001)  # let the server keep up; this is not a load test
        # Every packet with a header and QR=0 gets exactly one reply; the rest none.
        expected = sum(1 for p in packets if len(p) >= 12 and not p[2] & 0x80)
        for _ in range(200):
            if len(replies) >= expected:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and nothing more arrives
    finally:
        receiver.cancel()
        client.close()
    assert len(replies) == expected
    for reply in replies:
        assert reply[:2] in by_id
        check_reply(by_id[reply[:2]][0], reply)
    # Responses and packets shorter than a header are dropped, never answered.
    # (An empty datagram may not even reach the protocol, so those are not counted.)
    assert (
        len(packets) - expected
        >= server.metrics.dropped
        >= sum(1 for p in packets if p) - expected
        > 0
    )
    assert server.metrics.rcodes[1] > 0 and server.metrics.rcodes[4] > 0  # FORMERR, NOTIMP
    assert server.handler.internal_errors == 0  # every packet was judged, none hit a bug
    r = await dig(port, f"web.default.svc.{Z}")
    assert r.answer == [(f"web.default.svc.{Z}.", 30, "A", "10.96.0.20")]
    r = await dig(port, "+tcp", f"db.default.svc.{Z}")
    assert len(r.answer) == 2


async def test_broken_tcp_frames_do_not_hurt_other_connections(server: DNSServer) -> None:
    port = server.addresses[0][1]
    rng = random.Random(99)
    packets = broken_packets(rng, 300)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for packet in packets:
        writer.write(len(packet).to_bytes(2, "big") + packet)
    # A frame that announces more than it sends, then hangs up.
    writer.write(b"\xff\xff" + b"\x00" * 10)
    await writer.drain()
    writer.close()
    r = await dig(port, "+tcp", f"web.default.svc.{Z}")
    assert r.answer == [(f"web.default.svc.{Z}.", 30, "A", "10.96.0.20")]
    r = await dig(port, f"nope.default.svc.{Z}")
    assert r.status == "NXDOMAIN"
    assert server.handler.internal_errors == 0
