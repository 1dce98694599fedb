"""The client gate without sockets: the allow-list (REFUSED outside it) and response rate
limiting per client prefix and response (RRL's identical responses) with slip, on an
injected clock."""

from __future__ import annotations

import socket

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord

from kubeshim.dns.gate import (
    DROP,
    ERROR,
    NODATA,
    NXDOMAIN,
    POSITIVE,
    SEND,
    SLIP,
    ClientGate,
    response_token,
    slipped_reply,
)


def packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def reply(name: str, qtype: str = "A", rcode: int = RCODE.NOERROR, answer: bool = True,
          zone: str | None = None) -> bytes:
    """A packed reply as the server sends it: an answer, NODATA/NXDOMAIN with the SOA of
    `zone`, or an error."""
    r = DNSRecord.question(name, qtype).reply()
    r.header.rcode = rcode
    if rcode == RCODE.NOERROR and answer:
        r.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.1"), ttl=30))
    if zone is not None:
        soa = SOA(f"ns.{zone}", f"hostmaster.{zone}", (1, 7200, 1800, 86400, 30))
        r.add_auth(RR(zone, QTYPE.SOA, rdata=soa, ttl=30))
    return bytes(r.pack())


WEB = reply("web.default.svc.cluster.local")


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
    assert gate.rate_limit(packed("203.0.113.1"), WEB) == SEND


def test_rate_limit_per_prefix_bursts_a_second_then_slips_every_second_reply() -> None:
    clock = Clock()
    gate = ClientGate(rate=10, slip=2, ipv4_prefix=24, clock=clock)
    a, same_prefix, other = packed("10.0.0.1"), packed("10.0.0.2"), packed("10.0.1.1")
    assert [gate.rate_limit(a, WEB) for _ in range(5)] == [SEND] * 5
    assert [gate.rate_limit(same_prefix, WEB) for _ in range(5)] == [SEND] * 5  # one per /24
    over = [gate.rate_limit(a, WEB) for _ in range(6)]
    assert over == [DROP, SLIP, DROP, SLIP, DROP, SLIP]
    assert gate.rate_limit(other, WEB) == SEND  # another prefix has its own bucket
    clock.now += 0.5  # refilled at 10/s: five more
    assert [gate.rate_limit(a, WEB) for _ in range(5)] == [SEND] * 5
    assert gate.rate_limit(a, WEB) != SEND
    assert (gate.slipped, gate.dropped) == (3, 4)


def test_slip_zero_drops_everything_over_the_limit() -> None:
    gate = ClientGate(rate=1, slip=0, clock=Clock())
    assert gate.rate_limit(packed("fd00::1"), WEB) == SEND
    assert {gate.rate_limit(packed("fd00::2"), WEB) for _ in range(10)} == {DROP}  # same /56


def test_many_different_names_are_not_limited_one_repeated_answer_is() -> None:
    gate = ClientGate(rate=5, slip=2, clock=Clock())
    client = packed("10.244.1.5")
    names = [reply(f"svc{i}.default.svc.cluster.local") for i in range(200)]
    assert {gate.rate_limit(client, r) for r in names} == {SEND}
    assert {gate.rate_limit(client, reply("web.example", "AAAA")) for _ in range(5)} == {SEND}
    assert [gate.rate_limit(client, WEB) for _ in range(9)] == [SEND] * 5 + [DROP, SLIP] * 2
    # The same name of another type is another response.
    assert gate.rate_limit(client, reply("web.default.svc.cluster.local", "AAAA")) == SEND


@pytest.mark.parametrize(
    ("kind", "first", "second"),
    [
        ("NXDOMAIN: random names of one zone are one response",
         reply("x1.default.svc.cluster.local", rcode=RCODE.NXDOMAIN, zone="cluster.local"),
         reply("y2.other.svc.cluster.local", rcode=RCODE.NXDOMAIN, zone="Cluster.Local")),
        ("NODATA: one name, whatever the type",
         reply("web.example", "MX", answer=False, zone="example"),
         reply("WEB.example", "TXT", answer=False, zone="example")),
        ("errors: one response whatever the name",
         reply("a.example", rcode=RCODE.SERVFAIL), reply("b.example", "MX", rcode=RCODE.REFUSED)),
        ("case does not make a response different", reply("Web.Example"), reply("wEB.eXAMPLE")),
    ],
)
def test_identical_responses_share_a_bucket(kind: str, first: bytes, second: bytes) -> None:
    gate = ClientGate(rate=2, slip=0, clock=Clock())
    client = packed("10.244.1.5")
    assert [gate.rate_limit(client, r) for r in (first, second, first)] == [SEND, SEND, DROP]
    assert response_token(first) == response_token(second)


def test_response_tokens_name_the_kind_and_what_is_identical() -> None:
    web = b"\x03web\x07example\x00"
    assert response_token(reply("Web.Example")) == POSITIVE + web + b"\x00\x01\x00\x01"
    assert response_token(reply("web.example", answer=False)) == NODATA + web
    nx = reply("nope.sub.example", rcode=RCODE.NXDOMAIN, zone="sub.example")
    assert response_token(nx) == NXDOMAIN + b"\x03sub\x07example\x00"  # compressed owner, read
    assert response_token(reply("a.example", rcode=RCODE.NXDOMAIN)) == NXDOMAIN  # no SOA
    assert response_token(reply("a.example", rcode=RCODE.FORMERR)) == ERROR
    assert response_token(b"\x00" * 5) == ERROR
    # A malformed authority section (cut short) is still one NXDOMAIN bucket, not an error.
    assert response_token(nx[: 12 + 18 + 4 + 1]) == NXDOMAIN


def test_all_per_second_caps_a_flood_that_rotates_names() -> None:
    gate = ClientGate(rate=100, all_rate=10, slip=0, clock=Clock())
    client = packed("10.244.1.5")
    out = [gate.rate_limit(client, reply(f"n{i}.example")) for i in range(20)]
    assert out == [SEND] * 10 + [DROP] * 10
    assert gate.rate_limit(packed("10.244.2.5"), WEB) == SEND  # another prefix


def test_a_flood_of_distinct_names_does_not_reset_a_limited_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("kubeshim.dns.gate._MEMO", 64)
    clock = Clock()
    gate = ClientGate(rate=2, slip=0, clock=clock)
    victim = packed("10.244.1.5")
    assert [gate.rate_limit(victim, WEB) for _ in range(3)] == [SEND, SEND, DROP]
    clock.now += 2.0  # the burst refills: 2 more
    gate.rate_limit(victim, WEB)
    gate.rate_limit(victim, WEB)
    for i in range(200):  # other answers fill the store several times over
        gate.rate_limit(packed("10.244.9.9"), reply(f"n{i}.example"))
        clock.now += 0.001
    assert gate.rate_limit(victim, WEB) == DROP  # still limited: its bucket was kept


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
