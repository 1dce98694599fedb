"""The operations HTTP endpoints: /healthz and /livez like kube-proxy, /metrics, /status.

Health follows kube-proxy's proxier health server (pkg/proxy/healthcheck/proxier_health.go):
healthy unless a change has been queued for the data plane and has waited longer than the health
timeout (kube-proxy: twice the sync period) without being applied. Both paths answer the JSON
kube-proxy v1.37 marshals (healthcheck/proxy_health.go ProxyHealth): lastUpdated, currentTime,
healthy and the per-family status, times in Go's JSON form (RFC 3339 with nanoseconds);
/healthz adds nodeEligible and fails (503) while the node is not eligible (tainted
ToBeDeletedByClusterAutoscaler or being deleted); /livez ignores the node. Each answer is
counted in kubeproxy_proxy_healthz_total / kubeproxy_proxy_livez_total by code.

The metrics address serves prometheus_client's default registry (process metrics included; the
proxy and DNS server register their collectors there), kubeshim's /status JSON, and, like
kube-proxy's metrics server (cmd/kube-proxy/app/server.go, serveMetrics), a plain /healthz and
/proxyMode: the mode's name as text (kubeshim's capture mode: tproxy, interface or loopback).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter
from prometheus_client.exposition import choose_encoder

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger

if TYPE_CHECKING:
    # Imported where an endpoint is built: aiohttp takes a tenth of a second to import, which
    # a daemon without ops endpoints (or a worker) need not spend at start.
    from aiohttp import web

log = get_logger("ops")

# kube-proxy's pkg/proxy/metrics ProxyHealthzTotal / ProxyLivezTotal.
HEALTHZ_TOTAL = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status",
                        ["code"], registry=REGISTRY)
LIVEZ_TOTAL = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status",
                      ["code"], registry=REGISTRY)

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


@dataclass
class Health:
    """kube-proxy's health rule over the data plane's (last_updated, oldest_queued) times.

    `probe` returns monotonic times: when the data plane last applied state (0: never), and
    since when the oldest change not yet applied has waited (None when nothing waits).
    """

    timeout: float
    probe: Callable[[], tuple[float, float | None]]
    # Whether this node may take load-balancer traffic (ClusterState.node_eligible).
    node_eligible: Callable[[], bool] = field(default=lambda: True)
    # The IP families the data plane serves ("IPv4", "IPv6"): kube-proxy's per-family status.
    families: Callable[[], Sequence[str]] = field(default=lambda: ("IPv4",))

    def check(self) -> tuple[bool, float, float]:
        """(healthy, last_updated, now), the two times as wall-clock seconds (0: never)."""
        updated, queued = self.probe()
        mono, now = time.monotonic(), time.time()
        # Healthy while starting up or fully synced, or while the oldest queued change is
        # not yet late (proxier_health.go isHealthy).
        healthy = queued is None or mono - queued < self.timeout
        return healthy, (now - (mono - updated)) if updated else 0.0, now

    def healthy(self) -> bool:
        return self.check()[0]


def go_time(ts: float) -> str:
    """A time as Go's encoding/json writes a time.Time in UTC (RFC 3339 with up to nine
    fraction digits, trailing zeros dropped), e.g. 2024-05-01T10:00:00.5Z; the zero time is
    0001-01-01T00:00:00Z."""
    if ts <= 0:
        return "0001-01-01T00:00:00Z"
    dt = datetime.fromtimestamp(ts, UTC)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def health_handler(health: Health, livez: bool) -> Handler:
    """kube-proxy's healthzHandler (livez=False) or livezHandler (livez=True)."""
    from aiohttp import web

    counter = LIVEZ_TOTAL if livez else HEALTHZ_TOTAL

    async def handle(_: web.Request) -> web.Response:
        proxy_healthy, last_updated, now = health.check()
        node_eligible = health.node_eligible()
        healthy = proxy_healthy and (livez or node_eligible)
        # kube-proxy reports a "recent" lastUpdated whenever it is healthy, as older releases
        # did when their sync loop ran even with nothing to change; the per-family status
        # keeps the real time. "healthy" is the proxier's own health, without the node.
        doc: dict[str, Any] = {"lastUpdated": go_time(now if healthy else last_updated),
                               "currentTime": go_time(now)}
        if not livez:
            doc["nodeEligible"] = node_eligible
        doc["healthy"] = proxy_healthy
        if last_updated:  # kube-proxy lists only families that have synced (omitempty)
            doc["status"] = {family: {"lastUpdated": go_time(last_updated),
                                      "healthy": proxy_healthy}
                             for family in sorted(health.families())}
        status = 200 if healthy else 503
        counter.labels(code=str(status)).inc()
        body = json.dumps(doc, separators=(",", ":"))
        return web.Response(status=status, body=body.encode(), headers={
            "Content-Type": "application/json", "X-Content-Type-Options": "nosniff"})

    return handle


