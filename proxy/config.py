"""The proxy's configuration: what the daemon decides from flags and the KubeProxyConfiguration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

VipMode = Literal["tproxy", "interface", "loopback"]
BalancePolicy = Literal["round-robin", "random", "least-connections"]


@dataclass
class ProxyConfig:
    # "tproxy": nftables hands the Service tuples to transparent listeners (proxy/capture.py);
    # "interface": ClusterIPs (and externalIPs / LoadBalancer IPs) are assigned to
    # `vip_interface`, like IPVS mode's kube-ipvs0; "loopback": each one maps to a 127/8 address.
    vip_mode: VipMode
    vip_interface: str = "kubeshim0"
    # --hostname-override: which endpoints are node-local for traffic policy Local.
    node_name: str = ""
    # kube-proxy's nodePortAddresses: CIDRs and/or "primary"; empty means every node address.
    nodeport_addresses: list[str] = field(default_factory=list)
    balance: BalancePolicy = "round-robin"
    # A TCP connection with no traffic either way for this long is closed (0 = never). The
    # default is kube-proxy's: conntrack.tcpEstablishedTimeout, 24 h.
    tcp_idle_timeout: float = 86400.0
    tcp_connect_timeout: float = 3.0
    # How many further endpoints a connection tries after a failed connect.
    connect_retries: int = 2
    # --udp-timeout: how long an idle UDP flow keeps its endpoint.
    udp_timeout: float = 30.0
    udp_max_flows: int = 65536  # per listener; the oldest flow goes when it is full
    # Caps in total and per client address (0: sized from the descriptor limit, proxy/budget.py).
    max_connections: int = 0
    max_connections_per_client: int = 0
    max_udp_flows: int = 0
    max_udp_flows_per_client: int = 0
    # Taking over from a running kubeshim: keep the VIP addresses and the capture table it left
    # until this process has synced (kubeshim/takeover.py).
    adopt: bool = False
    # RLIMIT_NOFILE the caps are sized from (0: read it at start).
    descriptor_limit: int = 0
    listen_backlog: int = 4096
    # tproxy mode: the port of the transparent listeners (on 127.0.0.1 and ::1).
    capture_port: int = 10265
    # A worker process (kubeshim/workers.py): it serves the transparent listeners (joining
    # their SO_REUSEPORT groups) while the control process owns the nftables table and route.
    worker: bool = False
    # The processes serving the listeners (the control process's own count, --workers).
    workers: int = 1
    # Pod CIDRs (kube-proxy's clusterCIDR, detectLocalMode ClusterCIDR): which clients are
    # local pods, for Local-policy short-circuits and keeping the client's address.
    cluster_cidrs: list[str] = field(default_factory=list)
    # The DNS server's transparent binds (the kube-dns ClusterIP on this node): tproxy mode
    # hands their tuples to it in the capture table; interface mode keeps their addresses on
    # the VIP interface and opens no listener of its own on those ports.
    dns_capture: list[tuple[str, int]] = field(default_factory=list)
