"""The wire-answer cache and the upstream cache (dns/cache.py) with an injected clock."""

from __future__ import annotations

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSLabel, DNSRecord

from kubeshim.dns.cache import AnswerCache, RelayedAnswers, UpstreamCache
from kubeshim.dns.wire import question_key, ttl_offsets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream_reply(
    name: str,
    rcode: int = RCODE.NOERROR,
    ttl: int = 300,
    soa_ttl: int = 900,
    minimum: int = 60,
    soa: bool = True,
) -> DNSRecord:
    reply = DNSRecord(DNSHeader(qr=1, rcode=rcode), q=DNSRecord.question(name).q)
    if rcode == RCODE.NOERROR and ttl:
        reply.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.1"), ttl=ttl))
    elif soa:
        times = (1, 2, 3, 4, minimum)
        reply.add_auth(
            RR("example.", QTYPE.SOA, ttl=soa_ttl, rdata=SOA("ns.example.", "h.example.", times))
        )
    return reply


def test_answer_cache_drops_exactly_the_dependent_answers() -> None:
    cache = AnswerCache(100)
    cache.put(b"web", b"p1", 0, (("svc", "default", "web"),))
    cache.put(b"web-aaaa", b"p2", 0, (("svc", "default", "web"),))
    cache.put(b"db", b"p3", 0, (("svc", "default", "db"),))
    cache.put(b"version", b"p4", 0, ())
    assert cache.invalidate([("svc", "default", "web")]) == 2
    assert set(cache.entries) == {b"db", b"version"}
    assert cache.invalidate([("svc", "default", "web")]) == 0


def test_answer_cache_clears_when_full() -> None:
    cache = AnswerCache(3)
    for i in range(3):
        cache.put(bytes([i]), b"p", 0, (("svc", "ns", str(i)),))
    cache.put(b"new", b"p", 0, ())
    assert list(cache.entries) == [b"new"] and cache.clears == 1
    assert cache.invalidate([("svc", "ns", "0")]) == 0


def test_positive_answer_kept_for_its_ttl_and_counted_down() -> None:
    clock = Clock()
    cache = UpstreamCache(10, 10, clock=clock)
    key = cache.key("Example.com.", QTYPE.A, 1, False)
    assert key == ((b"example", b"com"), QTYPE.A, 1, False)
    assert cache.put(key, upstream_reply("example.com", ttl=300)) == 300
    clock.now += 100.5
    hit = cache.get(key)
    assert hit is not None and hit.rr[0].ttl == 200
    clock.now += 199.4
    assert cache.get(key) is not None
    clock.now += 0.2
    assert cache.get(key) is None
    assert cache.hits["success"] == 2 and cache.misses == 1


def test_max_ttl_caps_positive_entries() -> None:
    cache = UpstreamCache(10, 10, max_ttl=60, clock=Clock())
    assert cache.put(cache.key("a.", 1, 1, False), upstream_reply("a", ttl=86400)) == 60


def test_negative_answer_kept_min_of_soa_ttl_and_minimum() -> None:
    # RFC 2308 section 5: the SOA's TTL or its MINIMUM, whichever is smaller.
    clock = Clock()
    cache = UpstreamCache(10, 10, clock=clock)
    nx = cache.key("nope.example.", QTYPE.A, 1, False)
    assert (
        cache.put(nx, upstream_reply("nope.example", RCODE.NXDOMAIN, minimum=60, soa_ttl=900)) == 60
    )
    nodata = cache.key("nodata.example.", QTYPE.A, 1, False)
    assert cache.put(nodata, upstream_reply("nodata.example", ttl=0, soa_ttl=5, minimum=60)) == 5
    assert len(cache.negative) == 2 and not cache.positive
    clock.now += 10
    hit = cache.get(nx)
    assert hit is not None and hit.auth[0].ttl == 890 and hit.header.rcode == RCODE.NXDOMAIN
    assert cache.get(nodata) is None
    assert cache.hits["denial"] == 1


def test_not_cached_without_soa_truncated_or_failed() -> None:
    cache = UpstreamCache(10, 10, clock=Clock())
    key = cache.key("x.", 1, 1, False)
    assert cache.put(key, upstream_reply("x", RCODE.NXDOMAIN, soa=False)) == 0
    assert cache.put(key, upstream_reply("x", RCODE.SERVFAIL)) == 0
    truncated = upstream_reply("x")
    truncated.header.tc = 1
    assert cache.put(key, truncated) == 0
    assert len(cache) == 0


