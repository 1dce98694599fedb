"""Endpoint-change latency of the proxier with many Services (kube-proxy's network programming).

    python bench/bench_proxy_sync.py [--services 10000] [--changes 300]
    python bench/bench_proxy_sync.py --vip-mode tproxy [--services 10000] [--changes 300]

Loads N ClusterIP Services (loopback mode: N real listeners) then, repeatedly, moves one
Service's endpoint to the other of two backends and measures (a) state change -> sync applied
and (b) state change -> a new connection answered by the new backend. Prints p50/p99/max.

With --vip-mode tproxy (root; in a network namespace of its own, bench/lab.py) each change
instead flips a Service's verdict in the kernel: its only endpoint goes away (the capture table
now rejects its port) or comes back (captured again). (a) is then state change -> the nftables
transaction committed, (b) state change -> a new connection refused, or answered by the backend.
Then changes this node's zone label (Node object) a few times: the Services whose endpoints carry
zone hints (every --hinted-every-th) are resynced; prints how long that takes beside the
initial sync.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from bench.lab import POD_IP, Lab  # noqa: E402
from kubeshim.cluster.model import NamespacedName, Node, decode  # noqa: E402
from kubeshim.cluster.state import ClusterState, EventType, WatchEvent  # noqa: E402
from kubeshim.proxy.config import ProxyConfig  # noqa: E402
from kubeshim.proxy.proxier import Proxier  # noqa: E402
from tests.proxy_helpers import endpoint, endpoint_slice, name_server, service  # noqa: E402

BACKENDS = ("127.0.1.1", "127.0.1.2")
BACKEND_PORT = 18999


NODE = "bench-node"


def node(zone: str) -> Node:
    obj = decode("Node", {"metadata": {"name": NODE,
                                       "labels": {"topology.kubernetes.io/zone": zone}}})
    assert isinstance(obj, Node)
    return obj


def zoned(ep: dict[str, object]) -> dict[str, object]:
    return {**ep, "zone": "zone-0", "hints": {"forZones": [{"name": "zone-0"}]}}


PORTS = [{"name": "http", "port": 8080}]
EPORTS = [{"name": "http", "port": BACKEND_PORT}]


def load(state: ClusterState, services: int,
         endpoints: Callable[[int], list[dict[str, object]]]) -> tuple[list[str], list[str]]:
    """N ClusterIP Services (10.100.0.1 up) with the endpoints `endpoints(i)` gives Service i;
    returns their names and ClusterIPs."""
    base = int(ipaddress.IPv4Address("10.100.0.0"))
    names = [f"svc-{i}" for i in range(services)]
    ips = [str(ipaddress.IPv4Address(base + 1 + i)) for i in range(services)]
    state.replace("Service", [service(n, ip, PORTS) for n, ip in zip(names, ips, strict=True)])
    state.replace("EndpointSlice", [endpoint_slice(n, endpoints(i), EPORTS)
                                    for i, n in enumerate(names)])
    return names, ips


async def settled(proxier: Proxier, poll: float = 0.05) -> None:
    while proxier.changes or (proxier._sync_task and not proxier._sync_task.done()):
        await asyncio.sleep(poll)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--changes", type=int, default=300)
    p.add_argument("--zone-changes", type=int, default=3)
    p.add_argument("--hinted-every", type=int, default=10,
                   help="every Nth Service's endpoints carry zone hints (PreferClose)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after the initial sync (long-lived objects out of GC scans)")
    p.add_argument("--vip-mode", choices=("loopback", "tproxy"), default="loopback")
    a = p.parse_args(argv)
    if a.vip_mode == "tproxy":
        await flips(a)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.services + 4096), hard))
    servers = [await name_server(ip, BACKEND_PORT, ip) for ip in BACKENDS]
    state = ClusterState(node_name=NODE)
    proxier = Proxier(state, ProxyConfig(vip_mode="loopback", nodeport_addresses=["127.0.0.1/32"],
                                         node_name=NODE),
                      registry=CollectorRegistry())
    await proxier.start()
    t0 = time.monotonic()
    names, ips = load(state, a.services, lambda i: [
        zoned(endpoint(BACKENDS[0])) if i % a.hinted_every == 0 else endpoint(BACKENDS[0])])
    await settled(proxier)
    initial = time.monotonic() - t0
    print(f"initial sync of {a.services} services: {initial:.2f}s "
          f"({sum(len(rt.listeners) for rt in proxier.services.values())} listeners)")

    if a.gc_freeze:
        gc.collect()
        gc.freeze()
    sync_times: list[float] = []
    conn_times: list[float] = []
    for i in range(a.changes):
        k = (i * 7919) % a.services
        port_name = state.services[NamespacedName("default", names[k])].ports[0].name
        current = proxier.tables[(port_name, 4)]
        target = BACKENDS[1] if current.internal[0].ip == BACKENDS[0] else BACKENDS[0]
        start = time.perf_counter()
        state.apply([WatchEvent(EventType.MODIFIED,
                                endpoint_slice(names[k], [endpoint(target)], EPORTS))])
        while current.internal[0].ip != target:
            await asyncio.sleep(0)
        sync_times.append(time.perf_counter() - start)
        reader, writer = await asyncio.open_connection(proxier.vip_address(ips[k]), 8080)
        answer = (await reader.readline()).strip().decode()
        conn_times.append(time.perf_counter() - start)
        writer.close()
        assert answer == target, (answer, target)
    for label, values in (("change -> sync applied", sync_times),
                          ("change -> new connection answered by new endpoint", conn_times)):
        print(f"{label}: p50 {pct(values, 0.5):.2f} ms, p99 {pct(values, 0.99):.2f} ms, "
              f"max {max(values) * 1000:.2f} ms, mean {statistics.mean(values) * 1000:.2f} ms")
    zone_times = []
    for i in range(a.zone_changes):
        start = time.perf_counter()
        state.apply([WatchEvent(EventType.MODIFIED, node(f"zone-{i}"))])
        await settled(proxier, 0.001)
        zone_times.append(time.perf_counter() - start)
    if zone_times:
        took = statistics.median(zone_times)
        hinted = len(range(0, a.services, a.hinted_every))
        print(f"node zone label change -> the {hinted} zone-hinted of {a.services} services "
              "resynced: median "
              f"{took:.3f}s over {len(zone_times)} changes "
              f"({took / initial:.2f}x the initial sync)")
    await proxier.stop(0)
    for s in servers:
        s.close()


async def flips(a: argparse.Namespace) -> None:
    """tproxy mode: verdict flips (reject <-> capture) of one Service at a time."""
    server = await name_server(POD_IP, BACKEND_PORT, POD_IP)
    state = ClusterState(node_name=NODE)
    proxier = Proxier(state, ProxyConfig(vip_mode="tproxy", node_name=NODE),
                      registry=CollectorRegistry())
    await proxier.start()
    capture = proxier.capture
    assert capture is not None, "tproxy capture unavailable"
    t0 = time.monotonic()
    names, ips = load(state, a.services, lambda i: [endpoint(POD_IP)])
    await settled(proxier)
    print(f"initial sync of {a.services} services: {time.monotonic() - t0:.2f}s "
          f"({len(capture.store)} table elements, {capture.transactions} transactions)")
    if a.gc_freeze:
        gc.collect()
        gc.freeze()
    served = {n: True for n in names}
    sync_times: list[float] = []
    conn_times: list[float] = []
    for i in range(a.changes):
        k = (i * 7919) % a.services
        served[names[k]] = not served[names[k]]
        before = capture.transactions
        start = time.perf_counter()
        state.apply([WatchEvent(EventType.MODIFIED, endpoint_slice(
            names[k], [endpoint(POD_IP)] if served[names[k]] else [], EPORTS))])
        while capture.transactions == before:
            await asyncio.sleep(0)
        sync_times.append(time.perf_counter() - start)
        try:
            reader, writer = await asyncio.open_connection(ips[k], 8080)
        except ConnectionRefusedError:
            answer = ""
        else:
            answer = (await reader.readline()).strip().decode()
            writer.close()
        conn_times.append(time.perf_counter() - start)
        assert answer == (POD_IP if served[names[k]] else ""), (names[k], answer)
        await settled(proxier, 0.001)
    for label, values in (("change -> verdict flip committed (nft transaction)", sync_times),
                          ("change -> new connection refused / answered", conn_times)):
        print(f"{label}: p50 {pct(values, 0.5):.2f} ms, p99 {pct(values, 0.99):.2f} ms, "
              f"max {max(values) * 1000:.2f} ms, mean {statistics.mean(values) * 1000:.2f} ms")
    await proxier.stop(0)
    server.close()


if __name__ == "__main__":
    import tempfile

    import uvloop

    lab = None
    if "tproxy" in sys.argv:
        # Its own network namespace, entered while the process is still single-threaded.
        lab = Lab(Path(tempfile.mkdtemp(prefix="ks-proxy-sync-")))
        lab.enter()
        lab.sh("ip route add 10.96.0.0/12 dev lo")  # a node's route towards the Service range
    try:
        uvloop.run(main())
    finally:
        if lab is not None:
            lab.close()
