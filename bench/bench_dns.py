"""DNS micro-benchmark: kubeshim's DNS server vs dnsmasq on the same records, with dnsperf.

    python bench/bench_dns.py [--services 200] [--seconds 10] [--clients 4] [--mix cluster]
        [--servers kubeshim,kubeshim-datagram,dnsmasq] [--server-cpus 1 --client-cpus 0]

Builds N ClusterIP Services (plus 10 headless ones), serves them from kubeshim's DNSServer (uvloop,
its own process) and the same names from dnsmasq (a hosts file, no upstream) on loopback, then
runs dnsperf with one query file against each, one after the other. Reports queries/s and the
latency percentiles dnsperf's per-query output (-v) gives, and the ratio kubeshim/dnsmasq.
Also times the server's in-process hit path (answer()) without sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubeshim.cluster.model import decode  # noqa: E402
from kubeshim.cluster.state import ClusterState  # noqa: E402
from kubeshim.dns.batch import BatchedUDP  # noqa: E402
from kubeshim.dns.config import DNSConfig  # noqa: E402
from kubeshim.dns.server import DNSServer  # noqa: E402

ZONE = "cluster.local"
HEADLESS = 10  # headless Services hl-0.. with 3 ready endpoints each


def cluster_state(services: int) -> ClusterState:
    state = ClusterState()
    svcs = [
        decode(
            "Service",
            {
                "metadata": {"name": f"svc-{i}", "namespace": "bench"},
                "spec": {
                    "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                    "ports": [{"name": "http", "port": 80}],
                },
            },
        )
        for i in range(services)
    ]
    slices = []
    for j in range(HEADLESS):
        svcs.append(
            decode(
                "Service",
                {
                    "metadata": {"name": f"hl-{j}", "namespace": "bench"},
                    "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]},
                },
            )
        )
        slices.append(
            decode(
                "EndpointSlice",
                {
                    "metadata": {
                        "name": f"hl-{j}-1",
                        "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": f"hl-{j}"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 80}],
                    "endpoints": [{"addresses": [ip]} for ip in headless_ips(j)],
                },
            )
        )
    state.replace("Service", svcs)
    state.replace("EndpointSlice", slices)
    return state


def headless_ips(j: int) -> list[str]:
    return [f"10.244.{j}.{k}" for k in (1, 2, 3)]


def names(services: int) -> list[tuple[str, str]]:
    return [
        (f"svc-{i}.bench.svc.{ZONE}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(services)
    ]


def query_lines(services: int, mix: str) -> str:
    """dnsperf's query file. plain: one A per Service. cluster: per Service its A, the SRV of
    its named port, an NXDOMAIN name in the namespace, and a headless Service's A (3 records)."""
    lines = []
    for i, (name, _ip) in enumerate(names(services)):
        lines.append(f"{name} A")
        if mix == "cluster":
            lines.append(f"_http._tcp.{name} SRV")
            lines.append(f"nope-{i}.bench.svc.{ZONE} A")
            lines.append(f"hl-{i % HEADLESS}.bench.svc.{ZONE} A")
    return "".join(line + "\n" for line in lines)


def dnsmasq_records(services: int, tmp: str) -> tuple[Path, Path]:
    """The same records for dnsmasq: a hosts file, SRV lines, the zone answered locally."""
    hosts = Path(tmp, "hosts")
    entries = [f"{ip} {name}" for name, ip in names(services)]
    entries += [f"{ip} hl-{j}.bench.svc.{ZONE}" for j in range(HEADLESS) for ip in headless_ips(j)]
    hosts.write_text("".join(e + "\n" for e in entries))
    conf = Path(tmp, "dnsmasq.conf")
    srv = [f"srv-host=_http._tcp.{name},{name},80,0,100" for name, _ in names(services)]
    # local=: names of the zone without records get NXDOMAIN here, never go upstream.
    conf.write_text("".join(line + "\n" for line in [f"local=/{ZONE}/", *srv]))
    return hosts, conf


