"""Health-check nodePorts: one small HTTP listener per externalTrafficPolicy: Local Service.

Owns kube-proxy's service health server (pkg/proxy/healthcheck/service_health.go) for kubeshim:
it follows the Services the proxy's sync applied (`update`, fed from the proxy's change
tracker, proxy/changes.py, as kube-proxy's syncProxyRules feeds SyncServices/SyncEndpoints),
opens a listener on spec.healthCheckNodePort for each proxied Service with
externalTrafficPolicy: Local, closes it when the Service goes or stops asking, and answers
load balancers' probes:

    200 when the node has local endpoints and the proxy is healthy, else 503, with
    {"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": bool},
    X-Content-Type-Options: nosniff and X-Load-Balancing-Endpoint-Weight: N.

N counts the distinct IPs of ready endpoints whose nodeName is this node (kube-proxy's
EndpointsMap.LocalReadyEndpoints: terminating endpoints may still carry traffic, but a node with
only terminating ones fails the check so load balancers drain it). Listeners bind the node
addresses that nodePortAddresses selects (as the proxy reads it: CIDRs and 'primary'), or
every address when it selects all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.state import ServiceInfo

if TYPE_CHECKING:
    # Imported when a health check opens: most nodes start with none to serve.
    from aiohttp import web
    from aiohttp.web_request import BaseRequest

log = get_logger("healthcheck")

# A listener that could not be opened (port taken) is tried again after this long.
RETRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What one Service asks of this node: a port, and how many local endpoints answer it."""

    port: int
    local_endpoints: int


def wanted_health_check(info: ServiceInfo | None, node_name: str) -> HealthCheck | None:
    """The health check a Service needs on `node_name`, or None (pure)."""
    if info is None or not info.proxied:
        return None
    svc = info.service
    port = svc.spec.health_check_node_port
    if not port or not svc.external_local:
        return None
    # Count IPs, not ip:port pairs: a Pod serving two ports is one endpoint.
    local_ips = {ep.ip for p in info.ports for ep in p.endpoints
                 if ep.ready and ep.node_name == node_name}
    return HealthCheck(port, len(local_ips))


def listen_hosts(nodeport_addresses: Sequence[str], exclude_ifname: str = "") -> list[str] | None:
    """The node addresses nodePortAddresses selects; None means every address (a wildcard bind,
    as kube-proxy listens on 0.0.0.0 when the list matches all). Uses the proxy's reading of
    the list, so health checks and NodePorts listen on the same addresses."""
    if not nodeport_addresses or any(
        ipaddress.ip_network(c, strict=False).prefixlen == 0
        for c in nodeport_addresses if c != "primary"
    ):
        return None
    from kubeshim.proxy.vip import nodeport_addresses as select

    return select(list(nodeport_addresses), exclude_ifname)


class ServiceHealthServer:
    """Keeps one listener per wanted health check; probes read the latest counts."""

    def __init__(self, node_name: str, nodeport_addresses: Sequence[str],
                 proxy_healthy: Callable[[], bool], exclude_ifname: str = "") -> None:
        self.exclude_ifname = exclude_ifname
        self.node_name = node_name
        self.nodeport_addresses = list(nodeport_addresses)
        self.proxy_healthy = proxy_healthy
        self._wanted: dict[NamespacedName, HealthCheck] = {}
        self._open: dict[NamespacedName, tuple[int, web.Server, list[asyncio.AbstractServer]]] = {}
        # Set when the wanted ports differ from the open listeners (wakes the reconciler).
        self._reconcile = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._hosts: list[str] | None = None

    # --- the applied Services -------------------------------------------------------------

    def update(self, services: Iterable[tuple[NamespacedName, ServiceInfo | None]]) -> None:
        """Services as the proxy applied them (None: gone): ports and local endpoint counts."""
        for key, info in services:
            check = wanted_health_check(info, self.node_name)
            before = self._wanted.get(key)
            if check is None:
                self._wanted.pop(key, None)
            else:
                self._wanted[key] = check
            if (before and before.port) != (check and check.port):
                self._reconcile.set()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # pyroute2's synchronous socket runs its own event loop: keep it off this one.
        self._hosts = await asyncio.to_thread(
            listen_hosts, self.nodeport_addresses, self.exclude_ifname)
        self._task = asyncio.create_task(self._run(), name="service-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for key in list(self._open):
            await self._close(key)

    def status(self) -> list[dict[str, object]]:
        return [{"service": str(key), "port": port, "localEndpoints": self._count(key)}
                for key, (port, _, _) in sorted(self._open.items())]

    # --- reconciling listeners -----------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._reconcile.wait()
            self._reconcile.clear()
            failed = False
            for key in list(self._open):
                check = self._wanted.get(key)
                if check is None or check.port != self._open[key][0]:
                    await self._close(key)
            for key, check in list(self._wanted.items()):
                if key not in self._open:
                    failed |= not await self._listen(key, check.port)
            if failed:
                loop.call_later(RETRY_SECONDS, self._reconcile.set)

    async def _listen(self, key: NamespacedName, port: int) -> bool:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        server = web.Server(self._handler(key), access_log=None)
        hosts: Sequence[str | None] = self._hosts if self._hosts is not None else [None]
        servers: list[asyncio.AbstractServer] = []
        try:
            for host in hosts:
                inherited = handover.take(socket.SOCK_STREAM, host, port) if host else None
                if inherited is not None:
                    servers.append(await loop.create_server(server, sock=inherited))
                else:
                    servers.append(await loop.create_server(server, host, port,
                                                            reuse_address=True))
        except OSError as e:
            for s in servers:
                s.close()
            log.error("cannot open health check", service=str(key), port=port,
                      node=self.node_name, reason=e.strerror or str(e))
            return False
        self._open[key] = (port, server, servers)
        log.info("opened health check", service=str(key), port=port)
        return True

    async def _close(self, key: NamespacedName) -> None:
        port, server, servers = self._open.pop(key)
        for s in servers:
            s.close()
        await server.shutdown(timeout=1.0)  # also ends kept-alive probe connections
        for s in servers:
            await s.wait_closed()
        log.info("closed health check", service=str(key), port=port)

    def _count(self, key: NamespacedName) -> int:
        check = self._wanted.get(key)
        return check.local_endpoints if check else 0

    def _handler(self, key: NamespacedName) -> Callable[[BaseRequest], Awaitable[web.Response]]:
        from aiohttp import web

        async def handle(_: BaseRequest) -> web.Response:
            count = self._count(key)
            healthy = self.proxy_healthy()
            body = json.dumps({"service": {"namespace": key.namespace, "name": key.name},
                               "localEndpoints": count, "serviceProxyHealthy": healthy},
                              indent="\t")
            return web.Response(
                status=200 if count and healthy else 503, body=body.encode(),
                headers={"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
                         "X-Load-Balancing-Endpoint-Weight": str(count)})

        return handle
