"""Manifest-source change -> traffic: the latency of an edited EndpointSlice file.

    python bench/bench_manifest_latency.py [--services 1000 10000] [--changes 200]
                                           [--baseline CHECKOUT] [--nice N]

Runs the real daemon (`kubeshim run --manifests DIR --vip-mode loopback --no-dns`) over N
Services, one file each (a Service and its EndpointSlice), in front of two loopback backends
that answer their name. Then, repeatedly, one Service's file is rewritten the way editors and
`kubectl get -o yaml > f` pipelines do (written beside it, renamed into place) to point at the
other backend, and the time from the rename to the first new connection answered by the new
backend is measured (the client connects in a tight loop), once the daemon is idle after
start-up (its CPU time stands still for a second). Prints p50/p99/max per size, and
with --poll the same with the folder polled (inotify disabled) for a side-by-side ratio.

With --baseline CHECKOUT a second daemon runs the code of another checkout of kubeshim (say
main's worktree) at the same time, over its own folder and its own Service addresses, and the
changes alternate between the two: both see the same other load on the machine, so their ratio
is measured side by side even where the machine is busy. The slowest changes are listed with
their number (0 is the first after start-up). Like `python -m bench`, the harness and the
daemons it starts run at niceness -10 (--nice), ahead of background work on a shared machine:
what is measured is kubeshim's latency, not the wait for a CPU behind unrelated processes.
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

from bench.bench_dns import cpu_seconds  # noqa: E402
from kubeshim.proxy.vip import LoopbackMapper  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.proxy_helpers import name_server  # noqa: E402

BACKENDS = ("127.0.2.1", "127.0.2.2")
BACKEND_PORT = 18998
SERVICE_PORT = 8080
MAPPER = LoopbackMapper()


def cluster_ip(i: int, net: int = 102) -> str:
    # Loopback mode keeps the low 22 bits: 10.102/16 and 10.101/16 map apart.
    return f"10.{net}.{i // 250}.{i % 250 + 1}"


def manifest(i: int, backend: str, net: int = 102) -> str:
    name = f"svc-{i}"
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
         "spec": {"clusterIP": cluster_ip(i, net),
                  "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": BACKEND_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "bench",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": BACKEND_PORT}],
         "endpoints": [{"addresses": [backend]}]},
    ]
    return "\n---\n".join(json.dumps(o) for o in objs)  # JSON is YAML: one multi-doc file


def write(folder: Path, i: int, backend: str, net: int = 102) -> None:
    tmp = folder / f".svc-{i}.yaml.tmp"
    tmp.write_text(manifest(i, backend, net))
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


class Daemon:
    """One kubeshim daemon (the code of `checkout`) over its own folder of N Services."""

    def __init__(self, checkout: Path, services: int, poll: bool, net: int, tmp: Path) -> None:
        self.checkout, self.services, self.poll, self.net = checkout, services, poll, net
        self.folder = tmp / f"manifests-{net}"
        self.log_path = tmp / f"kubeshim-{net}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.current = [BACKENDS[0]] * services
        self.times: list[tuple[float, int]] = []  # (seconds, change number)

    def start(self) -> None:
        self.folder.mkdir()
        for i in range(self.services):
            write(self.folder, i, BACKENDS[0], self.net)
        env = dict(os.environ, PYTHONPATH=str(self.checkout))
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubeshim", "run", "--manifests", str(self.folder),
                 *(["--manifests-poll"] if self.poll else []),
                 "--vip-mode", "loopback", "--no-dns", "--healthz-bind-address",
                 f"127.0.0.1:{free_port()}", "--metrics-bind-address", f"127.0.0.1:{free_port()}"],
                cwd=self.checkout, env=env, stdout=log, stderr=subprocess.STDOUT)

    async def served(self) -> float:
        assert self.proc is not None
        last = MAPPER.address(cluster_ip(self.services - 1, self.net))
        start = time.monotonic()
        while await answer(last) != BACKENDS[0]:
            if self.proc.poll() is not None or time.monotonic() - start > 600:
                raise SystemExit(self.log_path.read_text()[-3000:])
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def change(self, n: int) -> None:
        """Point one Service at the other backend; time the first connection that reaches it."""
        i = (n * 7919) % self.services
        target = BACKENDS[1] if self.current[i] == BACKENDS[0] else BACKENDS[0]
        host = MAPPER.address(cluster_ip(i, self.net))
        t0 = time.perf_counter()
        write(self.folder, i, target, self.net)
        while await answer(host) != target:
            if time.perf_counter() - t0 > 10:
                raise SystemExit(f"change {n} not applied within 10 s")
        self.times.append((time.perf_counter() - t0, n))
        self.current[i] = target

    async def settled(self, timeout: float = 60.0) -> float:
        """Wait until the daemon is idle (start-up work such as the first collection of the
        whole state can outlast the first answer); returns the seconds waited."""
        assert self.proc is not None
        start, last_cpu = time.monotonic(), cpu_seconds(self.proc.pid)
        quiet = 0
        while quiet < 4 and time.monotonic() - start < timeout:
            await asyncio.sleep(0.25)
            now_cpu = cpu_seconds(self.proc.pid)
            quiet = quiet + 1 if now_cpu - last_cpu < 0.01 else 0  # < 4% of a CPU
            last_cpu = now_cpu
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


async def run_size(services: int, changes: int, poll: bool,
                   baseline: Path | None) -> list[tuple[str, list[tuple[float, int]]]]:
    with tempfile.TemporaryDirectory(prefix="kubeshim-bench-") as tmp:
        daemons = [("kubeshim", Daemon(ROOT, services, poll, 102, Path(tmp)))]
        if baseline is not None:
            daemons.append(("baseline", Daemon(baseline, services, poll, 101, Path(tmp))))
        try:
            for _, d in daemons:
                d.start()
            for name, d in daemons:
                print(f"  {services} services served after {await d.served():.1f} s ({name})")
            for name, d in daemons:
                print(f"  {name} idle {await d.settled():.1f} s later")
            for n in range(changes):
                # Alternate which daemon goes first, so neither always follows the other.
                for _, d in daemons if n % 2 == 0 else daemons[::-1]:
                    await d.change(n)
                    await asyncio.sleep(0.02)
            return [(name, d.times) for name, d in daemons]
        finally:
            for _, d in daemons:
                d.stop()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--poll", action="store_true", help="also measure with polling (no inotify)")
    p.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                   help="also run this checkout's daemon, side by side, changes alternating")
    p.add_argument("--nice", type=int, default=-10,
                   help="niceness of the harness and the daemons (default -10, as python -m bench)")
    a = p.parse_args()
    if a.nice:
        os.setpriority(os.PRIO_PROCESS, 0, a.nice)  # inherited by the daemons
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = [await name_server(ip, BACKEND_PORT, ip) for ip in BACKENDS]
    print("manifest EndpointSlice change -> first connection on the new endpoint "
          f"(niceness {os.getpriority(os.PRIO_PROCESS, 0)}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    for services in a.services:
        for poll in ([False, True] if a.poll else [False]):
            mode = "poll 0.5 s" if poll else "inotify"
            for name, timed in await run_size(services, a.changes, poll, a.baseline):
                times = [t for t, _ in timed]
                slowest = ", ".join(f"#{n} {t * 1000:.1f}" for t, n in sorted(timed)[-3:][::-1])
                print(f"  {services:>6} services, {mode:<10} {name:<8}: "
                      f"p50 {pct(times, 0.5):7.2f} ms  p99 {pct(times, 0.99):7.2f} ms  "
                      f"max {max(times) * 1000:7.2f} ms  ({len(times)} changes; slowest {slowest})")
    for s in servers:
        s.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