def test_stores_are_bounded_oldest_out() -> None:
    cache = UpstreamCache(2, 1, clock=Clock())
    for name in ("a", "b", "c"):
        cache.put(cache.key(name, 1, 1, False), upstream_reply(name))
    assert [k[0] for k in cache.positive] == [(b"b",), (b"c",)]
    for name in ("n1", "n2"):
        cache.put(cache.key(name, 1, 1, False), upstream_reply(name, RCODE.NXDOMAIN))
    assert [k[0] for k in cache.negative] == [(b"n2",)]


def _relayed_reply() -> bytes:
    q = DNSRecord.question("www.example.org", "A")
    reply = q.reply()
    reply.add_answer(RR("www.example.org", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    reply.add_answer(RR("www.example.org", QTYPE.A, rdata=A("192.0.2.2"), ttl=30))
    reply.add_auth(RR("example.org", QTYPE.SOA, rdata=SOA("ns.example.org", "h.example.org",
                                                            (1, 2, 3, 4, 5)), ttl=300))
    return bytes(reply.pack())


def test_ttl_offsets_point_at_every_record_ttl() -> None:
    packet = _relayed_reply()
    parsed = DNSRecord.parse(packet)
    offsets = ttl_offsets(packet)
    assert [int.from_bytes(packet[o : o + 4], "big") for o in offsets] == [60, 30, 300]
    assert len(offsets) == len(parsed.rr) + len(parsed.auth)


def test_relayed_answers_count_ttls_down_and_expire() -> None:
    now = [100.0]
    cache = RelayedAnswers(10, clock=lambda: now[0])
    packet = _relayed_reply()
    found = question_key(bytes(DNSRecord.question("www.example.org", "A").pack()), False, 1232)
    assert found is not None
    cache.put(found[0], packet, expires_at=130.0, rcode=RCODE.NOERROR, kind="success")
    assert cache.get(found[0]) == (packet, RCODE.NOERROR, "success")  # same second: as stored
    now[0] = 112.5
    hit = cache.get(found[0])
    assert hit is not None
    assert [r.ttl for r in (*DNSRecord.parse(hit[0]).rr, *DNSRecord.parse(hit[0]).auth)] == [
        48, 18, 288]
    now[0] = 130.0
    assert cache.get(found[0]) is None and len(cache) == 0  # expired with its upstream entry


def test_relayed_answers_clear_when_full() -> None:
    cache = RelayedAnswers(2)
    packet = _relayed_reply()
    keys = [(b"k%d" % i, b"\x00\x01\x00\x01", 1, 512, 0, False) for i in range(3)]
    for key in keys:
        cache.put(key, packet, expires_at=1e12, rcode=0, kind="success")  # type: ignore[arg-type]
    assert len(cache) == 1 and cache.get(keys[2]) is not None  # type: ignore[arg-type]


def test_keys_come_from_wire_labels_so_a_dot_inside_a_label_is_another_name() -> None:
    dotted = DNSLabel([b"www.example", b"com"])  # `www\\.example.com`: two labels
    plain = DNSLabel("WWW.example.com")
    assert str(dotted) == "www.example.com."  # the dotted text alone cannot tell them apart
    assert UpstreamCache.key(dotted, 1, 1, False) != UpstreamCache.key(plain, 1, 1, False)
    as_text = UpstreamCache.key("www.example.com", 1, 1, False)
    assert UpstreamCache.key(plain, 1, 1, False) == as_text


def test_expired_answer_served_stale_only_on_request_with_the_rfc_8767_ttl() -> None:
    clock = Clock()
    cache = UpstreamCache(10, 10, clock=clock, stale_ttl=30, stale_max=3600)
    key = cache.key("example.com", QTYPE.A, 1, False)
    cache.put(key, upstream_reply("example.com", ttl=60))
    assert cache.stale(key) is None and not cache.has_stale(key)  # still fresh: not stale
    clock.now += 61
    assert cache.get(key) is None  # expired for normal use...
    assert cache.has_stale(key) and cache.stale_hits == 0  # (asking does not serve it)
    stale = cache.stale(key)  # ...but kept for when every upstream fails
    assert stale is not None and stale.rr[0].ttl == 30 and cache.stale_hits == 1
    assert cache.is_stale(key, stale) and not cache.is_stale(key, upstream_reply("example.com"))
    clock.now += 3600
    assert not cache.has_stale(key)
    assert cache.stale(key) is None and cache.get(key) is None
    assert not cache.positive  # dropped past stale_max
