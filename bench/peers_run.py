"""`python -m bench.peers_run`: EndpointSlice change -> traffic, kube-proxy (nftables) beside
kubeshim on a real kube-apiserver (bench/peers_proxy.py), standalone.

    python -m bench.peers_run --scales 1000,10000 --changes 30

Needs root (a bench namespace, bench/lab.py) and tests/peers/build.sh's binaries. Writes
bench/results/peers-control-<date>.json and .md. In `python -m bench`, the same function plugs
into run_parts: `results["peers_control"].append(endpoint_change(lab, n, args.changes, s))`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from .__main__ import _interrupt, log
from .lab import BenchError, Lab
from .peers_proxy import endpoint_change
from .scenarios import Settings

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers_run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--scales", default=None, help="Service counts (default 1000)")
    p.add_argument("--changes", type=int, default=None, help="EndpointSlice flips per proxy")
    p.add_argument("--subject-cpu", default="1")
    p.add_argument("--load-cpu", default="0")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    scales = [int(x) for x in (args.scales or "1000").split(",") if x]
    changes = args.changes or 30
    if os.geteuid() != 0:
        print("bench.peers_run: needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="kubeshim-peers-bench-"))
    lab = Lab(workdir)
    s = Settings(reps=1, seconds=0, latency_seconds=0,
                 subject_cpu=args.subject_cpu, load_cpu=args.load_cpu, log=log)
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.peers_run", *(argv or sys.argv[1:])]),
        "machine": report.machine_info(argparse.Namespace(subject_cpu=args.subject_cpu,
                                                          load_cpu=args.load_cpu, nice=0)),
        "errors": {}, "control": [],
    }
    t0 = time.monotonic()
    try:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
        lab.enter()
        run(lab, s, scales, changes, results)
    except KeyboardInterrupt:
        results["errors"]["run"] = "interrupted"
    except BenchError as e:
        log(f"failed: {e}")
        results["errors"]["run"] = str(e)
    finally:
        lab.close()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = round(time.monotonic() - t0, 1)
    stem = f"peers-control-{started:%Y-%m-%d-%H%M}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    log(f"wrote {args.out / stem}.md/.json in {results['duration_s']:.0f} s")
    return 1 if "run" in results["errors"] else 0


def run(lab: Lab, s: Settings, scales: list[int], changes: int,
        results: dict[str, Any]) -> None:
    for n in scales:
        log(f"endpoint change -> traffic: {n} Services x 10 endpoints on a real API server")
        try:
            results["control"].append(endpoint_change(lab, n, changes, s))
        except BenchError as e:
            results["errors"][f"control/{n}"] = str(e)
            log(f"control {n} failed: {str(e)[:2000]}")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [f"# EndpointSlice change -> traffic on a real kube-apiserver ({results['started']})",
           "", "kube-proxy --proxy-mode=nftables and kubeshim --vip-mode loopback, one at a time.",
           "",
           f"Command: `{results['command']}`  ", f"Machine: {json.dumps(m)}  ",
           f"Duration: {results.get('duration_s')} s", ""]
    if results["control"]:
        out += ["## EndpointSlice change -> first new connection on the new endpoint", "",
                "| Services | proxy | ready s | RSS MiB | p50 ms | p90 ms | p99 ms | max ms | n |",
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["control"]:
            for name in ("kube-proxy-nftables", "kubeshim"):
                e = r.get(name)
                if not e:
                    continue
                st = e["change_tcp"]
                out.append(f"| {r['services']} | {name} | {e['ready_s']:.2f} | "
                           f"{e['rss_bytes'] / 2**20:.0f} | {st['p50_ms']:.1f} | "
                           f"{st['p90_ms']:.1f} | {st['p99_ms']:.1f} | {st['max_ms']:.1f} | "
                           f"{st['n']} |")
        out.append("")
        for r in results["control"]:
            kp = r.get("kube-proxy-nftables", {})
            out.append(f"- {r['services']} Services: {2 * r['services'] + 2} objects created "
                       f"through the API (8 clients) in {r['create_s']:.1f} s; kube-proxy's "
                       f"SyncProxyRules: first {kp.get('first_sync_ms')} ms, last "
                       f"{kp.get('last_sync_ms')} ms")
        out.append("")
    if results["errors"]:
        out += ["## Errors", ""] + [f"- `{k}`: {v[:500]}" for k, v in results["errors"].items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
