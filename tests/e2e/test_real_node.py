"""kubeshim as the DaemonSet on a real node: kubelet, containerd and Pods (tests/peers/node.py).

kubeshim is installed as README.md tells users: `kubectl apply -k deploy/` with only the
ConfigMap's API server address set. A Deployment of agnhost servers behind a selector Service
gets its EndpointSlices from the real EndpointSlice controller; a client Pod (kubeshim's own
image, which has dig and curl) resolves the Service through the cluster DNS (10.96.0.10 from
the kubelet's clusterDNS, served by kubeshim) and curls it through its ClusterIP. Then the
Deployment is scaled, rolled and has a Pod deleted while the client keeps sending: not one
request may fail, since terminating Pods turn unready (agnhost's /readyz) and keep serving
for a while (--delay-shutdown), as a well-behaved workload does.

Every test runs twice: with kubeshim, and with kube-proxy (nftables) + CoreDNS as the baseline
(`node.py --proxy kube-proxy`), so a difference between them shows up side by side.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.fixtures import require_node_prerequisites
from tests.peers.images import AGNHOST_IMAGE, KUBESHIM_IMAGE
from tests.peers.node import (
    CLUSTER_DNS,
    Cluster,
    install_kubeshim,
    processes_in_netns,
    read_sysctls,
    sysctl_holders,
)

pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.timeout(900)]

SERVICE = "web"
SERVICE_FQDN = f"{SERVICE}.default.svc.cluster.local"


@pytest.fixture(scope="module", params=["kubeshim", "kube-proxy"])
def node(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node cluster; with kubeshim the tests install it themselves, from deploy/."""
    require_node_prerequisites()
    proxy = "none" if request.param == "kubeshim" else request.param
    cluster = Cluster(tmp_path_factory.mktemp("node"), proxy=proxy)
    cluster.start()
    try:
        yield cluster
    finally:
        left = cluster.stop()
        # Teardown undid everything on the host: no cgroup left, kernel settings as before
        # (unless a node of another checkout still runs: the last one puts them back).
        assert left == []
        assert cluster.cgroup not in sysctl_holders()
        if not sysctl_holders():
            assert read_sysctls() == cluster.sysctls
        assert not list(Path("/sys/fs/cgroup/memory").glob(cluster.cgroup))


def _apply(node: Cluster, obj: dict[str, Any]) -> None:
    node.kubectl("apply", "-f", "-", input=json.dumps(obj))


def _wait(node: Cluster, *args: str, timeout: int = 180) -> None:
    node.kubectl(*args, f"--timeout={timeout}s", timeout=timeout + 10)


def _exec(node: Cluster, pod: str, *cmd: str, timeout: float = 30) -> str:
    return node.kubectl("exec", pod, "--", *cmd, timeout=timeout).stdout


def _deployment(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": SERVICE, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": SERVICE}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": SERVICE}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "netexec", "image": AGNHOST_IMAGE,
                        "imagePullPolicy": "Never",
                        # After SIGTERM: /readyz fails at once, serving goes on for 8 s.
                        "args": ["netexec", "--http-port=8080",
                                 "--delay-shutdown=8"],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080},
                                           "periodSeconds": 1, "failureThreshold": 1},
                    }],
                },
            },
        },
    }


@pytest.fixture(scope="module")
def workload(node: Cluster) -> Cluster:
    """kubeshim from deploy/, the web Deployment + Service, and a client Pod; all Ready."""
    if node.proxy == "none":
        install_kubeshim(node.kubectl, node.workdir, *node.node_apiserver)
        _wait(node, "-n", "kube-system", "rollout", "status", "ds/kubeshim")
    _apply(node, _deployment(2))
    _apply(node, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": "default"},
        "spec": {"selector": {"app": SERVICE},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
    _apply(node, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "client", "image": KUBESHIM_IMAGE, "imagePullPolicy": "Never",
            "command": ["sleep", "infinity"]}]},
    })
    _wait(node, "rollout", "status", f"deployment/{SERVICE}")
    _wait(node, "wait", "--for=condition=Ready", "pod/client")
    return node


def _ready_pod_ips(node: Cluster) -> set[str]:
    pods = json.loads(node.kubectl("get", "pods", "-l", f"app={SERVICE}", "-o", "json").stdout)
    return {p["status"]["podIP"] for p in pods["items"]
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in p["status"].get("conditions", []))}


def _slice_addresses(node: Cluster) -> tuple[set[str], set[str]]:
    """(ready addresses, managers) of the Service's EndpointSlices."""
    slices = json.loads(node.kubectl(
        "get", "endpointslices", "-l", f"kubernetes.io/service-name={SERVICE}",
        "-o", "json").stdout)["items"]
    ready = {a for s in slices for e in s.get("endpoints") or []
             if e["conditions"].get("ready") for a in e["addresses"]}
    managers = {s["metadata"]["labels"].get("endpointslice.kubernetes.io/managed-by")
                for s in slices}
    return ready, managers


