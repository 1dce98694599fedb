"""The proxy's status document (`kubeshim status`, /status) and the counts worker processes
report to their control process, so that both read as one proxy.

Plain data out: what each Service port serves, its capture verdicts, endpoints with their state
and open connections, counters and errors; nothing here changes the proxier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kubeshim.cluster.model import ServicePortName
from kubeshim.cluster.state import EndpointInfo
from kubeshim.proxy.balancer import EndpointKey
from kubeshim.proxy.metrics import PortCounters
from kubeshim.proxy.table import PortTable

if TYPE_CHECKING:
    from kubeshim.proxy.proxier import Proxier


def status_document(proxier: Proxier) -> dict[str, Any]:
    """What the proxier serves, per Service and port (the `proxy` part of /status)."""
    services = []
    for key in sorted(proxier.services):
        rt = proxier.services[key]
        ports = []
        info = rt.info
        for spi in info.ports if info is not None else ():
            tables = [t for f in (4, 6) if (t := proxier.tables.get((spi.name, f))) is not None]
            listeners = sorted(str(k) for k, li in rt.listeners.items()
                               if li.spec.port_name == spi.name)
            entry: dict[str, Any] = {
                "name": spi.name.port, "port": spi.spec.port,
                "protocol": spi.spec.protocol, "nodePort": spi.spec.node_port or None,
                "listeners": listeners,
            }
            if proxier.capture is not None:
                entry["capture"] = [
                    {"address": str(e), "kind": e.kind, "verdict": str(e.verdict),
                     **({"sourceRanges": list(e.source_ranges)} if e.source_ranges else {})}
                    for e in rt.capture if e.port_name == spi.name]
            if tables:
                entry["endpoints"] = [
                    endpoint_status(table, ep, proxier.peer_active if proxier.peers else None)
                    for table in tables for ep in table.endpoints
                ]
                table = tables[0]
                # The topology kube-proxy would apply (PreferSameNode / PreferSameZone).
                entry["topology"] = table.categorized.topology or None
                c = proxier.port_counters(table.name)
                entry.update(c.as_dict())
                entry["active"] = c.connections_active + c.flows_active
                entry["connections"] = c.connections_total
                entry["errors"] = dict(c.errors)
                if table.affinity is not None:
                    entry["affinity"] = {"timeoutSeconds": table.affinity.timeout,
                                         "clients": len(table.affinity)}
            ports.append(entry)
        services.append({
            "name": str(key),
            "clusterIPs": info.service.cluster_ips if info else [],
            "servedAt": {ip: proxier.served_address(ip) for ip in sorted(rt.vips)},
            "ports": ports,
            "errors": [f"{what}: {why}" for what, why in sorted(rt.errors.items())],
        })
    return {
        "vipMode": proxier.config.vip_mode,
        "vipInterface": proxier.config.vip_interface if proxier.vips is not None else None,
        "capture": ({"table": "inet kubeshim", "port": proxier.capture.listen.port,
                     "redirectPort": proxier.capture.listen.redirect,
                     "families": proxier.capture.families,
                     "transactions": proxier.capture.transactions,
                     "appliedWith": proxier.capture.nft.backend}
                    if proxier.capture is not None else None),
        "nodePortAddresses": proxier.node_ips,
        "synced": proxier.state.synced,
        "services": services,
        "connections": len(proxier.connections)
        + sum(r["connections"] for r in proxier.peers.values()),
        "udpFlows": proxier._udp_flows() + sum(r["udpFlows"] for r in proxier.peers.values()),
        "workers": ({"configured": proxier.config.workers,
                     "serving": 1 + sum(bool(r["serving"]) for r in proxier.peers.values())}
                    if proxier.config.workers > 1 else None),
        "budget": {"tcpConnections": proxier.tcp_budget.status(),
                   "udpFlows": proxier.udp_budget.status()},
    }


def endpoint_status(table: PortTable, ep: EndpointInfo,
                     peer_active: Callable[[PortTable, EndpointKey], int] | None = None
                     ) -> dict[str, Any]:
    key = (ep.ip, ep.port)
    used = [w for w, eps in (("internal", table.internal), ("external", table.external))
            if any((e.ip, e.port) == key for e in eps)]
    active = table.active.get(key, 0) + (peer_active(table, key) if peer_active else 0)
    return {"address": ep.address,
            "state": endpoint_state(ep.ready, ep.serving, ep.terminating),
            "node": ep.node_name, "usedFor": used, "active": active}


# A worker's report: {"ports": {port_key: PortCounters.as_dict()}, "active": {port_key/family:
# {ip/port: n}}, "connections": n, "udpFlows": n}. Plain data: it crosses a process boundary.
WorkerReport = dict[str, Any]


def port_key(name: ServicePortName) -> str:
    return f"{name.service}/{name.port}/{name.protocol}"


def add_counts(into: PortCounters, d: dict[str, Any], totals_only: bool = False) -> None:
    """Add the counters of `d` (PortCounters.as_dict()) into `into`; `totals_only` leaves out
    the gauges (open connections and flows)."""
    into.connections_total += d["connectionsTotal"]
    into.bytes_in += d["bytesIn"]
    into.bytes_out += d["bytesOut"]
    into.datagrams_in += d["datagramsIn"]
    into.datagrams_out += d["datagramsOut"]
    if not totals_only:
        into.connections_active += d["connectionsActive"]
        into.flows_active += d["flowsActive"]
    for reason, n in d["errors"].items():
        into.errors[reason] = into.errors.get(reason, 0) + n


def endpoint_state(ready: bool, serving: bool, terminating: bool) -> str:
    if ready:
        return "ready"
    if serving and terminating:
        return "serving-terminating"
    if terminating:
        return "terminating"
    return "not-ready"
