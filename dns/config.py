"""DNS server options: the zone, where to listen, where to forward, TTLs and cache bounds.

`DNSConfig` is plain data the daemon fills from its flags; `resolv_conf_nameservers` reads the
node's resolver configuration for the default upstreams (what CoreDNS's `forward . /etc/resolv.conf`
does).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PodRecords = Literal["disabled", "insecure", "verified"]


def resolv_conf_nameservers(path: str | Path = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf as (address, 53); empty when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    servers = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            # A scoped IPv6 address (fe80::1%eth0) keeps its scope; asyncio accepts it.
            servers.append((parts[1], 53))
    return servers


@dataclass
class DNSConfig:
    zone: str = "cluster.local"  # --cluster-domain
    binds: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 53)])
    # Binds (also listed in binds) opened with IP_TRANSPARENT: an address that is not local,
    # such as the kube-dns ClusterIP, whose packets a TPROXY rule hands to the DNS sockets.
    transparent_binds: list[tuple[str, int]] = field(default_factory=list)
    # SO_REUSEPORT on every bind: worker processes share them, the kernel balances queries.
    reuse_port: bool = False
    upstreams: list[tuple[str, int]] = field(default_factory=resolv_conf_nameservers)
    ttl: int = 30  # TTL of cluster records
    negative_ttl: int = 30  # the zone SOA's minimum and TTL: how long NXDOMAIN/NODATA are kept
    pod_records: PodRecords = "insecure"
    # Reverse zones (CIDRs, e.g. the Service CIDR) answered only from the cluster: an unknown
    # address in them gets NXDOMAIN instead of being forwarded. Empty: unknown PTRs are forwarded
    # (CoreDNS's `fallthrough in-addr.arpa ip6.arpa`).
    reverse_cidrs: list[str] = field(default_factory=list)
    # Wire answers for cluster names; cleared when full.
    answer_cache_size: int = 10000
    # Upstream answers: positive and negative stores, each bounded, oldest out first.
    upstream_cache_size: int = 10000
    upstream_negative_cache_size: int = 10000
    upstream_max_ttl: int = 3600  # cap on how long an upstream answer is kept
    upstream_timeout: float = 2.0  # per upstream, per attempt
    # All attempts for one question end by then (the client's patience: glibc waits 5 s).
    forward_deadline: float = 5.0
    # Connected UDP sockets per upstream, shared by all forwarded queries (transaction ids
    # tell them apart); each is replaced after a few hundred queries so source ports keep
    # changing (RFC 5452 section 9.2).
    upstream_sockets: int = 8
    # RFC 8767 serve-stale (section 5's timers): an expired upstream answer is kept up to
    # serve_stale_max past its expiry (the maximum stale timer; 1 to 3 days recommended, 0
    # turns serve-stale off). Upstream is always asked first; the stale answer (TTL
    # serve_stale_ttl, section 4) goes out when no fresh one came within
    # serve_stale_client_timeout (the client response timer) or every upstream failed, while
    # the exchange goes on and refreshes the cache. After a failed refresh the name is answered
    # stale without asking upstream for serve_stale_recheck seconds (the failure recheck timer).
    serve_stale_max: float = 86400.0
    serve_stale_ttl: int = 30
    serve_stale_client_timeout: float = 1.8
    serve_stale_recheck: float = 30.0
    # Forwarded queries in flight at once; beyond it queries get REFUSED (CoreDNS forward's
    # max_concurrent) instead of piling up tasks while upstreams are slow.
    max_concurrent_forwards: int = 1000
    tcp_idle_timeout: float = 10.0
    tcp_max_pipelined: int = 64  # queries in flight on one TCP connection before reading pauses
    # DNS over TCP connections held at once, in total and per client address; beyond either a
    # new connection is closed at once. A message must arrive whole within tcp_read_timeout.
    tcp_max_connections: int = 256
    tcp_max_connections_per_client: int = 16
    tcp_read_timeout: float = 5.0
    # Clients allowed to query (CIDRs); others get REFUSED, as CoreDNS's acl plugin answers a
    # blocked client. Empty: every client that can reach a bind.
    allowed_clients: list[str] = field(default_factory=list)
    # Response rate limiting of UDP replies (authoritative servers' RRL, dns/gate.py):
    # rrl_responses_per_second identical responses per second per client prefix (0: off), a
    # burst of one second; identical means the same name and type for an answer, the same
    # name for NODATA, the same zone for NXDOMAIN, any error for errors. rrl_all_per_second
    # (BIND's all-per-second; 0: off) caps every reply to a prefix together. Past a limit
    # every rrl_slip-th reply goes out as an empty TC=1 reply (the client retries over TCP,
    # which is not limited) and the rest are dropped (rrl_slip 0: all dropped).
    rrl_responses_per_second: float = 0.0
    rrl_all_per_second: float = 0.0
    rrl_slip: int = 2
    rrl_ipv4_prefix: int = 24
    rrl_ipv6_prefix: int = 56
    max_udp_payload: int = 4096  # the largest EDNS UDP size we honour (and advertise)
    # Read and answer UDP in batches (recvmmsg/sendmmsg) where libc has them; off: one
    # datagram per callback through the event loop's datagram transport.
    udp_batch: bool = True
    spec_version: str = "1.1.0"  # answered at dns-version.<zone> (DNS spec section 2.2)

    def __post_init__(self) -> None:
        self.zone = self.zone.strip(".").lower()
        if not self.zone:
            raise ValueError("DNS zone (cluster domain) must not be empty")
        if self.pod_records not in ("disabled", "insecure", "verified"):
            raise ValueError(
                f"pod records mode {self.pod_records!r} is not disabled, insecure or verified"
            )
        if self.ttl < 0 or self.negative_ttl < 0 or self.serve_stale_ttl < 0:
            raise ValueError("DNS TTLs must not be negative")
        if min(self.serve_stale_max, self.serve_stale_client_timeout,
               self.serve_stale_recheck) < 0:
            raise ValueError("DNS serve-stale timers must not be negative")
        for cidr in self.allowed_clients:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as e:
                raise ValueError(f"DNS allowed client {cidr!r} is not a CIDR: {e}") from None
        if min(self.rrl_responses_per_second, self.rrl_all_per_second, self.rrl_slip) < 0:
            raise ValueError("DNS rate limit and slip must not be negative")
        if self.rrl_ipv4_prefix % 8 or not 8 <= self.rrl_ipv4_prefix <= 32:
            raise ValueError("DNS rate-limit IPv4 prefix must be 8, 16, 24 or 32")
        if self.rrl_ipv6_prefix % 8 or not 8 <= self.rrl_ipv6_prefix <= 128:
            raise ValueError("DNS rate-limit IPv6 prefix must be a multiple of 8 up to 128")
        if self.upstream_sockets < 1 or self.tcp_max_connections < 1:
            raise ValueError("DNS upstream sockets and TCP connection cap must be at least 1")