def test_dns_and_a_service_from_the_endpointslice_controller(
    workload: Cluster,
) -> None:
    node = workload
    cluster_ip = node.kubectl("get", "service", SERVICE, "-o",
                              "jsonpath={.spec.clusterIP}").stdout
    # The slices are the EndpointSlice controller's, with both Pods ready.
    deadline = time.monotonic() + 30
    while True:
        ready, managers = _slice_addresses(node)
        if ready == _ready_pod_ips(node) and len(ready) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert managers == {"endpointslice-controller.k8s.io"}
    assert ready == _ready_pod_ips(node) and len(ready) == 2

    if node.proxy == "none":
        # The DaemonSet captures in tproxy mode, though the Pods sit behind the CNI bridge
        # with br_netfilter on (the node namespace's default), and never fell back.
        logs = node.kubectl("logs", "-n", "kube-system", "ds/kubeshim").stdout
        assert "proxy starting vip_mode=tproxy" in logs and "interface mode" not in logs, logs

    # The Pod's resolver is the cluster DNS Service, answered by kubeshim.
    assert f"nameserver {CLUSTER_DNS}" in _exec(node, "client", "cat", "/etc/resolv.conf")
    assert _exec(node, "client", "dig", "+short", SERVICE_FQDN).split() == [cluster_ip]
    assert _exec(node, "client", "dig", "+short", "+search", SERVICE).split() == [cluster_ip]
    assert _exec(node, "client", "dig", "+short", "nosuch.default.svc.cluster.local") == ""

    # Through the ClusterIP, by name, to both backends.
    names = _exec(node, "client", "sh", "-c",
                  f"for i in $(seq 20); do curl -fsS --max-time 3 http://{SERVICE}/hostname;"
                  " echo; done").split()
    pods = set(node.kubectl("get", "pods", "-l", f"app={SERVICE}", "-o",
                            "jsonpath={.items[*].metadata.name}").stdout.split())
    assert len(names) == 20 and set(names) == pods


def test_scale_roll_and_delete_pods_while_traffic_flows(workload: Cluster) -> None:
    node = workload
    # One request every ~50 ms, each on a new connection, until /tmp/stop appears.
    loop = subprocess.Popen(
        [str(node.peers.kubectl), f"--kubeconfig={node.kubeconfig}", "exec", "client", "--",
         "sh", "-c",
         "rm -f /tmp/stop; while [ ! -e /tmp/stop ]; do "
         f"curl -sS -o /dev/null -w '%{{http_code}}\\n' --max-time 3 http://{SERVICE}/hostname"
         " || echo failed; sleep 0.05; done"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)
        node.kubectl("scale", f"deployment/{SERVICE}", "--replicas=4")
        _wait(node, "rollout", "status", f"deployment/{SERVICE}")
        node.kubectl("rollout", "restart", f"deployment/{SERVICE}")
        _wait(node, "rollout", "status", f"deployment/{SERVICE}", timeout=300)
        victim = node.kubectl("get", "pods", "-l", f"app={SERVICE}", "-o",
                              "jsonpath={.items[0].metadata.name}").stdout
        node.kubectl("delete", "pod", victim, "--wait=false")
        node.kubectl("scale", f"deployment/{SERVICE}", "--replicas=2")
        _wait(node, "rollout", "status", f"deployment/{SERVICE}")
        time.sleep(12)  # past the deleted Pods' delayed shutdown
    finally:
        node.kubectl("exec", "client", "--", "touch", "/tmp/stop", check=False)
        out, _ = loop.communicate(timeout=30)
    codes = out.split()
    assert len(codes) > 100, out[-2000:]
    failed = [c for c in codes if c != "200"]
    assert failed == [], f"{len(failed)} of {len(codes)} requests failed: {out[-2000:]}"


def _pids_in(cgroup: str) -> set[int]:
    root = Path("/sys/fs/cgroup/pids") / cgroup
    return {int(p) for f in root.rglob("cgroup.procs") for p in f.read_text().split()}


def test_teardown_after_the_node_is_killed(workload: Cluster) -> None:
    """Last in the module: SIGKILL the node's inside process, which leaves the runtime's shims
    and the containers running; stop() must still leave the host as it was."""
    node = workload
    assert node.inside is not None
    netns = Path(f"/proc/{node.inside.pid}/ns/net").stat().st_ino
    node.inside.kill()
    node.inside.wait(30)
    orphans = _pids_in(node.cgroup)
    assert orphans, "the crash left nothing behind, so this test proves nothing"
    assert node.stop() == []
    assert not any(Path(h, node.cgroup).exists() for h in Path("/sys/fs/cgroup").iterdir())
    assert not [pid for pid in orphans if Path(f"/proc/{pid}/cmdline").exists()
                and Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert processes_in_netns(netns) == []
