"""Not an open resolver, on real sockets: clients outside the allowed CIDRs get REFUSED over
UDP (batched and datagram paths) and TCP, allowed ones are answered, and response rate
limiting answers a flood from one prefix with a bounded number of full replies plus slipped
(empty, TC=1) ones no larger than the queries."""

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
