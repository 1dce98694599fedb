"""/healthz, /livez and /metrics through curl on real sockets, with the health rule driven."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeshim.ops import Health, build_apps, go_time, serve
from tests.ports import free_port


async def curl(url: str) -> tuple[int, dict[str, str], str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "3",
        "-D",
        "-",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


class DataPlane:
    """Stands in for the proxier's two health timestamps (monotonic)."""

    def __init__(self) -> None:
        self.last_updated = 0.0
        self.last_queued: float | None = None

    def probe(self) -> tuple[float, float | None]:
        return self.last_updated, self.last_queued


@pytest.fixture
async def endpoints() -> Any:
    plane = DataPlane()
    health = Health(timeout=0.5, probe=plane.probe)
    healthz_app, metrics_app = build_apps(
        health, lambda: {"node": "n1", "healthy": health.healthy()}
    )
    hp, mp = free_port(), free_port()
    runners = [
        await serve(healthz_app, "127.0.0.1", hp, "healthz"),
        await serve(metrics_app, "127.0.0.1", mp, "metrics"),
    ]
    try:
        yield plane, f"http://127.0.0.1:{hp}", f"http://127.0.0.1:{mp}"
    finally:
        for r in runners:
            assert r is not None
            await r.cleanup()


GO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


async def test_healthy_while_starting_and_when_synced(endpoints: Any) -> None:
    plane, healthz, _ = endpoints
    for path in ("/healthz", "/livez"):
        status, headers, body = await curl(healthz + path)
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert headers["x-content-type-options"] == "nosniff"
        doc = json.loads(body)
        assert GO_TIME.fullmatch(doc["lastUpdated"]) and GO_TIME.fullmatch(doc["currentTime"])
        # Healthy answers report lastUpdated as now, as kube-proxy does.
        assert doc["lastUpdated"] == doc["currentTime"]
        # kube-proxy v1.37's ProxyHealth, keys in its field order; no family has synced yet.
        want = ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
        assert list(doc) == [k for k in want if path == "/healthz" or k != "nodeEligible"]
        assert doc["healthy"] is True and "status" not in doc
    plane.last_updated = time.monotonic() - 3
    status, _, body = await curl(healthz + "/healthz")
    doc = json.loads(body)
    assert status == 200 and list(doc) == ["lastUpdated", "currentTime", "nodeEligible",
                                           "healthy", "status"]
    assert list(doc["status"]) == ["IPv4"] and doc["status"]["IPv4"]["healthy"] is True
    # The family keeps its real last update (3 s ago); the top level says "now".
    assert doc["status"]["IPv4"]["lastUpdated"] < doc["lastUpdated"] == doc["currentTime"]
    assert ", " not in body and ": " not in body  # Go's json.Marshal: no spaces


async def test_a_change_queued_past_the_timeout_is_503(endpoints: Any) -> None:
    plane, healthz, _ = endpoints
    plane.last_updated = time.monotonic() - 5
    plane.last_queued = time.monotonic()
    assert (await curl(healthz + "/healthz"))[0] == 200  # queued, not late yet
    await asyncio.sleep(0.6)
    for path in ("/healthz", "/livez"):
        status, _, body = await curl(healthz + path)
        doc = json.loads(body)
        assert status == 503
        # Unhealthy answers carry the real last update, about 5.6 s ago.
        assert doc["lastUpdated"] != doc["currentTime"]
        assert doc["healthy"] is False and doc["status"]["IPv4"]["healthy"] is False
    plane.last_queued, plane.last_updated = None, time.monotonic()
    assert (await curl(healthz + "/livez"))[0] == 200


async def test_metrics_serve_process_and_health_counters(endpoints: Any) -> None:
    plane, healthz, metrics = endpoints

    def count(text: str, name: str, code: str) -> float:
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == name and sample.labels.get("code") == code:
                    return sample.value
        return 0.0

    _, _, before = await curl(metrics + "/metrics")
    await curl(healthz + "/healthz")
    await curl(healthz + "/healthz")
    plane.last_queued = time.monotonic() - 10
    await curl(healthz + "/livez")
    status, headers, text = await curl(metrics + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds",
        "process_open_fds",
        "kubeproxy_proxy_healthz",
        "kubeproxy_proxy_livez",
    } <= names
    assert (
        count(text, "kubeproxy_proxy_healthz_total", "200")
        == count(before, "kubeproxy_proxy_healthz_total", "200") + 2
    )
    assert (
        count(text, "kubeproxy_proxy_livez_total", "503")
        == count(before, "kubeproxy_proxy_livez_total", "503") + 1
    )


async def test_metrics_address_serves_status_and_plain_healthz(endpoints: Any) -> None:
    _, _, metrics = endpoints
    status, headers, body = await curl(metrics + "/status")
    assert status == 200 and json.loads(body) == {"node": "n1", "healthy": True}
    assert (await curl(metrics + "/healthz"))[2] == "ok"


async def test_metrics_address_names_the_proxy_mode() -> None:
    """/proxyMode as kube-proxy's metrics server serves it (e2e: `should check kube-proxy
    urls`): the mode as plain text, the one the proxy runs in now; 404 without a proxy."""
    mode = ""
    _, app = build_apps(Health(timeout=1, probe=DataPlane().probe), dict, lambda: mode)
    port = free_port()
    runner = await serve(app, "127.0.0.1", port, "metrics")
    assert runner is not None
    try:
        assert (await curl(f"http://127.0.0.1:{port}/proxyMode"))[0] == 404
        mode = "interface"  # e.g. tproxy fell back once the proxier started
        status, headers, body = await curl(f"http://127.0.0.1:{port}/proxyMode")
        assert (status, body) == (200, "interface")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["x-content-type-options"] == "nosniff"
    finally:
        await runner.cleanup()


async def test_a_port_in_use_is_reported_not_fatal() -> None:
    from aiohttp import web

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert await serve(web.Application(), "127.0.0.1", port, "healthz") is None


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0, "0001-01-01T00:00:00Z"),
        (1700000000.25, "2023-11-14T22:13:20.25Z"),
        (1700000000, "2023-11-14T22:13:20Z"),
    ],
)
def test_go_time(ts: float, text: str) -> None:
    assert go_time(ts) == text
