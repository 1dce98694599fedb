"""Kubernetes' own sig-network conformance tests against a real node with kubeshim as its proxy.

The node is tests/peers/node.py's (kubelet + containerd, the real controllers); kubeshim is
installed as README.md tells users (`kubectl apply -k deploy/`, only the ConfigMap's API server
address set). e2e.test is Kubernetes' end-to-end suite at the pinned version, built by
tests/peers/build.sh with the sig-network tests; it runs every `[sig-network] ...
[Conformance]` test and each must pass, none may be skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import require_root
from tests.peers.cluster import Peers, PeersMissing
from tests.peers.node import Cluster, install_kubeshim

pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.timeout(3600)]

FOCUS = r"\[sig-network\].*\[Conformance\]"


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def e2e_test() -> Path:
    binary = Peers.find().kube_proxy.parent / "e2e.test"
    if not os.access(binary, os.X_OK):
        _missing(f"{binary} missing: run tests/peers/build.sh")
    return binary


@pytest.fixture(scope="module")
def kubeshim_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_root()
    try:
        Peers.find().require()
    except PeersMissing as err:
        _missing(str(err))
    cluster = Cluster(tmp_path_factory.mktemp("conformance-node"), proxy="none")
    cluster.start()
    try:
        install_kubeshim(cluster.kubectl, cluster.workdir, *cluster.node_apiserver)
        cluster.kubectl("-n", "kube-system", "rollout", "status", "ds/kubeshim",
                        "--timeout=180s", timeout=190)
        yield cluster
    finally:
        assert cluster.stop() == []


def _specs(report: Path) -> list[dict[str, Any]]:
    suites = json.loads(report.read_text())
    return [s for suite in suites for s in suite.get("SpecReports") or []
            if s.get("LeafNodeType") == "It"]


def _name(spec: dict[str, Any]) -> str:
    return " ".join([*spec.get("ContainerHierarchyTexts", []), spec.get("LeafNodeText", "")])


def run_e2e(e2e_test: Path, node: Cluster, workdir: Path, focus: str,
            dry_run: bool = False) -> list[dict[str, Any]]:
    """Run e2e.test against the node; returns its ginkgo spec reports."""
    report = workdir / ("dry-run.json" if dry_run else "report.json")
    kubectl = node.peers.kubectl
    argv = [
        str(e2e_test), f"--kubeconfig={node.kubeconfig}", "--provider=skeleton",
        f"--kubectl-path={kubectl}", f"--report-dir={workdir}",
        f"--ginkgo.focus={focus}", f"--ginkgo.json-report={report}", "--ginkgo.no-color",
        "--ginkgo.timeout=55m", "--ginkgo.v",
    ]
    if dry_run:
        argv.append("--ginkgo.dry-run")
    env = {**os.environ, "PATH": f"{kubectl.parent}:{os.environ.get('PATH', '')}"}
    with open(workdir / ("dry-run.log" if dry_run else "e2e.log"), "wb") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3500,
                       check=False)
    assert report.exists(), (workdir / "e2e.log").read_text(errors="replace")[-3000:]
    return _specs(report)


def test_sig_network_conformance(e2e_test: Path, kubeshim_node: Cluster,
                                 tmp_path: Path) -> None:
    planned = [s for s in run_e2e(e2e_test, kubeshim_node, tmp_path, FOCUS, dry_run=True)
               if s["State"] != "skipped"]
    assert len(planned) >= 40, f"the focus selects only {len(planned)} tests"
    names = {_name(s) for s in planned}
    # Specs the focus leaves out are reported as skipped too: keep the planned ones.
    states = {_name(s): s["State"] for s in run_e2e(e2e_test, kubeshim_node, tmp_path, FOCUS)
              if _name(s) in names}
    failed = {name: state for name, state in states.items() if state != "passed"}
    print(f"sig-network conformance: {len(states) - len(failed)} of {len(names)} passed")
    assert failed == {}, "\n".join(f"{state}: {name}" for name, state in failed.items())
    assert set(states) == names
