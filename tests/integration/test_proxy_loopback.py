"""The proxier in loopback mode with real backends and real clients on 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry, generate_latest

from kubeshim.cluster.state import ClusterState
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.proxier import Proxier
from tests.ports import free_port
from tests.proxy_helpers import (
    endpoint,
    endpoint_slice,
    name_server,
    service,
    udp_name_server,
)

# Addresses unique to this process, so parallel runs on one machine do not collide.
NET = f"{os.getpid() % 200 + 20}"
BACKEND = [f"127.1.{NET}.{i}" for i in range(1, 6)]
CLUSTER_IP = f"10.100.{NET}.10"


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


class Env:
    def __init__(self) -> None:
        self.state = ClusterState()
        self.registry = CollectorRegistry()
        self.proxier = Proxier(
            self.state,
            ProxyConfig(vip_mode="loopback", node_name="node-a",
                        nodeport_addresses=["127.0.0.0/8"], tcp_connect_timeout=1.0,
                        udp_timeout=5.0),
            registry=self.registry,
        )
        self.port = free_port(BACKEND[0])
        self.servers: list[Any] = []

    def publish(self, services: list[Any], slices: list[Any]) -> None:
        self.state.replace("Service", services)
        self.state.replace("EndpointSlice", slices)

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not self.proxier.changes and (self.proxier._sync_task is None
                                            or self.proxier._sync_task.done()):
                return

    def vip(self, ip: str = CLUSTER_IP) -> str:
        return self.proxier.vip_address(ip)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    await e.proxier.start()
    try:
        yield e
    finally:
        await e.proxier.stop(0.5)
        for s in e.servers:
            s.close()


def web(port: int, **spec: Any) -> Any:
    return service("web", CLUSTER_IP, [{"name": "http", "port": port, "protocol": "TCP"}], **spec)


def web_slice(port: int, *eps: dict[str, Any]) -> Any:
    return endpoint_slice("web", eps, [{"name": "http", "port": port, "protocol": "TCP"}])


@contextlib.asynccontextmanager
async def udp_service_proxier(**config: Any) -> AsyncIterator[Proxier]:
    """A loopback Proxier of its own (config as given) serving one UDP Service, port 5353,
    backed by one name server at BACKEND[0]."""
    state = ClusterState()
    proxier = Proxier(state, ProxyConfig(vip_mode="loopback", **config,
                                         nodeport_addresses=["127.0.0.1/32"]),
                      registry=CollectorRegistry())
    await proxier.start()
    port = free_port(BACKEND[0], socket.SOCK_DGRAM)
    backend = await udp_name_server(BACKEND[0], port, "pod-0")
    svc = service("dns", CLUSTER_IP, [{"name": "dns", "port": 5353, "protocol": "UDP"}])
    eps = [{"name": "dns", "port": port, "protocol": "UDP"}]
    try:
        state.replace("Service", [svc])
        state.replace("EndpointSlice", [endpoint_slice("dns", [endpoint(BACKEND[0])], eps)])
        await asyncio.sleep(0.1)
        yield proxier
    finally:
        await proxier.stop(0.1)
        backend.close()


async def ask(ip: str, port: int, send: bytes = b"") -> bytes:
    """Connect, read the backend's name line, optionally send and half-close, read to EOF."""
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        if send:
            writer.write(send)
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 5)
            return line + rest
        return line
    finally:
        writer.close()


async def test_cluster_ip_forwards_and_round_robin_spreads(env: Env) -> None:
    for i in range(3):
        env.servers.append(await name_server(BACKEND[i], env.port, f"pod-{i}"))
    env.publish([web(8080)], [web_slice(env.port, *(endpoint(BACKEND[i]) for i in range(3)))])
    await env.settle()
    vip = env.vip()
    assert vip == f"127.100.{NET}.10"
    names = collections.Counter([(await ask(vip, 8080)).strip() for _ in range(30)])
    assert names == {b"pod-0": 10, b"pod-1": 10, b"pod-2": 10}
    metrics = generate_latest(env.registry).decode()
    labels = 'port="http",protocol="TCP",service="default/web"'
    assert f"kubeshim_proxy_connections_total{{{labels}}} 30.0" in metrics
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in metrics


