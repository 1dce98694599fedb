"""Load generators (wrk, iperf3, dnsperf) run pinned to the load CPU, and their output parsed.

Each function returns a flat dict of figures; the caller adds the contender's CPU seconds.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from pathlib import Path

from .lab import BenchError

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _run(argv: list[str], cpu: str, timeout: float) -> str:
    proc = subprocess.run(["taskset", "-c", cpu, *argv], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def _duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, cpu: str, seconds: float, connections: int, close: bool) -> dict[str, float]:
    """HTTP requests/s and latency percentiles; `close` sends `Connection: close` so every
    request is a new TCP connection (new connections per second)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = _run([*argv, url], cpu, timeout=seconds + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise BenchError(f"wrk printed no Requests/sec:\n{out}")
    res: dict[str, float] = {"rps": float(rps.group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _duration(m.group(1)) * 1e3
    total = re.search(r"(\d+) requests in", out)
    res["requests"] = float(total.group(1)) if total else 0.0
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = float(sum(int(g) for g in errs.groups())) if errs else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return res


def iperf3(host: str, port: int, cpu: str, seconds: float) -> dict[str, float]:
    """One TCP stream, client -> server; bytes and bits/s as the receiver counted them."""
    out = _run(["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", "3000"], cpu, timeout=seconds + 30)
    data = json.loads(out)
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    recv = data["end"]["sum_received"]
    return {"gbit_s": recv["bits_per_second"] / 1e9, "bytes": float(recv["bytes"])}


def dnsperf(host: str, port: int, queries: Path, cpu: str, seconds: float, *,
            rate: int | None = None, clients: int = 8, outstanding: int = 200
            ) -> dict[str, float]:
    """Queries/s at saturation (`rate` None), or latency percentiles at a fixed offered rate
    (dnsperf 2.10 reports no percentiles, so each answer's latency is read from -v lines)."""
    argv = ["dnsperf", "-s", host, "-p", str(port), "-d", str(queries), "-l", f"{seconds:g}",
            "-c", str(clients), "-q", str(outstanding), "-t", "2"]
    if rate is not None:
        argv += ["-Q", str(rate), "-v"]
    out = _run(argv, cpu, timeout=seconds + 30)
    res: dict[str, float] = {}
    for key, pattern in (
        ("sent", r"Queries sent:\s+(\d+)"),
        ("completed", r"Queries completed:\s+(\d+)"),
        ("lost", r"Queries lost:\s+(\d+)"),
        ("qps", r"Queries per second:\s+([\d.]+)"),
        ("avg_ms", r"Average Latency \(s\):\s+([\d.]+)"),
    ):
        m = re.search(pattern, out)
        if not m:
            raise BenchError(f"dnsperf printed no {key}:\n{out[-1500:]}")
        res[key] = float(m.group(1))
    res["avg_ms"] *= 1e3
    codes = re.search(r"Response codes:\s+(.*)", out)
    res["rcodes"] = codes.group(1).strip() if codes else ""  # type: ignore[assignment]
    if rate is not None:
        lat = sorted(float(x) for x in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
        if not lat:
            raise BenchError("dnsperf -v printed no per-query latencies")
        res["p50_ms"] = lat[len(lat) // 2] * 1e3
        res["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        res["max_ms"] = lat[-1] * 1e3
    return res


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(pct / 100 * (len(s) - 1))))]
