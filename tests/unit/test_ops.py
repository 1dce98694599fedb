"""The operations endpoints (kubeshim/ops.py) on loopback: kube-proxy's health rule and JSON,
the node's eligibility, per-family status, /metrics content negotiation, /status, and the
connection caps and timeouts that keep probes answerable.

Requests come from aiohttp's client and from plain sockets (for heads sent slowly or never
finished), each hostile client from its own 127.0.0.x address. The data plane's two health
times are set by the test through the `probe` the daemon gives `Health`; the caps and timeouts
are lowered per test (module constants) so that a handful of connections reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeshim import ops
from kubeshim.cluster import handover
from kubeshim.ops import Health, OpsServer, build_apps, serve


class DataPlane:
    """The proxy's health times as the daemon's probe reports them (monotonic seconds)."""

    def __init__(self) -> None:
        self.last_updated = 0.0
        self.oldest_queued: float | None = None
        self.eligible = True
        self.families: tuple[str, ...] = ("IPv4",)

    def health(self, timeout: float = 10.0) -> Health:
        return Health(timeout=timeout, probe=lambda: (self.last_updated, self.oldest_queued),
                      node_eligible=lambda: self.eligible, families=lambda: self.families)


class Endpoints:
    def __init__(self, plane: DataPlane, healthz: OpsServer, metrics: OpsServer) -> None:
        self.plane = plane
        self.healthz = healthz
        self.metrics = metrics

    @staticmethod
    def port(server: OpsServer) -> int:
        return int(cast(asyncio.Server, server.server).sockets[0].getsockname()[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port(self.healthz)}{path}"

    def murl(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port(self.metrics)}{path}"

    async def get(self, url: str, **headers: str) -> tuple[int, dict[str, str], str]:
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            return r.status, dict(r.headers), await r.text()

    async def connect(self, client: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to the healthz endpoint from the loopback address `client`."""
        return await asyncio.open_connection("127.0.0.1", self.port(self.healthz),
                                             local_addr=(client, 0))


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    plane = DataPlane()
    healthz_app, metrics_app = build_apps(plane.health(), lambda: {"node": "n1"})
    healthz = await serve(healthz_app, "127.0.0.1", 0, "healthz")
    metrics = await serve(metrics_app, "127.0.0.1", 0, "metrics")
    assert healthz is not None and metrics is not None
    try:
        yield Endpoints(plane, healthz, metrics)
    finally:
        await healthz.cleanup()
        await metrics.cleanup()


