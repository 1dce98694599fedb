"""Who may query and how fast (sans-IO): the client allow-list and response rate limiting.

Owns two decisions the socket shells take per query before and after the handler:

- `ClientGate.admits(packed)`: is the client's address (packed, 4 or 16 bytes) inside the
  allowed CIDRs? Outsiders get REFUSED, the answer CoreDNS's `acl` plugin gives a blocked
  client, so kubeshim recurses and enumerates Services only for the node and its pods.
  Decisions are remembered per address (a bounded dict), so the hot path is one lookup.
- `ClientGate.rate_limit(packed, reply)`: response rate limiting of UDP replies as
  authoritative servers' RRL does (BIND's `rate-limit`, Knot's `rrl` module). Replies are
  accounted per client prefix (/24 and /56 by default) AND per response: identical responses
  share a token bucket refilled at `rate` per second, bursting one second's worth. What makes
  responses identical (`response_token`, BIND's categories):
    - a positive answer: its question name and type;
    - NODATA: its name, whatever the type;
    - NXDOMAIN: the zone, the owner of the SOA it carries (a flood of random names in one
      zone shares one bucket);
    - errors (SERVFAIL, REFUSED, FORMERR, ...): one bucket per prefix, whatever the name.
  So a client asking many different names is not limited, while a flood of one large answer
  sent to a spoofed source is. Optionally (`all_rate`, BIND's `all-per-second`) every reply
  to a prefix is also counted in one bucket of its own, a ceiling for floods that rotate names.
  Past a limit, every `slip`-th reply becomes an empty TC=1 reply (a real client retries over
  TCP, which is not limited; a spoofed victim gets a packet no larger than the query) and the
  rest are dropped, so the server is a poor amplifier. TCP is never limited: it cannot be
  spoofed.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from kubeshim.dns.wire import skip_name

SEND, SLIP, DROP = 0, 1, 2
_MEMO = 65536  # remembered allow decisions / buckets before the store is trimmed
_SOA = b"\x00\x06"
# Response kinds, the first byte of a token: never a label length (0-63), so a positive
# answer's token (its wire question, starting with one) needs no kind byte of its own.
POSITIVE, NODATA, NXDOMAIN, ERROR = b"", b"D", b"N", b"E"
_ALL = b"*"  # the token of the per-prefix bucket counting every reply


class ClientGate:
    def __init__(
        self,
        allowed: Iterable[str] = (),
        rate: float = 0.0,
        slip: int = 2,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 56,
        clock: Callable[[], float] = time.monotonic,
        all_rate: float = 0.0,
    ) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in allowed]
        self.rate = rate
        self.all_rate = all_rate
        self.slip = slip
        self._v4 = ipv4_prefix // 8
        self._v6 = ipv6_prefix // 8
        self.clock = clock
        self._admitted: dict[bytes, bool] = {}
        # (prefix, response token) -> [tokens, last refill time, replies over the limit so far]
        self._buckets: dict[tuple[bytes, bytes], list[float]] = {}
        self.refused = 0
        self.slipped = 0
        self.dropped = 0

    @property
    def active(self) -> bool:
        """False when it lets everything through unlimited (the shells skip it)."""
        return bool(self.networks) or self.limiting

    @property
    def limiting(self) -> bool:
        return self.rate > 0 or self.all_rate > 0

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

    def rate_limit(self, packed: bytes, reply: bytes) -> int:
        """SEND, SLIP (send an empty TC=1 reply instead) or DROP for one more UDP `reply` to
        the client at `packed`."""
        prefix = packed[: self._v4] if len(packed) == 4 else packed[: self._v6]
        now = self.clock()
        if self.rate > 0:
            verdict = self._take((prefix, response_token(reply)), self.rate, now)
            if verdict != SEND:
                return verdict
        if self.all_rate > 0:
            return self._take((prefix, _ALL), self.all_rate, now)
        return SEND

    def _take(self, key: tuple[bytes, bytes], rate: float, now: float) -> int:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= _MEMO:
                self._trim(now)
            bucket = buckets[key] = [rate, now, 0.0]
        tokens = min(rate, bucket[0] + (now - bucket[1]) * rate)
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

    def _trim(self, now: float) -> None:
        """Forget the buckets not limiting anything now (a token or more after refill: a new
        bucket would let the next reply through too), so a flood of distinct names cannot
        reset the bucket of a response being limited; everything only when most are."""
        buckets = self._buckets
        for key in [k for k, b in buckets.items() if b[0] + (now - b[1]) * self._rate(k) >= 1]:
            del buckets[key]
        if len(buckets) >= _MEMO * 3 // 4:
            buckets.clear()

    def _rate(self, key: tuple[bytes, bytes]) -> float:
        return self.all_rate if key[1] == _ALL else self.rate


def response_token(reply: bytes) -> bytes:
    """What makes UDP replies identical for rate limiting (module docstring): the kind, then
    the lower-cased wire name (and the type and class of a positive answer).

    The question's name is taken up to its first zero byte (the root label) without walking
    its labels: a zero byte inside a label (legal, never seen in practice) only shortens the
    token, so such responses share a bucket with more of their kind, never fewer."""
    if len(reply) < 17 or reply[5] != 1 or reply[4]:  # one question
        return ERROR
    rcode = reply[3] & 0xF
    if rcode == 0:
        end = reply.find(b"\x00", 12) + 5
        if reply[6] or reply[7]:  # ANCOUNT
            return reply[12:end].lower()  # starts with a label length: no kind byte needed
        return NODATA + reply[12 : end - 4].lower()
    if rcode == 3:
        question_end = _question_end(reply)
        owner = _soa_owner(reply, question_end) if question_end else None
        return NXDOMAIN + (owner or b"")
    return ERROR


def _soa_owner(reply: bytes, i: int) -> bytes | None:
    """The lower-cased wire owner name of the first SOA in the authority section, or None.

    `i` is where the answer section starts; a malformed packet gives None."""
    try:
        an = reply[6] << 8 | reply[7]
        ns = reply[8] << 8 | reply[9]
        for n in range(an + ns):
            at = i
            i = skip_name(reply, i)
            if n >= an and reply[i : i + 2] == _SOA:
                return _read_name(reply, at)
            i += 10 + (reply[i + 8] << 8 | reply[i + 9])
    except IndexError:
        return None
    return None


def _read_name(packet: bytes, i: int) -> bytes:
    """A possibly compressed name (RFC 1035 4.1.4) as lower-cased uncompressed wire bytes."""
    out = bytearray()
    for _ in range(128):  # a pointer loop ends here
        length = packet[i]
        if length == 0:
            return bytes(out + b"\x00").lower()
        if length & 0xC0 == 0xC0:
            i = (length & 0x3F) << 8 | packet[i + 1]
            continue
        out += packet[i : i + length + 1]
        i += length + 1
    raise IndexError("name compression loop")


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
