"""Tables for `kubeshim state` (what the sources deliver) and `kubeshim status` (a live daemon)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from kubeshim.cluster.state import ClusterState, EndpointInfo, ServiceInfo


def _endpoint_state(ep: EndpointInfo) -> str:
    """The words the proxy's status uses: ready, serving-terminating, terminating, not-ready."""
    if ep.ready:
        return "ready"
    if ep.serving and ep.terminating:
        return "serving-terminating"
    if ep.terminating:
        return "terminating"
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
    from kubeshim.proxy.vip import LoopbackMapper

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
        shown = info.proxied or svc.spec.type == "ExternalName"
        kind = svc.spec.type + ("" if shown else " (not proxied)")
        if svc.spec.type == "ExternalName":
            table.add_row(key.namespace, key.name, kind, svc.spec.external_name, "", "")
            continue
        if not info.ports:
            table.add_row(key.namespace, key.name, kind, ips, "", "")
        for i, port in enumerate(info.ports):
            node = f":{port.spec.node_port}" if port.spec.node_port else ""
            label = f"{port.spec.name or '-'} {port.spec.port}{node}/{port.spec.protocol}"
            eps = " ".join(f"{ep.address}({_endpoint_state(ep)})" for ep in port.endpoints)
            eps = eps or "<none>"
            first = i == 0
            table.add_row(key.namespace if first else "", key.name if first else "",
                          kind if first else "", ips if first else "", label, eps)
    Console(width=200).print(table)
    if not state.synced:
        print("warning: the source has not delivered a complete list")


def _errors_text(errors: Any) -> str:
    if isinstance(errors, dict):
        return " ".join(f"{reason}={n}" for reason, n in sorted(errors.items())) or "-"
    return str(errors or "-")


def _served_text(port: dict[str, Any]) -> str:
    """Listening sockets, or in tproxy mode each captured tuple with its verdict."""
    if "capture" not in port:
        return " ".join(port.get("listeners", []))
    return " ".join(f"{e['address']}={e['verdict']}"
                    + (f"(from {','.join(e['sourceRanges'])})" if e.get("sourceRanges") else "")
                    for e in port["capture"])


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    """`kubeshim status`: what a running daemon serves, from its GET /status answer."""
    console = console or Console(width=200)
    proxy = data.get("proxy") or {}
    console.print(
        f"node [bold]{data.get('node')}[/]  synced={data.get('synced')}  "
        f"healthy={data.get('healthy')}  generation={data.get('generation')}  "
        f"uptime={data.get('uptimeSeconds')}s"
    )
    node = data.get("nodeObject")
    if node is None:
        console.print("Node object: not seen (no topology zone; eligible)")
    elif node.get("deleted"):
        console.print("Node object: [red]deleted[/] (not eligible)")
    else:
        eligible = "eligible" if node.get("eligible") else "[red]not eligible[/]"
        taints = ",".join(node.get("taints") or []) or "-"
        deleting = "  [red]being deleted[/]" if node.get("deleting") else ""
        console.print(f"Node object: zone={node.get('zone') or '-'}  {eligible}  "
                      f"taints={taints}{deleting}")
    if proxy:
        where = proxy.get("vipMode", "?")
        if proxy.get("vipInterface"):
            where += f" on {proxy['vipInterface']}"
        console.print(
            f"proxy: VIPs {where}  nodePort addresses "
            f"{','.join(proxy.get('nodePortAddresses') or []) or '-'}  "
            f"open connections {proxy.get('connections', 0)}  "
            f"UDP flows {proxy.get('udpFlows', 0)}"
        )
        table = Table(title="Services")
        capture = proxy.get("capture") is not None
        for column in ("SERVICE", "CLUSTER-IP", "PORT", "CAPTURE" if capture else "LISTENING ON",
                       "ENDPOINTS", "ACTIVE", "TOTAL", "ERRORS"):
            table.add_column(column)
        for svc in proxy.get("services", []):
            served = svc.get("servedAt") or {}
            ips = " ".join(
                ip + (f" -> {at}" if at != ip else "") for ip, at in sorted(served.items())
            ) or ",".join(svc.get("clusterIPs") or []) or "-"
            ports = [p for p in svc.get("ports", []) if p.get("listeners") or p.get("capture")]
            if not ports:
                table.add_row(svc.get("name", ""), ips, "", "[dim]not proxied[/]", "", "", "",
                              "")
            for i, port in enumerate(ports):
                node = f":{port['nodePort']}" if port.get("nodePort") else ""
                topology = f"[{port['topology']}] " if port.get("topology") else ""
                endpoints = topology + " ".join(
                    f"{e.get('address')}({e.get('state')}"
                    + (f",{e['active']} open" if e.get("active") else "") + ")"
                    for e in port.get("endpoints", [])
                ) or "<none>"
                table.add_row(
                    svc.get("name", "") if i == 0 else "",
                    ips if i == 0 else "",
                    f"{port.get('name') or '-'} {port.get('port')}{node}/{port.get('protocol')}",
                    _served_text(port),
                    endpoints,
                    str(port.get("active", 0)),
                    str(port.get("connections", 0)),
                    _errors_text(port.get("errors")),
                )
        console.print(table)
        for svc in proxy.get("services", []):
            for error in svc.get("errors", []):
                console.print(f"[red]error[/] {svc.get('name')}: {error}")
    if checks := data.get("healthCheckNodePorts"):
        table = Table(title="Health-check nodePorts")
        for column in ("SERVICE", "PORT", "LOCAL ENDPOINTS"):
            table.add_column(column)
        for check in checks:
            table.add_row(str(check["service"]), str(check["port"]),
                          str(check["localEndpoints"]))
        console.print(table)
    if dns := data.get("dns"):
        console.print(
            f"dns: zone {dns.get('zone')}  listening on {' '.join(dns.get('listen', []))}  "
            f"upstreams {' '.join(dns.get('upstreams', [])) or '-'}"
        )
        for name in ("answerCache", "upstreamCache"):
            if cache := dns.get(name):
                console.print(f"  {name}: " + " ".join(f"{k}={v}" for k, v in cache.items()))
