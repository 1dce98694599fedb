"""DNS metrics: plain integer counters on the hot path, CoreDNS metric names on the way out.

The server bumps attributes of `DNSMetrics` (an int add per query, no prometheus calls);
`DNSCollector` is a prometheus_client custom collector that reads them at scrape time under the
names CoreDNS uses (coredns_dns_*, coredns_cache_*, coredns_forward_*), so existing dashboards
apply. The daemon registers it: `REGISTRY.register(DNSCollector(server))`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Protocol

from dnslib import RCODE
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# CoreDNS's request duration buckets (plugin/pkg/metrics/vars: 0.00025 .. 8.192 s doubling).
DURATION_BUCKETS = tuple(0.00025 * 2**i for i in range(16))


class Histogram:
    """Counts per bucket (upper bounds), a sum and a count: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        fam.add_metric(list(labels.values()), buckets, self.sum)
        return fam


class ForwardStats:
    """Per-upstream counters (CoreDNS forward plugin)."""

    __slots__ = ("requests", "rcodes", "failures", "duration")

    def __init__(self) -> None:
        self.requests = 0
        self.rcodes: dict[int, int] = {}
        self.failures = 0  # timeouts, refused connections, unparsable replies
        self.duration = Histogram()


class DNSMetrics:
    __slots__ = (
        "requests_udp",
        "requests_tcp",
        "rcodes",
        "dropped",
        "duration",
        "forward",
        "answer_hits",
        "answer_misses",
    )

    def __init__(self) -> None:
        self.answer_hits = 0  # answered from the wire-answer cache (either level)
        self.answer_misses = 0
        self.requests_udp = 0
        self.requests_tcp = 0
        self.rcodes = [0] * 32  # responses by rcode (BADVERS counted as 16)
        self.dropped = 0  # packets not answered (shorter than a header, or responses)
        # Time spent answering queries that missed the wire-answer cache (cluster answers built,
        # forwarded answers); a cache hit costs microseconds and is not timed.
        self.duration = Histogram()
        self.forward: dict[str, ForwardStats] = {}

    def upstream(self, address: str) -> ForwardStats:
        stats = self.forward.get(address)
        if stats is None:
            stats = self.forward[address] = ForwardStats()
        return stats


def rcode_name(rcode: int) -> str:
    return "BADVERS" if rcode == 16 else str(RCODE.get(rcode, str(rcode)))


class _Source(Protocol):
    """What the collector reads (a DNSServer): counters, the zone and the caches' sizes."""

    metrics: DNSMetrics
    config: Any

    @property
    def answers(self) -> Any: ...

    @property
    def upstream_cache(self) -> Any: ...


class DNSCollector(Collector):
    """Reads a DNSServer's counters at scrape time."""

    def __init__(self, server: _Source, name: str = "dns://") -> None:
        self.server = server
        self.name = name

    def collect(self) -> Iterator[Metric]:
        s = self.server
        m = s.metrics
        zone = s.config.zone + "."
        server = self.name
        req = CounterMetricFamily(
            "coredns_dns_requests", "Queries received.", labels=["server", "zone", "proto"]
        )
        req.add_metric([server, zone, "udp"], m.requests_udp)
        req.add_metric([server, zone, "tcp"], m.requests_tcp)
        yield req
        resp = CounterMetricFamily(
            "coredns_dns_responses", "Responses sent, by rcode.", labels=["server", "zone", "rcode"]
        )
        for rcode, count in enumerate(m.rcodes):
            if count:
                resp.add_metric([server, zone, rcode_name(rcode)], count)
        yield resp
        dropped = CounterMetricFamily(
            "coredns_dns_dropped", "Packets dropped without an answer.", labels=["server"]
        )
        dropped.add_metric([server], m.dropped)
        yield dropped
        yield m.duration.family(
            "coredns_dns_request_duration_seconds",
            "Time to answer queries that missed the wire-answer cache.",
            {"server": server, "zone": zone},
        )
        labels = ["server", "cache", "type"]
        hits = CounterMetricFamily("coredns_cache_hits", "Cache hits.", labels=labels)
        misses = CounterMetricFamily(
            "coredns_cache_misses", "Cache misses.", labels=["server", "cache"]
        )
        entries = GaugeMetricFamily("coredns_cache_entries", "Cache entries.", labels=labels)
        hits.add_metric([server, "answer", "cluster"], m.answer_hits)
        misses.add_metric([server, "answer"], m.answer_misses)
        entries.add_metric([server, "answer", "cluster"], len(s.answers))
        up = s.upstream_cache
        for kind in ("success", "denial"):
            hits.add_metric([server, "upstream", kind], up.hits[kind])
        misses.add_metric([server, "upstream"], up.misses)
        entries.add_metric([server, "upstream", "success"], len(up.positive))
        entries.add_metric([server, "upstream", "denial"], len(up.negative))
        yield hits
        yield misses
        yield entries
        freq = CounterMetricFamily(
            "coredns_forward_requests", "Queries sent upstream.", labels=["to"]
        )
        fresp = CounterMetricFamily(
            "coredns_forward_responses", "Upstream responses by rcode.", labels=["to", "rcode"]
        )
        ffail = CounterMetricFamily(
            "coredns_forward_request_failures",
            "Upstream exchanges that failed (timeout, refused, unparsable).",
            labels=["to"],
        )
        durations = []
        for to, stats in sorted(m.forward.items()):
            freq.add_metric([to], stats.requests)
            ffail.add_metric([to], stats.failures)
            for rcode, count in sorted(stats.rcodes.items()):
                fresp.add_metric([to, rcode_name(rcode)], count)
            durations.append(
                stats.duration.family(
                    "coredns_forward_request_duration_seconds",
                    "Upstream exchange time.",
                    {"to": to},
                )
            )
        yield freq
        yield fresp
        yield ffail
        if durations:
            merged = durations[0]
            for fam in durations[1:]:
                merged.samples.extend(fam.samples)
            yield merged
