"""Run the Proxier on a folder of manifests, for end-to-end tests inside a node namespace.

    python -m tests.e2e.proxy_runner --manifests DIR --status FILE [--vip-mode interface]
                                      [--hostname-override NODE]

Decodes every YAML document of DIR into ClusterState.replace (re-read when a file changes, polled
every 50 ms) and writes the proxier's status() as JSON to FILE after every change and every
200 ms. SIGTERM drains and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop
import yaml

from cluster import log as klog
from cluster.model import EndpointSlice, InvalidObject, Service, decode
from cluster.state import ClusterState
from proxy.config import ProxyConfig
from proxy.proxier import Proxier

log = klog.get_logger("runner")


def read_manifests(folder: Path) -> tuple[list[Service], list[EndpointSlice]]:
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                obj = decode(doc.get("kind", ""), doc)
            except (InvalidObject, KeyError) as e:
                log.error("invalid object", file=str(path), reason=str(e))
                continue
            (services if isinstance(obj, Service) else slices).append(obj)  # type: ignore[arg-type]
    return services, slices


def fingerprint(folder: Path) -> tuple[Any, ...]:
    files = sorted(folder.glob("*.yaml"))
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--manifests", type=Path, required=True)
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--vip-mode", default="interface")
    p.add_argument("--vip-interface", default="kubeshim0")
    p.add_argument("--hostname-override", default="")
    p.add_argument("--nodeport-addresses", default="")
    p.add_argument("--udp-timeout", type=float, default=30.0)
    a = p.parse_args()
    klog.setup("info")
    state = ClusterState()
    config = ProxyConfig(
        vip_mode=a.vip_mode, vip_interface=a.vip_interface, node_name=a.hostname_override,
        nodeport_addresses=[x for x in a.nodeport_addresses.split(",") if x],
        udp_timeout=a.udp_timeout,
    )
    proxier = Proxier(state, config)
    await proxier.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    seen: tuple[Any, ...] = ()
    ticks = 0
    while not stop.is_set():
        now = fingerprint(a.manifests)
        if now != seen:
            seen = now
            services, slices = read_manifests(a.manifests)
            state.replace("Service", services)
            state.replace("EndpointSlice", slices)
            await asyncio.sleep(0.02)
            ticks = 0
        if ticks % 4 == 0:
            tmp = a.status.with_suffix(".tmp")
            tmp.write_text(json.dumps({"generation": state.generation, **proxier.status()}))
            os.replace(tmp, a.status)
        ticks += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    await proxier.stop(2.0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    uvloop.run(main())
