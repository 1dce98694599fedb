"""Two real nodes (tests/peers/node.py, `nodes=2`): traffic that crosses from one node to the other.

node-1 (192.168.130.10, Pods 10.244.0.0/24) runs the control plane, node-2 (192.168.130.11,
Pods 10.244.1.0/24) joins it; each has its own kubelet, containerd and network namespace, and a
veth links them. kubeshim runs as the DaemonSet from deploy/ on both (or, as the baseline,
kube-proxy on both with CoreDNS on node-1). One agnhost server and one client Pod (kubeshim's
image: curl, dig, getent) per node, and:

- a client on node-2 reaches a ClusterIP Service whose only endpoint is on node-1, by name and
  by address, and the reverse;
- a NodePort Service reached through node-2's address (from node-1's host network, an outside
  client to node-2) is served by the Pod on node-1;
- externalTrafficPolicy: Local: through node-1, which has the endpoint, the NodePort serves and
  the health-check nodePort answers 200 with localEndpoints 1; through node-2 the NodePort does
  not serve and the health check answers 503 with localEndpoints 0;
- cluster DNS from a Pod on node-2 (dig and glibc's getent through the kubelet's resolv.conf);
- after both nodes' inside processes are SIGKILLed, stop() still removes every process (the
  runtimes' shims and containers of both nodes), both namespaces and the cgroups.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.peers.fixtures import require_node_prerequisites
from tests.peers.images import AGNHOST_IMAGE, KUBESHIM_IMAGE
from tests.peers.node import (
    CLUSTER_DNS,
    NODES,
    Cluster,
    processes_in_netns,
    read_sysctls,
    sysctl_holders,
)

pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.timeout(900)]

NODE_1, NODE_2 = NODES
T = TypeVar("T")


@pytest.fixture(scope="module", params=["kubeshim", "kube-proxy"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two nodes with kubeshim from deploy/ (or kube-proxy + CoreDNS), the Pods and Services."""
    require_node_prerequisites()
    c = Cluster(tmp_path_factory.mktemp("two-nodes"), proxy=request.param, nodes=2)
    c.start()
    try:
        _workload(c)
        yield c
    finally:
        left = c.stop()
        assert left == []
        assert c.cgroup not in sysctl_holders()
        if not sysctl_holders():
            assert read_sysctls() == c.sysctls
        assert not any(Path(h, c.cgroup).exists() for h in Path("/sys/fs/cgroup").iterdir())


def _pod(name: str, node: str, image: str, args: list[str], labels: dict[str, str],
         command: list[str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never",
                                 "args": args}
    if command:
        container["command"] = command
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "terminationGracePeriodSeconds": 1, "containers": [container]}}


def _service(name: str, server: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"app": server},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def _workload(c: Cluster) -> None:
    """server-N (agnhost netexec) and client-N (sleep) on node-N; Services to-1 and to-2
    (ClusterIP), nodeport-1 (NodePort) and local-1 (LoadBalancer, externalTrafficPolicy
    Local)."""
    if c.proxy == "kubeshim":
        c.kubectl("-n", "kube-system", "rollout", "status", "ds/kubeshim", "--timeout=180s",
                  timeout=190)
        pods = json.loads(c.kubectl("-n", "kube-system", "get", "pods", "-l",
                                    "k8s-app=kubeshim", "-o", "json").stdout)["items"]
        assert sorted(p["spec"]["nodeName"] for p in pods) == [NODE_1.name, NODE_2.name]
    items = []
    for i, spec in enumerate(NODES, 1):
        items += [
            _pod(f"server-{i}", spec.name, AGNHOST_IMAGE, ["netexec", "--http-port=8080"],
                 {"app": f"server-{i}"}),
            _pod(f"client-{i}", spec.name, KUBESHIM_IMAGE, ["infinity"], {}, ["sleep"]),
            _service(f"to-{i}", f"server-{i}"),
        ]
    # The API server allocates a health-check nodePort only to a LoadBalancer Service with
    # policy Local; without a cloud provider it gets no ingress IP and is a NodePort otherwise.
    items += [_service("nodeport-1", "server-1", type="NodePort"),
              _service("local-1", "server-1", type="LoadBalancer",
                       externalTrafficPolicy="Local")]
    c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                    "items": items}))
    c.kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=180s", timeout=190)
    nodes = json.loads(c.kubectl("get", "pods", "-o", "json").stdout)["items"]
    assert {p["metadata"]["name"]: p["spec"]["nodeName"] for p in nodes} == {
        "server-1": NODE_1.name, "client-1": NODE_1.name,
        "server-2": NODE_2.name, "client-2": NODE_2.name}


