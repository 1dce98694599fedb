"""The data-plane and DNS scenarios: each contender measured in turn, repeated, order rotated.

Every sample records the figures of its load generator plus the contender's CPU seconds over the
same wall time (utilisation near 1.0 means the contender saturated its one CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import load
from .contenders import Contender
from .lab import CLK_TCK, BenchError

Sample = dict[str, Any]


@dataclass
class Settings:
    reps: int
    seconds: float        # per sample, TCP/UDP/DNS throughput
    latency_seconds: float
    subject_cpu: str
    load_cpu: str
    wrk_connections: int = 64
    scenarios: set[str] | None = None  # proxy scenarios to run (None: all)
    log: Callable[[str], None] = print


def cpu_busy(cpus: str) -> float:
    """Seconds the CPUs in `cpus` (a taskset list like "1" or "0,1") spent not idle, from
    /proc/stat (all processes and interrupts, not only ours)."""
    wanted = {f"cpu{c.strip()}" for c in cpus.split(",")}
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in wanted:
                ticks = [int(x) for x in parts[1:]]
                busy += sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / CLK_TCK


def tcp_counters() -> dict[str, int]:
    """This namespace's TCP retransmission counters (/proc/net/snmp, /proc/net/netstat)."""
    out: dict[str, int] = {}
    for path, table, keys in (("/proc/net/snmp", "Tcp:", ("RetransSegs",)),
                              ("/proc/net/netstat", "TcpExt:", ("TCPSynRetrans",))):
        try:
            text = Path(path).read_text()
            lines = [ln.split() for ln in text.splitlines() if ln.startswith(table)]
        except OSError:
            continue
        if len(lines) >= 2:
            row = dict(zip(lines[0][1:], lines[1][1:], strict=False))
            for k in keys:
                if k in row:
                    out[k] = int(row[k])
    return out


def _measure(c: Contender, fn: Callable[[], dict[str, Any]], subject_cpu: str,
             load_cpu: str) -> Sample:
    cpu0 = c.proc.cpu_seconds() if c.proc else None
    busy0, load0, tcp0 = cpu_busy(subject_cpu), cpu_busy(load_cpu), tcp_counters()
    t0 = time.monotonic()
    figures = fn()
    wall = time.monotonic() - t0
    tcp1 = tcp_counters()
    figures["tcp_retrans"] = float(tcp1.get("RetransSegs", 0) - tcp0.get("RetransSegs", 0))
    figures["syn_retrans"] = float(tcp1.get("TCPSynRetrans", 0) - tcp0.get("TCPSynRetrans", 0))
    subject_busy = (cpu_busy(subject_cpu) - busy0) / wall
    figures["subject_cpu_busy"] = subject_busy
    # Near 1.0: the client/backend CPU was the bottleneck, not the contender.
    figures["load_cpu_busy"] = (cpu_busy(load_cpu) - load0) / wall
    if c.proc is not None and cpu0 is not None:
        if not c.proc.alive():
            raise BenchError(f"{c.name} exited during the run:\n{c.proc.tail()}")
        cpu = c.proc.cpu_seconds() - cpu0
        figures["cpu_s"] = cpu
        figures["cpu_util"] = cpu / wall
        # What else ran on the contender's CPU meanwhile (other work on a shared machine).
        figures["other_load"] = max(0.0, subject_busy - cpu / wall)
        done = figures.get("requests") or figures.get("completed")
        if done:
            figures["cpu_us_per_req"] = cpu / done * 1e6
    figures["wall_s"] = wall
    return figures


def _rotated(items: list[Contender], rep: int) -> list[Contender]:
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]