async def test_curl_through_cluster_ip(env: Env, tmp_path: Any) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    (tmp_path / "index.html").write_text("hello from pod\n")
    proc = subprocess.Popen(
        ["python3", "-m", "http.server", str(env.port), "--bind", BACKEND[0]],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]))])
        await env.settle()
        for _ in range(100):
            out = await asyncio.to_thread(
                subprocess.run, ["curl", "-sS", "--max-time", "5", f"http://{env.vip()}:8080/"],
                capture_output=True, text=True)
            if out.returncode == 0:
                break
            await asyncio.sleep(0.05)
        assert out.stdout == "hello from pod\n", out.stderr
    finally:
        proc.terminate()
        proc.wait()


async def test_client_ip_affinity_pins(env: Env) -> None:
    for i in range(3):
        env.servers.append(await name_server(BACKEND[i], env.port, f"pod-{i}"))
    svc = web(8080, sessionAffinity="ClientIP",
              sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    env.publish([svc], [web_slice(env.port, *(endpoint(BACKEND[i]) for i in range(3)))])
    await env.settle()
    names = {(await ask(env.vip(), 8080)).strip() for _ in range(10)}
    assert len(names) == 1


async def test_no_endpoints_refuses_until_one_is_ready(env: Env) -> None:
    """A port without endpoints has no socket, so the kernel refuses the connection (kube-proxy
    rejects it); a ready endpoint opens it, losing the endpoint closes it again."""
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0], ready=False))])
    await env.settle()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(env.vip(), 8080)
    [svc] = env.proxier.status()["services"]
    assert svc["ports"][0]["listeners"] == []
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]))])
    await env.settle()
    assert (await ask(env.vip(), 8080)).strip() == b"pod-0"
    env.publish([web(8080)], [web_slice(env.port)])
    await env.settle()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(env.vip(), 8080)


async def test_half_close_with_socat(env: Env) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat missing")
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]))])
    await env.settle()
    # socat sends stdin, shuts down its write side at stdin's EOF, and keeps reading the reply.
    out = await asyncio.to_thread(
        subprocess.run, ["socat", "-t", "5", "-", f"TCP:{env.vip()}:8080"],
        input=b"ping\n", capture_output=True, timeout=10)
    assert out.stdout == b"pod-0\nping\nbye\n", out.stderr


async def test_raw_shutdown_wr_then_reply(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]))])
    await env.settle()

    def client() -> bytes:
        with socket.create_connection((env.vip(), 8080), timeout=5) as s:
            s.sendall(b"x" * 100000)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
            return b"".join(chunks)

    reply = await asyncio.to_thread(client)
    assert reply == b"pod-0\n" + b"x" * 100000 + b"bye\n"


async def test_failed_endpoint_is_retried_on_the_next(env: Env) -> None:
    # BACKEND[0] has nothing listening: connects there are refused and go to BACKEND[1].
    env.servers.append(await name_server(BACKEND[1], env.port, "pod-1"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]), endpoint(BACKEND[1]))])
    await env.settle()
    names = [(await ask(env.vip(), 8080)).strip() for _ in range(6)]
    assert names == [b"pod-1"] * 6
    port = env.proxier.status()["services"][0]["ports"][0]
    assert port["errors"]["connect_failed"] >= 3


async def test_a_connect_that_hangs_times_out_and_goes_to_the_next(env: Env) -> None:
    # BACKEND[0] listens but never accepts, and its accept queue is full: the kernel drops
    # further SYNs, so a connect there hangs until tcp_connect_timeout (1 s here), then the
    # connection is retried on BACKEND[1].
    stuck = socket.socket()
    stuck.bind((BACKEND[0], env.port))
    stuck.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    try:
        for f in fillers:
            f.setblocking(False)
            f.connect_ex((BACKEND[0], env.port))
        await asyncio.sleep(0.2)
        env.servers.append(await name_server(BACKEND[1], env.port, "pod-1"))
        env.publish([web(8080)],
                    [web_slice(env.port, endpoint(BACKEND[0]), endpoint(BACKEND[1]))])
        await env.settle()
        started = time.monotonic()
        names = [(await ask(env.vip(), 8080)).strip() for _ in range(2)]
        assert names == [b"pod-1"] * 2
        assert time.monotonic() - started >= 1.0  # one of them waited for the timeout
        errors = env.proxier.status()["services"][0]["ports"][0]["errors"]
        assert errors.get("connect_timeout", 0) >= 1 and "connect_failed" not in errors, errors
    finally:
        for f in fillers:
            f.close()
        stuck.close()


