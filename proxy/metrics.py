"""Proxy metrics: plain counters on the hot path, exported through a prometheus Collector.

The data path only bumps integer attributes of a `PortCounters` (one per service port); the
`ProxyCollector` turns them into metric families when scraped. Sync metrics carry kube-proxy's
names (pkg/proxy/metrics) so dashboards built for kube-proxy read them unchanged.

`ProxyMetrics.default()` registers once into prometheus_client's global REGISTRY (what the
daemon serves on /metrics) and is shared by every Proxier built without a registry; tests pass
a private `CollectorRegistry`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Error reasons counted per service port.
NO_ENDPOINTS = "no_endpoints"
CONNECT_FAILED = "connect_failed"
CONNECT_TIMEOUT = "connect_timeout"
UPSTREAM_RESET = "upstream_reset"
UDP_SEND_FAILED = "udp_send_failed"
UDP_FLOW_EVICTED = "udp_flow_evicted"
UDP_NO_SOCKET = "udp_no_socket"
# Refused at a cap (proxy/budget.py): LIMIT_TOTAL, LIMIT_CLIENT.


class PortCounters:
    """Counters of one service port, bumped in place by the data path."""

    __slots__ = ("connections_total", "connections_active", "bytes_in", "bytes_out", "errors",
                 "datagrams_in", "datagrams_out", "flows_active")

    def __init__(self) -> None:
        self.connections_total = 0  # TCP connections accepted, UDP flows created
        self.connections_active = 0
        self.bytes_in = 0  # client -> endpoint
        self.bytes_out = 0  # endpoint -> client
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.flows_active = 0
        self.errors: dict[str, int] = {}

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "connectionsTotal": self.connections_total,
            "connectionsActive": self.connections_active,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            "datagramsIn": self.datagrams_in,
            "datagramsOut": self.datagrams_out,
            "flowsActive": self.flows_active,
            "errors": dict(self.errors),
        }


# (service "ns/name", port name, protocol, counters)
CounterSource = Callable[[], Iterable[tuple[str, str, str, PortCounters]]]


class ProxyCollector(Collector):
    """Reads the counters of every registered proxier at scrape time."""

    def __init__(self) -> None:
        self._sources: weakref.WeakKeyDictionary[Any, CounterSource] = weakref.WeakKeyDictionary()

    def add(self, owner: Any, source: CounterSource) -> None:
        self._sources[owner] = source

    def collect(self) -> Iterator[Any]:
        labels = ["service", "port", "protocol"]
        conn = CounterMetricFamily(
            "kubeshim_proxy_connections", "TCP connections accepted / UDP flows created",
            labels=labels)
        active = GaugeMetricFamily(
            "kubeshim_proxy_connections_active", "Open TCP connections and UDP flows",
            labels=labels)
        received = CounterMetricFamily(
            "kubeshim_proxy_received_bytes", "Bytes from clients to endpoints", labels=labels)
        sent = CounterMetricFamily(
            "kubeshim_proxy_sent_bytes", "Bytes from endpoints to clients", labels=labels)
        errors = CounterMetricFamily(
            "kubeshim_proxy_errors", "Failed connections and datagrams by reason",
            labels=[*labels, "reason"])
        for source in list(self._sources.values()):
            for service, port, protocol, c in source():
                lv = [service, port, protocol]
                conn.add_metric(lv, c.connections_total)
                active.add_metric(lv, c.connections_active + c.flows_active)
                received.add_metric(lv, c.bytes_in)
                sent.add_metric(lv, c.bytes_out)
                for reason, n in c.errors.items():
                    errors.add_metric([*lv, reason], n)
        yield from (conn, active, received, sent, errors)


class ProxyMetrics:
    """kube-proxy's sync metrics plus the per-port collector, registered in one registry."""

    _default: ProxyMetrics | None = None

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.collector = ProxyCollector()
        registry.register(self.collector)
        buckets = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                   0.512, 1.024, 2.048, 4.096, 8.192, 16.384)
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds", buckets=buckets, registry=registry)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", registry=registry)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", registry=registry)
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (from the change being queued)",
            buckets=buckets, registry=registry)
        self.sync_failures = Gauge(
            "kubeshim_proxy_sync_failed_service_ports",
            "Service ports that could not be fully served at the last sync", registry=registry)

    @classmethod
    def default(cls) -> ProxyMetrics:
        if cls._default is None:
            cls._default = cls(REGISTRY)
        return cls._default
