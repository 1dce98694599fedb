"""Where kubeshim spends its time under load: py-spy samples the running daemon while one load
generator drives it, and the folded stacks are reduced to self and inclusive shares per function.
py-spy runs on the load CPU, with --nonblocking so the daemon is never paused.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from . import load
from .contenders import KUBESHIM_DNS, Contender
from .lab import BenchError, Lab
from .scenarios import Settings

RATE = 250  # samples per second


def _fold(path: Path) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]],
                              list[tuple[str, float]]]:
    """(samples, self % per function, inclusive % per function, self % per source line).
    Self time of the outermost frame (`Runner.run`) is time in uvloop/libuv's C code: system
    calls and the loop itself, below any Python callback."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    line_c: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        line_c[frames[-1]] += n
        funcs = [_function(f) for f in frames]
        self_c[funcs[-1]] += n
        for f in set(funcs):
            total_c[f] += n
    if not samples:
        return 0, [], [], []

    def pct(c: Counter[str], k: int, cap: int | None = None) -> list[tuple[str, float]]:
        return [(f, 100 * v / samples) for f, v in c.most_common()
                if cap is None or v < cap][:k]

    # Inclusive: leave out the daemon's entry chain (the frames nearly every sample has).
    root = max(total_c.values())
    return samples, pct(self_c, 25), pct(total_c, 30, cap=int(root * 0.98)), pct(line_c, 25)


def _function(frame: str) -> str:
    """`f (dns/server.py:123)` -> `f (dns/server.py)`."""
    return re.sub(r":\d+\)$", ")", frame)


def _short(frame: str) -> str:
    """`handler (/work/main/dns/server.py:123)` -> `handler (dns/server.py:123)`; site-packages
    paths keep only the package part."""
    frame = re.sub(r"\(.*?/site-packages/", "(", frame)
    return re.sub(r"\(/[^()]*?/(cluster|proxy|dns|kubeshim|bench|asyncio)/", r"(\1/", frame)


def record(pid: int, seconds: float, folded: Path) -> subprocess.Popen[str]:
    """Start py-spy on `pid` for `seconds`; the caller drives the load, then calls finish()."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking",
         "--format", "raw", "--output", str(folded), "--duration", f"{int(seconds) + 1}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(spy: subprocess.Popen[str], folded: Path, seconds: float) -> dict[str, Any]:
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not folded.exists():
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    samples, top_self, top_total, top_lines = _fold(folded)
    return {"samples": samples, "busy": samples / (RATE * (int(seconds) + 1)),
            "top_self": top_self, "top_total": top_total, "top_lines": top_lines,
            "folded_text": folded.read_text(errors="replace")}


def profile_kubeshim(lab: Lab, ks: Contender, s: Settings, cluster_q: Path,
                     forward_q: Path, prefix: str = "") -> dict[str, Any]:
    """Profiles under each load the contender serves (a proxy-only one: no DNS loads), keyed
    `prefix + load`; `s.scenarios` narrows the proxy loads."""
    assert ks.proc is not None
    seconds = max(2.0, s.seconds)
    loads = {
        "tcp_keepalive": lambda: load.wrk(f"http://{ks.targets['http'][0]}:"
                                          f"{ks.targets['http'][1]}/", s.load_cpu, seconds,
                                          s.wrk_connections, close=False),
        "tcp_newconn": lambda: load.wrk(f"http://{ks.targets['http'][0]}:"
                                        f"{ks.targets['http'][1]}/", s.load_cpu, seconds,
                                        s.wrk_connections, close=True),
        "tcp_bulk": lambda: load.iperf3(*ks.targets["iperf"], s.load_cpu, seconds),
        "udp_rr": lambda: load.dnsperf(*ks.targets["udp"], lab.workdir / "udp-queries.txt",
                                       s.load_cpu, seconds),
        "dns_cluster": lambda: load.dnsperf(*KUBESHIM_DNS, cluster_q, s.load_cpu, seconds),
        "dns_forward": lambda: load.dnsperf(*KUBESHIM_DNS, forward_q, s.load_cpu, seconds),
    }
    result: dict[str, Any] = {}
    for name, fn in loads.items():
        if name.startswith("dns_") and prefix:  # the proxy-only contender
            continue
        if not name.startswith("dns_") and s.scenarios is not None and name not in s.scenarios:
            continue
        name = prefix + name
        folded = lab.workdir / f"profile-{name}.folded"
        spy = record(ks.proc.pid, seconds, folded)
        try:
            figures = fn()
        except BenchError as e:
            figures = {"error": str(e)}
        result[name] = finish(spy, folded, seconds)
        if "error" in result[name]:
            continue
        result[name]["load"] = {k: v for k, v in figures.items() if isinstance(v, int | float)}
        top_self = result[name]["top_self"]
        samples = result[name]["samples"]
        s.log(f"  profile {name}: {samples} samples; top self: "
              + ", ".join(f"{f.split(' (')[0]} {p:.0f}%" for f, p in top_self[:4]))
    return result