def proxy_scenarios(contenders: list[Contender], s: Settings, udp_queries: Path,
                    samples: list[Sample], errors: dict[str, str]) -> None:
    def keepalive(c: Contender) -> dict[str, Any]:
        host, port = c.targets["http"]
        return load.wrk(f"http://{host}:{port}/", c.load_cpus or s.load_cpu, s.seconds,
                        s.wrk_connections, close=False)

    def newconn(c: Contender) -> dict[str, Any]:
        host, port = c.targets["http"]
        return load.wrk(f"http://{host}:{port}/", c.load_cpus or s.load_cpu, s.seconds,
                        s.wrk_connections, close=True)

    def bulk(c: Contender) -> dict[str, Any]:
        host, port = c.targets["iperf"]
        return load.iperf3(host, port, c.load_cpus or s.load_cpu, s.seconds)

    def udp(c: Contender) -> dict[str, Any]:
        host, port = c.targets["udp"]
        return load.dnsperf(host, port, udp_queries, c.load_cpus or s.load_cpu, s.seconds)

    scenarios: list[tuple[str, str, Callable[[Contender], dict[str, Any]]]] = [
        ("tcp_keepalive", "http", keepalive),
        ("tcp_newconn", "http", newconn),
        ("tcp_bulk", "iperf", bulk),
        ("udp_rr", "udp", udp),
    ]
    if s.scenarios is not None:
        scenarios = [x for x in scenarios if x[0] in s.scenarios]
    for rep in range(s.reps):
        for scenario, service, fn in scenarios:
            for c in _rotated(contenders, rep):
                if service not in c.targets:
                    continue
                key = f"{scenario}/{c.name}"
                try:
                    c.activate()
                    fig = _measure(c, lambda c=c, fn=fn: fn(c), c.cpus or s.subject_cpu,  # type: ignore[misc]
                                   c.load_cpus or s.load_cpu)
                except BenchError as e:
                    errors[key] = str(e)
                    s.log(f"  {key}: FAILED {str(e).splitlines()[0]}")
                    continue
                if scenario == "tcp_bulk" and "cpu_s" in fig and fig["bytes"]:
                    fig["cpu_s_per_gb"] = fig["cpu_s"] / (fig["bytes"] / 1e9)
                samples.append({"scenario": scenario, "contender": c.name, "rep": rep, **fig})
                s.log(f"  rep {rep + 1}/{s.reps} {key}: " + _brief(fig))
                time.sleep(0.3)


def dns_scenarios(contenders: list[Contender], s: Settings, cluster_q: Path, forward_q: Path,
                  samples: list[Sample], errors: dict[str, str]) -> None:
    # Warm the forwarders' caches: every forwarded name once.
    for c in contenders:
        host, port = c.targets["dns"]
        if not c.forwards:
            continue
        try:
            load.dnsperf(host, port, forward_q, s.load_cpu, 1, clients=1, outstanding=10)
        except BenchError as e:
            errors[f"dns_warmup/{c.name}"] = str(e)
    sets = [("dns_cluster", cluster_q), ("dns_forward", forward_q)]
    for rep in range(s.reps):
        for scenario, qfile in sets:
            for c in _rotated(contenders, rep):
                if scenario == "dns_forward" and not c.forwards:
                    continue
                key = f"{scenario}/{c.name}"
                host, port = c.targets["dns"]
                lc = c.load_cpus or s.load_cpu
                try:
                    fig = _measure(c, lambda h=host, p=port, q=qfile, lc=lc: load.dnsperf(  # type: ignore[misc]
                        h, p, q, lc, s.seconds), c.cpus or s.subject_cpu, lc)
                except BenchError as e:
                    errors[key] = str(e)
                    s.log(f"  {key}: FAILED {str(e).splitlines()[0]}")
                    continue
                samples.append({"scenario": scenario, "contender": c.name, "rep": rep, **fig})
                s.log(f"  rep {rep + 1}/{s.reps} {key}: " + _brief(fig))
                time.sleep(0.3)
    # Latency at one fixed offered load for all: 30% of the slowest contender's median
    # saturation rate, so every server has headroom and p99 measures service time, not queueing.
    for scenario, qfile in sets:
        # One-process contenders set the rate (the two-process ones share the load's CPU).
        rates = [load.median([x["qps"] for x in samples
                              if x["scenario"] == scenario and x["contender"] == c.name])
                 for c in contenders if c.cpus is None]
        rates = [r for r in rates if r == r]  # drop NaN
        if not rates:
            continue
        rate = max(100, int(min(rates) * 0.3))
        for rep in range(s.reps):
            for c in _rotated(contenders, rep):
                if scenario == "dns_forward" and not c.forwards:
                    continue
                key = f"{scenario}_latency/{c.name}"
                host, port = c.targets["dns"]
                try:
                    lc = c.load_cpus or s.load_cpu
                    fig = _measure(c, lambda h=host, p=port, q=qfile, r=rate, lc=lc: load.dnsperf(  # type: ignore[misc]
                        h, p, q, lc, s.latency_seconds, rate=r), c.cpus or s.subject_cpu, lc)
                except BenchError as e:
                    errors[key] = str(e)
                    s.log(f"  {key}: FAILED {str(e).splitlines()[0]}")
                    continue
                fig["offered_qps"] = rate
                samples.append({"scenario": f"{scenario}_latency", "contender": c.name,
                                "rep": rep, **fig})
                s.log(f"  rep {rep + 1}/{s.reps} {key}: " + _brief(fig))


def _brief(fig: dict[str, Any]) -> str:
    keys = ("rps", "gbit_s", "qps", "p50_ms", "p99_ms", "cpu_util", "other_load", "cpu_s_per_gb",
            "lost", "socket_errors", "syn_retrans")
    return " ".join(f"{k}={fig[k]:.4g}" for k in keys if isinstance(fig.get(k), float | int))
