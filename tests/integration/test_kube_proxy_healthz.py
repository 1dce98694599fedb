"""/healthz beside the real kube-proxy v1.37.2: both watch the same Node of a real kube-apiserver
in one network namespace; kubectl taints the Node with ToBeDeletedByClusterAutoscaler, deletes
it with a finalizer holding it (deletionTimestamp), and restores it. At every step both answer
the same status code, the same JSON keys and the same nodeEligible and healthy values.

kube-proxy runs in nftables mode inside the namespace (its tables live and die there), with
--conntrack-max-per-core=0 so it leaves the machine's conntrack table size alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Netns, require_root
from tests.peers.bridge import APIBridge
from tests.peers.cluster import ControlPlane, Peers
from tests.peers.fixtures import require_peers

ROOT = Path(__file__).resolve().parents[2]
NODE = f"kp-{os.getpid()}"
NODE_IP = "10.244.0.9"
KUBE_PROXY = "127.0.0.1:10266"
KUBESHIM = "127.0.0.1:10256"


def healthz(ns: Netns, address: str) -> tuple[int, dict[str, Any]]:
    out = ns.run(["curl", "-sS", "--max-time", "2", "-w", "\n%{http_code}",
                  f"http://{address}/healthz"], check=False)
    if out.returncode != 0:
        return 0, {}
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def shape(answer: tuple[int, dict[str, Any]]) -> tuple[int, list[str], Any, Any, list[str]]:
    """What must agree: code, keys in order, nodeEligible, healthy, the families in status."""
    code, doc = answer
    return (code, list(doc), doc.get("nodeEligible"), doc.get("healthy"),
            sorted(doc.get("status") or {}))


@pytest.fixture
def side_by_side(control_plane: ControlPlane, kube_peers: Peers,
                 tmp_path: Path) -> Iterator[tuple[ControlPlane, Netns, Callable[[], str]]]:
    require_root()
    require_peers(kube_peers, "kube_proxy")
    cp = control_plane
    cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE},
                     "finalizers": ["kubeshim.test/hold"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}))
    # kube-proxy reads the node's IPs from status, which apply does not write.
    cp.kubectl("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}))
    ns = Netns(f"ks{os.getpid()}kp")
    logs = {"kube-proxy": tmp_path / "kube-proxy.log", "kubeshim": tmp_path / "kubeshim.log"}
    try:
        ns.run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
        with APIBridge(ns, cp.port, tmp_path):
            with logs["kube-proxy"].open("w") as out:
                ns.popen([str(kube_peers.kube_proxy), f"--kubeconfig={cp.admin_kubeconfig}",
                          "--proxy-mode=nftables", f"--hostname-override={NODE}",
                          "--cluster-cidr=10.244.0.0/16", f"--healthz-bind-address={KUBE_PROXY}",
                          "--metrics-bind-address=127.0.0.1:10269",
                          "--conntrack-max-per-core=0", "--v=2"], stdout=out,
                         stderr=subprocess.STDOUT)
            with logs["kubeshim"].open("w") as out:
                ns.popen([sys.executable, "-m", "kubeshim", "run",
                          "--kubeconfig", str(cp.kubeshim_kubeconfig), "--hostname-override",
                          NODE, "--vip-mode", "loopback", "--no-dns",
                          "--nodeport-addresses", "localhost",
                          "--healthz-bind-address", KUBESHIM,
                          "--metrics-bind-address", "127.0.0.1:10249"], cwd=ROOT, stdout=out,
                         stderr=subprocess.STDOUT)

            def tails() -> str:
                return "\n".join(f"--- {k}\n{v.read_text()[-3000:]}" for k, v in logs.items())

            yield cp, ns, tails
    finally:
        ns.delete()
        cp.kubectl("delete", "node", NODE, "--ignore-not-found", "--wait=false", check=False)
        cp.kubectl("patch", "node", NODE, "--type=merge", "-p",
                   json.dumps({"metadata": {"finalizers": None}}), check=False)
    assert "Traceback" not in logs["kubeshim"].read_text()


def test_healthz_agrees_with_kube_proxy_on_node_eligibility(side_by_side: Any) -> None:
    cp, ns, tails = side_by_side

    def agree(code: int, eligible: bool, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            theirs, ours = healthz(ns, KUBE_PROXY), healthz(ns, KUBESHIM)
            if shape(theirs) == shape(ours) and theirs[0] == code and \
                    theirs[1].get("nodeEligible") is eligible:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: kube-proxy {theirs}, kubeshim {ours}\n{tails()}")
            time.sleep(0.2)

    agree(200, True, "both healthy and eligible")
    cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler=1:NoSchedule")
    agree(503, False, "both 503 on the autoscaler taint")
    cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler-")
    agree(200, True, "both 200 again")
    cp.kubectl("delete", "node", NODE, "--wait=false")  # held by the finalizer
    agree(503, False, "both 503 while the Node is being deleted")
