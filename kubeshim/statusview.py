"""Tables for `kubeshim state` (what the sources deliver) and `kubeshim status` (a live daemon)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from cluster.state import ClusterState, EndpointInfo, ServiceInfo


def _endpoint_state(ep: EndpointInfo) -> str:
    if ep.ready:
        return "ready"
    if ep.serving and ep.terminating:
        return "terminating"
    if ep.terminating:
        return "terminating,not-serving"
    return "not-ready"


def _service_json(info: ServiceInfo, vip: Callable[[str], str] | None) -> dict[str, Any]:
    svc = info.service
    out: dict[str, Any] = {
        "namespace": svc.metadata.namespace,
        "name": svc.metadata.name,
        "type": svc.spec.type,
        "clusterIPs": svc.cluster_ips,
        "proxied": info.proxied,
        "ports": [],
    }
    if vip is not None and svc.cluster_ips:
        out["servedAt"] = {ip: vip(ip) for ip in svc.cluster_ips}
    if svc.headless:
        out["headless"] = True
    if svc.spec.external_name:
        out["externalName"] = svc.spec.external_name
    for extra, value in (("externalIPs", svc.spec.external_ips),
                         ("loadBalancerIPs", svc.load_balancer_ips)):
        if value:
            out[extra] = value
    if svc.affinity_timeout:
        out["sessionAffinityTimeoutSeconds"] = svc.affinity_timeout
    for port in info.ports:
        out["ports"].append({
            "name": port.spec.name,
            "protocol": port.spec.protocol,
            "port": port.spec.port,
            "nodePort": port.spec.node_port or None,
            "endpoints": [{"address": ep.address, "state": _endpoint_state(ep),
                           "nodeName": ep.node_name} for ep in port.endpoints],
        })
    return out


def _vip_function(vip_mode: str | None) -> Callable[[str], str] | None:
    if vip_mode != "loopback":
        return None
    from proxy.vip import LoopbackMapper

    mapper = LoopbackMapper()
    return mapper.address


def state_as_json(state: ClusterState, vip_mode: str | None = None) -> dict[str, Any]:
    vip = _vip_function(vip_mode)
    return {
        "synced": state.synced,
        "services": [_service_json(state.services[k], vip) for k in sorted(state.services)],
    }


def print_state(state: ClusterState, vip_mode: str | None = None) -> None:
    vip = _vip_function(vip_mode)
    table = Table(title="Services and endpoints", show_lines=False)
    for column in ("NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT", "ENDPOINTS"):
        table.add_column(column)
    for key in sorted(state.services):
        info = state.services[key]
        svc = info.service
        ips = ",".join(svc.cluster_ips) or ("None" if svc.headless else "-")
        if vip is not None and svc.cluster_ips:
            ips += " -> " + ",".join(vip(ip) for ip in svc.cluster_ips)
        kind = svc.spec.type + ("" if info.proxied or svc.spec.type == "ExternalName" else " (not proxied)")
        if svc.spec.type == "ExternalName":
            table.add_row(key.namespace, key.name, kind, svc.spec.external_name, "", "")
            continue
        if not info.ports:
            table.add_row(key.namespace, key.name, kind, ips, "", "")
        for i, port in enumerate(info.ports):
            node = f":{port.spec.node_port}" if port.spec.node_port else ""
            label = f"{port.spec.name or '-'} {port.spec.port}{node}/{port.spec.protocol}"
            eps = " ".join(f"{ep.address}({_endpoint_state(ep)})" for ep in port.endpoints) or "<none>"
            first = i == 0
            table.add_row(key.namespace if first else "", key.name if first else "",
                          kind if first else "", ips if first else "", label, eps)
    Console(width=200).print(table)
    if not state.synced:
        print("warning: the source has not delivered a complete list")


def print_status(data: dict[str, Any]) -> None:
    console = Console(width=200)
    console.print(f"node {data.get('node')}  synced={data.get('synced')}  "
                  f"healthy={data.get('healthy')}  generation={data.get('generation')}  "
                  f"uptime={data.get('uptimeSeconds')}s")
    proxy = data.get("proxy") or {}
    services = proxy.get("services") or []
    table = Table(title="Proxied services")
    for column in ("SERVICE", "PORT", "LISTENING ON", "ENDPOINTS", "CONNECTIONS", "ERRORS"):
        table.add_column(column)
    for svc in services:
        for port in svc.get("ports", []):
            table.add_row(
                svc.get("name", ""),
                f"{port.get('name') or '-'} {port.get('port')}/{port.get('protocol')}",
                " ".join(port.get("listeners", [])),
                " ".join(f"{e.get('address')}({e.get('state')})" for e in port.get("endpoints", [])),
                str(port.get("active", port.get("connections", ""))),
                str(port.get("errors", "")),
            )
    console.print(table)
    if dns := data.get("dns"):
        console.print(f"dns: {dns}")
