"""Query keys, validation and truncation on the wire (dns/wire.py)."""

from __future__ import annotations

import struct

from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from kubeshim.dns.wire import error_reply, finish, parse_query, question_key


def query(
    name: str = "web.default.svc.cluster.local",
    qtype: str = "A",
    edns: int | None = None,
    do: bool = False,
) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(q.pack())


def test_key_ignores_id_and_case_but_not_type_edns_or_transport() -> None:
    a = question_key(query("WEB.default.svc.cluster.local"), False, 4096)
    b = question_key(query("web.default.svc.cluster.local"), False, 4096)
    assert a is not None and b is not None and a[0] == b[0]
    assert a[1] == 12 + len(b"\x03web\x07default\x03svc\x07cluster\x05local\x00")
    keys = {
        question_key(query(), False, 4096)[0],  # type: ignore[index]
        question_key(query(qtype="AAAA"), False, 4096)[0],  # type: ignore[index]
        question_key(query(edns=1232), False, 4096)[0],  # type: ignore[index]
        question_key(query(edns=1232, do=True), False, 4096)[0],  # type: ignore[index]
        question_key(query(), True, 4096)[0],  # type: ignore[index]
    }
    assert len(keys) == 5


def test_key_takes_the_honoured_size() -> None:
    k = question_key(query(edns=65000), False, 4096)
    assert k is not None and k[0][3] == 4096
    k = question_key(query(edns=100), False, 4096)
    assert k is not None and k[0][3] == 512


def test_unusual_queries_have_no_key() -> None:
    data = bytearray(query())
    data[2] |= 0x80  # a response
    assert question_key(bytes(data), False, 4096) is None
    assert question_key(query()[:15], False, 4096) is None
    two = bytearray(query())
    two[5] = 2
    assert question_key(bytes(two), False, 4096) is None


def test_parse_query_decisions() -> None:
    assert parse_query(b"\x00" * 11, 4096) is None
    response = bytearray(query())
    response[2] |= 0x80
    assert parse_query(bytes(response), 4096) is None
    notify = bytearray(query())
    notify[2] |= 4 << 3
    assert parse_query(bytes(notify), 4096)[3] & 0xF == RCODE.NOTIMP  # type: ignore[index]
    two = bytearray(query())
    two[5] = 2
    assert parse_query(bytes(two), 4096)[3] & 0xF == RCODE.FORMERR  # type: ignore[index]
    loop = query()[:12] + b"\xc0\x0c\x00\x01\x00\x01"  # a name pointing at itself
    assert parse_query(loop, 4096)[3] & 0xF == RCODE.FORMERR  # type: ignore[index]
    parsed = parse_query(query(edns=1232, do=True), 4096)
    assert parsed is not None and not isinstance(parsed, bytes)
    assert parsed.edns is not None and parsed.edns.payload == 1232 and parsed.edns.do


def test_unknown_edns_version_gets_badvers() -> None:
    q = DNSRecord.question("web.default.svc.cluster.local")
    q.add_ar(EDNS0(version=1, udp_len=1232))
    out = parse_query(bytes(q.pack()), 4096)
    assert isinstance(out, bytes)
    reply = DNSRecord.parse(out)
    opt = reply.ar[0]
    assert opt.rtype == QTYPE.OPT and (opt.ttl >> 24) == 1  # extended rcode 16 = BADVERS


def test_error_reply_keeps_id_opcode_and_rd() -> None:
    out = error_reply(0xBEEF, 0x0100, RCODE.FORMERR)
    assert struct.unpack("!6H", out) == (0xBEEF, 0x8100 | RCODE.FORMERR, 0, 0, 0, 0)


def test_finish_truncates_what_does_not_fit() -> None:
    parsed = parse_query(query(edns=1232), 4096)
    assert parsed is not None and not isinstance(parsed, bytes)
    reply = parsed.record.reply()
    for i in range(100):
        reply.add_answer(RR("web.default.svc.cluster.local", QTYPE.A, rdata=A(f"10.0.0.{i}")))
    full = DNSRecord.parse(finish(reply, parsed, 65535, 4096))
    assert len(full.rr) == 100 and not full.header.tc
    packed = finish(reply, parsed, 1232, 4096)
    short = DNSRecord.parse(packed)
    # Header 12 + question 35 + OPT 11, then 16 bytes per compressed A record: 73 fit.
    assert len(packed) <= 1232 and len(packed) + 16 > 1232
    assert short.header.tc and len(short.rr) == 73 and len(short.questions) == 1
    assert [str(rr.rdata) for rr in short.rr] == [f"10.0.0.{i}" for i in range(73)]  # in order
    assert short.ar[0].rtype == QTYPE.OPT  # the OPT stays (RFC 6891 7)


def test_finish_sets_tc_for_additional_records_left_out_as_coredns_does() -> None:
    parsed = parse_query(query(), 4096)
    assert parsed is not None and not isinstance(parsed, bytes)
    reply = parsed.record.reply()
    reply.add_answer(RR("web.default.svc.cluster.local", QTYPE.A, rdata=A("10.0.0.1")))
    for i in range(40):
        reply.add_ar(RR(f"host{i}.example.org", QTYPE.A, rdata=A(f"10.0.1.{i}")))
    packed = finish(reply, parsed, 512, 4096)
    out = DNSRecord.parse(packed)
    # The answer is whole and glue fills the rest; TC still set (miekg/dns Msg.Truncate).
    assert len(packed) <= 512 and len(out.rr) == 1 and 0 < len(out.ar) < 40
    assert out.header.tc
