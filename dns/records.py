"""Cluster records: what the cluster zone answers, computed from ClusterState (sans-IO).

`ClusterRecords.resolve(request)` is the one boundary (like dnslib's `BaseResolver.resolve`):
a parsed query in, a reply out with the names its answer depends on, or None when the name is
not ours and goes upstream. Nothing here touches a socket or a clock.

Records follow the Kubernetes DNS-Based Service Discovery specification (kubernetes/dns
docs/specification.md, version 1.1.0) and CoreDNS's kubernetes plugin where the spec is silent:

- A/AAAA of a ClusterIP service: its ClusterIPs, per family (spec 2.3.1), served through
  `address_map` so loopback-mode addresses point where traffic works.
- Headless: one A/AAAA per ready endpoint address, or every endpoint with
  publishNotReadyAddresses; NXDOMAIN when there is none (spec 2.4.1). An endpoint is also named
  `<hostname>.<svc>...` (spec 2.4.1) or, without a hostname, by its dashed address (CoreDNS
  endpointHostname), for any Service with endpoints, as CoreDNS does.
- SRV `_<port>._<proto>.<svc>...` for a named port; SRV on `<svc>...` lists every port (CoreDNS).
  Priority 0, weight 100/n (CoreDNS), targets' addresses in the additional section.
- ExternalName: a CNAME for every type (spec 2.5). For other types than CNAME the reply names
  the target to chase (`Resolution.chase`): the server appends the target's records, as the
  spec's example and CoreDNS do, so stub resolvers that do not follow CNAMEs (glibc) work.
- PTR for ClusterIPs and ready headless endpoint addresses (spec 2.3.3, 2.4.3).
- Pods `a-b-c-d.<ns>.pod.<zone>` (spec 2.6): "insecure" answers any address in any namespace;
  "verified" only an address that is an endpoint of some Service in that namespace, because
  kubeshim watches no Pods (CoreDNS's verified mode checks the Pod itself).
- NXDOMAIN vs NODATA as CoreDNS decides: a name exists when it has any record (so an AAAA query
  on an IPv4-only service is NODATA); `<zone>`, `svc.<zone>`, `pod.<zone>` and `<ns>.svc.<zone>`
  of a namespace with Services are empty non-terminals (NODATA). Negative answers carry the
  zone's SOA, whose TTL and minimum are the negative TTL (RFC 2308 sections 3 and 5).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from dnslib import (
    AAAA,
    CNAME,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.netaddr import ip_family
from kubeshim.cluster.state import ClusterState, ServiceChange, ServiceInfo
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.names import (
    ClusterName,
    NameKind,
    dashed,
    is_reverse,
    parse_cluster_name,
    pod_address,
    reverse_address,
    reverse_zone,
    split_zone,
    wire_labels,
)

Dep = Hashable  # what an answer depends on: ("svc", ns, name), ("ns", ns), ("ptr", ip), ("pod", ns)

CLASS_IN = 1


@dataclass(slots=True)
class Resolution:
    """A reply for one question and the state it was computed from (for cache invalidation)."""

    reply: DNSRecord
    deps: tuple[Dep, ...] = ()
    cacheable: bool = True
    chase: DNSLabel | None = None  # a CNAME target whose records complete the answer


@dataclass(frozen=True, slots=True)
class _Target:
    """One thing a service name stands for: an address, a port, and the name owning that address."""

    ip: str
    port: int | None
    name: str


class ClusterRecords:
    """Answers for the cluster zone (and PTRs of cluster addresses) from a ClusterState."""

    def __init__(
        self,
        state: ClusterState,
        config: DNSConfig,
        address_map: Callable[[str], str] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.zone = config.zone
        self._address_map = address_map
        self._serial = int(time.time()) & 0xFFFFFFFF
        # Indexes kept per change, O(that service): reverse names, namespaces with services,
        # and endpoint addresses per namespace (for verified pod records).
        self._ptr: dict[str, dict[str, int]] = {}
        self._namespaces: dict[str, int] = {}
        self._endpoint_ips: dict[str, dict[str, int]] = {}
        self._reverse_nets = [
            (ipaddress.ip_network(c, strict=False), reverse_zone(c)) for c in config.reverse_cidrs
        ]
        for info in state.services.values():
            self._index(info, +1)

    # --- following the state ----------------------------------------------------------------

    def apply(self, changes: Sequence[ServiceChange]) -> set[Dep]:
        """Update the indexes; return the dependencies whose cached answers are now stale."""
        stale: set[Dep] = set()
        for change in changes:
            ns, name = change.key
            stale.add(("svc", ns, name))
            had_namespace = ns in self._namespaces
            for info, sign in ((change.previous, -1), (change.current, +1)):
                if info is not None:
                    stale.update(("ptr", ip) for ip, _ in self._ptr_entries(info))
                    self._index(info, sign)
            if had_namespace != (ns in self._namespaces):
                stale.add(("ns", ns))
            if _endpoint_addresses(change.previous) != _endpoint_addresses(change.current):
                stale.add(("pod", ns))
        return stale

    def _index(self, info: ServiceInfo, sign: int) -> None:
        ns = info.key.namespace
        _count(self._namespaces, ns, sign)
        for ip, target in self._ptr_entries(info):
            _count(self._ptr.setdefault(ip, {}), target, sign)
            if not self._ptr[ip]:
                del self._ptr[ip]
        ips = self._endpoint_ips.setdefault(ns, {})
        for ip in _endpoint_addresses(info):
            _count(ips, ip, sign)
        if not ips:
            del self._endpoint_ips[ns]

    def _ptr_entries(self, info: ServiceInfo) -> list[tuple[str, str]]:
        fqdn = self._fqdn(info.key)
        svc = info.service
        if not svc.headless:
            return [(_canonical(ip), fqdn) for ip in svc.cluster_ips]
        return [
            (_canonical(t.ip), t.name) for t in self._endpoint_targets(info, fqdn, None, "", "")
        ]

    # --- resolving ----------------------------------------------------------------------------

    def resolve(self, request: DNSRecord) -> Resolution | None:
        """Answer `request` if its name is ours; None means forward it upstream."""
        q = request.q
        wire = wire_labels(q.qname.label)
        labels = split_zone(wire, self.zone)
        if labels is None:
            if not is_reverse(wire):
                return None
            # A label holding a dot never spells an address: match zones only.
            qname = ".".join(wire) if not any("." in label for label in wire) else ""
            return self._resolve_reverse(request, qname)
        reply = _reply(request, aa=True)
        if not self.state.synced:
            # Never a false NXDOMAIN before the first full list (CoreDNS answers SERVFAIL too).
            reply.header.aa = 0
            reply.header.rcode = RCODE.SERVFAIL
            return Resolution(reply, cacheable=False)
        if q.qclass != CLASS_IN:
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return Resolution(reply)
        name = parse_cluster_name(labels)
        records, deps = self._lookup(name, q.qtype, q.qname)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa())
        elif not records.answer:
            reply.add_auth(self._soa())
        else:
            for rr in records.answer:
                reply.add_answer(rr)
            for rr in records.additional:
                reply.add_ar(rr)
            last = records.answer[-1]
            if last.rtype == QTYPE.CNAME and q.qtype not in (QTYPE.CNAME, QTYPE.ANY):
                return Resolution(reply, deps, cacheable=False, chase=last.rdata.label)
        return Resolution(reply, deps)

    def _lookup(
        self, name: ClusterName, qtype: int, owner: object
    ) -> tuple[_RRs | None, tuple[Dep, ...]]:
        """(records, deps): records None means the name does not exist (NXDOMAIN)."""
        kind = name.kind
        if kind is NameKind.APEX:
            return _RRs([self._soa()] if qtype in (QTYPE.SOA, QTYPE.ANY) else []), ()
        if kind is NameKind.VERSION:
            if qtype in (QTYPE.TXT, QTYPE.ANY):
                txt = RR(owner, QTYPE.TXT, rdata=TXT(self.config.spec_version), ttl=self.config.ttl)
                return _RRs([txt]), ()
            return _RRs([]), ()
        if kind is NameKind.SERVICE:
            return self._lookup_service(name, qtype, owner)
        if kind is NameKind.POD:
            return self._lookup_pod(name, qtype, owner)
        return None, ()

    def _lookup_service(
        self, name: ClusterName, qtype: int, owner: object
    ) -> tuple[_RRs | None, tuple[Dep, ...]]:
        if not name.namespace:
            return _RRs([]), ()
        if not name.service:
            dep = ("ns", name.namespace)
            return (_RRs([]) if name.namespace in self._namespaces else None), (dep,)
        key = NamespacedName(name.namespace, name.service)
        deps = (("svc", name.namespace, name.service),)
        info = self.state.services.get(key)
        if info is None:
            return None, deps
        fqdn = self._fqdn(key)
        svc = info.service
        ttl = self.config.ttl
        if svc.spec.type == "ExternalName":
            if name.endpoint or name.port:
                return None, deps
            target = svc.spec.external_name.rstrip(".") + "."
            return _RRs([RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl)]), deps
        if name.endpoint or svc.headless:
            targets = self._endpoint_targets(
                info, fqdn, name.endpoint or None, name.port, name.protocol
            )
        else:
            if self._address_map and not any(map(self._address_map, svc.cluster_ips)) and (
                    svc.cluster_ips):
                # The Service exists but none of its addresses is served here: NODATA, never
                # an address that reaches another Service, nor a false NXDOMAIN.
                return _RRs([]), deps
            targets = self._cluster_ip_targets(info, fqdn, name.port, name.protocol)
        if not targets:
            return None, deps
        return _records_for(targets, qtype, owner, ttl), deps

    def _cluster_ip_targets(
        self, info: ServiceInfo, fqdn: str, port: str, protocol: str
    ) -> list[_Target]:
        svc = info.service
        # The address map names where each address is served ('' where it is not: a loopback
        # address that serves another Service's address).
        ips = (
            [served for ip in svc.cluster_ips if (served := self._address_map(ip))]
            if self._address_map
            else svc.cluster_ips
        )
        if not svc.ports and not port:
            return [_Target(ip, None, fqdn) for ip in ips]
        return [
            _Target(ip, p.port, fqdn)
            for p in svc.ports
            if _port_matches(port, protocol, p.name, p.protocol)
            for ip in ips
        ]

    def _endpoint_targets(
        self, info: ServiceInfo, fqdn: str, endpoint: str | None, port: str, protocol: str
    ) -> list[_Target]:
        """Ready endpoints (all of them with publishNotReadyAddresses) per matching slice port."""
        publish_all = info.service.spec.publish_not_ready_addresses
        out: list[_Target] = []
        for eps in info.slices:
            if eps.address_type == "FQDN" or not eps.endpoints:
                continue
            # A slice without ports still names its endpoints (CoreDNS adds a sentinel port).
            ports: list[int | None]
            if eps.ports:
                ports = [
                    p.port
                    for p in eps.ports
                    if _port_matches(port, protocol, p.name or "", p.protocol)
                ]
            else:
                ports = [] if port else [None]
            if not ports:
                continue
            for ep in eps.endpoints:
                if not (ep.ready or publish_all):
                    continue
                for ip in ep.addresses:
                    host = (ep.hostname or dashed(ip)).lower()
                    if endpoint is not None and host != endpoint:
                        continue
                    out.extend(_Target(ip, number, f"{host}.{fqdn}") for number in ports)
        return out

    def _lookup_pod(
        self, name: ClusterName, qtype: int, owner: object
    ) -> tuple[_RRs | None, tuple[Dep, ...]]:
        mode = self.config.pod_records
        if not name.namespace:
            return _RRs([]), ()
        if mode == "disabled":
            return None, ()
        if not name.service:
            return _RRs([]), ()
        addr = pod_address(name.service)
        if addr is None:
            return None, ()
        deps: tuple[Dep, ...] = ()
        if mode == "verified":
            deps = (("pod", name.namespace),)
            if str(addr) not in self._endpoint_ips.get(name.namespace, {}):
                return None, deps
        target = _Target(str(addr), None, "")
        return _records_for([target], qtype, owner, self.config.ttl), deps

    def _resolve_reverse(self, request: DNSRecord, qname: str) -> Resolution | None:
        addr = reverse_address(qname)
        names = self._ptr.get(str(addr)) if addr is not None else None
        zone = next((z for net, z in self._reverse_nets if addr is not None and addr in net), None)
        if zone is None:
            zone = next(
                (z for _, z in self._reverse_nets if qname == z or qname.endswith("." + z)), None
            )
        if not names:
            if zone is None:
                return None  # not ours: forward (CoreDNS's fallthrough for reverse zones)
            if not self.state.synced:
                reply = _reply(request, aa=False)
                reply.header.rcode = RCODE.SERVFAIL
                return Resolution(reply, cacheable=False)
            reply = _reply(request, aa=True)
            reply.header.rcode = RCODE.NXDOMAIN if addr is not None or qname != zone else 0
            reply.add_auth(self._soa(zone))
            return Resolution(reply, (("ptr", str(addr)),) if addr is not None else ())
        reply = _reply(request, aa=True)
        deps = (("ptr", str(addr)),)
        if request.q.qtype in (QTYPE.PTR, QTYPE.ANY):
            for target in sorted(names):
                reply.add_answer(
                    RR(request.q.qname, QTYPE.PTR, rdata=PTR(target), ttl=self.config.ttl)
                )
        elif zone is not None:
            reply.add_auth(self._soa(zone))
        else:
            return None
        return Resolution(reply, deps)

    # --- helpers ------------------------------------------------------------------------------

    def _fqdn(self, key: NamespacedName) -> str:
        return f"{key.name}.{key.namespace}.svc.{self.zone}"

    def _soa(self, zone: str | None = None) -> RR:
        zone = zone or self.zone
        neg = self.config.negative_ttl
        # RFC 2308 section 5: a negative answer is cached for min(SOA TTL, SOA minimum).
        return RR(
            zone + ".",
            QTYPE.SOA,
            ttl=neg,
            rdata=SOA(
                f"ns.dns.{self.zone}.",
                f"hostmaster.{self.zone}.",
                (self._serial, 7200, 1800, 86400, neg),
            ),
        )


@dataclass(slots=True)
class _RRs:
    answer: list[RR]
    additional: list[RR] = field(default_factory=list)


def _records_for(targets: list[_Target], qtype: int, owner: object, ttl: int) -> _RRs:
    """Turn what a name stands for into the RRs of one type (empty: NODATA)."""
    rrs: list[RR] = []
    if qtype in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
        seen: set[str] = set()
        for t in targets:
            if t.ip in seen:
                continue
            seen.add(t.ip)
            if qtype == QTYPE.ANY or (qtype == QTYPE.AAAA) == (ip_family(t.ip) == 6):
                rrs.append(_address_rr(owner, t.ip, ttl))
        return _RRs(rrs)
    if qtype == QTYPE.SRV:
        srv: dict[tuple[int, str], None] = {}
        for t in targets:
            if t.port is not None and t.port > 0 and t.name:
                srv[(t.port, t.name)] = None
        if not srv:
            return _RRs([])
        weight = 100 // len(srv)
        rrs = [
            RR(owner, QTYPE.SRV, rdata=SRV(0, weight, port, name + "."), ttl=ttl)
            for port, name in srv
        ]
        extra: dict[tuple[str, str], None] = {}
        for t in targets:
            if t.port is not None and (t.port, t.name) in srv:
                extra[(t.name, t.ip)] = None
        additional = [_address_rr(name + ".", ip, ttl) for name, ip in extra]
        return _RRs(rrs, additional)
    return _RRs([])


def _address_rr(owner: object, ip: str, ttl: int) -> RR:
    if ip_family(ip) == 6:
        return RR(owner, QTYPE.AAAA, rdata=AAAA(ip), ttl=ttl)
    return RR(owner, QTYPE.A, rdata=A(ip), ttl=ttl)


def _reply(request: DNSRecord, aa: bool) -> DNSRecord:
    h = request.header
    header = DNSHeader(id=h.id, qr=1, aa=int(aa), ra=1, rd=h.rd, opcode=h.opcode)
    return DNSRecord(header, q=request.q)


def _port_matches(want_port: str, want_proto: str, name: str, protocol: str) -> bool:
    """An empty wanted part matches anything (CoreDNS matchPortAndProtocol)."""
    return (not want_port or want_port == name.lower()) and (
        not want_proto or want_proto == protocol.lower()
    )


def _endpoint_addresses(info: ServiceInfo | None) -> set[str]:
    if info is None:
        return set()
    return {
        _canonical(ip)
        for eps in info.slices
        if eps.address_type != "FQDN"
        for ep in eps.endpoints or ()
        for ip in ep.addresses
    }


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _count(counter: dict[str, int], key: str, sign: int) -> None:
    n = counter.get(key, 0) + sign
    if n > 0:
        counter[key] = n
    else:
        counter.pop(key, None)
