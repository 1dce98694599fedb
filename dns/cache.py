"""The DNS caches: packed cluster answers, upstream answers with negative caching, and the
packed form of those upstream answers for the hot path.

`AnswerCache` keeps the packed reply of a cluster question under `wire.AnswerKey` and the names
of the state it came from, so a Service change drops exactly the answers it touches (no TTL:
the state itself is the source of truth). Full means cleared: one dict, no per-hit bookkeeping.

`UpstreamCache` keeps forwarded answers like CoreDNS's cache plugin: positive and negative
entries in separate bounded stores, keyed by (lower-cased wire labels, type, class, DO bit): a
dot inside a label stays inside it, so `www\\.example.com` (one label `www.example`) never
shares an entry with `www.example.com`. The original TTLs are stored with the time of storing
and decremented on a hit; the clock is injected. Negative answers live min(SOA TTL, SOA
minimum) (RFC 2308 section 5); negative answers without an SOA, truncated answers and failures
are not kept (RFC 2308 section 5, 7.1). Expired entries stay up to `stale_max` seconds for
RFC 8767 serve-stale: `stale()` hands one out (TTL `stale_ttl`, the RFC's 30 s) when the
forwarder's rules call for it (the upstreams failed or were too slow).

`RelayedAnswers` keeps the packed reply kubeshim sent for a forwarded question under the same
`AnswerKey`, until the `UpstreamCache` entry it came from expires; a hit rewrites the TTL fields
in place (counted down, like CoreDNS's cache), so a warm forwarded name costs no parse or pack.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSLabel, DNSRecord

from kubeshim.dns.wire import AnswerKey, ttl_offsets

CacheKey = AnswerKey | bytes


class AnswerCache:
    """Packed replies for cluster questions, invalidated per dependency, cleared when full.

    Two kinds of keys share the store: an `AnswerKey` (the question's shape) maps to a whole
    reply packet; the exact bytes of a UDP query after its id map to the reply after its id.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.entries: dict[CacheKey, tuple[bytes, int, tuple[Hashable, ...]]] = {}
        self._by_dep: dict[Hashable, set[CacheKey]] = {}
        self._dep_refs = 0
        self.clears = 0

    def get(self, key: CacheKey) -> tuple[bytes, int, tuple[Hashable, ...]] | None:
        return self.entries.get(key)

    def put(self, key: CacheKey, packet: bytes, rcode: int, deps: tuple[Hashable, ...]) -> None:
        # Stale dependency references (an entry dropped through one of several deps) are bounded
        # by clearing everything once they outnumber the entries a few times over.
        if len(self.entries) >= self.capacity or self._dep_refs >= 4 * self.capacity:
            self.clear()
            self.clears += 1
        self.entries[key] = (packet, rcode, deps)
        for dep in deps:
            self._by_dep.setdefault(dep, set()).add(key)
            self._dep_refs += 1

    def invalidate(self, deps: Iterable[Hashable]) -> int:
        """Drop every answer that depends on any of `deps`; return how many were dropped."""
        dropped = 0
        for dep in deps:
            keys = self._by_dep.pop(dep, None)
            if keys:
                self._dep_refs -= len(keys)
                for key in keys:
                    if self.entries.pop(key, None) is not None:
                        dropped += 1
        return dropped

    def clear(self) -> None:
        self.entries.clear()
        self._by_dep.clear()
        self._dep_refs = 0

    def __len__(self) -> int:
        return len(self.entries)


UpstreamKey = tuple[tuple[bytes, ...], int, int, bool]

_TTL = struct.Struct("!I")


class RelayedAnswers:
    """Packed forwarded replies per question shape; TTLs counted down on a hit; full = cleared."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(1, capacity)
        self.clock = clock
        # key -> (packet, stored at, expires at, TTL offsets, TTLs when stored, rcode, kind)
        self.entries: dict[
            AnswerKey, tuple[bytes, float, float, list[int], list[int], int, str]
        ] = {}

    def get(self, key: AnswerKey) -> tuple[bytes, int, str] | None:
        """(reply packet, rcode, "success" or "denial"), or None when absent or expired."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        packet, stored_at, expires_at, offsets, ttls, rcode, kind = entry
        now = self.clock()
        if now >= expires_at:
            del self.entries[key]
            return None
        spent = int(now - stored_at)
        if spent == 0:
            return packet, rcode, kind
        out = bytearray(packet)
        for offset, ttl in zip(offsets, ttls, strict=True):
            _TTL.pack_into(out, offset, max(0, ttl - spent))
        return bytes(out), rcode, kind

    def put(
        self, key: AnswerKey, packet: bytes, expires_at: float, rcode: int, kind: str
    ) -> None:
        if len(self.entries) >= self.capacity:
            self.entries.clear()
        offsets = ttl_offsets(packet)
        ttls = [_TTL.unpack_from(packet, o)[0] for o in offsets]
        self.entries[key] = (packet, self.clock(), expires_at, offsets, ttls, rcode, kind)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(slots=True)
class _Stored:
    reply: DNSRecord
    stored_at: float
    ttl: int
    original_ttls: list[int]


class UpstreamCache:
    """Forwarded answers: positive for their smallest TTL, negative for the SOA's limit."""

    def __init__(
        self,
        positive_capacity: int,
        negative_capacity: int,
        max_ttl: int = 3600,
        clock: Callable[[], float] = time.monotonic,
        stale_ttl: int = 30,
        stale_max: float = 0.0,
    ) -> None:
        self.stale_ttl = stale_ttl  # RFC 8767 section 4: the TTL of a stale answer (30 s)
        self.stale_max = stale_max  # how long past expiry an entry may still be served stale
        self.stale_hits = 0
        self.positive_capacity = positive_capacity
        self.negative_capacity = negative_capacity
        self.max_ttl = max_ttl
        self.clock = clock
        self.positive: dict[UpstreamKey, _Stored] = {}
        self.negative: dict[UpstreamKey, _Stored] = {}
        self.hits = {"success": 0, "denial": 0}
        self.misses = 0

    @staticmethod
    def key(qname: DNSLabel | str, qtype: int, qclass: int, do: bool) -> UpstreamKey:
        """Wire labels, lower-cased (RFC 4343: ASCII case-insensitive), never the dotted text
        (a str is split at its dots)."""
        if not isinstance(qname, DNSLabel):
            qname = DNSLabel(qname)
        return (tuple(label.lower() for label in qname.label), qtype, qclass, do)

    def get(self, key: UpstreamKey) -> DNSRecord | None:
        """The stored reply with its TTLs counted down, or None (expired entries stay for stale
        use while `stale_max` allows, else they are dropped)."""
        for kind, store in (("success", self.positive), ("denial", self.negative)):
            entry = store.get(key)
            if entry is None:
                continue
            age = self.clock() - entry.stored_at
            if age >= entry.ttl:
                if age >= entry.ttl + self.stale_max:
                    del store[key]
                break
            spent = int(age)
            for rr, ttl in zip(_records(entry.reply), entry.original_ttls, strict=True):
                rr.ttl = max(0, ttl - spent)
            self.hits[kind] += 1
            return entry.reply
        self.misses += 1
        return None

    def has_stale(self, key: UpstreamKey) -> bool:
        """True when `stale(key)` would give an answer now."""
        return self._stale_entry(key) is not None

    def stale(self, key: UpstreamKey) -> DNSRecord | None:
        """An expired answer within `stale_max` of its expiry, every TTL set to `stale_ttl`
        (RFC 8767 section 4); None when there is none. For when the upstreams failed or did
        not answer within the client response timer."""
        entry = self._stale_entry(key)
        if entry is None:
            return None
        for rr in _records(entry.reply):
            rr.ttl = self.stale_ttl
        self.stale_hits += 1
        return entry.reply

    def is_stale(self, key: UpstreamKey, reply: DNSRecord) -> bool:
        """True when `reply` is the expired answer stored under `key` (one `stale()` gave)."""
        entry = self._stale_entry(key)
        return entry is not None and entry.reply is reply

    def _stale_entry(self, key: UpstreamKey) -> _Stored | None:
        for store in (self.positive, self.negative):
            entry = store.get(key)
            if entry is None:
                continue
            age = self.clock() - entry.stored_at
            if age < entry.ttl or age >= entry.ttl + self.stale_max:
                return None
            return entry
        return None

    def expires_at(self, key: UpstreamKey) -> tuple[float, str] | None:
        """When the entry under `key` expires (clock time) and its kind, if it is stored."""
        for kind, store in (("success", self.positive), ("denial", self.negative)):
            entry = store.get(key)
            if entry is not None:
                return entry.stored_at + entry.ttl, kind
        return None

    def put(self, key: UpstreamKey, reply: DNSRecord) -> int:
        """Keep `reply` if it may be cached; return the seconds it will be kept (0: not kept)."""
        if reply.header.tc:
            return 0
        rcode = reply.header.rcode
        records = _records(reply)
        if rcode == RCODE.NOERROR and reply.rr:
            ttl = min(rr.ttl for rr in records)
            store, capacity = self.positive, self.positive_capacity
        elif rcode == RCODE.NXDOMAIN or (rcode == RCODE.NOERROR and not reply.rr):
            soa = next((rr for rr in reply.auth if rr.rtype == QTYPE.SOA), None)
            if soa is None:
                return 0
            ttl = min(soa.ttl, soa.rdata.times[4])
            store, capacity = self.negative, self.negative_capacity
        else:
            return 0
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0 or capacity <= 0:
            return 0
        store.pop(key, None)
        while len(store) >= capacity:
            del store[next(iter(store))]  # oldest first
        reply.ar = [rr for rr in reply.ar if rr.rtype != QTYPE.OPT]
        store[key] = _Stored(reply, self.clock(), ttl, [rr.ttl for rr in _records(reply)])
        return int(ttl)

    def __len__(self) -> int:
        return len(self.positive) + len(self.negative)


def _records(reply: DNSRecord) -> list:  # type: ignore[type-arg]
    return [rr for rr in (*reply.rr, *reply.auth, *reply.ar) if rr.rtype != QTYPE.OPT]
