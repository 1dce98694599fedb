"""TPROXY capture rules, sans-IO: per Service port, what the kernel does with its tuples.

Owns the kubeshim nftables table (`inet kubeshim`): which (address, protocol, port) tuples are
handed to the transparent listeners, and the verdicts kube-proxy gives in the kernel
(pkg/proxy/nftables/proxier.go, syncProxyRules):

- a port without usable endpoints is rejected: TCP reset to the SYN, ICMP port unreachable
  ("has no endpoints", the reject chain);
- a Local traffic policy with no local endpoint drops ("has no local endpoints"); external
  traffic from the node itself or from a local pod is short-circuited to the cluster-wide
  endpoints first, as kube-proxy's external chain does;
- sources outside spec.loadBalancerSourceRanges are dropped for LoadBalancer IPs (the firewall
  chains);
- other ports of a ClusterIP are rejected ("cluster-ips-check");
- LoadBalancer ingress IPs with ipMode Proxy are not captured (KEP-1860).

Captured packets go to the transparent listeners by TPROXY, except those that arrived on a Linux
bridge: with br_netfilter (net.bridge.bridge-nf-call-iptables=1, what kubeadm requires) the
prerouting hook runs during the bridge pass (br_nf_pre_routing), where the socket TPROXY assigns is
orphaned again by ip_rcv_core() and br_netfilter's ip_sabotage_in skips the second pass, so the
packet would reach the socket lookup with no socket for its Service tuple. Those packets are marked
and NATed instead (`redirect`, a DNAT to the bridge's own address, as kube-proxy's DNAT works
there) to the redirect listeners on a port of their own, which the input hook lets reach only
through that NAT.

`capture_entries` turns a Service into `CaptureEntry`s; `Ruleset` renders the whole table (start)
or the element changes between two sets of entries (a sync), always as one `nft -f -`
transaction. Nothing here runs a process or touches a socket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kubeshim.cluster.model import ServicePortName
from kubeshim.cluster.netaddr import ip_family
from kubeshim.cluster.state import ServiceInfo

TABLE = "kubeshim"
# fwmark of packets delivered locally (policy routing: fwmark -> table with a local default).
CAPTURE_MARK = 0x4B53
ROUTE_TABLE = 0x4B53
# SO_MARK of kubeshim's own outbound sockets: never captured again.
BYPASS_MARK = 0x4B54
# fwmark of captured packets that arrived on a Linux bridge: NATed to the redirect listeners.
REDIRECT_MARK = 0x4B55


class Verdict(StrEnum):
    CAPTURED = "captured"
    REJECTED = "rejected"  # no endpoints
    DROPPED = "dropped"  # internalTrafficPolicy Local without a local endpoint
    LOCAL_ONLY = "local-only"  # externalTrafficPolicy Local without one: node/pods short-circuit
    NOT_CAPTURED = "not-captured"  # LoadBalancer ingress with ipMode Proxy


# A verdict -> the map value it becomes.
_MAP_VALUE = {
    Verdict.CAPTURED: "goto capture-chain",
    Verdict.REJECTED: "goto reject-chain",
    Verdict.DROPPED: "drop",
    Verdict.LOCAL_ONLY: "goto local-only",
}


@dataclass(frozen=True, slots=True)
class CaptureEntry:
    """One captured tuple of a Service port; NodePorts have no address (any local one)."""

    kind: str  # ClusterIP, ExternalIP, LoadBalancer, NodePort
    family: int
    address: str  # "" for a NodePort
    protocol: str
    port: int
    verdict: Verdict
    port_name: ServicePortName
    source_ranges: tuple[str, ...] = ()  # LoadBalancer IPs only

    def __str__(self) -> str:
        if not self.address:
            host = "*" if self.family == 4 else "[*]"
        else:
            host = f"[{self.address}]" if self.family == 6 else self.address
        return f"{host}:{self.port}/{self.protocol}"

    @property
    def key(self) -> tuple[int, str, str, int]:
        return (self.family, self.address, self.protocol, self.port)


@dataclass(frozen=True, slots=True)
class PortEndpoints:
    """Which endpoint sets of one service port (one family) are non-empty."""

    any: bool  # some endpoint in the cluster is usable
    internal: bool  # for ClusterIP traffic
    external: bool  # for NodePort / externalIP / LoadBalancer traffic


def _verdict(ends: PortEndpoints, external: bool) -> Verdict:
    # proxier.go: no endpoints at all -> reject; endpoints, but none for this kind of
    # traffic (a Local policy) -> drop.
    if not ends.any:
        return Verdict.REJECTED
    if external:
        return Verdict.CAPTURED if ends.external else Verdict.LOCAL_ONLY
    return Verdict.CAPTURED if ends.internal else Verdict.DROPPED


def capture_entries(
    info: ServiceInfo, endpoints: Callable[[ServicePortName, int], PortEndpoints]
) -> list[CaptureEntry]:
    """The tuples of one proxied Service and their verdicts (SCTP ports are left out)."""
    if not info.proxied:
        return []
    svc = info.service
    families = {ip_family(ip) for ip in svc.cluster_ips}
    proxy_ips = set(svc.proxy_mode_ips)
    ranges = tuple(r.strip() for r in svc.spec.load_balancer_source_ranges if r.strip())
    addresses = [("ClusterIP", ip) for ip in svc.cluster_ips]
    # An address of a family the Service does not have is ignored, as by kube-proxy's
    # per-family proxiers.
    addresses += [("ExternalIP", ip) for ip in svc.spec.external_ips if ip_family(ip) in families]
    addresses += [("LoadBalancer", ip) for ip in [*svc.load_balancer_ips, *svc.proxy_mode_ips]
                  if ip_family(ip) in families]
    out: dict[tuple[int, str, str, int], CaptureEntry] = {}
    for spi in info.ports:
        sp = spi.spec
        if sp.protocol == "SCTP":
            continue
        for kind, ip in addresses:
            family = ip_family(ip)
            if kind == "LoadBalancer" and ip in proxy_ips:
                verdict = Verdict.NOT_CAPTURED
            else:
                verdict = _verdict(endpoints(spi.name, family), kind != "ClusterIP")
            fw = (tuple(r for r in ranges if ip_family(r) == family) if kind == "LoadBalancer"
                  else ())
            if kind == "LoadBalancer" and ranges and not fw:
                fw = ("0.0.0.0/32",) if family == 4 else ("::/128",)  # no range of this family
            entry = CaptureEntry(kind, family, ip, sp.protocol, sp.port, verdict, spi.name, fw)
            out.setdefault(entry.key, entry)
        if sp.node_port and svc.spec.type in ("NodePort", "LoadBalancer"):
            for family in sorted(families):
                entry = CaptureEntry("NodePort", family, "", sp.protocol, sp.node_port,
                                     _verdict(endpoints(spi.name, family), True), spi.name)
                out.setdefault(entry.key, entry)
    return list(out.values())


# --- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenPorts:
    """Where the transparent listeners are (loopback addresses and one port), and the port of
    the redirect listeners (every address, the next port; reached only through the NAT)."""

    port: int
    ipv4: str = "127.0.0.1"
    ipv6: str = "::1"

    @property
    def redirect(self) -> int:
        return self.port + 1


@dataclass
class Elements:
    """The table's set and map elements, as nft text per set name."""

    items: dict[str, set[str]] = field(default_factory=dict)

    def add(self, name: str, element: str) -> None:
        self.items.setdefault(name, set()).add(element)


