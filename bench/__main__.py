"""`python -m bench`: kubeshim side by side with the limit and its peers, in one run.

    python -m bench            # full run (< 20 min): 3 repetitions, 1k and 10k Services
    python -m bench --quick    # < 3 min: one repetition, short samples, 1k Services
    python -m bench --only dns,control --reps 5

Writes bench/results/<date>-<host>.md, .json (every sample) and .png (charts). Needs root: it
creates its own network namespace and runs everything inside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import contenders as cs
from . import report, workload
from .lab import BenchError, Lab
from .scenarios import Settings, dns_scenarios, proxy_scenarios

HERE = Path(__file__).resolve().parent
TOOLS = ["wrk", "iperf3", "dnsperf", "haproxy", "nginx", "dnsmasq", "nsd", "nft", "taskset",
         "ip", "py-spy"]
PARTS = ("proxy", "dns", "peers", "profile", "control")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short repetition (< 3 minutes)")
    p.add_argument("--reps", type=int, help="repetitions per scenario (default 3; quick 1)")
    p.add_argument("--seconds", type=float, help="length of each sample (default 6; quick 2)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run: {', '.join(PARTS)}")
    p.add_argument("--scales", help="Service counts for the control-plane part "
                                    "(default 1000,10000; quick 1000)")
    p.add_argument("--changes", type=int, help="endpoint changes measured per scale "
                                               "(default 200; quick 30)")
    p.add_argument("--contenders", help="comma-separated proxy/DNS contenders to run (default "
                   "all), e.g. direct,kubeshim-tproxy,haproxy for a quick side-by-side")
    p.add_argument("--scenarios", help="comma-separated proxy scenarios (default all): "
                   "tcp_keepalive, tcp_newconn, tcp_bulk, udp_rr")
    p.add_argument("--subject-cpu", default="1", help="CPU of the process under test")
    p.add_argument("--load-cpu", default="0", help="CPU of clients, backends and the fake API")
    p.add_argument("--nice", type=int, default=-10,
                   help="scheduling niceness of the harness and everything it starts (default "
                        "-10: ahead of background work on a shared machine)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--name", help="results file stem (default <date>-<host>)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 6.0)
    args.scales = [int(x) for x in (args.scales or ("1000" if args.quick else "1000,10000"))
                   .split(",") if x]
    args.changes = args.changes or (30 if args.quick else 200)
    args.contenders = ({x.strip() for x in args.contenders.split(",") if x.strip()}
                       if args.contenders else None)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if unknown := args.only - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run ./scripts/setup.sh)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    # SIGTERM ends the run like Ctrl-C does: through the finally below, stopping everything.
    # SIGINT too, explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    machine = report.machine_info(args)
    workdir = Path(tempfile.mkdtemp(prefix="kubeshim-bench-"))
    lab = Lab(workdir)
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "settings": {"reps": args.reps, "seconds": args.seconds, "scales": args.scales,
                     "changes": args.changes, "subject_cpu": args.subject_cpu,
                     "load_cpu": args.load_cpu, "parts": sorted(args.only),
                     "nice": args.nice},
        "samples": [], "errors": {}, "contenders": {}, "control": [], "profile": {},
    }
    t_start = time.monotonic()
    try:
        # The harness itself (pollers, py-spy) runs on the load CPU with the clients.
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        lab.enter()
        log(f"namespace {lab.name}, work directory {workdir}")
        run_parts(lab, args, results)
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        results["errors"]["run"] = "interrupted"
    except BenchError as e:
        log(f"failed: {e}")
        results["errors"]["run"] = str(e)
    finally:
        lab.close()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = round(time.monotonic() - t_start, 1)
    stem = args.name or f"{started:%Y-%m-%d-%H%M}-{socket.gethostname()}"
    paths = report.write(results, args.out, stem)
    log(f"wrote {', '.join(str(p) for p in paths)} in {results['duration_s']:.0f} s")
    return 1 if "run" in results["errors"] else 0


def run_parts(lab: Lab, args: argparse.Namespace, results: dict[str, Any]) -> None:
    s = Settings(reps=args.reps, seconds=args.seconds, latency_seconds=max(2.0, args.seconds / 2),
                 subject_cpu=args.subject_cpu, load_cpu=args.load_cpu, log=log,
                 scenarios=({x.strip() for x in args.scenarios.split(",")}
                            if args.scenarios else None))
    ld = args.load_cpu
    records = workload.DNSRecords()
    udp_q = lab.workdir / "udp-queries.txt"
    udp_q.write_text("\n".join(workload.forward_queries(5000, seed=3)) + "\n")
    cluster_q = lab.workdir / "cluster-queries.txt"
    cluster_q.write_text("\n".join(records.cluster_queries()) + "\n")
    forward_q = lab.workdir / "forward-queries.txt"
    forward_q.write_text("\n".join(workload.forward_queries()) + "\n")

    log("starting backends (nginx, iperf3, dnsmasq) and the upstream DNS server")
    cs.nginx_backend(lab, ld)
    cs.iperf_backend(lab, ld)
    cs.udp_backend(lab, ld)
    cs.upstream_dns(lab, ld)

    peers = None
    if "peers" in args.only and args.only & {"proxy", "dns"}:
        from .peers import Peers

        log("starting a real control plane (etcd + kube-apiserver) for kube-proxy and CoreDNS")
        try:
            peers = Peers(lab)
            peers.create(peers.data_plane_objects() + records.objects())
        except BenchError as e:
            results["errors"]["peers/control-plane"] = str(e)
            log(f"no real control plane: {str(e).splitlines()[0]}")
            if peers is not None:
                peers.close()
            peers = None
    try:
        _run_contenders(lab, args, results, s, records, peers, udp_q, cluster_q, forward_q)
    finally:
        if peers is not None:
            peers.close()
    if "control" in args.only:
        from .control import control_plane

        for n in args.scales:
            log(f"control plane: {n} Services x 10 endpoints through the fake API server")
            try:
                profile = "profile" in args.only and n == max(args.scales)
                res = control_plane(lab, n, args.changes, s, profile=profile)
                if "profile" in res:
                    results["profile"][f"endpoint_changes_{n}"] = res.pop("profile")
                results["control"].append(res)
            except BenchError as e:
                results["errors"][f"control/{n}"] = str(e)
                log(f"control plane {n} failed: {str(e).splitlines()[0]}")
    json.dumps(results)  # fail here, not after the run, if something is not serialisable


def _run_contenders(lab: Lab, args: argparse.Namespace, results: dict[str, Any], s: Settings,
                    records: workload.DNSRecords, peers: Any, udp_q: Path, cluster_q: Path,
                    forward_q: Path) -> None:
    sub, ld = args.subject_cpu, args.load_cpu
    ks: cs.Contender | None = None
    if args.only & {"proxy", "dns", "profile"} and (args.contenders is None
                                                    or "kubeshim" in args.contenders):
        log("starting kubeshim")
        try:
            ks = cs.kubeshim(lab, sub, records)
        except BenchError as e:
            results["errors"]["start/kubeshim"] = str(e)
            log(f"kubeshim did not start: {str(e).splitlines()[0]}")
    if "proxy" in args.only:
        proxies = [cs.direct()]
        if ks is not None:
            proxies.append(ks)
        both = f"{ld},{sub}"  # two-process contenders: both CPUs, shared with the load
        # Two kubeshim in tproxy mode would own one nftables table, route and capture port:
        # they take turns (each runs only for its own samples).
        tproxies: list[cs.Contender] = []
        starts = [("kubeshim-tproxy", lambda: cs.kubeshim_tproxy(lab, sub, group=tproxies)),
                  ("kubeshim-tproxy-w2",
                   lambda: cs.kubeshim_tproxy(lab, both, 2, group=tproxies)),
                  ("kubeshim-interface", lambda: cs.kubeshim_interface(lab, sub)),
                  ("haproxy", lambda: cs.haproxy(lab, sub, splice=False)),
                  ("haproxy-t2", lambda: cs.haproxy(lab, both, splice=False, threads=2)),
                  ("haproxy-splice", lambda: cs.haproxy(lab, sub, splice=True)),
                  ("nginx-stream", lambda: cs.nginx_stream(lab, sub)),
                  ("nginx-stream-w2", lambda: cs.nginx_stream(lab, both, workers=2)),
                  ("nftables-dnat", lambda: cs.nftables_dnat(lab))]
        if peers is not None:
            starts.append(("kube-proxy-nft", lambda: peers.kube_proxy(sub)))
        wanted = args.contenders
        if wanted is not None:
            proxies = [c for c in proxies if c.name in wanted]
            starts = [(n, f) for n, f in starts if n in wanted]
        for name, start in starts:
            try:
                proxies.append(start())
            except BenchError as e:
                results["errors"][f"start/{name}"] = str(e)
                log(f"{name} did not start: {str(e).splitlines()[0]}")
        for c in proxies:
            results["contenders"][c.name] = {"note": c.note, "targets": c.targets,
                                             "cpu": c.proc.cpu if c.proc else (c.cpu or "kernel")}
        log(f"proxy scenarios: {', '.join(c.name for c in proxies)}")
        proxy_scenarios(proxies, s, udp_q, results["samples"], results["errors"])
        tproxy = next((c for c in proxies if c.name == "kubeshim-tproxy"), None)
        if "profile" in args.only and tproxy is not None:
            tproxy.activate()
            from .profile import profile_kubeshim

            log("profiling kubeshim --vip-mode tproxy under load (py-spy)")
            results["profile"].update(profile_kubeshim(lab, tproxy, s, cluster_q, forward_q,
                                                       prefix="tproxy-"))
        for c in proxies:
            if c.proc is not None and c.name != "kubeshim":
                lab.stop(c.proc)
    if "dns" in args.only:
        servers = [cs.kubeshim_dns(ks)] if ks is not None else []
        both = f"{ld},{sub}"
        dstarts: list[tuple[str, Any]] = [
            ("kubeshim-dns-w1", lambda: cs.kubeshim_dns_only(lab, sub, records, 1)),
            ("kubeshim-dns-w2", lambda: cs.kubeshim_dns_only(lab, both, records, 2)),
            ("dnsmasq", lambda: cs.dnsmasq_cluster(lab, sub, records)),
            ("nsd", lambda: cs.nsd(lab, sub, records)),
            ("nsd-s2", lambda: cs.nsd(lab, both, records, servers=2)),
        ]
        if peers is not None:
            dstarts += [("coredns", lambda: peers.coredns(sub, records)),
                        ("coredns-p2", lambda: peers.coredns(both, records, procs=2))]
        if args.contenders is not None:
            servers = [c for c in servers if c.name in args.contenders]
            dstarts = [(n, f) for n, f in dstarts if n in args.contenders]
        for name, start in dstarts:
            try:
                servers.append(start())
            except BenchError as e:
                results["errors"][f"start/{name}"] = str(e)
                log(f"{name} did not start: {str(e).splitlines()[0]}")
        for c in servers:
            results["contenders"].setdefault(c.name, {})["dns_note"] = c.note
        log(f"DNS scenarios: {', '.join(c.name for c in servers)}")
        dns_scenarios(servers, s, cluster_q, forward_q, results["samples"], results["errors"])
        for c in servers:
            if c.proc is not None and c.name != "kubeshim":
                lab.stop(c.proc)
    if "profile" in args.only and ks is not None and ks.proc is not None:
        from .profile import profile_kubeshim

        log("profiling kubeshim under load (py-spy)")
        results["profile"].update(profile_kubeshim(lab, ks, s, cluster_q, forward_q))
    if ks is not None and ks.proc is not None:
        results["kubeshim_rss_after_load"] = ks.proc.rss_bytes()
        lab.stop(ks.proc)


if __name__ == "__main__":
    sys.exit(main())