def _eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30) -> T:
    """`probe()` until `done` holds (the proxies program a new Service within seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def _exec(c: Cluster, pod: str, *cmd: str) -> str:
    result = c.kubectl("exec", pod, "--", *cmd, check=False, timeout=30)
    return result.stdout.strip()


def _curl_from_pod(c: Cluster, pod: str, url: str) -> str:
    return _exec(c, pod, "curl", "-sS", "--max-time", "3", url)


def _service_field(c: Cluster, name: str, path: str) -> str:
    return c.kubectl("get", "service", name, "-o", f"jsonpath={path}").stdout


def _curl_on_node(c: Cluster, node: str, url: str) -> tuple[int, str]:
    """curl from `node`'s host network: (exit code, body)."""
    got = c.on_node(node, "curl", "-sS", "--max-time", "3", url)
    return got.returncode, got.stdout.strip()


def test_cluster_ip_across_nodes(cluster: Cluster) -> None:
    c = cluster
    for client, target, server in (("client-2", "to-1", "server-1"),
                                   ("client-1", "to-2", "server-2")):
        ip = _service_field(c, target, "{.spec.clusterIP}")
        for url in (f"http://{target}/hostname", f"http://{ip}/hostname"):
            got = _eventually(partial(_curl_from_pod, c, client, url), server.__eq__)
            assert got == server, f"{client} -> {url}"
        # Many new connections, every one answered by the other node's Pod.
        names = _exec(c, client, "sh", "-c", f"for i in $(seq 20); do curl -fsS --max-time 3 "
                      f"http://{ip}/hostname; echo; done").split()
        assert names == [server] * 20


def test_node_port_through_the_other_node(cluster: Cluster) -> None:
    c = cluster
    port = _service_field(c, "nodeport-1", "{.spec.ports[0].nodePort}")
    # From node-1's host network to node-2's address: node-2 forwards to the Pod on node-1.
    got = _eventually(lambda: _curl_on_node(c, NODE_1.name, f"http://{NODE_2.ip}:{port}/hostname"),
                      lambda r: r == (0, "server-1"))
    assert got == (0, "server-1")
    got = _eventually(lambda: _curl_on_node(c, NODE_2.name, f"http://{NODE_1.ip}:{port}/hostname"),
                      lambda r: r == (0, "server-1"))
    assert got == (0, "server-1")


def _health(c: Cluster, from_node: str, node_ip: str, port: str) -> tuple[int, dict[str, Any]]:
    got = c.on_node(from_node, "curl", "-sS", "--max-time", "3", "-o", "-", "-w", "\n%{http_code}",
                    f"http://{node_ip}:{port}/healthz")
    body, _, code = got.stdout.rpartition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return 0, {"output": got.stdout, "error": got.stderr}


def _requests_served(c: Cluster, pod: str) -> int:
    """How many /hostname requests the agnhost server has logged."""
    return c.kubectl("logs", pod).stdout.count("GET /hostname")


