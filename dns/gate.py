"""Who may query and how fast (sans-IO): the client allow-list and response rate limiting.

Owns two decisions the socket shells take per query before and after the handler:

- `ClientGate.admits(packed)`: is the client's address (packed, 4 or 16 bytes) inside the
  allowed CIDRs? Outsiders get REFUSED, the answer CoreDNS's `acl` plugin gives a blocked
  client, so kubeshim recurses and enumerates Services only for the node and its pods.
  Decisions are remembered per address (a bounded dict), so the hot path is one lookup.
- `ClientGate.rate(packed)`: response rate limiting of UDP replies per client prefix, as
  authoritative servers' RRL does (BIND's responses-per-second with slip): a token bucket per
  prefix (/24 and /56 by default) refilled at `rate` per second, bursting one second's worth.
  Past it, every `slip`-th reply becomes an empty TC=1 reply (a real client retries over TCP,
  which is not limited; a spoofed victim gets a packet no larger than the query) and the rest
  are dropped, so the server is a poor amplifier. TCP is never limited: it cannot be spoofed.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

SEND, SLIP, DROP = 0, 1, 2
_MEMO = 65536  # remembered allow decisions / buckets before the store is cleared


class ClientGate:
    def __init__(
        self,
        allowed: Iterable[str] = (),
        rate: float = 0.0,
        slip: int = 2,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 56,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in allowed]
        self.rate = rate
        self.slip = slip
        self._v4 = ipv4_prefix // 8
        self._v6 = ipv6_prefix // 8
        self.clock = clock
        self._admitted: dict[bytes, bool] = {}
        # prefix -> [tokens, last refill time, replies over the limit so far]
        self._buckets: dict[bytes, list[float]] = {}
        self.refused = 0
        self.slipped = 0
        self.dropped = 0

    @property
    def active(self) -> bool:
        """False when it lets everything through unlimited (the shells skip it)."""
        return bool(self.networks) or self.rate > 0

    def admits(self, packed: bytes) -> bool:
        if not self.networks:
            return True
        ok = self._admitted.get(packed)
        if ok is None:
            if len(self._admitted) >= _MEMO:
                self._admitted.clear()
            ip = ipaddress.ip_address(packed)
            mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:a.b.c.d on a dual-stack socket
            ip = mapped or ip
            ok = self._admitted[packed] = any(
                ip.version == net.version and ip in net for net in self.networks
            )
        if not ok:
            self.refused += 1
        return ok

    def rate_limit(self, packed: bytes) -> int:
        """SEND, SLIP (send an empty TC=1 reply instead) or DROP for one more UDP reply."""
        if self.rate <= 0:
            return SEND
        prefix = packed[: self._v4] if len(packed) == 4 else packed[: self._v6]
        now = self.clock()
        bucket = self._buckets.get(prefix)
        if bucket is None:
            if len(self._buckets) >= _MEMO:
                self._buckets.clear()
            bucket = self._buckets[prefix] = [self.rate, now, 0.0]
        tokens = min(self.rate, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return SEND
        bucket[0] = tokens
        bucket[2] += 1
        if self.slip and int(bucket[2]) % self.slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP


def slipped_reply(query: bytes) -> bytes | None:
    """An empty TC=1 reply to a UDP query: the header (QR, TC, RD kept) and its question.

    No records, no OPT: never larger than the query that asked."""
    if len(query) < 12:
        return None
    end = _question_end(query)
    if end is None:
        return None
    flags = 0x8200 | ((query[2] << 8 | query[3]) & 0x7900)  # QR, TC + the query's opcode and RD
    counts = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # one question, no records
    return query[:2] + flags.to_bytes(2, "big") + counts + query[12:end]


def _question_end(query: bytes) -> int | None:
    if query[4:6] != b"\x00\x01":
        return None
    i = 12
    n = len(query)
    while i < n:
        length = query[i]
        if length == 0:
            return i + 5 if i + 5 <= n else None
        if length > 63:
            return None
        i += length + 1
    return None