async def _metrics(request: web.Request) -> web.Response:
    from aiohttp import web

    # The format the scraper asks for (Prometheus text 0.0.4 by default, OpenMetrics on request).
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(REGISTRY), headers={"Content-Type": content_type})


async def _ok(_: web.Request) -> web.Response:
    from aiohttp import web

    return web.Response(text="ok")


def build_apps(
    health: Health, status: Callable[[], dict[str, Any]],
    proxy_mode: Callable[[], str] = lambda: "",
) -> tuple[web.Application, web.Application]:
    """The healthz app (healthz bind address) and the metrics app (metrics bind address).
    `proxy_mode` names the mode the proxy runs in, "" while there is none (404)."""
    from aiohttp import web

    async def proxy_mode_handler(_: web.Request) -> web.Response:
        mode = proxy_mode()
        if not mode:
            raise web.HTTPNotFound(text="no service proxy")
        return web.Response(text=mode, headers={"X-Content-Type-Options": "nosniff"})

    healthz = web.Application()
    healthz.router.add_get("/healthz", health_handler(health, livez=False))
    healthz.router.add_get("/livez", health_handler(health, livez=True))

    async def status_handler(_: web.Request) -> web.Response:
        return web.json_response(status())

    metrics = web.Application()
    metrics.router.add_get("/metrics", _metrics)
    metrics.router.add_get("/status", status_handler)
    metrics.router.add_get("/healthz", _ok)
    metrics.router.add_get("/proxyMode", proxy_mode_handler)
    return healthz, metrics


# The ops endpoints serve probes and scrapes: short requests from few clients. A connection
# must send its request head within HEADER_TIMEOUT, may idle between requests KEEPALIVE_TIMEOUT,
# and one client address may hold PER_CLIENT of the MAX_CONNECTIONS, so slow or piled-up
# clients cannot take the descriptors or the port from the kubelet's and load balancers' probes.
MAX_CONNECTIONS = 256
PER_CLIENT = 32
HEADER_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 15.0


class _Limits:
    def __init__(self, what: str) -> None:
        self.what = what
        self.active = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self.timed_out = 0


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's request handler: admission by the caps, and a deadline for the head."""

    def __init__(self, inner: Any, limits: _Limits) -> None:
        self.inner = inner
        self.limits = limits
        self.client = ""
        self.admitted = False
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        lim = self.limits
        n = lim.by_client.get(self.client, 0)
        if lim.active >= MAX_CONNECTIONS or n >= PER_CLIENT:
            lim.refused += 1
            transport.abort()
            return
        self.admitted = True
        lim.active += 1
        lim.by_client[self.client] = n + 1
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._head_late)
        self.inner.connection_made(transport)

    def _head_late(self) -> None:
        self.limits.timed_out += 1
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            # Waiting for the first request head: look for its end across chunks.
            if b"\r\n\r\n" in self.tail + data[:8192]:
                self.timer.cancel()
                self.timer = None
            elif len(self.tail) < 16384:
                self.tail = (self.tail + data)[-16384:]
            else:
                self.timer.cancel()
                self.timer = None
                self.transport.abort()  # a head past aiohttp's own limits: no request
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        if self.timer is not None:
            self.timer.cancel()
        lim = self.limits
        lim.active -= 1
        n = lim.by_client.get(self.client, 0) - 1
        if n > 0:
            lim.by_client[self.client] = n
        else:
            lim.by_client.pop(self.client, None)
        self.inner.connection_lost(exc)


class OpsServer:
    """One HTTP endpoint: aiohttp's handler behind the connection caps and timeouts."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer,
                 limits: _Limits) -> None:
        self.runner = runner
        self.server = server
        self.limits = limits

    def status(self) -> dict[str, int]:
        lim = self.limits
        return {"active": lim.active, "refused": lim.refused, "headerTimeouts": lim.timed_out}

    async def cleanup(self) -> None:
        self.server.close()
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, what: str) -> OpsServer | None:
    """Start one HTTP endpoint; a bind failure is logged and the daemon keeps going."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    handler = runner.server
    assert handler is not None
    limits = _Limits(what)
    loop = asyncio.get_running_loop()
    inherited = handover.take(socket.SOCK_STREAM, host, port)
    try:
        if inherited is not None:
            server = await loop.create_server(lambda: _Guard(handler(), limits), sock=inherited,
                                              backlog=128)
        else:
            server = await loop.create_server(lambda: _Guard(handler(), limits), host, port,
                                              reuse_address=True, backlog=128)
    except OSError as e:
        log.error("cannot serve endpoint", what=what, address=f"{host}:{port}",
                  reason=e.strerror or str(e))
        await runner.cleanup()
        return None
    log.info("serving", what=what, address=f"{host}:{port}")
    return OpsServer(runner, server, limits)