def test_external_traffic_policy_local(cluster: Cluster) -> None:
    c = cluster
    port = _service_field(c, "local-1", "{.spec.ports[0].nodePort}")
    health = _service_field(c, "local-1", "{.spec.healthCheckNodePort}")
    assert health
    # Each node's health check is asked from the other node's host network (an outside client).
    on_1 = _eventually(lambda: _health(c, NODE_2.name, NODE_1.ip, health), lambda r: r[0] == 200)
    on_2 = _eventually(lambda: _health(c, NODE_1.name, NODE_2.ip, health), lambda r: r[0] == 503)
    assert on_1[0] == 200 and on_1[1]["localEndpoints"] == 1, on_1
    assert on_2[0] == 503 and on_2[1]["localEndpoints"] == 0, on_2
    assert on_1[1]["service"] == on_2[1]["service"] == {"namespace": "default", "name": "local-1"}
    # Through node-1, which has the endpoint: served.
    got = _eventually(lambda: _curl_on_node(c, NODE_2.name, f"http://{NODE_1.ip}:{port}/hostname"),
                      lambda r: r == (0, "server-1"))
    assert got == (0, "server-1")
    # Through node-2, which has none: not served and not forwarded to node-1 (node-2 knows the
    # Service: its health check answered 503 above). kube-proxy drops the packets, and so does
    # kubeshim's DaemonSet (tproxy mode, the kernel's verdict): curl times out (28).
    served = _requests_served(c, "server-1")
    code, body = _curl_on_node(c, NODE_1.name, f"http://{NODE_2.ip}:{port}/hostname")
    assert (code, body) == (28, ""), (code, body)
    assert _requests_served(c, "server-1") == served
    # The same NodePort with policy Cluster is served through node-2: the drop is the policy's.
    cluster_port = _service_field(c, "nodeport-1", "{.spec.ports[0].nodePort}")
    assert _curl_on_node(c, NODE_1.name, f"http://{NODE_2.ip}:{cluster_port}/hostname") == (
        0, "server-1")


def test_cluster_dns_from_a_pod_on_node_2(cluster: Cluster) -> None:
    c = cluster
    assert f"nameserver {CLUSTER_DNS}" in _exec(c, "client-2", "cat", "/etc/resolv.conf")
    for name in ("to-1", "to-2"):
        ip = _service_field(c, name, "{.spec.clusterIP}")
        fqdn = f"{name}.default.svc.cluster.local"
        assert _exec(c, "client-2", "dig", "+short", fqdn).split() == [ip]
        assert _exec(c, "client-2", "dig", "+short", "+search", name).split() == [ip]
        assert _exec(c, "client-2", "getent", "hosts", name).split() == [ip, fqdn]
    # The Pod on node-1 by its A record in the pod zone, and a name that does not exist.
    server_ip = c.kubectl("get", "pod", "server-1", "-o", "jsonpath={.status.podIP}").stdout
    pod_name = f"{server_ip.replace('.', '-')}.default.pod.cluster.local"
    assert _exec(c, "client-2", "dig", "+short", pod_name).split() == [server_ip]
    got = _exec(c, "client-2", "dig", "nosuch.default.svc.cluster.local")
    assert "status: NXDOMAIN" in got


def test_teardown_after_both_nodes_are_killed(cluster: Cluster) -> None:
    """Last in the module: SIGKILL both nodes' inside processes, which leaves the runtimes'
    shims and the containers of both nodes running; stop() must still leave the host as it
    was."""
    c = cluster
    netns = {name: Path(f"/proc/{p.pid}/ns/net").stat().st_ino for name, p in c.insides.items()}
    for inside in c.insides.values():
        inside.kill()
        inside.wait(30)
    for spec in NODES:
        assert processes_in_netns(netns[spec.name]), f"nothing left on {spec.name} to clean"
    assert c.stop() == []
    assert not any(Path(h, c.cgroup).exists() for h in Path("/sys/fs/cgroup").iterdir())
    for spec in NODES:
        assert processes_in_netns(netns[spec.name]) == [], spec.name