async def closed_by_server(reader: asyncio.StreamReader, within: float = 3.0) -> bool:
    """Whether the server closed or reset the connection (True) or kept it open (False)."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionError:  # reset, or the pipe broken while the client still wrote
        return True
    except TimeoutError:
        return False


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  *chunks: bytes) -> int:
    """Send a keep-alive request for /healthz in `chunks` (a short pause between them); the
    status code of the answer, its body read, the connection left open."""
    for i, chunk in enumerate(chunks):
        if i:
            await asyncio.sleep(0.05)
        writer.write(chunk)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head.split()[1])


GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


# --- the health rule -------------------------------------------------------------------------


def test_health_rule_healthy_until_a_queued_change_waits_past_the_timeout() -> None:
    plane = DataPlane()
    health = plane.health(timeout=10)
    now = time.monotonic()
    assert health.check()[:2] == (True, 0.0)  # starting up: never synced, nothing queued
    plane.last_updated = now - 100
    healthy, last_updated, wall = health.check()
    assert healthy and abs((wall - last_updated) - 100) < 1  # the sync, in wall-clock time
    plane.oldest_queued = now - 9  # queued, not late yet
    assert health.healthy()
    plane.oldest_queued = now - 11
    assert not health.healthy()
    plane.last_updated, plane.oldest_queued = time.monotonic(), None  # applied
    assert health.healthy()


async def test_node_not_eligible_fails_healthz_but_not_livez(endpoints: Endpoints) -> None:
    endpoints.plane.eligible = False
    status, _, body = await endpoints.get(endpoints.url("/healthz"))
    doc = json.loads(body)
    assert status == 503 and doc["nodeEligible"] is False and doc["healthy"] is True
    status, _, body = await endpoints.get(endpoints.url("/livez"))
    assert status == 200 and "nodeEligible" not in json.loads(body)
    endpoints.plane.eligible = True
    assert (await endpoints.get(endpoints.url("/healthz")))[0] == 200


async def test_every_synced_family_has_its_status(endpoints: Endpoints) -> None:
    plane = endpoints.plane
    plane.families = ("IPv6", "IPv4")
    _, _, body = await endpoints.get(endpoints.url("/healthz"))
    assert "status" not in json.loads(body)  # omitted until the first sync
    plane.last_updated = time.monotonic() - 2
    _, _, body = await endpoints.get(endpoints.url("/livez"))
    status = json.loads(body)["status"]
    assert list(status) == ["IPv4", "IPv6"]
    assert status["IPv4"] == status["IPv6"]
    assert status["IPv4"]["healthy"] is True
    synced = datetime.fromisoformat(status["IPv4"]["lastUpdated"]).timestamp()
    assert abs(synced - (time.time() - 2)) < 1  # the sync's own time, not the answer's


async def test_unhealthy_answers_carry_the_real_last_update(endpoints: Endpoints) -> None:
    plane = endpoints.plane
    plane.last_updated = time.monotonic() - 30
    plane.oldest_queued = time.monotonic() - 20  # late: the timeout is 10 s
    for path in ("/healthz", "/livez"):
        status, headers, body = await endpoints.get(endpoints.url(path))
        doc = json.loads(body)
        assert status == 503 and doc["healthy"] is False
        assert headers["Content-Type"] == "application/json"
        assert doc["lastUpdated"] == doc["status"]["IPv4"]["lastUpdated"] != doc["currentTime"]


# --- the metrics address ---------------------------------------------------------------------


async def test_metrics_in_the_format_the_scraper_asks_for(endpoints: Endpoints) -> None:
    status, headers, text = await endpoints.get(endpoints.murl("/metrics"))
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "process_open_fds" in {f.name for f in text_string_to_metric_families(text)}
    status, headers, text = await endpoints.get(
        endpoints.murl("/metrics"), Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


async def test_status_and_plain_healthz_on_the_metrics_address_only(
        endpoints: Endpoints) -> None:
    status, _, body = await endpoints.get(endpoints.murl("/status"))
    assert status == 200 and json.loads(body) == {"node": "n1"}
    assert (await endpoints.get(endpoints.murl("/healthz")))[2] == "ok"
    # Each address serves its own paths and nothing else.
    assert (await endpoints.get(endpoints.url("/status")))[0] == 404
    assert (await endpoints.get(endpoints.url("/metrics")))[0] == 404
    assert (await endpoints.get(endpoints.murl("/livez")))[0] == 404
    async with aiohttp.ClientSession() as session, \
            session.post(endpoints.url("/healthz")) as r:
        assert r.status == 405


async def test_an_inherited_listening_socket_is_served_instead_of_a_new_bind() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # Bound and listening: a fresh bind of this address would fail, only the handover serves.
    handover.offer({handover.key_of(socket.SOCK_STREAM, "127.0.0.1", port): listener})
    _, metrics_app = build_apps(DataPlane().health(), lambda: {"inherited": True})
    server = await serve(metrics_app, "127.0.0.1", port, "metrics")
    assert server is not None
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/status") as r:
            assert await r.json() == {"inherited": True}
    finally:
        await server.cleanup()


async def test_a_port_in_use_is_logged_and_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        healthz_app, _ = build_apps(DataPlane().health(), dict)
        assert await serve(healthz_app, "127.0.0.1", taken.getsockname()[1], "healthz") is None


# --- connection caps and timeouts ------------------------------------------------------------


@contextlib.asynccontextmanager
async def healthz_endpoint() -> AsyncIterator[Endpoints]:
    """The healthz endpoint alone, started under the caps the test set."""
    plane = DataPlane()
    app, _ = build_apps(plane.health(), dict)
    server = await serve(app, "127.0.0.1", 0, "healthz")
    assert server is not None
    try:
        yield Endpoints(plane, server, server)
    finally:
        await server.cleanup()


@pytest.fixture
def caps(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def set_caps(**values: float) -> None:
        for name, value in values.items():
            monkeypatch.setattr(ops, name, value)
    return set_caps


async def test_one_client_holds_at_most_its_share_and_others_still_get_in(
        caps: Callable[..., None]) -> None:
    caps(PER_CLIENT=3, MAX_CONNECTIONS=5)
    held: list[asyncio.StreamWriter] = []
    async with healthz_endpoint() as e:
        server = e.healthz
        for _ in range(3):  # 127.0.0.2's share, kept alive after a request each
            reader, writer = await e.connect("127.0.0.2")
            assert await request(reader, writer, GET) == 200
            held.append(writer)
        reader, writer = await e.connect("127.0.0.2")
        held.append(writer)
        assert await closed_by_server(reader)  # a fourth from the same client: refused
        # Another client is admitted, up to the total cap ...
        for client in ("127.0.0.3", "127.0.0.4"):
            reader, writer = await e.connect(client)
            assert await request(reader, writer, GET) == 200
            held.append(writer)
        reader, writer = await e.connect("127.0.0.5")
        held.append(writer)
        assert await closed_by_server(reader)  # ... which is full now
        assert server.status() == {"active": 5, "refused": 2, "headerTimeouts": 0}
        # A closed connection gives its place back.
        held[0].close()
        await asyncio.sleep(0.1)
        reader, writer = await e.connect("127.0.0.2")
        held.append(writer)
        assert await request(reader, writer, GET) == 200
        for writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        assert server.status()["active"] == 0 and server.limits.by_client == {}


async def test_a_head_not_finished_in_time_is_cut_and_a_slow_complete_one_is_served(
        caps: Callable[..., None]) -> None:
    caps(HEADER_TIMEOUT=0.5)
    async with healthz_endpoint() as e:
        server = e.healthz
        stalled_reader, stalled = await e.connect("127.0.0.2")
        stalled.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        # A head in pieces, its blank line split across two of them, finished in time.
        reader, writer = await e.connect("127.0.0.3")
        code = await request(reader, writer, b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n\r",
                             b"\n")
        assert code == 200
        assert await closed_by_server(stalled_reader)
        assert server.status()["headerTimeouts"] == 1
        # Once a head has come, the head deadline no longer applies: idle, then asked again.
        await asyncio.sleep(0.7)
        assert await request(reader, writer, GET) == 200
        stalled.close()
        writer.close()


async def test_a_head_longer_than_any_request_is_cut_at_once(endpoints: Endpoints) -> None:
    reader, writer = await endpoints.connect("127.0.0.2")
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    try:
        for _ in range(40):  # 40 KiB of header lines, never the blank line
            writer.write(b"X-Pad: " + b"a" * 1014 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
    except ConnectionError:  # reset or broken pipe: cut while still sending
        pass
    # Cut long before the 10 s head deadline, and not by a timeout.
    assert await closed_by_server(reader, within=3)
    assert endpoints.healthz.status()["headerTimeouts"] == 0
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
        caps: Callable[..., None]) -> None:
    caps(KEEPALIVE_TIMEOUT=0.5)
    async with healthz_endpoint() as e:
        reader, writer = await e.connect("127.0.0.2")
        assert await request(reader, writer, GET) == 200
        assert await closed_by_server(reader, within=3)
        writer.close()


def test_aiohttp_waits_for_an_endpoint() -> None:
    """The daemon's start-up path imports no HTTP server: without ops endpoints or health-check
    nodePorts (a worker, --healthz-bind-address "") aiohttp's import is never paid."""
    import subprocess
    import sys

    code = ("import sys, kubeshim.daemon, kubeshim.proxy.proxier, "
            "kubeshim.cluster.sources.manifests; print(sorted({m.split('.')[0] for m in "
            "sys.modules} & {'aiohttp', 'multidict', 'yarl'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
