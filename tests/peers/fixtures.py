"""pytest plugin: the real Kubernetes peers and a real control plane (etcd + kube-apiserver).

Enable with `pytest_plugins = ["tests.peers.fixtures"]` in tests/conftest.py. Binaries come
from tests/peers/build.sh (or KUBEBUILDER_ASSETS). A missing binary skips the test with a
hint, except under CI=true, where it fails: CI must build the peers, not skip past them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.netns import require_root
from tests.peers.cluster import ControlPlane, Peers, PeersMissing


def peers_missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_peers(peers: Peers, *names: str) -> None:
    """Skip (fail under CI) unless each named binary of `peers` is there (all when none named)."""
    try:
        peers.require(*names)
    except PeersMissing as err:
        peers_missing(str(err))


NODE_TOOLS = ("containerd", "runc", "ctr", "debootstrap", "socat", "nsenter", "curl")


def require_node_prerequisites() -> None:
    """Root, every peer binary and the node's Debian tools (tests/peers/node.py), or skip (fail
    under CI)."""
    require_root()
    require_peers(Peers.find())
    for tool in NODE_TOOLS:
        if shutil.which(tool) is None:
            peers_missing(f"{tool} is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def kube_peers() -> Peers:
    """Paths of kube-apiserver, etcd, kubectl, kube-proxy, coredns; see require_peers()."""
    return Peers.find()


@pytest.fixture(scope="session")
def control_plane(
    kube_peers: Peers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """One control plane for the session: admin, kubeshim and norole kubeconfigs on it.

    Tests share it: create objects under unique names. There is no controller-manager, so
    nothing derives EndpointSlices from Services, and namespaces are never finalized.
    A test that restarts kube-apiserver leaves it running again.
    """
    require_peers(kube_peers, "etcd", "kube_apiserver", "kubectl")
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), kube_peers)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def new_control_plane(kube_peers: Peers, tmp_path: Path) -> Iterator[Callable[..., ControlPlane]]:
    """A factory for a test's own started control plane(s), each stopped when the test ends."""
    require_peers(kube_peers, "etcd", "kube_apiserver", "kubectl")
    started: list[ControlPlane] = []

    def start(**kwargs: object) -> ControlPlane:
        cp = ControlPlane(tmp_path / f"control-plane-{len(started)}", kube_peers, **kwargs)  # type: ignore[arg-type]
        started.append(cp)
        cp.start()
        return cp

    try:
        yield start
    finally:
        for cp in started:
            cp.stop()
            shutil.rmtree(cp.workdir / "etcd-data", ignore_errors=True)
