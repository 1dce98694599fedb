"""Kubernetes' own sig-network conformance tests against a real node with kubeshim as its proxy.

The node is tests/peers/node.py's (kubelet + containerd, the real controllers); kubeshim is
installed as README.md tells users (`kubectl apply -k deploy/`, only the ConfigMap's API server
address set). e2e.test is Kubernetes' end-to-end suite at the pinned version, built by
tests/peers/build.sh with the sig-network tests; it runs every `[sig-network] ...
[Conformance]` test and each must pass, none may be skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import require_root
from tests.peers.cluster import Peers, PeersMissing
from tests.peers.e2e import e2e_binary, run_e2e, spec_name
from tests.peers.node import Cluster, install_kubeshim

pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.timeout(3600)]

FOCUS = r"\[sig-network\].*\[Conformance\]"


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def e2e_test() -> Path:
    binary = e2e_binary()
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


def test_sig_network_conformance(e2e_test: Path, kubeshim_node: Cluster,
                                 tmp_path: Path) -> None:
    def run(dry_run: bool = False) -> list[dict[str, Any]]:
        return run_e2e(e2e_test, kubeshim_node.kubeconfig, kubeshim_node.peers.kubectl,
                       tmp_path, FOCUS, dry_run=dry_run)

    planned = [s for s in run(dry_run=True) if s["State"] != "skipped"]
    assert len(planned) >= 40, f"the focus selects only {len(planned)} tests"
    names = {spec_name(s) for s in planned}
    # Specs the focus leaves out are reported as skipped too: keep the planned ones.
    states = {spec_name(s): s["State"] for s in run() if spec_name(s) in names}
    failed = {name: state for name, state in states.items() if state != "passed"}
    print(f"sig-network conformance: {len(states) - len(failed)} of {len(names)} passed")
    assert failed == {}, "\n".join(f"{state}: {name}" for name, state in failed.items())
    assert set(states) == names
