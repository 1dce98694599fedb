"""Kubernetes' end-to-end suite (e2e.test, built by build.sh) against a node of node.py.

Owns how e2e.test is run (focus, skip, seed, time limit, JSON report) and how its ginkgo
report is read; used by tests/e2e/test_conformance.py and by the broader sig-network run:

    python tests/peers/e2e.py run --proxy kube-proxy --out DIR   # the baseline
    python tests/peers/e2e.py run --proxy kubeshim --out DIR     # kubeshim from deploy/
    ... run --nodes 2 ...                                        # on two nodes
    python tests/peers/e2e.py table BASELINE_DIR KUBESHIM_DIR... # the comparison, Markdown

`run` starts a node, or two (kube-proxy + CoreDNS, or kubeshim applied from deploy/ as
README.md says), runs the selected [sig-network] tests, writes DIR/report.json, DIR/e2e.log and
DIR/summary.json (states and seconds), and stops the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the tests package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.peers.cluster import Peers  # noqa: E402

# The broader run: [sig-network] tests that fit one or two nodes without a cloud provider.
# Left out: conformance (its own test), tests that need the cluster to themselves or break it
# ([Serial], [Disruptive]), long ones ([Slow]), features and providers these nodes lack
# ([Feature:*], [FeatureGate:*], [Provider:*], LoadBalancer), and API-only tests of objects
# a service proxy does not read (NetworkPolicy, Ingress, Endpoints mirroring, the API
# server's proxy subresource). With two nodes also `KubeProxy should set TCP CLOSE_WAIT
# timeout`: it reads kube-proxy's own conntrack setting from the kernel's table, through an
# image (distroless-iptables) the node does not have, so it waits 5 minutes for a pull on any
# proxy.
BROAD_FOCUS = r"\[sig-network\]"
BROAD_SKIP = (
    r"\[Conformance\]|\[Serial\]|\[Disruptive\]|\[Slow\]|\[Feature:|\[FeatureGate:|"
    r"\[Provider:|LoadBalancer|Netpol|NetworkPolicy|Ingress|EndpointSliceMirroring|"
    r"Proxy version v1|should set TCP CLOSE_WAIT timeout"
)
SEED = 1  # the same order on both proxies, so a time limit cuts both runs at the same test


def e2e_binary() -> Path:
    return Peers.find().kube_proxy.parent / "e2e.test"


def specs(report: Path) -> list[dict[str, Any]]:
    suites = json.loads(report.read_text())
    return [s for suite in suites for s in suite.get("SpecReports") or []
            if s.get("LeafNodeType") == "It"]


def spec_name(spec: dict[str, Any]) -> str:
    return " ".join([*spec.get("ContainerHierarchyTexts", []), spec.get("LeafNodeText", "")])


def run_e2e(e2e_test: Path, kubeconfig: Path, kubectl: Path, workdir: Path, focus: str,
            skip: str = "", dry_run: bool = False, minutes: int = 55) -> list[dict[str, Any]]:
    """Run e2e.test against the cluster; returns its ginkgo spec reports."""
    report = workdir / ("dry-run.json" if dry_run else "report.json")
    argv = [
        str(e2e_test), f"--kubeconfig={kubeconfig}", "--provider=skeleton",
        f"--kubectl-path={kubectl}", f"--report-dir={workdir}",
        f"--ginkgo.focus={focus}", f"--ginkgo.json-report={report}", "--ginkgo.no-color",
        f"--ginkgo.timeout={minutes}m", f"--ginkgo.seed={SEED}", "--ginkgo.v",
    ]
    if skip:
        argv.append(f"--ginkgo.skip={skip}")
    if dry_run:
        argv.append("--ginkgo.dry-run")
    env = {**os.environ, "PATH": f"{kubectl.parent}:{os.environ.get('PATH', '')}"}
    log = workdir / ("dry-run.log" if dry_run else "e2e.log")
    with open(log, "wb") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                       timeout=minutes * 60 + 120, check=False)
    assert report.exists(), log.read_text(errors="replace")[-3000:]
    return specs(report)


def _run(args: argparse.Namespace) -> int:
    from tests.peers.node import Cluster, install_kubeshim

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    cluster = Cluster(out / "node", proxy="none" if args.proxy == "kubeshim" else args.proxy,
                      nodes=args.nodes)
    cluster.start()
    try:
        if args.proxy == "kubeshim":
            install_kubeshim(cluster.kubectl, cluster.workdir, *cluster.node_apiserver)
            cluster.kubectl("-n", "kube-system", "rollout", "status", "ds/kubeshim",
                            "--timeout=180s", timeout=190)
        ready = time.monotonic() - began
        reports = run_e2e(e2e_binary(), cluster.kubeconfig, cluster.peers.kubectl, out,
                          args.focus, args.skip, minutes=args.minutes)
    finally:
        left = cluster.stop()
    summary = {
        "proxy": args.proxy, "nodes": args.nodes, "focus": args.focus, "skip": args.skip,
        "node_ready_seconds": round(ready, 1),
        "total_seconds": round(time.monotonic() - began, 1),
        "left_over": left,
        # Specs the focus or skip left out are "skipped" without a message: dropped.
        "specs": {spec_name(s): {"state": s["State"],
                                 "seconds": round(s.get("RunTime", 0) / 1e9, 1),
                                 "failure": (s.get("Failure") or {}).get("Message", "")[:2000]}
                  for s in reports if s["State"] != "skipped" or s.get("Failure")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    states = [s["state"] for s in summary["specs"].values()]
    print(f"{args.proxy}: {states.count('passed')} passed, {len(states) - states.count('passed')}"
          f" not passed, {summary['total_seconds']:.0f}s")
    return 0


def _cell(spec: dict[str, Any] | None) -> str:
    """A state; a skip gives the test's own reason (e.g. it needs two nodes)."""
    if spec is None:
        return "not run"
    if spec["state"] == "skipped" and spec["failure"]:
        return f"skipped: {spec['failure'].splitlines()[0]}"
    return str(spec["state"])


def _table(args: argparse.Namespace) -> int:
    """One column per run directory, headed by its proxy and node count."""
    runs = [json.loads((Path(d) / "summary.json").read_text()) for d in args.runs]
    names = sorted(set().union(*(r["specs"] for r in runs)))
    heads = [("kube-proxy + CoreDNS" if r["proxy"] == "kube-proxy" else str(r["proxy"]))
             + (f", {r['nodes']} nodes" if r.get("nodes", 1) > 1 else "") for r in runs]
    print(f"| test | {' | '.join(heads)} |")
    print(f"| --- |{' --- |' * len(runs)}")
    for name in names:
        cells = " | ".join(_cell(r["specs"].get(name)) for r in runs)
        print(f"| {name.removeprefix('[sig-network] ')} | {cells} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a node, run the e2e tests, stop the node")
    run.add_argument("--proxy", choices=("kubeshim", "kube-proxy"), required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--focus", default=BROAD_FOCUS)
    run.add_argument("--skip", default=BROAD_SKIP)
    run.add_argument("--minutes", type=int, default=80, help="ginkgo's time limit")
    run.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    table = sub.add_parser("table", help="runs side by side (baseline, kubeshim, ...), Markdown")
    table.add_argument("runs", nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    return _run(args) if args.command == "run" else _table(args)


if __name__ == "__main__":
    sys.exit(main())
