"""The operations HTTP endpoints: /healthz and /livez like kube-proxy, /metrics, /status.

Health follows kube-proxy's proxier health server (pkg/proxy/healthcheck/proxier_health.go):
healthy unless a change has been queued for the data plane and not applied within the health
timeout (twice the sync period). The answer carries lastUpdated and currentTime.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from cluster.log import get_logger

log = get_logger("ops")


@dataclass
class Health:
    """kube-proxy's health rule over the data plane's (last_updated, oldest_queued) times.

    `probe` returns monotonic times: when the data plane last applied state, and since when the
    oldest change not yet applied has waited (None when nothing waits).
    """

    timeout: float
    probe: Callable[[], tuple[float, float | None]]

    def check(self) -> tuple[bool, float]:
        """(healthy, last_updated as wall-clock time)."""
        updated, queued = self.probe()
        now = time.monotonic()
        healthy = queued is None or now < queued + self.timeout
        return healthy, (time.time() - (now - updated)) if updated else 0.0

    def healthy(self) -> bool:
        return self.check()[0]


def _rfc3339(ts: float) -> str:
    if ts <= 0:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _health_handler(health: Health) -> Callable[[web.Request], Any]:
    async def handle(_: web.Request) -> web.Response:
        ok, last_updated = health.check()
        body = {"lastUpdated": _rfc3339(last_updated), "currentTime": _rfc3339(time.time()),
                "nodeEligible": True}
        return web.Response(status=200 if ok else 503, text=json.dumps(body),
                            content_type="application/json")

    return handle


async def _metrics(_: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def build_apps(health: Health, status: Callable[[], dict[str, Any]]) -> tuple[web.Application, web.Application]:
    """The healthz app (healthz bind address) and the metrics app (metrics bind address)."""
    healthz = web.Application()
    healthz.router.add_get("/healthz", _health_handler(health))
    healthz.router.add_get("/livez", _health_handler(health))

    async def status_handler(_: web.Request) -> web.Response:
        return web.json_response(status())

    metrics = web.Application()
    metrics.router.add_get("/metrics", _metrics)
    metrics.router.add_get("/status", status_handler)
    metrics.router.add_get("/healthz", _health_handler(health))
    return healthz, metrics


async def serve(app: web.Application, host: str, port: int, what: str) -> web.AppRunner | None:
    """Start one HTTP endpoint; a bind failure is logged and the daemon keeps going."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as e:
        log.error("cannot serve endpoint", what=what, address=f"{host}:{port}", reason=e.strerror or str(e))
        await runner.cleanup()
        return None
    log.info("serving", what=what, address=f"{host}:{port}")
    return runner