async def test_endpoint_removed_keeps_established_connection(env: Env) -> None:
    for i in range(2):
        env.servers.append(await name_server(BACKEND[i], env.port, f"pod-{i}"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]), endpoint(BACKEND[1]))])
    await env.settle()
    reader, writer = await asyncio.open_connection(env.vip(), 8080)
    first = (await reader.readline()).strip()
    remaining = 1 if first == b"pod-0" else 0
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[remaining]))])
    await env.settle()
    writer.write(b"still here\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"still here\n"
    writer.close()
    names = {(await ask(env.vip(), 8080)).strip() for _ in range(4)}
    assert names == {f"pod-{remaining}".encode()}


async def test_udp_flows_move_when_endpoint_removed(env: Env) -> None:
    port = free_port(BACKEND[0], socket.SOCK_DGRAM)
    for i in range(2):
        env.servers.append(await udp_name_server(BACKEND[i], port, f"pod-{i}"))
    svc = service("dns", CLUSTER_IP, [{"name": "dns", "port": 5353, "protocol": "UDP"}])
    eps = [{"name": "dns", "port": port, "protocol": "UDP"}]
    env.publish([svc], [endpoint_slice("dns", [endpoint(BACKEND[0]), endpoint(BACKEND[1])], eps)])
    await env.settle()

    def query(sock: socket.socket) -> bytes:
        sock.send(b"q")
        return sock.recv(100)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((env.vip(), 5353))
        first = await asyncio.to_thread(query, s)
        assert first in (b"pod-0:q", b"pod-1:q")
        # The same client keeps its flow (and so its endpoint).
        assert await asyncio.to_thread(query, s) == first
        remaining = b"pod-1" if first.startswith(b"pod-0") else b"pod-0"
        keep = BACKEND[1] if remaining == b"pod-1" else BACKEND[0]
        env.publish([svc], [endpoint_slice("dns", [endpoint(keep)], eps)])
        await env.settle()
        assert await asyncio.to_thread(query, s) == remaining + b":q"
    assert env.proxier.status()["udpFlows"] == 1


async def test_port_taken_is_reported_and_others_keep_serving(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    other_ip = f"10.100.{NET}.11"
    # Something else already holds the second service's mapped address and port.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((env.proxier.vip_address(other_ip), 8080))
    squatter.listen()
    try:
        taken = service("taken", other_ip, [{"name": "http", "port": 8080, "protocol": "TCP"}])
        env.publish([web(8080), taken],
                    [web_slice(env.port, endpoint(BACKEND[0])),
                     endpoint_slice("taken", [endpoint(BACKEND[0])],
                                    [{"name": "http", "port": env.port, "protocol": "TCP"}])])
        await env.settle()
        assert (await ask(env.vip(), 8080)).strip() == b"pod-0"
        status = {s["name"]: s for s in env.proxier.status()["services"]}
        assert status["default/taken"]["errors"] == [
            f"{env.proxier.vip_address(other_ip)}:8080/TCP: "
            f"{env.proxier.vip_address(other_ip)}:8080/TCP is already in use by another socket"
        ]
        assert status["default/web"]["errors"] == []
    finally:
        squatter.close()
    # The retry picks the port up once it is free.
    for _ in range(40):
        await asyncio.sleep(0.1)
        if not {s["name"]: s for s in env.proxier.status()["services"]}["default/taken"]["errors"]:
            break
    assert (await ask(env.proxier.vip_address(other_ip), 8080)).strip() == b"pod-0"


async def test_removing_a_service_leaves_others_alone(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    other_ip = f"10.100.{NET}.12"
    other = service("other", other_ip, [{"name": "http", "port": 8080, "protocol": "TCP"}])
    other_slice = endpoint_slice("other", [endpoint(BACKEND[0])],
                                 [{"name": "http", "port": env.port, "protocol": "TCP"}])
    env.publish([web(8080), other], [web_slice(env.port, endpoint(BACKEND[0])), other_slice])
    await env.settle()
    reader, writer = await asyncio.open_connection(env.vip(), 8080)
    await reader.readline()
    env.publish([other], [other_slice])
    await env.settle()
    writer.write(b"x\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"x\n"
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(env.vip(), 8080)
    assert (await ask(env.vip(other_ip), 8080)).strip() == b"pod-0"


async def test_nodeport_on_node_loopback(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    node_port = free_port("127.0.0.1")
    svc = service("web", CLUSTER_IP, [{"name": "http", "port": 8080, "protocol": "TCP",
                                       "nodePort": node_port}], type="NodePort")
    env.publish([svc], [web_slice(env.port, endpoint(BACKEND[0]))])
    await env.settle()
    assert (await ask("127.0.0.1", node_port)).strip() == b"pod-0"


Check = Callable[[], Any]


async def test_nothing_served_until_the_state_is_synced(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    env.state.replace("Service", [web(8080)])  # Services listed, EndpointSlices not yet
    await asyncio.sleep(0.2)
    assert env.proxier.status()["services"] == []
    assert env.proxier.last_queued is not None
    # An empty list of slices changes nothing in the state, yet completes the sync.
    env.state.replace("EndpointSlice", [])
    await asyncio.sleep(0.2)
    [svc] = env.proxier.status()["services"]
    assert svc["ports"][0]["listeners"] == []  # served, but no endpoint yet: refused
    assert env.proxier.last_queued is None and env.proxier.last_updated > 0


async def test_idle_tcp_connection_is_closed() -> None:
    state = ClusterState()
    proxier = Proxier(state, ProxyConfig(vip_mode="loopback", tcp_idle_timeout=0.2,
                                         nodeport_addresses=["127.0.0.1/32"]),
                      registry=CollectorRegistry())
    await proxier.start()
    port = free_port(BACKEND[0])
    server = await name_server(BACKEND[0], port, "pod-0")
    try:
        state.replace("Service", [web(8080)])
        state.replace("EndpointSlice", [web_slice(port, endpoint(BACKEND[0]))])
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(proxier.vip_address(CLUSTER_IP), 8080)
        assert await reader.readline() == b"pod-0\n"
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the proxy
        assert 0.15 < asyncio.get_running_loop().time() - start < 0.8
        writer.close()
        # A connection with data every half timeout outlives many sweeps; idle, it goes too.
        reader, writer = await asyncio.open_connection(proxier.vip_address(CLUSTER_IP), 8080)
        assert await reader.readline() == b"pod-0\n"
        for i in range(12):  # 1.2 s: six idle timeouts
            writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 1) == b"%d\n" % i
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert proxier.status()["services"][0]["ports"][0]["errors"] == {"idle_timeout": 2}
        writer.close()
    finally:
        await proxier.stop(0.1)
        server.close()


async def test_udp_flow_table_is_bounded() -> None:
    async with udp_service_proxier(udp_max_flows=2) as proxier:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        for s in socks:
            s.settimeout(3)
            s.connect((proxier.vip_address(CLUSTER_IP), 5353))
            await asyncio.to_thread(s.send, b"q")
            assert await asyncio.to_thread(s.recv, 100) == b"pod-0:q"
            s.close()
        port_status = proxier.status()["services"][0]["ports"][0]
        assert proxier.status()["udpFlows"] == 2
        assert port_status["errors"] == {"udp_flow_evicted": 1}
        assert port_status["connectionsTotal"] == 3


async def test_address_claimed_twice_is_reported(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    shared = f"10.100.{NET}.77"
    a = service("a", f"10.100.{NET}.20", [{"name": "http", "port": 8080}], externalIPs=[shared])
    b = service("b", f"10.100.{NET}.21", [{"name": "http", "port": 8080}], externalIPs=[shared])
    slices = [endpoint_slice(n, [endpoint(BACKEND[0])], [{"name": "http", "port": env.port}])
              for n in ("a", "b")]
    env.publish([a, b], slices)
    await env.settle()
    status = {s["name"]: s for s in env.proxier.status()["services"]}
    mapped = env.vip(shared)
    assert status["default/a"]["errors"] == []
    assert status["default/b"]["errors"] == [
        f"{mapped}:8080/TCP: {mapped}:8080/TCP is already served for service default/a"]
    # b's own ClusterIP still serves.
    assert (await ask(env.vip(f"10.100.{NET}.21"), 8080)).strip() == b"pod-0"


async def test_stop_drains_open_connections_then_closes() -> None:
    state = ClusterState()
    proxier = Proxier(state, ProxyConfig(vip_mode="loopback", nodeport_addresses=["127.0.0.1/32"]),
                      registry=CollectorRegistry())
    await proxier.start()
    port = free_port(BACKEND[0])
    server = await name_server(BACKEND[0], port, "pod-0")
    state.replace("Service", [web(8080)])
    state.replace("EndpointSlice", [web_slice(port, endpoint(BACKEND[0]))])
    await asyncio.sleep(0.1)
    vip = proxier.vip_address(CLUSTER_IP)
    reader, writer = await asyncio.open_connection(vip, 8080)
    await reader.readline()
    stopping = asyncio.ensure_future(proxier.stop(0.5))
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await asyncio.open_connection(vip, 8080)
    writer.write(b"during drain\n")  # but the open connection still works
    assert await reader.readline() == b"during drain\n"
    await stopping  # the deadline passes: the connection is reset
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 1)
    writer.close()
    server.close()


PRIVILEGED = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from prometheus_client import CollectorRegistry
from kubeshim.cluster.state import ClusterState
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.proxier import Proxier
from tests.proxy_helpers import endpoint, endpoint_slice, service

async def main():
    state = ClusterState()
    p = Proxier(state, ProxyConfig(vip_mode="loopback", nodeport_addresses=["127.0.0.1/32"]),
                registry=CollectorRegistry())
    await p.start()
    state.replace("Service", [service("low", sys.argv[2], [{"name": "http", "port": 80}]),
                              service("high", sys.argv[3], [{"name": "http", "port": 8080}])])
    # An endpoint each: a port without endpoints gets no socket, so no bind would be tried.
    state.replace("EndpointSlice", [
        endpoint_slice(name, [endpoint("127.0.0.1")], [{"name": "http", "port": 9}])
        for name in ("low", "high")])
    await asyncio.sleep(0.3)
    print(json.dumps(p.status()))
    await p.stop(0)

asyncio.run(main())
"""


def test_privileged_port_without_privilege_is_reported_and_the_rest_served() -> None:
    cmd = [sys.executable, "-c", PRIVILEGED, str(Path(__file__).resolve().parents[2]),
           f"10.100.{NET}.30", f"10.100.{NET}.31"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv missing: cannot drop CAP_NET_BIND_SERVICE")
        cmd = ["setpriv", "--bounding-set=-net_bind_service",
               "--inh-caps=-net_bind_service", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = {s["name"]: s for s in json.loads(out.stdout)["services"]}
    [error] = status["default/low"]["errors"]
    assert "127.100" in error and ":80/TCP: permission denied" in error
    assert "CAP_NET_BIND_SERVICE" in error and "ip_unprivileged_port_start" in error
    assert "cannot serve" in out.stderr or "permission denied" in out.stderr
    assert status["default/high"]["errors"] == []
    assert status["default/high"]["ports"][0]["listeners"] == [f"127.100.{NET}.31:8080/TCP"]


class Flood(asyncio.Protocol):
    """Writes `total` bytes as fast as the transport takes them; records what is still queued."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"x" * self.total)


class Sink(asyncio.Protocol):
    """Accepts and stops reading (uvloop may still deliver a first read after connection_made)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.transport.pause_reading()


async def test_backpressure_bounds_buffering_both_ways(env: Env) -> None:
    total = 64 << 20
    loop = asyncio.get_running_loop()
    floods: list[Flood] = []
    sinks: list[Sink] = []

    def flood() -> Flood:
        floods.append(Flood(total))
        return floods[-1]

    def sink() -> Sink:
        sinks.append(Sink())
        return sinks[-1]

    # Endpoint -> client: the endpoint floods, the client never reads.
    env.servers.append(await loop.create_server(flood, BACKEND[0], env.port))
    other = free_port(BACKEND[1])
    sink_sock = socket.socket()
    sink_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited when accepted
    sink_sock.bind((BACKEND[1], other))
    sink_sock.listen()
    env.servers.append(await loop.create_server(sink, sock=sink_sock))
    up = service("up", f"10.100.{NET}.40", [{"name": "x", "port": 8080}])
    env.publish([web(8080), up],
                [web_slice(env.port, endpoint(BACKEND[0])),
                 endpoint_slice("up", [endpoint(BACKEND[1])], [{"name": "x", "port": other}])])
    await env.settle()
    client = socket.create_connection((env.vip(), 8080))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    # Client -> endpoint: the client floods, the endpoint never reads.
    writer_transport, _ = await loop.create_connection(lambda: Flood(total),
                                                       env.vip(f"10.100.{NET}.40"), 8080)
    await asyncio.sleep(1.0)
    # Had the proxy read without pausing, it would hold the data and both floods would have
    # drained into it. Instead the rest is still queued at its sender: 64 MiB minus what the
    # kernel buffers on the way (up to tcp_rmem's 32 MiB max plus tcp_wmem's 4 MiB).
    assert floods[0].transport.get_write_buffer_size() > 16 << 20
    assert writer_transport.get_write_buffer_size() > 16 << 20
    # And the data still flows once the slow side reads.
    client.setblocking(False)
    received = 0
    deadline = loop.time() + 10
    while received < total and loop.time() < deadline:
        try:
            received += len(client.recv(1 << 20))
        except BlockingIOError:
            await asyncio.sleep(0.001)
    assert received == total
    client.close()
    writer_transport.abort()


async def test_renamed_port_keeps_its_socket(env: Env) -> None:
    env.servers.append(await name_server(BACKEND[0], env.port, "pod-0"))
    env.publish([web(8080)], [web_slice(env.port, endpoint(BACKEND[0]))])
    await env.settle()
    [before] = [li for rt in env.proxier.services.values() for li in rt.listeners.values()]
    renamed = service("web", CLUSTER_IP, [{"name": "www", "port": 8080}])
    slice_ = endpoint_slice("web", [endpoint(BACKEND[0])], [{"name": "www", "port": env.port}])
    env.publish([renamed], [slice_])
    await env.settle()
    [after] = [li for rt in env.proxier.services.values() for li in rt.listeners.values()]
    assert after is before and after.spec.port_name.port == "www"
    assert (await ask(env.vip(), 8080)).strip() == b"pod-0"
    assert env.proxier.status()["services"][0]["errors"] == []


async def test_udp_flow_expires_after_udp_timeout() -> None:
    async with udp_service_proxier(udp_timeout=0.2) as proxier:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.connect((proxier.vip_address(CLUSTER_IP), 5353))
            for _ in range(4):  # traffic keeps the flow alive past the timeout
                await asyncio.to_thread(s.send, b"q")
                assert await asyncio.to_thread(s.recv, 100) == b"pod-0:q"
                await asyncio.sleep(0.1)
            assert proxier.status()["udpFlows"] == 1
            await asyncio.sleep(0.6)  # idle: gone between 1x and 2x the timeout
            assert proxier.status()["udpFlows"] == 0
            await asyncio.to_thread(s.send, b"q")  # a new flow is made on demand
            assert await asyncio.to_thread(s.recv, 100) == b"pod-0:q"


async def test_ipv6_cluster_ip_in_loopback_mode_is_reported(env: Env) -> None:
    dual = service("dual", CLUSTER_IP, [{"name": "http", "port": 8080}],
                   clusterIPs=[CLUSTER_IP, "fd00:96::1"], ipFamilies=["IPv4", "IPv6"])
    env.publish([dual], [endpoint_slice("dual", [endpoint(BACKEND[0])],
                                        [{"name": "http", "port": env.port}])])
    await env.settle()
    [svc] = env.proxier.status()["services"]
    assert svc["ports"][0]["listeners"] == [f"{env.vip()}:8080/TCP"]
    assert any("IPv6 address fd00:96::1 cannot be served in loopback mode" in e
               for e in svc["errors"])
