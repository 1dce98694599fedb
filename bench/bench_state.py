"""Control-plane benchmark: list+watch of a large cluster through the fake API server.

    python bench/bench_state.py                   # 10,000 Services x 10 endpoints
    python bench/bench_state.py --services 1000 --changes 500

The fake API server runs as a subprocess (its CPU is not ours). Measured in this process:
- first full state: from the start of the list to both kinds synced in ClusterState;
- RSS after the first full state (VmRSS; and the peak, ru_maxrss);
- one EndpointSlice change: p50/p99 from the server writing the MODIFIED event (its
  CLOCK_MONOTONIC, shared by every process on the machine) to the ClusterState subscriber being
  called here (end to end), and the pure `ClusterState.apply` of one decoded event;
- decoding one full EndpointSlice list: json vs orjson vs msgspec (typed, validated).
Targets: first state < 3 s, one change applied < 1 ms. Not a test: prints a markdown table and
writes bench/results/state-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubeshim.cluster.bulk import gc_paused  # noqa: E402
from kubeshim.cluster.model import EndpointSlice, decode  # noqa: E402
from kubeshim.cluster.sources.api import APISource, decode_list  # noqa: E402
from kubeshim.cluster.sources.kubeconfig import ClientConfig, ssl_context  # noqa: E402
from kubeshim.cluster.state import ClusterState, EventType, ServiceChange, WatchEvent  # noqa: E402

TOKEN = "bench-token"


class _SliceList(msgspec.Struct):
    items: list[EndpointSlice]


MAX_ENDPOINTS_PER_SLICE = 100  # the EndpointSlice controller's default --max-endpoints-per-slice
NAMESPACES = 20
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"


def make_objects(services: int, per_service: int = 10) -> list[dict[str, Any]]:
    """Services with `per_service` ready endpoints each, in slices of at most 100 endpoints."""
    objects: list[dict[str, Any]] = []
    pod = 0
    for i in range(services):
        ns, name = f"ns-{i % NAMESPACES}", f"svc-{i}"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "uid": f"uid-svc-{i}",
                    "labels": {"app": name},
                },
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                    "clusterIPs": [f"10.96.{i // 250}.{i % 250 + 1}"],
                    "ipFamilies": ["IPv4"],
                    "selector": {"app": name},
                    "sessionAffinity": "None",
                    "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                },
            }
        )
        for s, start in enumerate(range(0, per_service, MAX_ENDPOINTS_PER_SLICE)):
            endpoints = []
            for _ in range(start, min(per_service, start + MAX_ENDPOINTS_PER_SLICE)):
                pod += 1
                endpoints.append(
                    {
                        "addresses": [f"10.{128 + pod // 65536}.{pod // 256 % 256}.{pod % 256}"],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "nodeName": f"node-{pod % 50}",
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": f"{name}-{pod}"},
                    }
                )
            objects.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-{s:05x}",
                        "namespace": ns,
                        "labels": {
                            "kubernetes.io/service-name": name,
                            MANAGED_BY: "endpointslice-controller.k8s.io",
                        },
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                    "endpoints": endpoints,
                }
            )
    return objects


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {
        "n": len(s),
        "p50_ms": pick(0.5) * 1e3,
        "p99_ms": pick(0.99) * 1e3,
        "max_ms": s[-1] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakeapi",
            "--port",
            "0",
            "--pki",
            str(workdir / "pki"),
            "--objects",
            str(workdir / "objects.json"),
            "--token",
            TOKEN,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"fake API server did not start: {line!r}")
    return proc, line.split()[1]


async def decode_bench(url: str, client: ClientConfig, reps: int = 3) -> dict[str, float]:
    """Seconds to decode one full EndpointSlice list (the largest body) per decoder."""
    import orjson

    async with (
        aiohttp.ClientSession() as s,
        s.get(
            url + "/apis/discovery.k8s.io/v1/endpointslices",
            headers={"Authorization": f"Bearer {TOKEN}"},
            ssl=client.ssl,
        ) as r,
    ):
        body = await r.read()

    def best(fn: Any) -> float:
        """Best of `reps`, the collector paused for every decoder alike (as the source does)."""
        times = []
        for _ in range(reps):
            with gc_paused():
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return min(times)

    return {
        "body_mib": len(body) / 2**20,
        "json.loads_s": best(lambda: json.loads(body)),
        "orjson.loads_s": best(lambda: orjson.loads(body)),
        "msgspec_untyped_s": best(lambda: msgspec.json.decode(body)),
        "msgspec_typed_s": best(lambda: msgspec.json.decode(body, type=_SliceList)),
        "msgspec_typed_validated_s": best(lambda: decode_list("EndpointSlice", body, [])),
    }


def write_objects(workdir: Path, services: int, changes: int) -> None:
    """objects.json for the server, and picked.json: the slices the changes will edit."""
    objects = make_objects(services)
    all_slices = [o for o in objects if o["kind"] == "EndpointSlice"]
    picked = {n: all_slices[n] for n in {(i * 7919) % len(all_slices) for i in range(changes)}}
    (workdir / "objects.json").write_bytes(msgspec.json.encode(objects))
    counts = {"slices": len(all_slices), "endpoints": sum(len(s["endpoints"]) for s in all_slices)}
    (workdir / "picked.json").write_bytes(msgspec.json.encode({"counts": counts, "picked": picked}))


async def run(services: int, changes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        workdir = Path(tmp)
        # Generated in a child process so this one's RSS is the source's and the state's.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--write-objects",
                str(workdir),
                "--services",
                str(services),
                "--changes",
                str(changes),
            ],
            check=True,
        )
        spec = msgspec.json.decode((workdir / "picked.json").read_bytes())
        counts = spec["counts"]
        slices = {int(n): obj for n, obj in spec["picked"].items()}
        proc, url = start_server(workdir)
        try:
            return {
                "services": services,
                **counts,
                **await measure(
                    url, workdir / "pki" / "ca.crt", slices, counts["slices"], services, changes
                ),
            }
        finally:
            proc.terminate()
            proc.wait(5)


async def measure(
    url: str,
    ca: Path,
    slices: dict[int, dict[str, Any]],
    n_slices: int,
    services: int,
    changes: int,
) -> dict[str, Any]:
    async def authorization() -> str:
        return f"Bearer {TOKEN}"

    client = ClientConfig(url, ssl_context(ca_file=str(ca)), authorization, "bench")
    state = ClusterState()
    called: dict[str, float] = {}
    waiting: dict[str, asyncio.Future[float]] = {}

    def subscriber(batch: Any) -> None:
        now = time.monotonic()
        for change in batch:
            name = str(change.key)
            called[name] = now
            if (fut := waiting.pop(name, None)) is not None and not fut.done():
                fut.set_result(now)

    state.subscribe(subscriber)
    gc.collect()
    rss_before = rss_bytes()
    source = APISource(client, state)
    t0, cpu0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(source.run())
    while not state.synced:
        await asyncio.sleep(0.001)
    first_state = time.perf_counter() - t0
    first_state_cpu = time.process_time() - cpu0
    gc.collect()
    rss_after = rss_bytes()
    assert len(state.services) == services

    # One EndpointSlice change at a time: flip the readiness of one endpoint.
    e2e: list[float] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as control:
        for i in range(changes):
            n = (i * 7919) % n_slices
            obj = copy.deepcopy(slices[n])
            ep = obj["endpoints"][i % len(obj["endpoints"])]
            ep["conditions"]["ready"] = ep["conditions"]["serving"] = not ep["conditions"]["ready"]
            slices[n] = obj
            meta = obj["metadata"]
            svc = f"{meta['namespace']}/{meta['labels']['kubernetes.io/service-name']}"
            fut = waiting[svc] = loop.create_future()
            async with control.post(url + "/_control/put?wait=sent", json=obj, ssl=False) as r:
                sent = (await r.json())["sent"]
            called_at = await asyncio.wait_for(fut, 10)
            e2e.append(called_at - sent)
    task.cancel()

    # The pure reducer: one decoded MODIFIED event through ClusterState.apply.
    raw = [msgspec.json.encode(s) for s in list(slices.values())[:changes]]
    apply_s: list[float] = []
    decode_s: list[float] = []
    apply_cpu: list[float] = []  # CPU time: free of preemption by other processes
    for i, body in enumerate(raw):
        obj = msgspec.json.decode(body)
        ep = obj["endpoints"][0]
        ep["addresses"] = [f"10.255.{i // 256 % 256}.{i % 256}"]
        line = msgspec.json.encode(obj)
        t = time.perf_counter()
        decoded = decode("EndpointSlice", line)
        t1, c1 = time.perf_counter(), time.thread_time()
        got = state.apply([WatchEvent(EventType.MODIFIED, decoded)])
        t2, c2 = time.perf_counter(), time.thread_time()
        apply_cpu.append(c2 - c1)
        assert got and isinstance(got[0], ServiceChange)
        decode_s.append(t1 - t)
        apply_s.append(t2 - t1)

    return {
        "first_state_s": first_state,
        "first_state_cpu_s": first_state_cpu,
        "loadavg_1m": os.getloadavg()[0],
        "rss_bytes": rss_after,
        "rss_growth_bytes": rss_after - rss_before,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "change_end_to_end": percentiles(e2e),
        "change_apply": percentiles(apply_s),
        "change_apply_cpu": percentiles(apply_cpu),
        "change_decode": percentiles(decode_s),
        "decode_list": await decode_bench(url, client),
    }


def markdown(r: dict[str, Any]) -> str:
    e, a, d = r["change_end_to_end"], r["change_apply"], r["change_decode"]
    ac = r["change_apply_cpu"]
    dl = r["decode_list"]
    return "\n".join(
        [
            f"### ClusterState: {r['services']} Services, {r['endpoints']} endpoints, "
            f"{r['slices']} slices",
            "",
            "| measure | value | target |",
            "|---|---:|---:|",
            f"| first full state (list -> both kinds synced) | {r['first_state_s']:.3f} s "
            "| < 3 s |",
            f"| CPU time of this process until then | {r['first_state_cpu_s']:.3f} s | |",
            f"| RSS after first state (growth) | {r['rss_bytes'] / 2**20:.0f} MiB "
            f"(+{r['rss_growth_bytes'] / 2**20:.0f}) | |",
            f"| change, server write -> subscriber p50 / p99 | {e['p50_ms']:.3f} / "
            f"{e['p99_ms']:.3f} ms | < 1 ms |",
            f"| change, decode one event p50 / p99 | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} ms | |",
            f"| change, ClusterState.apply p50 / p99 | {a['p50_ms']:.3f} / {a['p99_ms']:.3f} ms "
            "| < 1 ms |",
            f"| change, ClusterState.apply CPU time p50 / p99 | {ac['p50_ms']:.3f} / "
            f"{ac['p99_ms']:.3f} ms | |",
            f"| decode EndpointSlice list ({dl['body_mib']:.1f} MiB) to dicts: json / orjson / "
            f"msgspec | {dl['json.loads_s'] * 1e3:.0f} / {dl['orjson.loads_s'] * 1e3:.0f} / "
            f"{dl['msgspec_untyped_s'] * 1e3:.0f} ms | |",
            f"| decode it to typed structs: msgspec / msgspec + validation (what the source "
            f"does) | {dl['msgspec_typed_s'] * 1e3:.0f} / "
            f"{dl['msgspec_typed_validated_s'] * 1e3:.0f} ms | |",
            "",
            f"load average (1 min) at the end: {r['loadavg_1m']:.1f} on {os.cpu_count()} CPUs",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=500)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--write-objects", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_objects:
        write_objects(args.write_objects, args.services, args.changes)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.services, args.changes))
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "msgspec": msgspec.__version__,
    }
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(markdown(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"state-{datetime.date.today().isoformat()}-{args.services}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(
        markdown(result) + f"\nCommand: `{result['command']}`; {result['machine']}\n"
    )
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