def _ip_kw(ip: str) -> str:
    return "ip6" if ip_family(ip) == 6 else "ip"


def _host(ip: str) -> str:
    return f"[{ip}]" if ip_family(ip) == 6 else ip


def _proto(p: str) -> str:
    return p.lower()


def _tuple(e: CaptureEntry) -> str:
    return f"{e.address} . {_proto(e.protocol)} . {e.port}"


def elements_of(entries: Iterable[CaptureEntry], cluster_ips: Iterable[str]) -> Elements:
    out = Elements()
    for e in entries:
        if e.verdict == Verdict.NOT_CAPTURED:
            continue
        f = e.family
        value = _MAP_VALUE[e.verdict]
        if e.kind == "NodePort":
            out.add(f"nodeports{f}", f"{_proto(e.protocol)} . {e.port} : {value}")
            continue
        out.add(f"services{f}", f"{_tuple(e)} : {value}")
        out.add(f"tuples{f}", _tuple(e))
        if e.source_ranges:
            out.add(f"firewall{f}", _tuple(e))
            for r in e.source_ranges:
                net = ipaddress.ip_network(r, strict=False)
                out.add(f"firewall-allow{f}", f"{_tuple(e)} . {net}")
    for ip in cluster_ips:
        out.add(f"cluster-ips{ip_family(ip)}", ip)
    return out


