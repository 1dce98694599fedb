"""Wire handling of queries and replies: the cheap question key, full parsing, EDNS, truncation.

Owns the bytes (sans-IO): `question_key` reads just the header and the single question (plus a
bare OPT record) of the common query without building objects, giving the wire-answer cache its
key; `parse_query` is the full check with dnslib and decides FORMERR / NOTIMP / drop;
`finish` adds the OPT record and truncates a reply to what the client can take over UDP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import EDNS0, QTYPE, RCODE, RR, DNSHeader, DNSRecord, EDNSOption

HEADER = struct.Struct("!6H")
FLAG_QR = 0x8000
FLAG_TC = 0x0200
MASK_OPCODE = 0x7800
FLAG_RD = 0x0100
CLASSIC_UDP_SIZE = 512  # RFC 1035 4.2.1: without EDNS a UDP reply holds 512 bytes
TCP_SIZE = 65535
BADVERS = 16  # RFC 6891 9: extended RCODE for an unsupported EDNS version
EDE_OPTION = 15  # RFC 8914 2: the Extended DNS Error EDNS option
EDE_STALE_ANSWER = 3  # RFC 8914 4.4: answered from expired cache data (RFC 8767 serve-stale)

# Key of the wire-answer cache: (lower-cased qname bytes, qtype+qclass bytes, RD bit,
# size limit, DO bit, has OPT). Two queries with equal keys get byte-identical replies except
# for the transaction id and the case of the question name.
AnswerKey = tuple[bytes, bytes, int, int, int, bool]

_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT=1, ANCOUNT=0, NSCOUNT=0
_NO_ADDITIONAL = b"\x00\x00"
_ONE_ADDITIONAL = b"\x00\x01"


def question_key(data: bytes, tcp: bool, max_udp: int) -> tuple[AnswerKey, int] | None:
    """The cache key of a plain query and the offset where its question name ends; else None.

    Plain: QR=0, opcode QUERY, one question, no answer/authority records, and either no
    additional record or one OPT of EDNS version 0 that ends the packet. Anything else takes
    the full path.
    """
    n = len(data)
    if n < 17 or data[2] & 0xF8 or data[4:10] != _ONE_QUESTION:
        return None
    ar = data[10:12]
    if ar == _NO_ADDITIONAL:
        # The question runs to the end: name bytes then QTYPE+QCLASS. A malformed name only ever
        # reaches the full path, which refuses to cache what it cannot parse.
        qend = n - 4
        return (
            data[12:qend].lower(),
            data[qend:],
            data[2] & 1,
            TCP_SIZE if tcp else 512,
            0,
            False,
        ), qend
    if ar != _ONE_ADDITIONAL:
        return None
    i = 12
    while True:
        if i >= n:
            return None
        length = data[i]
        if length == 0:
            break
        if length > 63:
            return None
        i += length + 1
    qend = i + 1
    o = qend + 4
    # OPT: root owner, TYPE 41, CLASS = UDP size, TTL = ext-rcode/version/flags, RDLENGTH.
    if n < o + 11 or data[o] or data[o + 1 : o + 3] != b"\x00\x29" or data[o + 6]:
        return None
    if o + 11 + (data[o + 9] << 8 | data[o + 10]) != n:
        return None
    limit = TCP_SIZE if tcp else min(max(data[o + 3] << 8 | data[o + 4], CLASSIC_UDP_SIZE), max_udp)
    return (data[12:qend].lower(), data[qend:o], data[2] & 1, limit, data[o + 7] & 0x80, True), qend


@dataclass(slots=True)
class Edns:
    payload: int  # the client's advertised UDP size
    do: bool  # DNSSEC OK (RFC 3225): echoed in the reply's OPT


@dataclass(slots=True)
class Query:
    id: int
    record: DNSRecord
    edns: Edns | None

    def size_limit(self, tcp: bool, max_udp: int) -> int:
        if tcp:
            return TCP_SIZE
        if self.edns is None:
            return CLASSIC_UDP_SIZE
        return min(max(self.edns.payload, CLASSIC_UDP_SIZE), max_udp)


def parse_query(data: bytes, max_udp: int) -> Query | bytes | None:
    """A query to answer, an error reply to send as is, or None to drop the packet."""
    if len(data) < HEADER.size:
        return None  # not even a header: nothing to answer to
    qid, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        return None  # a response: answering it could loop between servers
    if flags & MASK_OPCODE:
        return error_reply(qid, flags, RCODE.NOTIMP)  # only QUERY (RFC 1035 4.1.1)
    if qdcount != 1:
        return error_reply(qid, flags, RCODE.FORMERR)
    try:
        record = DNSRecord.parse(data)
        str(record.q.qname)  # names must decode (labels, pointers) before anyone uses them
    except Exception:
        return error_reply(qid, flags, RCODE.FORMERR)
    if sum(len(label) + 1 for label in record.q.qname.label) + 1 > 255:
        return error_reply(qid, flags, RCODE.FORMERR)  # RFC 1035 2.3.4: names fit 255 bytes
    opts = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    if not opts:
        return Query(qid, record, None)
    opt = opts[0]
    # RFC 6891 6.1.1: more than one OPT, or an OPT not owned by the root, is FORMERR.
    if len(opts) > 1 or str(opt.rname) not in (".", ""):
        return error_reply(qid, flags, RCODE.FORMERR)
    edns = Edns(payload=opt.rclass, do=bool(opt.ttl & 0x8000))
    if (opt.ttl >> 16) & 0xFF != 0:
        # RFC 6891 6.1.3: an unknown version gets BADVERS with our OPT (version 0).
        reply = DNSRecord(DNSHeader(id=qid, qr=1, rd=(flags & FLAG_RD) >> 8), q=record.q)
        reply.add_ar(EDNS0(ext_rcode=BADVERS >> 4, udp_len=max_udp))
        return bytes(reply.pack())
    return Query(qid, record, edns)


def ttl_offsets(packet: bytes) -> list[int]:
    """Offsets of the TTL field of every record but OPT in a well-formed packed reply.

    Walks the sections without decoding names: a label run ends at a zero byte or at a
    compression pointer (two bytes, RFC 1035 4.1.4).
    """
    _id, _flags, qd, an, ns, ar = HEADER.unpack_from(packet)
    i = HEADER.size
    for _ in range(qd):
        i = skip_name(packet, i) + 4
    offsets = []
    for _ in range(an + ns + ar):
        i = skip_name(packet, i)
        rtype = packet[i] << 8 | packet[i + 1]
        if rtype != QTYPE.OPT:
            offsets.append(i + 4)
        i += 10 + (packet[i + 8] << 8 | packet[i + 9])
    return offsets


def skip_name(packet: bytes, i: int) -> int:
    """Where the name starting at `i` ends: a label run ends at a zero byte or at a
    compression pointer (two bytes, RFC 1035 4.1.4). IndexError past the packet's end."""
    while True:
        length = packet[i]
        if length == 0:
            return i + 1
        if length & 0xC0 == 0xC0:
            return i + 2
        i += length + 1


