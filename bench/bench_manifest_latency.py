"""Manifest-source change -> traffic: the latency of an edited EndpointSlice file.

    python bench/bench_manifest_latency.py [--services 1000 10000] [--changes 200]

Runs the real daemon (`kubeshim run --manifests DIR --vip-mode loopback --no-dns`) over N
Services, one file each (a Service and its EndpointSlice), in front of two loopback backends
that answer their name. Then, repeatedly, one Service's file is rewritten the way editors and
`kubectl get -o yaml > f` pipelines do (written beside it, renamed into place) to point at the
other backend, and the time from the rename to the first new connection answered by the new
backend is measured (the client connects in a tight loop). Prints p50/p99/max per size, and
with --poll the same with the folder polled (inotify disabled) for a side-by-side ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubeshim.proxy.vip import LoopbackMapper  # noqa: E402
from tests.proxy_helpers import free_port, name_server  # noqa: E402

BACKENDS = ("127.0.2.1", "127.0.2.2")
BACKEND_PORT = 18998
SERVICE_PORT = 8080


def cluster_ip(i: int) -> str:
    return f"10.102.{i // 250}.{i % 250 + 1}"


def manifest(i: int, backend: str) -> str:
    name = f"svc-{i}"
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
         "spec": {"clusterIP": cluster_ip(i),
                  "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": BACKEND_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": BACKEND_PORT}],
         "endpoints": [{"addresses": [backend]}]},
    ]
    return "\n---\n".join(json.dumps(o) for o in objs)  # JSON is YAML: one multi-doc file


def write(folder: Path, i: int, backend: str) -> None:
    tmp = folder / f".svc-{i}.yaml.tmp"
    tmp.write_text(manifest(i, backend))
    os.rename(tmp, folder / f"svc-{i}.yaml")


async def answer(host: str) -> str:
    try:
        reader, writer = await asyncio.open_connection(host, SERVICE_PORT)
    except OSError:
        return ""
    try:
        return (await reader.readline()).strip().decode()
    except OSError:
        return ""
    finally:
        writer.close()


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


async def run_size(services: int, changes: int, poll: bool) -> list[float]:
    mapper = LoopbackMapper()
    with tempfile.TemporaryDirectory(prefix="kubeshim-bench-") as tmp:
        folder = Path(tmp, "manifests")
        folder.mkdir()
        for i in range(services):
            write(folder, i, BACKENDS[0])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = Path(tmp, "kubeshim.log").open("w")  # noqa: SIM115 (closed in the finally)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubeshim", "run", "--manifests", str(folder),
             *(["--manifests-poll"] if poll else []),
             "--vip-mode", "loopback", "--no-dns", "--healthz-bind-address",
             f"127.0.0.1:{free_port()}", "--metrics-bind-address", f"127.0.0.1:{free_port()}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            last = mapper.address(cluster_ip(services - 1))
            start = time.monotonic()
            while await answer(last) != BACKENDS[0]:
                if proc.poll() is not None or time.monotonic() - start > 600:
                    raise SystemExit(Path(tmp, "kubeshim.log").read_text()[-3000:])
                await asyncio.sleep(0.1)
            print(f"  {services} services served after {time.monotonic() - start:.1f} s")
            await asyncio.sleep(1.0)
            current = [BACKENDS[0]] * services
            times: list[float] = []
            for n in range(changes):
                i = (n * 7919) % services
                target = BACKENDS[1] if current[i] == BACKENDS[0] else BACKENDS[0]
                host = mapper.address(cluster_ip(i))
                t0 = time.perf_counter()
                write(folder, i, target)
                while await answer(host) != target:
                    if time.perf_counter() - t0 > 10:
                        raise SystemExit(f"change {n} not applied within 10 s")
                times.append(time.perf_counter() - t0)
                current[i] = target
                await asyncio.sleep(0.02)
            return times
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            log.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--poll", action="store_true", help="also measure with polling (no inotify)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = [await name_server(ip, BACKEND_PORT, ip) for ip in BACKENDS]
    print("manifest EndpointSlice change -> first connection on the new endpoint")
    for services in a.services:
        for poll in ([False, True] if a.poll else [False]):
            times = await run_size(services, a.changes, poll)
            mode = "poll 0.5 s" if poll else "inotify"
            print(f"  {services:>6} services, {mode:<10}: p50 {pct(times, 0.5):7.2f} ms  "
                  f"p99 {pct(times, 0.99):7.2f} ms  max {max(times) * 1000:7.2f} ms  "
                  f"({len(times)} changes)")
    for s in servers:
        s.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