_SETS: dict[str, tuple[str, str]] = {
    # name: (type, flags)
    "services4": ("ipv4_addr . inet_proto . inet_service : verdict", ""),
    "services6": ("ipv6_addr . inet_proto . inet_service : verdict", ""),
    "nodeports4": ("inet_proto . inet_service : verdict", ""),
    "nodeports6": ("inet_proto . inet_service : verdict", ""),
    "tuples4": ("ipv4_addr . inet_proto . inet_service", ""),
    "tuples6": ("ipv6_addr . inet_proto . inet_service", ""),
    "firewall4": ("ipv4_addr . inet_proto . inet_service", ""),
    "firewall6": ("ipv6_addr . inet_proto . inet_service", ""),
    "firewall-allow4": ("ipv4_addr . inet_proto . inet_service . ipv4_addr", "interval"),
    "firewall-allow6": ("ipv6_addr . inet_proto . inet_service . ipv6_addr", "interval"),
    "cluster-ips4": ("ipv4_addr", ""),
    "cluster-ips6": ("ipv6_addr", ""),
    "cluster-cidr4": ("ipv4_addr", "interval"),
    "cluster-cidr6": ("ipv6_addr", "interval"),
}


@dataclass
class Ruleset:
    """Renders the kubeshim table: whole (start) or as element changes (a sync)."""

    listen: ListenPorts
    cluster_cidrs: Sequence[str] = ()
    nodeport_cidrs: Sequence[str] = ()  # empty: every local address
    # The DNS server's transparent binds (address, port): their TCP and UDP tuples go to the
    # DNS server's own sockets, before any Service capture (the kube-dns ClusterIP on the node).
    dns_binds: Sequence[tuple[str, int]] = ()

    def _chains(self) -> list[str]:
        m, b, lp = f"0x{CAPTURE_MARK:x}", f"0x{BYPASS_MARK:x}", self.listen
        r = f"0x{REDIRECT_MARK:x}"
        np4 = np6 = ""
        if self.nodeport_cidrs:
            v4 = [c for c in self.nodeport_cidrs if ip_family(c) == 4]
            v6 = [c for c in self.nodeport_cidrs if ip_family(c) == 6]
            np4 = f"ip daddr {{ {', '.join(v4)} }} " if v4 else None  # type: ignore[assignment]
            np6 = f"ip6 daddr {{ {', '.join(v6)} }} " if v6 else None  # type: ignore[assignment]
        nodeports = []
        # nftables mode serves no NodePort on localhost (its localhostNodePorts is false). The
        # port is looked up first (the map's keys): the fib lookup, the costliest match here,
        # runs only for packets to a NodePort, not for every packet that reaches this rule.
        if np4 is not None:
            nodeports.append(f"meta l4proto . th dport @nodeports4 {np4}ip daddr != 127.0.0.0/8 "
                             "fib daddr type local meta l4proto . th dport vmap @nodeports4")
        if np6 is not None:
            nodeports.append(f"meta l4proto . th dport @nodeports6 {np6}ip6 daddr != ::1 "
                             "fib daddr type local meta l4proto . th dport vmap @nodeports6")
        return [
            "chain reject-chain {",
            "  meta l4proto tcp reject with tcp reset",
            "  reject with icmpx port-unreachable",
            "}",
            "chain capture-chain {",
            # Arrived on a bridge: br_netfilter may be running this hook in the bridge pass,
            # where TPROXY cannot deliver (the module's docstring); capture-redirect NATs it.
            f'  meta iifkind "bridge" meta mark set {r} accept',
            f"  meta mark set {m}",
            f"  meta l4proto tcp tproxy ip to {lp.ipv4}:{lp.port} accept",
            f"  meta l4proto udp tproxy ip to {lp.ipv4}:{lp.port} accept",
            f"  meta l4proto tcp tproxy ip6 to [{lp.ipv6}]:{lp.port} accept",
            f"  meta l4proto udp tproxy ip6 to [{lp.ipv6}]:{lp.port} accept",
            "  drop",
            "}",
            # proxier.go's external chain: traffic from the node itself or from a local pod is
            # short-circuited to the cluster-wide endpoints even under a Local policy.
            "chain local-only {",
            "  fib saddr type local goto capture-chain",
            "  ip saddr @cluster-cidr4 goto capture-chain",
            "  ip6 saddr @cluster-cidr6 goto capture-chain",
            "  drop",
            "}",
            "chain services {",
            *(f"  {_ip_kw(ip)} daddr {ip} meta l4proto {{ tcp, udp }} th dport {port} "
              f"meta mark set {m} tproxy {_ip_kw(ip)} to {_host(ip)}:{port} accept"
              for ip, port in self.dns_binds),
            "  ip daddr . meta l4proto . th dport @firewall4 "
            "ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow4 drop",
            "  ip6 daddr . meta l4proto . th dport @firewall6 "
            "ip6 daddr . meta l4proto . th dport . ip6 saddr != @firewall-allow6 drop",
            "  ip daddr . meta l4proto . th dport vmap @services4",
            "  ip6 daddr . meta l4proto . th dport vmap @services6",
            *(f"  {r}" for r in nodeports),
            "  ip daddr @cluster-ips4 goto reject-chain",
            "  ip6 daddr @cluster-ips6 goto reject-chain",
            "}",
            # After the verdicts (priority mangle), before routing: bridged captured packets
            # to the redirect listeners; conntrack keeps the original destination and un-NATs
            # the replies.
            "chain capture-redirect {",
            "  type nat hook prerouting priority dstnat; policy accept;",
            f"  meta mark {r} meta l4proto {{ tcp, udp }} redirect to :{lp.redirect}",
            "}",
            # The redirect listeners listen on every address: only the redirect reaches them.
            # (TPROXY'd packets, marked, may have that port too: a Service port or NodePort.)
            "chain capture-input {",
            "  type filter hook input priority filter; policy accept;",
            f"  meta l4proto {{ tcp, udp }} th dport {lp.redirect} ct status dnat accept",
            f"  meta l4proto {{ tcp, udp }} th dport {lp.redirect} meta mark != {m} "
            "goto reject-chain",
            "}",
            "chain capture-prerouting {",
            "  type filter hook prerouting priority mangle; policy accept;",
            f"  meta mark {b} return",
            # The return path of established transparent sockets (accepted ones, and outbound
            # ones bound to a client's address): delivered locally by the policy route.
            f"  meta l4proto {{ tcp, udp }} socket transparent 1 meta mark set {m} accept",
            "  jump services",
            "}",
            # Locally originated traffic to Service addresses: marked, so the policy route sends
            # it through lo, where prerouting captures it. (Traffic to NodePorts on local
            # addresses passes lo anyway.)
            "chain capture-output {",
            "  type route hook output priority mangle; policy accept;",
            f"  meta mark {b} return",
            *(f"  {_ip_kw(ip)} daddr {ip} meta l4proto {{ tcp, udp }} th dport {port} "
              f"meta mark set {m} return" for ip, port in self.dns_binds),
            f"  ip daddr . meta l4proto . th dport @tuples4 meta mark set {m} return",
            f"  ip6 daddr . meta l4proto . th dport @tuples6 meta mark set {m} return",
            f"  ip daddr @cluster-ips4 meta mark set {m} return",
            f"  ip6 daddr @cluster-ips6 meta mark set {m} return",
            "}",
        ]

    def full(self, elements: Elements) -> str:
        """The whole table, replacing whatever table of that name exists (one transaction)."""
        lines = [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
        cidrs = Elements()
        for c in self.cluster_cidrs:
            cidrs.add(f"cluster-cidr{ip_family(c)}", str(ipaddress.ip_network(c, strict=False)))
        for name, (type_, flags) in _SETS.items():
            kind = "map" if ":" in type_ else "set"
            lines.append(f"  {kind} {name} {{")
            lines.append(f"    type {type_}")
            if flags:
                lines.append(f"    flags {flags}")
            items = elements.items.get(name, set()) | cidrs.items.get(name, set())
            if items:
                lines.append(f"    elements = {{ {', '.join(sorted(items))} }}")
            lines.append("  }")
        lines += [f"  {line}" for line in self._chains()]
        lines.append("}")
        return "\n".join(lines) + "\n"


class ElementStore:
    """The table's elements, counted per owner (Service), with the changes not yet applied.

    An element two Services share (a ClusterIP set entry, say) stays until the last one drops
    it. Each change costs O(that Service's elements), never O(all Services)."""

    def __init__(self) -> None:
        self._by_owner: dict[object, Elements] = {}
        self._count: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[str, str], bool] = {}  # element -> present after the change

    def replace(self, owner: object, new: Elements) -> None:
        old = self._by_owner.pop(owner, Elements())
        if new.items:
            self._by_owner[owner] = new
        for name in old.items.keys() | new.items.keys():
            before = old.items.get(name, set())
            after = new.items.get(name, set())
            for el in before - after:
                self._bump((name, el), -1)
            for el in after - before:
                self._bump((name, el), 1)

    def _bump(self, item: tuple[str, str], delta: int) -> None:
        n = self._count.get(item, 0) + delta
        if n > 0:
            self._count[item] = n
        else:
            self._count.pop(item, None)
        if (n == 1 and delta > 0) or (n == 0 and delta < 0):
            if item in self._pending:
                del self._pending[item]  # changed back before being applied
            else:
                self._pending[item] = n > 0

    def current(self) -> Elements:
        out = Elements()
        for name, el in self._count:
            out.add(name, el)
        return out

    def pending(self) -> str:
        """The transaction for the changes since the last `applied()`; "" when none."""
        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        for (name, el), present in self._pending.items():
            if present:
                adds.setdefault(name, []).append(el)
            else:
                deletes.setdefault(name, []).append(_key(el))
        # Deletions first: a map key whose value changed is deleted, then added again.
        lines = [f"delete element inet {TABLE} {n} {{ {', '.join(sorted(e))} }}"
                 for n, e in sorted(deletes.items())]
        lines += [f"add element inet {TABLE} {n} {{ {', '.join(sorted(e))} }}"
                  for n, e in sorted(adds.items())]
        return "\n".join(lines) + "\n" if lines else ""

    def applied(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._count)


def _key(element: str) -> str:
    """A map element's key (what `delete element` takes)."""
    return element.split(" : ", 1)[0]
