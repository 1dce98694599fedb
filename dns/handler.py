"""The DNS query handler, apart from any socket (sans-IO): query bytes in; reply bytes, a forward
request, or nothing out.

Owns the answer path and its caches; the socket shells (UDP, batched UDP, TCP in server.py and
batch.py) own sockets, framing and tasks, and reach the handler only through `Serving`.

1. `wire.question_key` reads the header and question bytes; a hit in the `AnswerCache` is
   answered by splicing the client's transaction id and question bytes (its qname case) into
   the cached packet. No parsing, no packing, no logging. A UDP query whose exact bytes after
   the id were answered before is a single dict lookup (`exact`), which shells may inline.
2. Otherwise `wire.parse_query` (dnslib) validates it (drop / FORMERR / NOTIMP / BADVERS),
   `ClusterRecords.resolve` answers cluster names, and the packed answer is cached with the
   state it depends on; a ServiceChange drops those entries before the next query is read.
3. Names that are not ours come out as a `ForwardRequest`: the shell's forwarder asks upstream
   and hands the upstream reply (or None when every upstream failed) to `complete`. An
   ExternalName whose target is outside the cluster takes the same path with the target as the
   question and the cluster CNAME as the partial reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dnslib import RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.state import ClusterState, ServiceChange
from kubeshim.dns.cache import AnswerCache, CacheKey, RelayedAnswers, UpstreamCache
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.metrics import DNSMetrics
from kubeshim.dns.records import ClusterRecords
from kubeshim.dns.wire import (
    EDE_STALE_ANSWER,
    AnswerKey,
    Query,
    error_reply,
    finish,
    parse_query,
    question_key,
)

log = get_logger("dns")

# A first-level entry: (reply bytes after the id, rcode, dependencies).
Entry = tuple[bytes, int, tuple[Hashable, ...]]


@dataclass(slots=True)
class ForwardRequest:
    """A question to ask upstream on behalf of `query`, and how to finish the reply."""

    query: Query
    question: DNSQuestion  # the query's own question, or the CNAME target of `partial`
    tcp: bool
    key: tuple[AnswerKey, int] | None  # the wire-cache key of a plain query (question_key)
    partial: DNSRecord | None = None  # a cluster reply ending in a CNAME to `question.qname`

    @property
    def do(self) -> bool:
        return self.query.edns.do if self.query.edns else False


Outcome = bytes | ForwardRequest | None


class Serving(Protocol):
    """What a socket shell calls: the one interface between sockets and the answer path.

    `client` is the packed source address (4 or 16 bytes); shells pass it when `gated` (an
    allow-list or a rate limit is configured) and may pass None otherwise."""

    metrics: DNSMetrics
    gated: bool
    # Exact bytes of a UDP query after its id -> the reply after its id (read only). A shell
    # may inline this lookup when not `gated`; a hit counts `metrics.answer_hits` and `rcodes`.
    exact: dict[CacheKey, Entry]

    def answer(self, data: bytes, tcp: bool, client: bytes | None = None) -> Outcome: ...

    def forward(
        self, request: ForwardRequest, send: Callable[[bytes], None], client: bytes | None = None
    ) -> None:
        """Resolve `request` upstream and `send` the reply when it comes (or REFUSED now)."""


class DNSHandler:
    """The cluster zone, its wire caches and the relay of upstream answers, without IO."""

    def __init__(
        self,
        state: ClusterState,
        config: DNSConfig,
        address_map: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.records = ClusterRecords(state, config, address_map)
        self.answers = AnswerCache(config.answer_cache_size)
        self.exact: dict[CacheKey, Entry] = self.answers.entries
        self.upstream_cache = UpstreamCache(
            config.upstream_cache_size,
            config.upstream_negative_cache_size,
            config.upstream_max_ttl,
            clock=clock,
            stale_ttl=config.serve_stale_ttl,
            stale_max=config.serve_stale_max,
        )
        self.relayed = RelayedAnswers(config.upstream_cache_size, clock=clock)
        self.metrics = DNSMetrics()
        self.internal_errors = 0
        state.subscribe(self.on_changes)

    def on_changes(self, changes: Sequence[ServiceChange]) -> None:
        self.answers.invalidate(self.records.apply(changes))

    # --- answering ----------------------------------------------------------------------------

    def answer(self, data: bytes, tcp: bool, client: bytes | None = None) -> Outcome:
        """Reply bytes, a ForwardRequest, or None to drop the packet. `client` is not looked
        at here (the gate in front of the handler does): the signature is `Serving.answer`'s,
        so an ungated server hands this very method to its shells."""
        metrics = self.metrics
        entries = self.answers.entries
        if not tcp:
            # First level: the exact bytes after the transaction id (flags, question with its
            # case, OPT) of a UDP query answered before; the reply is that answer with this id.
            entry = entries.get(data[2:])
            if entry is not None:
                metrics.answer_hits += 1
                metrics.rcodes[entry[1]] += 1
                return data[:2] + entry[0]
        # Second level: the question's shape (lower-cased wire name, type, RD, size, DO).
        found = question_key(data, tcp, self.config.max_udp_payload)
        if found is not None:
            entry = entries.get(found[0])
            if entry is not None:
                metrics.answer_hits += 1
                metrics.rcodes[entry[1]] += 1
                packet = entry[0]
                qend = found[1]
                reply = data[:2] + packet[2:12] + data[12:qend] + packet[qend:]
                if not tcp:
                    self.answers.put(data[2:], reply[2:], entry[1], entry[2])
                return reply
            # A forwarded name answered before and still fresh upstream (never a cluster
            # name: those are not forwarded, so the two stores cannot disagree).
            relayed = self.relayed.get(found[0])
            if relayed is not None:
                packet, rcode, kind = relayed
                self.upstream_cache.hits[kind] += 1
                metrics.rcodes[rcode] += 1
                qend = found[1]
                return data[:2] + packet[2:12] + data[12:qend] + packet[qend:]
        metrics.answer_misses += 1
        try:
            return self._answer_full(data, tcp, found)
        except Exception:
            if len(data) < 12:
                return None
            return self._servfail_after_bug(data[0] << 8 | data[1], data[2] << 8 | data[3])

    def _answer_full(self, data: bytes, tcp: bool, found: tuple[AnswerKey, int] | None) -> Outcome:
        started = time.perf_counter()
        max_udp = self.config.max_udp_payload
        parsed = parse_query(data, max_udp)
        if parsed is None:
            self.metrics.dropped += 1
            return None
        if isinstance(parsed, bytes):
            self.metrics.rcodes[parsed[3] & 0xF] += 1
            return parsed
        resolution = self.records.resolve(parsed.record)
        if resolution is None:
            return ForwardRequest(parsed, parsed.record.q, tcp, found)
        if resolution.chase is not None:
            return self._chase(parsed, resolution.reply, resolution.chase, tcp)
        rcode = resolution.reply.header.rcode
        packet = finish(resolution.reply, parsed, parsed.size_limit(tcp, max_udp), max_udp)
        if found is not None and resolution.cacheable:
            key, qend = found
            # Cache only when the reply's question is byte for byte the query's (but for case):
            # the hit path splices the client's question bytes over it.
            if packet[12:qend].lower() == key[0] and packet[qend : qend + 4] == key[1]:
                self.answers.put(key, packet, rcode, resolution.deps)
        if not tcp and resolution.cacheable:
            self.answers.put(data[2:], packet[2:], rcode, resolution.deps)
        self.metrics.rcodes[rcode] += 1
        self.metrics.duration.observe(time.perf_counter() - started)
        return packet

    def _chase(self, query: Query, reply: DNSRecord, target: DNSLabel, tcp: bool) -> Outcome:
        """Complete a cluster CNAME (ExternalName) with the target's records of the asked type.

        A target in the cluster zone is answered here (one link only); any other goes upstream
        as a ForwardRequest carrying the partial reply.
        """
        request = query.record
        question = DNSQuestion(target, request.q.qtype, request.q.qclass)
        inner = self.records.resolve(DNSRecord(DNSHeader(rd=1), q=question))
        if inner is None:
            return ForwardRequest(query, question, tcp, None, partial=reply)
        return self._finish_chase(query, reply, inner.reply if inner.chase is None else None, tcp)

    def _finish_chase(
        self, query: Query, reply: DNSRecord, found: DNSRecord | None, tcp: bool
    ) -> bytes:
        """When the target cannot be resolved the CNAME alone is the answer (the client may
        follow it itself)."""
        if found is not None:
            for rr in found.rr:
                reply.add_answer(rr)
            if found.header.rcode == RCODE.NXDOMAIN:
                reply.header.rcode = RCODE.NXDOMAIN  # RFC 6604: the rcode of the chain's end
        max_udp = self.config.max_udp_payload
        packet = finish(reply, query, query.size_limit(tcp, max_udp), max_udp)
        self.metrics.rcodes[reply.header.rcode] += 1
        return packet

    def complete(self, request: ForwardRequest, upstream: DNSRecord | None) -> bytes:
        """The reply to a forwarded query given upstream's answer (None: every upstream failed)."""
        try:
            return self._complete(request, upstream)
        except Exception:
            q = request.query
            return self._servfail_after_bug(q.id, q.record.header.bitmap)

    def _complete(self, request: ForwardRequest, upstream: DNSRecord | None) -> bytes:
        query = request.query
        if request.partial is not None:
            return self._finish_chase(query, request.partial, upstream, request.tcp)
        started = time.perf_counter()
        q = query.record.q
        rd = query.record.header.rd
        if upstream is not None:
            header = DNSHeader(id=query.id, bitmap=upstream.header.bitmap)
            header.rd = rd
            header.ra = 1
            header.aa = 0  # relayed, not ours: only an authority sets AA (RFC 1035 4.1.1)
            reply = DNSRecord(
                header,
                questions=[q],
                rr=_in_client_case(upstream.rr, q.qname),
                auth=list(upstream.auth),
                ar=list(upstream.ar),
            )
        else:
            reply = DNSRecord(DNSHeader(id=query.id, qr=1, rd=rd, ra=1), q=q)
            reply.header.rcode = RCODE.SERVFAIL
        max_udp = self.config.max_udp_payload
        key = UpstreamCache.key(q.qname, q.qtype, q.qclass, request.do)
        # A stale answer (RFC 8767) says so to EDNS clients: EDE 3, Stale Answer (RFC 8914 4.4).
        stale = upstream is not None and self.upstream_cache.is_stale(key, upstream)
        ede = EDE_STALE_ANSWER if stale else None
        packet = finish(reply, query, query.size_limit(request.tcp, max_udp), max_udp, ede)
        if upstream is not None and not stale:
            self._keep_relayed(request, packet, reply.header.rcode)
        self.metrics.rcodes[reply.header.rcode] += 1
        self.metrics.duration.observe(time.perf_counter() - started)
        return packet

    def _keep_relayed(self, request: ForwardRequest, packet: bytes, rcode: int) -> None:
        """Keep the packed reply while the upstream answer it carries is cached.

        Reverse names are left out: a PTR forwarded today may be a ClusterIP's tomorrow, and
        the relayed store is not dropped by Service changes.
        """
        if request.key is None:
            return
        q = request.question
        labels = [label.lower() for label in q.qname.label]
        if labels[-2:] == [b"in-addr", b"arpa"] or labels[-2:] == [b"ip6", b"arpa"]:
            return
        stored = self.upstream_cache.expires_at(
            UpstreamCache.key(q.qname, q.qtype, q.qclass, request.do)
        )
        if stored is not None:
            self.relayed.put(request.key[0], packet, stored[0], rcode, stored[1])

    def refuse(self, request: ForwardRequest) -> bytes:
        """REFUSED for a query that would exceed the forwarding limit."""
        self.metrics.rcodes[RCODE.REFUSED] += 1
        q = request.query
        return error_reply(q.id, q.record.header.bitmap, RCODE.REFUSED)

    def _servfail_after_bug(self, qid: int, flags: int) -> bytes:
        # A bug must not stop the server: answer SERVFAIL, log once per hundred.
        self.internal_errors += 1
        if self.internal_errors % 100 == 1:
            log.error("dns answer failed", exc_info=True, count=self.internal_errors)
        self.metrics.rcodes[RCODE.SERVFAIL] += 1
        return error_reply(qid, flags, RCODE.SERVFAIL)


def _in_client_case(records: list[RR], qname: DNSLabel) -> list[RR]:
    """Records owned by the question name carry the client's spelling of it (for 0x20 clients).

    Compared label by label (DNSLabel equality), so a dot inside a label is not a separator."""
    return [
        RR(qname, rr.rtype, rr.rclass, rr.ttl, rr.rdata) if rr.rname == qname else rr
        for rr in records
    ]