def error_reply(qid: int, flags: int, rcode: int) -> bytes:
    """A header-only reply (no question echoed) with the query's opcode and RD bit."""
    return HEADER.pack(qid, FLAG_QR | (flags & (MASK_OPCODE | FLAG_RD)) | rcode, 0, 0, 0, 0)


def finish(
    reply: DNSRecord, query: Query, limit: int, max_udp: int, ede: int | None = None
) -> bytes:
    """Pack `reply` with an OPT when the query had one (carrying the extended DNS error `ede`,
    RFC 8914, if given), truncated to `limit` bytes if over it.

    Truncation keeps, section by section (answer, authority, additional), the longest run of
    whole records that fits beside what is already kept, and sets TC when any record was left
    out: what CoreDNS does (miekg/dns `Msg.Truncate`, which also sets TC for additional
    records alone, where RFC 2181 9 would allow leaving it clear). The OPT stays (RFC 6891 7).
    Clients that never retry over TCP still get the addresses that fit; the packet never
    exceeds `limit`.
    """
    opt = None
    if query.edns is not None:
        options = [] if ede is None else [EDNSOption(EDE_OPTION, ede.to_bytes(2, "big"))]
        opt = EDNS0(udp_len=max_udp, flags="do" if query.edns.do else "", opts=options)
        reply.ar = [rr for rr in reply.ar if rr.rtype != QTYPE.OPT] + [opt]
    packed = bytes(reply.pack())
    if len(packed) <= limit:
        return packed
    sections = (list(reply.rr), list(reply.auth), [rr for rr in reply.ar if rr is not opt])
    kept: list[list[RR]] = [[], [], []]

    def pack(answer: list[RR], auth: list[RR], extra: list[RR]) -> bytes:
        header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
        header.rcode = reply.header.rcode
        out = DNSRecord(header, questions=list(reply.questions), rr=answer, auth=auth)
        out.ar = [*extra, opt] if opt is not None else extra
        return bytes(out.pack())

    for i, section in enumerate(sections):
        # The largest prefix of this section that fits beside what is kept (binary search:
        # with name compression a record's size depends on what precedes it).
        low, high = 0, len(section)
        while low < high:
            mid = (low + high + 1) // 2
            trial = [*kept]
            trial[i] = section[:mid]
            if len(pack(*trial)) <= limit:
                low = mid
            else:
                high = mid - 1
        kept[i] = section[:low]
    truncated = any(len(k) < len(s) for k, s in zip(kept, sections, strict=True))
    out = bytearray(pack(*kept))
    if truncated:
        out[2] |= FLAG_TC >> 8
    return bytes(out)
