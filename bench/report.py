"""Turning a run's samples into the results files: markdown (machine, targets, one ratio table per
scenario, control plane, profile, errors), JSON (everything, raw) and PNG charts.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from .load import median

REPO = Path(__file__).resolve().parent.parent

# scenario -> (title, main figure, unit, higher is better, extra figures shown)
SCENARIOS: dict[str, tuple[str, str, str, bool, list[str]]] = {
    "tcp_keepalive": ("TCP keep-alive HTTP (wrk -t1 -c64, small response)", "rps", "req/s", True,
                      ["p50_ms", "p99_ms", "cpu_util", "cpu_us_per_req", "other_load"]),
    "tcp_newconn": ("TCP new connection per request (wrk, Connection: close)", "rps", "conn/s",
                    True, ["p50_ms", "p99_ms", "cpu_util", "cpu_us_per_req", "other_load",
                           "syn_retrans"]),
    "tcp_bulk": ("TCP bulk (iperf3, one stream)", "gbit_s", "Gbit/s", True,
                 ["cpu_s_per_gb", "cpu_util", "other_load"]),
    "udp_rr": ("UDP request/response (dnsperf -c8 -q200 through the proxy to dnsmasq)", "qps",
               "req/s", True, ["avg_ms", "lost", "cpu_util", "cpu_us_per_req", "other_load"]),
    "dns_cluster": ("DNS cluster names, saturation (dnsperf -c8 -q200)", "qps", "queries/s", True,
                    ["avg_ms", "lost", "cpu_util", "cpu_us_per_req", "other_load"]),
    "dns_forward": ("DNS forwarded names, warm cache, saturation", "qps", "queries/s", True,
                    ["avg_ms", "lost", "cpu_util", "cpu_us_per_req", "other_load"]),
    "dns_cluster_latency": ("DNS cluster names, latency at a fixed rate", "p99_ms", "ms p99",
                            False, ["offered_qps", "p50_ms", "cpu_util", "other_load"]),
    "dns_forward_latency": ("DNS forwarded names, latency at a fixed rate", "p99_ms", "ms p99",
                            False, ["offered_qps", "p50_ms", "cpu_util", "other_load"]),
}
REFERENCE = {"tcp_keepalive": "direct", "tcp_newconn": "direct", "tcp_bulk": "direct",
             "udp_rr": "direct", "dns_cluster": "dnsmasq", "dns_forward": "dnsmasq",
             "dns_cluster_latency": "dnsmasq", "dns_forward_latency": "dnsmasq"}


def _cmd(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0] if (
        p.stdout or p.stderr) else "?"


def machine_info(args: Any) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "missing"
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "kubeshim_commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        + (" (dirty)" if _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--",
                               "proxy", "dns", "cluster", "kubeshim"]) not in ("?", "") else ""),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "haproxy": _cmd(["haproxy", "-v"]),
        "nginx": _cmd(["nginx", "-v"]),
        "dnsmasq": _cmd(["dnsmasq", "-v"]),
        "iperf3": _cmd(["iperf3", "-v"]),
        "wrk": _cmd(["wrk", "-v"]),
        "dnsperf": _dnsperf_version(),
        "nftables": _cmd(["nft", "-v"]),
        "placement": f"contender under test on CPU {args.subject_cpu}; load generators, "
                     f"backends, fake API server and the harness on CPU {args.load_cpu}",
    }


def _dnsperf_version() -> str:
    p = subprocess.run(["dnsperf", "-H"], capture_output=True, text=True)
    m = re.search(r"Version ([\d.]+)", p.stdout + p.stderr)
    return f"dnsperf {m.group(1)}" if m else "dnsperf ?"


# --- summaries -----------------------------------------------------------------------------------


def summarise(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> contender -> {figure: median, figure_min, figure_max, n}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in samples:
        out.setdefault(s["scenario"], {}).setdefault(s["contender"], {"_samples": []})[
            "_samples"].append(s)
    for per in out.values():
        for name, d in per.items():
            rows = d.pop("_samples")
            d["n"] = len(rows)
            keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)
                    and k != "rep"}
            for k in keys:
                vals = [float(r[k]) for r in rows if isinstance(r.get(k), int | float)]
                d[k] = median(vals)
                d[f"{k}_min"], d[f"{k}_max"] = min(vals), max(vals)
            per[name] = d
    return out


def _get(summary: dict[str, Any], scenario: str, contender: str, key: str) -> float | None:
    v = summary.get(scenario, {}).get(contender, {}).get(key)
    return v if isinstance(v, float) and not math.isnan(v) else None


def targets(summary: dict[str, Any], control: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(scn: str, key: str, other: str) -> float | None:
        a, b = _get(summary, scn, "kubeshim", key), _get(summary, scn, other, key)
        return a / b if a is not None and b else None

    def why(scn: str, other: str) -> str:
        """The evidence for what limited a ratio: who saturated their CPU, who was disturbed."""
        parts = []
        for who in ("kubeshim", other):
            d = summary.get(scn, {}).get(who, {})
            if d.get("cpu_util") is not None:
                parts.append(f"{who} CPU {d['cpu_util']:.2f}"
                             + (f" (+{d['other_load']:.2f} other)"
                                if (d.get("other_load") or 0) > 0.1 else ""))
            elif d:
                parts.append(f"{who}: no process CPU (kernel)" if other != "direct"
                             else "direct: no proxy")
        d = summary.get(scn, {}).get("kubeshim", {})
        if d.get("load_cpu_busy") is not None:
            parts.append(f"load CPU {d['load_cpu_busy']:.2f} during kubeshim's samples")
        return "; ".join(parts)

    rows = [
        ("DNS cluster-name queries/s vs dnsmasq", ratio("dns_cluster", "qps", "dnsmasq"),
         ">=", 2.5, "x"),
        ("DNS p99 latency vs dnsmasq (cluster names, fixed rate)",
         ratio("dns_cluster_latency", "p99_ms", "dnsmasq"), "<=", 1.0, "x"),
        ("TCP keep-alive req/s vs HAProxy", ratio("tcp_keepalive", "rps", "haproxy"), ">=", 1.0,
         "x"),
        ("TCP new connections/s vs HAProxy", ratio("tcp_newconn", "rps", "haproxy"), ">=", 1.0,
         "x"),
        ("TCP bulk throughput vs direct", ratio("tcp_bulk", "gbit_s", "direct"), ">=", 0.9, "x"),
        ("proxy CPU s/GB vs HAProxy (no splice)", ratio("tcp_bulk", "cpu_s_per_gb", "haproxy"),
         "<=", 1.0, "x"),
        ("UDP req/resp vs direct", ratio("udp_rr", "qps", "direct"), ">=", 0.9, "x"),
        ("UDP req/resp vs nginx stream", ratio("udp_rr", "qps", "nginx-stream"), ">=", 2.0, "x"),
    ]
    evidence = [why("dns_cluster", "dnsmasq"), why("dns_cluster_latency", "dnsmasq"),
                why("tcp_keepalive", "haproxy"), why("tcp_newconn", "haproxy"),
                why("tcp_bulk", "direct"), why("tcp_bulk", "haproxy"), why("udp_rr", "direct"),
                why("udp_rr", "nginx-stream")]
    big = max(control, key=lambda c: c["services"], default=None)
    if big is not None:
        rows.append((f"endpoint change -> data plane p99, {big['services']} services",
                     big.get("change_tcp", {}).get("p99_ms"), "<", 10.0, " ms"))
        rows.append((f"endpoint change -> DNS p99, {big['services']} services (no target)",
                     big.get("change_dns", {}).get("p99_ms"), "", None, " ms"))
    out = []
    for i, (name, value, op, goal, unit) in enumerate(rows):
        met = None
        if value is not None and goal is not None:
            met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
        if i < len(evidence):
            note = evidence[i]
        elif big is not None:
            d = big.get("change_tcp" if i == len(evidence) else "change_dns", {})
            note = (f"kubeshim CPU {d.get('cpu_util', 0):.2f} (+{d.get('other_load', 0):.2f} "
                    f"other); max {_fmt(d.get('max_ms'))} ms of {d.get('n', 0)}")
        else:
            note = ""
        out.append({"target": name, "value": value, "goal": f"{op} {goal}{unit}" if goal else "",
                    "unit": unit, "met": met, "evidence": note})
    return out + worker_targets(summary)


# A contender at this share of its CPU or more is CPU-bound; below it, something else limited.
CPU_BOUND = 0.9
# The most CPU per request two workers may spend against one for 1.7x on two CPUs.
SCALING_CPU = round(1 / 0.85, 2)


def worker_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """kubeshim in tproxy mode with one and two worker processes, beside HAProxy with one and
    two threads, and its DNS with one and two workers."""
    def pair(scn: str, key: str, a: str, b: str) -> float | None:
        x, y = _get(summary, scn, a, key), _get(summary, scn, b, key)
        return x / y if x is not None and y else None

    def cpu(scn: str, *who: str) -> str:
        parts = []
        for w in who:
            d = summary.get(scn, {}).get(w, {})
            if d.get("cpu_util") is not None:
                parts.append(f"{w} CPU {d['cpu_util']:.2f}"
                             + (f", {d['cpu_us_per_req']:.0f} µs/req"
                                if d.get("cpu_us_per_req") is not None else "")
                             + (f" (+{d['other_load']:.2f} other)"
                                if (d.get("other_load") or 0) > 0.1 else ""))
        return "; ".join(parts)

    ks1, ks2, dns1, dns2 = ("kubeshim-tproxy", "kubeshim-tproxy-w2", "kubeshim-dns-w1",
                            "kubeshim-dns-w2")
    rows = [
        ("TCP new connections/s, tproxy 1 worker vs HAProxy nbthread 1",
         pair("tcp_newconn", "rps", ks1, "haproxy"), ">=", 1.0, cpu("tcp_newconn", ks1, "haproxy")),
        ("CPU per new connection, tproxy 1 worker vs HAProxy nbthread 1",
         pair("tcp_newconn", "cpu_us_per_req", ks1, "haproxy"), "<=", 1.0,
         cpu("tcp_newconn", ks1, "haproxy")),
        ("TCP keep-alive req/s, tproxy 1 worker vs HAProxy nbthread 1",
         pair("tcp_keepalive", "rps", ks1, "haproxy"), ">=", 1.0,
         cpu("tcp_keepalive", ks1, "haproxy")),
        ("TCP new connections/s, tproxy 2 workers vs 1 worker",
         pair("tcp_newconn", "rps", ks2, ks1), ">=", 1.7, cpu("tcp_newconn", ks2, ks1)),
        ("TCP new connections/s, tproxy 2 workers vs HAProxy nbthread 2",
         pair("tcp_newconn", "rps", ks2, "haproxy-t2"), ">=", 1.0,
         cpu("tcp_newconn", ks2, "haproxy-t2")),
        ("DNS cluster-name queries/s, 2 workers vs 1 worker",
         pair("dns_cluster", "qps", dns2, dns1), ">=", 1.7, cpu("dns_cluster", dns2, dns1)),
        # What two workers spend per request against one: at most 1/0.85 of it, and two CPUs
        # give at least 1.7x where the load side has a CPU of its own (it has none here).
        ("CPU per new connection, tproxy 2 workers vs 1 worker",
         pair("tcp_newconn", "cpu_us_per_req", ks2, ks1), "<=", SCALING_CPU,
         cpu("tcp_newconn", ks2, ks1)),
        ("CPU per DNS query, 2 workers vs 1 worker",
         pair("dns_cluster", "cpu_us_per_req", dns2, dns1), "<=", SCALING_CPU,
         cpu("dns_cluster", dns2, dns1)),
    ]
    out = []
    for name, value, op, goal, note in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        if "2 workers vs 1 worker" in name and not name.startswith("CPU"):
            # A scaling ratio means something only where one worker used its whole CPU;
            # otherwise the load generator was the limit, and with two CPUs it shares them.
            scn, one = ("dns_cluster", dns1) if name.startswith("DNS") else ("tcp_newconn", ks1)
            used = summary.get(scn, {}).get(one, {}).get("cpu_util")
            if met is False and used is not None and used < CPU_BOUND:
                met = None
                note += (f"; not measurable here: 1 worker used {used:.2f} of its CPU (the load "
                         "side was the limit), see the CPU-per-request row")
        out.append({"target": name, "value": value, "goal": f"{op} {goal:g}x", "unit": "x",
                    "met": met, "evidence": note})
    return out


# --- writing -------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown(results: dict[str, Any], summary: dict[str, Any], tgt: list[dict[str, Any]],
             png: str) -> str:
    m = results["machine"]
    st = results["settings"]
    out = [f"# kubeshim benchmarks — {results['started']} on {m['host']}", ""]
    out += [f"Command: `{results['command']}` ({results['duration_s']:.0f} s). "
            f"Each figure is the median of {st['reps']} samples of {st['seconds']:g} s, "
            "contenders interleaved (order rotated each repetition); ranges are min–max.", ""]
    out += ["| machine | |", "|---|---|"]
    for k in ("cpu", "cpus", "memory_gib", "kernel", "python", "uvloop", "kubeshim_commit",
              "loadavg_at_start", "placement", "haproxy", "nginx", "dnsmasq", "iperf3", "wrk",
              "dnsperf", "nftables"):
        out.append(f"| {k} | {m.get(k, '?')} |")
    out += ["", "## Targets", "",
            "Evidence: each side's CPU use during the samples (1.00 = its CPU saturated; "
            "`other` = other work on that CPU). Below 1.00 the limit was elsewhere, usually "
            "the load CPU (client + backend), whose busy share is shown too.", "",
            "| target | kubeshim | goal | met | evidence |", "|---|---|---|---|---|"]
    for t in tgt:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        unit = t["unit"] if t["value"] is not None else ""
        out.append(f"| {t['target']} | {_fmt(t['value'])}{unit} | {t['goal']} | {met} | "
                   f"{t.get('evidence', '')} |")
    out += ["", f"![charts]({png})", ""]
    for scn, (title, key, unit, higher, extras) in SCENARIOS.items():
        per = summary.get(scn)
        if not per:
            continue
        ref = REFERENCE[scn]
        ks = per.get("kubeshim", {}).get(key)
        out += [f"## {title}", "",
                f"| contender | {unit} | range | vs {ref} | kubeshim ÷ this | "
                + " | ".join(extras) + " |",
                "|---|---:|---|---:|---:|" + "---:|" * len(extras)]
        order = sorted(per, key=lambda c: -(per[c].get(key) or 0) if higher
                       else (per[c].get(key) or 0))
        for c in order:
            d = per[c]
            v = d.get(key)
            refv = per.get(ref, {}).get(key)
            vs = v / refv if v is not None and refv else None
            kr = ks / v if ks is not None and v else None
            out.append(
                f"| {c} | {_fmt(v)} | {_fmt(d.get(key + '_min'))}–{_fmt(d.get(key + '_max'))} "
                f"| {_fmt(vs)} | {_fmt(kr)} | "
                + " | ".join(_fmt(d.get(e)) for e in extras) + " |")
        out.append("")
    if results.get("control"):
        out += ["## Control plane (fake API server subprocess, Services x 10 endpoints)", "",
                "| Services | first full state s | DNS / last listener / probe forwards s "
                "| RSS MiB "
                "| change->data plane p50 / p99 / max ms | change->DNS p50 / p99 / max ms "
                "| changes | other load on its CPU (data / DNS) |",
                "|---:|---:|---:|---:|---|---|---:|---|"]
        for c in results["control"]:
            t, d = c.get("change_tcp", {}), c.get("change_dns", {})
            out.append(
                f"| {c['services']} | {_fmt(c.get('ready_s'))} | {_fmt(c.get('dns_s'))} / "
                f"{_fmt(c.get('last_listener_s'))} / {_fmt(c.get('proxy_s'))} | "
                f"{_fmt(c.get('rss_bytes', 0) / 2**20)} | {_fmt(t.get('p50_ms'))} / "
                f"{_fmt(t.get('p99_ms'))} / {_fmt(t.get('max_ms'))} | {_fmt(d.get('p50_ms'))} / "
                f"{_fmt(d.get('p99_ms'))} / {_fmt(d.get('max_ms'))} | {t.get('n', 0)} | "
                f"{_fmt(t.get('other_load'))} / {_fmt(d.get('other_load'))} |")
        out += ["", "Change latency is measured from the moment the fake API server wrote the "
                "watch event (its CLOCK_MONOTONIC) to the first new connection reaching the new "
                "endpoint / the first DNS answer carrying the new address, polled in a tight "
                "loop.", ""]
    prof = results.get("profile") or {}
    if prof:
        out += ["## Profile (py-spy, kubeshim under load)", ""]
        for load_name, p in prof.items():
            if not isinstance(p, dict) or "top_self" not in p:
                continue
            out += [f"### {load_name}: {p.get('samples', 0)} samples, busy "
                    f"{100 * p.get('busy', 0):.0f}% of the time; folded stacks "
                    f"`{p.get('folded', '')}`", "", "| self % | function |", "|---:|---|"]
            out += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["top_self"][:10]]
            out += ["", "| inclusive % | function |", "|---:|---|"]
            out += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["top_total"][:10]]
            out += ["", "| self % | source line |", "|---:|---|"]
            out += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p.get("top_lines", [])[:8]]
            out.append("")
        out += ["Self time of `Runner.run` is time spent in uvloop/libuv's C code (system calls "
                "and the loop itself), below any Python callback.", ""]
    if results.get("errors"):
        out += ["## Errors", ""]
        for k, v in results["errors"].items():
            first = str(v).strip().splitlines()
            out.append(f"- `{k}`: {' / '.join(first[:6])[:600]}")
        out.append("")
    return "\n".join(out)


def charts(results: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(scn, *SCENARIOS[scn][:3]) for scn in SCENARIOS if scn in summary]
    extra_cpu = "tcp_bulk" in summary
    control = results.get("control") or []
    n = len(panels) + int(extra_cpu) + int(bool(control))
    if n == 0:
        return
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)

    def bars(ax: Any, title: str, per: dict[str, Any], key: str, unit: str) -> None:
        names = [c for c in per if per[c].get(key) is not None
                 and not math.isnan(per[c].get(key))]
        vals = [per[c][key] for c in names]
        lo = [v - per[c].get(f"{key}_min", v) for c, v in zip(names, vals, strict=True)]
        hi = [per[c].get(f"{key}_max", v) - v for c, v in zip(names, vals, strict=True)]
        colors = ["#d62728" if c == "kubeshim" else "#7f7f7f" if c == "direct" else "#1f77b4"
                  for c in names]
        ax.barh(names, vals, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {_fmt(v)}", va="center", fontsize=7)

    i = 0
    for scn, title, key, unit in panels:
        bars(flat[i], title, summary[scn], key, unit)
        i += 1
    if extra_cpu:
        per = {c: d for c, d in summary["tcp_bulk"].items() if d.get("cpu_s_per_gb") is not None}
        bars(flat[i], "Proxy CPU seconds per GB moved (iperf3)", per, "cpu_s_per_gb", "CPU s/GB")
        i += 1
    if control:
        ax = flat[i]
        labels, p50, p99 = [], [], []
        for c in control:
            for what in ("change_tcp", "change_dns"):
                d = c.get(what) or {}
                labels.append(f"{c['services']} svc {'data' if what == 'change_tcp' else 'DNS'}")
                p50.append(d.get("p50_ms") or 0)
                p99.append(d.get("p99_ms") or 0)
        y = range(len(labels))
        ax.barh([v - 0.2 for v in y], p50, height=0.4, label="p50", color="#ff9896")
        ax.barh([v + 0.2 for v in y], p99, height=0.4, label="p99", color="#d62728")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.axvline(10, color="k", linestyle="--", linewidth=0.8)
        ax.set_title("kubeshim: EndpointSlice change -> served (ms)", fontsize=9)
        ax.legend(fontsize=7)
        ax.invert_yaxis()
        i += 1
    for ax in flat[i:]:
        ax.axis("off")
    fig.suptitle(f"kubeshim side by side — {results['started']} — {results['machine']['host']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results["samples"])
    tgt = targets(summary, results.get("control") or [])
    results["summary"] = summary
    results["targets"] = tgt
    js, md, png = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    written = [md, js, png]
    for name, prof in (results.get("profile") or {}).items():
        if isinstance(prof, dict) and "folded_text" in prof:
            folded = out / f"{stem}.profile-{name}.folded"
            folded.write_text(prof.pop("folded_text"))
            prof["folded"] = folded.name
            written.append(folded)
    js.write_text(json.dumps(results, indent=1, default=str))
    try:
        charts(results, summary, png)
    except Exception as e:  # a chart failure must not lose the figures
        results["errors"]["charts"] = repr(e)
    md.write_text(markdown(results, summary, tgt, png.name))
    return written
