"""The client gate without sockets: the allow-list (REFUSED outside it) and response rate
limiting per client prefix with slip, on an injected clock."""

from __future__ import annotations

import socket

from dnslib import EDNS0, DNSRecord

from kubeshim.dns.gate import DROP, SEND, SLIP, ClientGate, slipped_reply


def packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_allow_list_admits_only_configured_cidrs_of_each_family() -> None:
    gate = ClientGate(["10.244.0.0/16", "192.168.1.10/32", "fd00:10:244::/56"])
    assert gate.active
    assert gate.admits(packed("10.244.3.7")) and gate.admits(packed("192.168.1.10"))
    assert gate.admits(packed("fd00:10:244::5"))
    assert not gate.admits(packed("192.168.1.11"))
    assert not gate.admits(packed("8.8.8.8")) and not gate.admits(packed("fd00:10:245::1"))
    assert gate.refused == 3
    assert gate.admits(packed("10.244.3.7"))  # remembered: same answer


def test_no_allow_list_and_no_rate_is_inactive() -> None:
    gate = ClientGate()
    assert not gate.active and gate.admits(packed("203.0.113.1"))
    assert gate.rate_limit(packed("203.0.113.1")) == SEND


def test_rate_limit_per_prefix_bursts_a_second_then_slips_every_second_reply() -> None:
    clock = Clock()
    gate = ClientGate(rate=10, slip=2, ipv4_prefix=24, clock=clock)
    a, same_prefix, other = packed("10.0.0.1"), packed("10.0.0.2"), packed("10.0.1.1")
    assert [gate.rate_limit(a) for _ in range(5)] == [SEND] * 5
    assert [gate.rate_limit(same_prefix) for _ in range(5)] == [SEND] * 5  # one bucket per /24
    over = [gate.rate_limit(a) for _ in range(6)]
    assert over == [DROP, SLIP, DROP, SLIP, DROP, SLIP]
    assert gate.rate_limit(other) == SEND  # another prefix has its own bucket
    clock.now += 0.5  # refilled at 10/s: five more
    assert [gate.rate_limit(a) for _ in range(5)] == [SEND] * 5
    assert gate.rate_limit(a) != SEND
    assert (gate.slipped, gate.dropped) == (3, 4)


def test_slip_zero_drops_everything_over_the_limit() -> None:
    gate = ClientGate(rate=1, slip=0, clock=Clock())
    assert gate.rate_limit(packed("fd00::1")) == SEND
    assert {gate.rate_limit(packed("fd00::2")) for _ in range(10)} == {DROP}  # same /56


def test_slipped_reply_is_an_empty_truncated_answer_no_larger_than_the_query() -> None:
    q = DNSRecord.question("big.default.svc.cluster.local")
    q.header.id = 4242
    q.add_ar(EDNS0(udp_len=4096))
    query = bytes(q.pack())
    out = slipped_reply(query)
    assert out is not None and len(out) <= len(query)
    reply = DNSRecord.parse(out)
    assert reply.header.id == 4242 and reply.header.qr and reply.header.tc and reply.header.rd
    assert not reply.rr and str(reply.q.qname) == "big.default.svc.cluster.local."
    assert slipped_reply(query[:11]) is None
