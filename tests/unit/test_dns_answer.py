"""The server's answer path without sockets: both cache levels, id and case splicing,
invalidation of both levels by a state change, and the full path's refusals."""

from __future__ import annotations

from dnslib import EDNS0, DNSRecord
from test_dns_records import endpoint_slice, service, synced_state

from kubeshim.cluster.state import ClusterState, EventType, WatchEvent
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.handler import ForwardRequest
from kubeshim.dns.server import DNSServer

NAME = "web.default.svc.cluster.local"


def packet(name: str = NAME, qid: int = 1, qtype: str = "A", edns: int | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def reply(server: DNSServer, data: bytes, tcp: bool = False) -> DNSRecord:
    out = server.answer(data, tcp)
    assert isinstance(out, bytes)
    return DNSRecord.parse(out)


def make_server() -> tuple[DNSServer, ClusterState]:
    state = synced_state(
        service("web", ip="10.96.0.20"),
        service("db", ip="None"),
        endpoint_slice("db", [{"addresses": ["10.244.0.5"]}]),
    )
    return DNSServer(state, DNSConfig(binds=[], upstreams=[])), state


def test_exact_repeat_and_case_variant_hit_the_cache_with_their_own_id_and_case() -> None:
    server, _ = make_server()
    first = reply(server, packet(qid=7))
    assert first.header.id == 7 and str(first.rr[0].rdata) == "10.96.0.20"
    assert server.metrics.answer_misses == 1
    again = reply(server, packet(qid=8))  # same bytes after the id: first level
    assert again.header.id == 8 and again.rr == first.rr
    upper = reply(server, packet("WEB.default.SVC.cluster.local", qid=9))  # second level
    assert upper.header.id == 9
    assert str(upper.q.qname) == "WEB.default.SVC.cluster.local."
    assert (
        str(upper.rr[0].rname) == "WEB.default.SVC.cluster.local."
    )  # compressed onto the question
    assert (server.metrics.answer_hits, server.metrics.answer_misses) == (2, 1)
    assert reply(server, packet(qid=10, edns=1232)).ar[0].rclass == 4096  # another shape: miss
    assert server.metrics.answer_misses == 2


def test_a_state_change_clears_both_levels_for_that_service_only() -> None:
    server, state = make_server()
    for data in (
        packet(),
        packet("Web.default.svc.cluster.local"),
        packet("db.default.svc.cluster.local"),
    ):
        reply(server, data)
        reply(server, data)
    state.apply([WatchEvent(EventType.MODIFIED, service("web", ip="10.96.0.21"))])
    assert str(reply(server, packet()).rr[0].rdata) == "10.96.0.21"
    assert str(reply(server, packet("Web.default.svc.cluster.local")).rr[0].rdata) == "10.96.0.21"
    hits = server.metrics.answer_hits
    reply(server, packet("db.default.svc.cluster.local"))
    assert server.metrics.answer_hits == hits + 1


def test_tcp_answers_are_not_truncated_and_outside_names_are_forwarded() -> None:
    big = [{"addresses": [f"10.245.0.{i}"]} for i in range(1, 101)]
    state = synced_state(service("big", ip="None"), endpoint_slice("big", big))
    server = DNSServer(state, DNSConfig(binds=[], upstreams=[]))
    raw = server.answer(packet("big.default.svc.cluster.local"), False)
    assert isinstance(raw, bytes) and len(raw) <= 512
    udp = DNSRecord.parse(raw)
    # Whole records up to 512 bytes (29 A records after the 47-byte question), TC set.
    assert udp.header.tc and len(udp.rr) == 29
    assert [str(rr.rdata) for rr in udp.rr] == [f"10.245.0.{i}" for i in range(1, 30)]
    tcp = reply(server, packet("big.default.svc.cluster.local"), tcp=True)
    assert not tcp.header.tc and len(tcp.rr) == 100
    assert isinstance(server.answer(packet("example.com"), False), ForwardRequest)


def test_dropped_and_refused_packets() -> None:
    server, _ = make_server()
    assert server.answer(b"\x00\x01", False) is None
    response = bytearray(packet())
    response[2] |= 0x80
    assert server.answer(bytes(response), False) is None
    assert server.metrics.dropped == 2
    formerr = server.answer(packet()[:20], False)
    assert isinstance(formerr, bytes) and formerr[3] & 0xF == 1
