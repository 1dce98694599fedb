"""Not an open resolver, on real sockets: clients outside the allowed CIDRs get REFUSED over
UDP (batched and datagram paths) and TCP, allowed ones are answered, and response rate
limiting answers a flood of one large answer with a bounded number of full replies plus
slipped (empty, TC=1) ones no larger than the queries, while the same client asking as many
different names at once gets every answer, and a flood of NXDOMAINs for random names of the
zone is limited as one response."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest
from dnslib import EDNS0, DNSRecord
from test_dns_batch import serving
from test_dns_server import dig

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

WEB = "web.default.svc.cluster.local"
BIG = "big.default.svc.cluster.local"


@pytest.mark.parametrize("udp_batch", [True, False])
async def test_clients_outside_the_allowed_cidrs_are_refused(udp_batch: bool) -> None:
    async with serving(allowed_clients=["10.244.0.0/16"], udp_batch=udp_batch) as server:
        port = server.addresses[0][1]
        for transport in ("+notcp", "+tcp"):
            r = await dig(port, transport, WEB)
            assert r.status == "REFUSED" and not r.answer, transport
            r = await dig(port, transport, "example.org")  # no recursion for them either
            assert r.status == "REFUSED", transport
    allowed = ["10.244.0.0/16", "127.0.0.0/8"]
    async with serving(allowed_clients=allowed, udp_batch=udp_batch) as server:
        r = await dig(server.addresses[0][1], WEB)
        assert r.status == "NOERROR" and r.answer


def burst(port: int, queries: list[bytes]) -> list[DNSRecord]:
    """Send every query at once from one socket; the replies that came back."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)
    for q in queries:
        sock.send(q)
    replies = []
    try:
        while len(replies) < len(queries):
            replies.append(DNSRecord.parse(sock.recv(65535)))
    except TimeoutError:
        pass
    sock.close()
    return replies


@pytest.mark.parametrize("udp_batch", [True, False])
async def test_rate_limit_counts_identical_responses_not_every_reply(udp_batch: bool) -> None:
    def ask(name: str, qid: int) -> bytes:
        q = DNSRecord.question(name)
        q.header.id = qid
        return bytes(q.pack())

    async with serving(rrl_responses_per_second=20, rrl_slip=2, udp_batch=udp_batch) as server:
        port = server.addresses[0][1]
        # 200 different names (pod records) at once: nothing limited.
        names = [f"10-244-{i // 100}-{i % 100}.default.pod.cluster.local" for i in range(200)]
        replies = await asyncio.to_thread(burst, port, [ask(n, i) for i, n in enumerate(names)])
        assert len(replies) == 200 and all(r.rr and not r.header.tc for r in replies)
        # The same client, 200 times the same name: a second's burst, then limited.
        replies = await asyncio.to_thread(burst, port, [ask(WEB, i) for i in range(200)])
        full = sum(1 for r in replies if r.rr)
        assert 20 <= full <= 40 and len(replies) < 200
        assert all(r.header.tc for r in replies if not r.rr)
        # Random names of the zone that do not exist: one response (the zone's NXDOMAIN).
        nx = [ask(f"nx{i}.default.svc.cluster.local", i) for i in range(200)]
        replies = await asyncio.to_thread(burst, port, nx)
        nxdomain = sum(1 for r in replies if r.header.rcode == 3 and not r.header.tc)
        assert 20 <= nxdomain <= 40 and len(replies) < 200
        # Other names still answered meanwhile, and TCP is never limited.
        r = await dig(port, "10-244-9-9.default.pod.cluster.local")
        assert r.status == "NOERROR" and r.answer
        r = await dig(port, "+tcp", WEB)
        assert r.status == "NOERROR" and r.answer


async def test_rate_limit_bounds_full_replies_and_slips_small_ones() -> None:
    q = DNSRecord.question(BIG)
    q.add_ar(EDNS0(udp_len=4096))
    query = bytes(q.pack())
    async with serving(rrl_responses_per_second=20, rrl_slip=2) as server:
        port = server.addresses[0][1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        for i in range(400):
            sock.send(i.to_bytes(2, "big") + query[2:])
        await asyncio.sleep(0.5)
        full = slipped = received = 0
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            received += len(data)
            reply = DNSRecord.parse(data)
            if reply.rr:
                full += 1
            else:
                assert reply.header.tc and len(data) <= len(query)
                slipped += 1
        sock.close()
        # A burst of one second's worth (20, plus what refilled meanwhile), then half slipped.
        assert 20 <= full <= 40
        assert slipped >= (400 - full) // 2 - 1
        amplification = received / (400 * len(query))
        assert amplification < 5, amplification  # ~70x without the limit
        # TCP is not limited: the client told to retry gets the whole answer.
        r = await dig(port, "+tcp", BIG)
        assert len(r.answer) == 300