def free_port() -> int:
    """A loopback port free for both UDP and TCP."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def serve(port: int, services: int, udp_batch: bool) -> None:
    """Child process: kubeshim's DNS server on 127.0.0.1:port until SIGTERM."""
    import uvloop

    async def main() -> None:
        server = DNSServer(
            cluster_state(services),
            DNSConfig(binds=[("127.0.0.1", port)], upstreams=[], udp_batch=udp_batch),
        )
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        hits, misses = server.metrics.answer_hits, server.metrics.answer_misses
        batched = [u for u in server._udp if isinstance(u, BatchedUDP)]
        shape = ""
        if batched and batched[0].batches:
            u = batched[0]
            shape = f" batches={u.batches} mean={server.metrics.requests_udp / u.batches:.1f}"
            shape += f" largest={u.largest_batch}"
        await server.stop()
        print(f"answer cache hits={hits} misses={misses}{shape}", file=sys.stderr)

    uvloop.run(main())


def wait_udp(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            [
                "dig",
                "+short",
                "+tries=1",
                "+time=1",
                "-p",
                str(port),
                "@127.0.0.1",
                f"svc-0.bench.svc.{ZONE}",
            ],
            capture_output=True,
            text=True,
        )
        if re.fullmatch(r"[\d.]+", r.stdout.strip()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no DNS answer on port {port}")


def dnsperf(port: int, queries: Path, args: argparse.Namespace, rate: int = 0) -> dict[str, Any]:
    """Saturating run (rate 0) for queries/s; a run at a fixed rate for latency percentiles."""
    cmd = [
        *pinned(args.client_cpus),
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        str(args.seconds),
        "-c",
        str(args.clients),
        "-q",
        str(args.outstanding),
    ]
    if rate:
        cmd += ["-Q", str(rate), "-v"]  # -v: one line per answered query, with its latency
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    codes = re.search(r"Response codes:\s+(.*)", out)
    result: dict[str, Any] = {
        "qps": qps,
        "lost": lost,
        "cmd": " ".join(cmd),
        "rcodes": codes.group(1) if codes else "",
        # dnsperf's own CPU per answered query: the client's ceiling on these cores.
        "client_us": client_cpu / (qps * args.seconds) * 1e6 if qps else 0.0,
    }
    if rate:
        lat = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
        pct = statistics.quantiles(lat, n=100)
        result.update(p50_ms=pct[49] * 1e3, p99_ms=pct[98] * 1e3)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, queries: Path, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    wait_udp(port)
    before = cpu_seconds(pid)
    result = dnsperf(port, queries, args)
    # The server's own CPU per answered query: what it costs, whatever the client's ceiling.
    answered = result["qps"] * args.seconds
    result["cpu_us"] = (cpu_seconds(pid) - before) / answered * 1e6 if answered else 0.0
    latency = dnsperf(port, queries, args, rate=args.rate)
    result.update(p50_ms=latency["p50_ms"], p99_ms=latency["p99_ms"], latency_cmd=latency["cmd"])
    return result


def hit_path_us(services: int) -> float:
    from dnslib import DNSRecord

    server = DNSServer(cluster_state(services), DNSConfig(binds=[], upstreams=[]))
    q = bytes(DNSRecord.question(f"svc-1.bench.svc.{ZONE}").pack())
    server.answer(q, False)
    n = 200_000
    return timeit.timeit(lambda: server.answer(q, False), number=n) / n * 1e6


def cache_policy_ns() -> tuple[float, float]:
    """Cost of one cache hit: a plain dict (clear-on-full) vs an LRU (OrderedDict move_to_end)."""
    from collections import OrderedDict

    keys = [f"svc-{i}.bench".encode() for i in range(1000)]
    plain = dict.fromkeys(keys, b"packet")
    lru: OrderedDict[bytes, bytes] = OrderedDict(plain)

    def plain_hit() -> None:
        for k in keys:
            plain.get(k)

    def lru_hit() -> None:
        for k in keys:
            if lru.get(k) is not None:
                lru.move_to_end(k)

    n = 200
    return (
        timeit.timeit(plain_hit, number=n) / (n * len(keys)) * 1e9,
        timeit.timeit(lru_hit, number=n) / (n * len(keys)) * 1e9,
    )


def pinned(cpus: str) -> list[str]:
    """The taskset prefix that keeps a process on `cpus` (nothing when no pinning was asked)."""
    return ["taskset", "-c", cpus] if cpus else []


def start_kubeshim(args: argparse.Namespace, port: int, udp_batch: bool) -> subprocess.Popen[bytes]:
    cmd = [*pinned(args.server_cpus), sys.executable, __file__, "--serve", str(port)]
    cmd += ["--services", str(args.services)]
    return subprocess.Popen(cmd + ([] if udp_batch else ["--no-udp-batch"]))


def start_dnsmasq(
    args: argparse.Namespace, port: int, hosts: Path, conf: Path, tmp: str
) -> subprocess.Popen[bytes]:
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    return subprocess.Popen(
        [
            *pinned(args.server_cpus),
            "dnsmasq",
            f"--conf-file={conf}",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={hosts}",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--cache-size=10000",
            f"--pid-file={tmp}/dnsmasq.pid",
            f"--user={user}",
        ],
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=int, default=5000, help="queries/s of the latency run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    ap.add_argument(
        "--servers",
        default="kubeshim,dnsmasq",
        help="comma-separated: kubeshim (batched UDP), kubeshim-datagram (one datagram per"
        " callback, the fallback path), dnsmasq",
    )
    ap.add_argument(
        "--mix",
        choices=("plain", "cluster"),
        default="plain",
        help="plain: A of each Service; cluster: A, SRV, NXDOMAIN and headless names",
    )
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    ap.add_argument("--server-cpus", default="", help="taskset CPU list for the servers")
    ap.add_argument("--client-cpus", default="", help="taskset CPU list for dnsperf")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-udp-batch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.services, not args.no_udp_batch)
        return
    for tool in ("dnsperf", "dnsmasq", "dig"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required")
    load_before = f"{os.getloadavg()[0]:.2f}"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.servers.split(",")}
    for name in runs:
        if name not in ("kubeshim", "kubeshim-datagram", "dnsmasq"):
            sys.exit(f"unknown server {name!r}: kubeshim, kubeshim-datagram or dnsmasq")
    with tempfile.TemporaryDirectory() as tmp:
        queries = Path(tmp, "queries.txt")
        queries.write_text(query_lines(args.services, args.mix))
        hosts, conf = dnsmasq_records(args.services, tmp)
        for _ in range(args.rounds):
            for name in runs:
                port = free_port()
                if name.startswith("kubeshim"):
                    proc = start_kubeshim(args, port, name == "kubeshim")
                else:
                    proc = start_dnsmasq(args, port, hosts, conf, tmp)
                try:
                    runs[name].append(measure(port, queries, args, proc.pid))
                finally:
                    proc.terminate()
                    proc.wait(10)
    print(f"hit path in process (answer(), no sockets): {hit_path_us(args.services):.2f} us/query")
    plain_ns, lru_ns = cache_policy_ns()
    print(f"cache hit bookkeeping: dict {plain_ns:.0f} ns, LRU (OrderedDict) {lru_ns:.0f} ns")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f} (2 cores shared)")
    print(
        f"{args.services} Services, {args.mix} mix, {args.rounds} alternating rounds of"
        f" {args.seconds}s; medians"
    )
    if args.server_cpus or args.client_cpus:
        print(
            f"pinned: servers on CPU {args.server_cpus or 'any'},"
            f" dnsperf on CPU {args.client_cpus or 'any'}"
        )
    print(f"latency percentiles measured at {args.rate} queries/s")
    print("cpu us/q: the server's user+system CPU per answered query in the saturating run;")
    print("dnsperf: the client's CPU per answered query in that run (us)")
    print(
        f"{'server':18} {'max qps':>10} {'lost':>6} {'cpu us/q':>8} {'dnsperf':>8}"
        f" {'p50 ms':>8} {'p99 ms':>8}"
        "  qps per round"
    )
    med: dict[str, float] = {}
    for name, rs in runs.items():
        med[name] = statistics.median(r["qps"] for r in rs)
        per_round = " ".join(f"{r['qps']:.0f}" for r in rs)
        p50 = statistics.median(r["p50_ms"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        lost = sum(r["lost"] for r in rs)
        cpu = statistics.median(r["cpu_us"] for r in rs)
        client = statistics.median(r["client_us"] for r in rs)
        print(
            f"{name:18} {med[name]:10.0f} {lost:6d} {cpu:8.2f} {client:8.2f}"
            f" {p50:8.3f} {p99:8.3f}  {per_round}"
        )
    if "dnsmasq" in med:
        for name in med:
            if name != "dnsmasq":
                ratio = med[name] / med["dnsmasq"]
                print(f"{name}/dnsmasq qps ratio (medians): {ratio:.2f}")
    for name, rs in runs.items():
        print(f"{name} response codes: {rs[0]['rcodes']}")
    first = next(iter(runs.values()))[0]
    print(f"dnsperf commands: {first['cmd']}")
    print(f"                  {first['latency_cmd']}  (port differs per server)")


if __name__ == "__main__":
    main()
