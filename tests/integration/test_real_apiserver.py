"""kubeshim against a real kube-apiserver + etcd: objects written with kubectl are served by the
proxy and the DNS; restarts, compaction (410 Gone) and missing RBAC rights are survived.

    root namespace   etcd + kube-apiserver on 127.0.0.1 (tests/peers/cluster.py), kubectl
    test namespace   kubeshim --vip-mode loopback (ClusterIPs served at 127.x), DNS on
                     127.0.0.1:5353, backends on 10.244.0.x (on its lo), curl/dig/socat clients

The API server rejects loopback endpoint addresses (EndpointSlice validation), so the backends
live on pod-like addresses inside a namespace of the test's own, and kubeshim with them; it
reaches the API server through tests/peers/bridge.py (a unix socket), whose pause() is the
partition the compaction test needs. kubeshim runs as the `kubeshim` ServiceAccount of
deploy/rbac.yaml (least privilege) unless a test says otherwise. Needs root (a namespace).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import LiveConnection, Netns, require_root
from tests.peers.bridge import APIBridge
from tests.peers.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-a"
DNS = ("127.0.0.1", 5353)
HEALTHZ = "127.0.0.1:10256"
WEB = ("10.244.0.2", "10.244.0.3")  # HTTP backends answering "hello from web-N"
ECHO = "10.244.0.4"  # a TCP echo backend on :9000
SUFFIX = f"p{os.getpid()}"
# How soon a change made with kubectl must be served (it takes ~50 ms here, polling with
# dig and curl included); the latency itself is measured in bench/peers_proxy.py.
SERVE_WITHIN = 1.0
# Reconnecting after an outage can wait out the source's backoff (full jitter, 30 s cap).
RECONNECT_WITHIN = 45.0


# --- the namespace, its backends and the daemon ----------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Netns]:
    require_root()
    ns = Netns(f"ks{os.getpid()}api")
    try:
        for ip in (*WEB, ECHO):
            ns.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        for i, ip in enumerate(WEB, 1):
            ns.popen([sys.executable, str(ROOT / "examples/backend.py"), f"web-{i}", ip, "8080"])
            ns.wait_port(ip, 8080)
        ns.popen(["socat", f"TCP-LISTEN:9000,bind={ECHO},fork,reuseaddr", "PIPE"])
        ns.wait_port(ECHO, 9000)
        yield ns
    finally:
        ns.delete()


class Kubeshim:
    """`kubeshim run` in the namespace, watching the API server of `kubeconfig`."""

    def __init__(self, ns: Netns, kubeconfig: Path, log: Path) -> None:
        self.ns = ns
        self.log = log
        argv = [sys.executable, "-m", "kubeshim", "run", "--kubeconfig", str(kubeconfig),
                "--hostname-override", NODE, "--vip-mode", "loopback",
                "--nodeport-addresses", "localhost",
                "--dns-bind", f"{DNS[0]}:{DNS[1]}", "--upstream", "127.0.0.1:5354",
                "--healthz-bind-address", HEALTHZ,
                "--metrics-bind-address", "127.0.0.1:10249"]
        with log.open("w") as out:
            self.proc = ns.popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert "Traceback" not in self.text(), self.text()


@pytest.fixture
def start_kubeshim(node: Netns, tmp_path: Path) -> Iterator[Callable[[Path], Kubeshim]]:
    started: list[Kubeshim] = []

    def start(kubeconfig: Path) -> Kubeshim:
        daemon = Kubeshim(node, kubeconfig, tmp_path / f"kubeshim-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def bridged(node: Netns, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ControlPlane]:
    """The session's control plane, reachable from the namespace."""
    with APIBridge(node, control_plane.port, tmp_path_factory.mktemp("bridge")):
        yield control_plane


# --- clients ---------------------------------------------------------------------------------


def dig(ns: Netns, name: str, qtype: str = "A") -> tuple[str, list[str]]:
    """(rcode, answer data) from kubeshim's DNS, asked with dig inside the namespace."""
    out = ns.run(["dig", f"@{DNS[0]}", "-p", str(DNS[1]), "+tries=1", "+time=2",
                  "+noall", "+comments", "+answer", name, qtype], check=False)
    status = re.search(r"status: (\w+)", out.stdout)
    answers = [line.split()[-1] for line in out.stdout.splitlines()
               if line and not line.startswith(";")]
    return (status.group(1) if status else "NOANSWER"), answers


def curl(ns: Netns, url: str) -> str:
    """The body, or `error <curl exit code>` (7: connection refused)."""
    out = ns.run(["curl", "-sS", "--max-time", "2", url], check=False)
    return out.stdout.strip() if out.returncode == 0 else f"error {out.returncode}"


def served_at(ns: Netns, name: str) -> str | None:
    """The address kubeshim's DNS gives `name` (loopback mode: the 127.x the VIP is served at)."""
    rcode, answers = dig(ns, f"{name}.default.svc.cluster.local")
    return answers[0] if rcode == "NOERROR" and answers else None


def wait_for(check: Callable[[], Any], what: str, timeout: float, daemon: Kubeshim) -> float:
    """Poll until `check()` is truthy; returns the seconds it took."""
    began = time.monotonic()
    while not check():
        if not daemon.alive() or time.monotonic() - began > timeout:
            raise AssertionError(f"not {what} after {time.monotonic() - began:.1f}s "
                                 f"(kubeshim alive: {daemon.alive()}):\n{daemon.text()[-4000:]}")
        time.sleep(0.02)
    return time.monotonic() - began


def apply(cp: ControlPlane, *docs: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": list(docs)}))


def service(name: str, port: int, target: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"name": "p", "port": port, "targetPort": target}]}}


def endpoint_slice(service_name: str, ips: list[str], port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "p", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [ip], "nodeName": NODE, "conditions": {"ready": True}}
                          for ip in ips]}


def count(log: str, event: str) -> int:
    return sum(1 for line in log.splitlines() if event in line)


# --- tests -----------------------------------------------------------------------------------


def test_kubectl_changes_are_served_by_proxy_and_dns(
    bridged: ControlPlane, node: Netns, start_kubeshim: Callable[[Path], Kubeshim]
) -> None:
    cp = bridged
    daemon = start_kubeshim(cp.kubeshim_kubeconfig)
    wait_for(lambda: served_at(node, "kubernetes"), "serving default/kubernetes",
             RECONNECT_WITHIN, daemon)
    name = f"web-{SUFFIX}"

    apply(cp, service(name, 80, 8080), endpoint_slice(name, [WEB[0]], 8080))
    cluster_ip = cp.kubectl("get", "service", name, "-o", "jsonpath={.spec.clusterIP}").stdout
    assert cluster_ip.startswith("10."), cluster_ip
    took = wait_for(lambda: curl(node, f"http://{served_at(node, name)}/") == "hello from web-1",
                    "served through the proxy", SERVE_WITHIN, daemon)
    vip = served_at(node, name)
    # Loopback mode: the ClusterIP's last three octets on 127/8.
    assert vip == "127." + cluster_ip.split(".", 1)[1], (vip, cluster_ip, took)

    # A patched slice re-routes new connections.
    cp.kubectl("patch", "endpointslice", f"{name}-1", "--type=json", "-p",
               json.dumps([{"op": "replace", "path": "/endpoints/0/addresses/0",
                            "value": WEB[1]}]))
    wait_for(lambda: curl(node, f"http://{vip}/") == "hello from web-2", "re-routed",
             SERVE_WITHIN, daemon)

    # A deleted Service is no longer served: NXDOMAIN, and connections are refused.
    cp.kubectl("delete", "service", name)
    wait_for(lambda: dig(node, f"{name}.default.svc.cluster.local")[0] == "NXDOMAIN",
             "NXDOMAIN after delete", SERVE_WITHIN, daemon)
    wait_for(lambda: curl(node, f"http://{vip}/") == "error 7", "refused after delete",
             SERVE_WITHIN, daemon)
    cp.kubectl("delete", "endpointslice", f"{name}-1")
    # The least-privilege identity was enough for all of it.
    assert "forbidden" not in daemon.text()


def test_apiserver_restart_keeps_connections_and_resumes_the_watch(
    bridged: ControlPlane, node: Netns, start_kubeshim: Callable[[Path], Kubeshim]
) -> None:
    cp = bridged
    daemon = start_kubeshim(cp.kubeshim_kubeconfig)
    echo, later = f"echo-{SUFFIX}", f"later-{SUFFIX}"
    apply(cp, service(echo, 7000, 9000), endpoint_slice(echo, [ECHO], 9000))
    wait_for(lambda: served_at(node, echo), "echo served", RECONNECT_WITHIN, daemon)
    live = LiveConnection(node, f"{served_at(node, echo)}:7000")
    try:
        assert live.echo("before") == "before"
        listed = count(daemon.text(), "listed resource=")
        assert listed == 3, daemon.text()  # services, endpointslices and nodes, once each

        cp.restart_apiserver()
        assert live.echo("during") == "during", "the established connection broke"
        # Objects written right after the restart reach kubeshim once its watch resumes.
        apply(cp, service(later, 7001, 9000), endpoint_slice(later, [ECHO], 9000))
        wait_for(lambda: served_at(node, later), "served after the restart",
                 RECONNECT_WITHIN, daemon)
        address = f"{served_at(node, later)}:7001"
        fresh = node.run(["socat", "-T", "2", "-", f"TCP:{address}"], input="after\n")
        assert fresh.stdout.strip() == "after"
        assert live.echo("after") == "after"
    finally:
        live.close(wait=5)
        cp.kubectl("delete", "service", echo, later)
        cp.kubectl("delete", "endpointslice", f"{echo}-1", f"{later}-1")
    log = daemon.text()
    assert "API connection failed" in log, log  # it did notice the restart
    # A restarted apiserver's watch cache starts at the current revision, so a watch from an
    # older resourceVersion may get 410 Gone (client-go relists then too). No needless
    # relist: at most one per kind, and only after a 410.
    expired = count(log, "resource version expired, relisting")
    assert expired <= 3 and count(log, "listed resource=") == listed + expired, log


def test_compaction_past_the_watch_relists_and_drops_deleted_objects(
    node: Netns, new_control_plane: Callable[..., ControlPlane],
    start_kubeshim: Callable[[Path], Kubeshim], tmp_path: Path,
) -> None:
    # Without the watch cache a watch is served by etcd itself, so compaction alone makes an
    # old resourceVersion answer 410 Gone.
    cp = new_control_plane(extra_apiserver_args=["--watch-cache=false"])
    with APIBridge(node, cp.port, tmp_path) as bridge:
        daemon = start_kubeshim(cp.kubeshim_kubeconfig)
        gone, kept, fresh = "gone", "kept", "fresh"
        apply(cp, service(gone, 80, 8080), endpoint_slice(gone, [WEB[0]], 8080),
              service(kept, 80, 8080), endpoint_slice(kept, [WEB[0]], 8080))
        wait_for(lambda: served_at(node, gone) and served_at(node, kept), "both served",
                 RECONNECT_WITHIN, daemon)
        gone_vip = served_at(node, gone)
        assert curl(node, f"http://{gone_vip}/") == "hello from web-1"

        # Partition kubeshim from the API server; change things; compact past its version.
        bridge.pause()
        cp.kubectl("delete", "service", gone)
        cp.kubectl("delete", "endpointslice", f"{gone}-1")
        cp.kubectl("patch", "endpointslice", f"{kept}-1", "--type=json", "-p",
                   json.dumps([{"op": "replace", "path": "/endpoints/0/addresses/0",
                                "value": WEB[1]}]))
        apply(cp, service(fresh, 80, 8080), endpoint_slice(fresh, [WEB[1]], 8080))
        cp.compact_etcd()
        # Still the old state while partitioned: nothing is dropped for lack of news.
        assert served_at(node, gone) == gone_vip
        bridge.resume()

        wait_for(lambda: dig(node, f"{gone}.default.svc.cluster.local")[0] == "NXDOMAIN",
                 "the deleted Service gone", RECONNECT_WITHIN, daemon)
        assert curl(node, f"http://{gone_vip}/") == "error 7"
        wait_for(lambda: curl(node, f"http://{served_at(node, kept)}/") == "hello from web-2",
                 "the patched slice followed", SERVE_WITHIN, daemon)
        wait_for(lambda: curl(node, f"http://{served_at(node, fresh)}/") == "hello from web-2",
                 "the new Service served", SERVE_WITHIN, daemon)
        log = daemon.text()
        assert "resource version expired, relisting" in log, log
        assert count(log, "listed resource=") >= 3, log


def test_identity_without_rights_gets_a_clear_403_and_keeps_retrying(
    bridged: ControlPlane, node: Netns, start_kubeshim: Callable[[Path], Kubeshim]
) -> None:
    daemon = start_kubeshim(bridged.norole_kubeconfig)
    for resource, group in (("services", ""), ("endpointslices", "discovery.k8s.io")):
        wait_for(lambda r=resource, g=group: count(  # type: ignore[misc]
            daemon.text(), f'forbidden: cannot list resource "{r}" in API group "{g}"') >= 2,
            f"a repeated 403 for {resource}", 20, daemon)
    assert 'User \\"norole\\" cannot list' in daemon.text() or \
        'User "norole" cannot list' in daemon.text(), daemon.text()
    # Alive and answering its health endpoint (not healthy: it has never synced).
    livez = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                      f"http://{HEALTHZ}/livez"], check=False)
    assert livez.stdout in {"200", "503"}, livez
    assert daemon.alive()


# --- this node's Node ------------------------------------------------------------------------


def status(ns: Netns) -> dict[str, Any]:
    out = ns.run(["curl", "-sS", "--max-time", "2", "http://127.0.0.1:10249/status"],
                 check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}  # type: ignore[no-any-return]


def healthz(ns: Netns) -> tuple[str, bool | None]:
    """(HTTP code, nodeEligible) of kubeshim's /healthz."""
    out = ns.run(["curl", "-sS", "--max-time", "2", "-w", "\n%{http_code}",
                  f"http://{HEALTHZ}/healthz"], check=False)
    body, _, code = out.stdout.rpartition("\n")
    try:
        return code, json.loads(body).get("nodeEligible")
    except json.JSONDecodeError:
        return code, None


def zoned_slice(service_name: str, port: int) -> dict[str, Any]:
    """web-1 in zone-a, web-2 in zone-b, hinted as the EndpointSlice controller hints them for
    trafficDistribution: PreferClose."""
    eps = [{"addresses": [ip], "nodeName": f"node-{zone}", "zone": zone,
            "conditions": {"ready": True}, "hints": {"forZones": [{"name": zone}]}}
           for ip, zone in zip(WEB, ("zone-a", "zone-b"), strict=True)]
    return {**endpoint_slice(service_name, list(WEB), port), "endpoints": eps}


def test_node_watch_follows_kubectl_label_taint_and_delete(
    bridged: ControlPlane, node: Netns, start_kubeshim: Callable[[Path], Kubeshim]
) -> None:
    cp = bridged
    apply(cp, {"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"},
                            "finalizers": ["kubeshim.test/hold"]}})
    name = f"zonal-{SUFFIX}"
    svc = service(name, 80, 8080)
    svc["spec"]["trafficDistribution"] = "PreferClose"
    apply(cp, svc, zoned_slice(name, 8080))
    daemon = start_kubeshim(cp.kubeshim_kubeconfig)
    try:
        wait_for(lambda: served_at(node, name), "zonal served", RECONNECT_WITHIN, daemon)
        vip = served_at(node, name)

        def answers(n: int = 8) -> set[str]:
            return {curl(node, f"http://{vip}/") for _ in range(n)}

        wait_for(lambda: answers() == {"hello from web-1"}, "zone-a traffic only",
                 SERVE_WITHIN, daemon)
        assert healthz(node) == ("200", True)
        assert status(node)["nodeObject"]["zone"] == "zone-a"

        cp.kubectl("label", "node", NODE, "topology.kubernetes.io/zone=zone-b", "--overwrite")
        wait_for(lambda: answers() == {"hello from web-2"}, "zone-b traffic only after the label",
                 SERVE_WITHIN, daemon)

        cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler=1:NoSchedule")
        wait_for(lambda: healthz(node) == ("503", False), "503 when tainted", SERVE_WITHIN,
                 daemon)
        assert answers(4) == {"hello from web-2"}  # the data plane keeps serving
        cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler-")
        wait_for(lambda: healthz(node) == ("200", True), "200 when untainted", SERVE_WITHIN,
                 daemon)

        # Deletion: first a deletionTimestamp (held by the finalizer), then gone.
        cp.kubectl("delete", "node", NODE, "--wait=false")
        wait_for(lambda: healthz(node) == ("503", False), "503 while being deleted",
                 SERVE_WITHIN, daemon)
        assert status(node)["nodeObject"]["deleting"] is True
        cp.kubectl("patch", "node", NODE, "--type=merge", "-p",
                   json.dumps({"metadata": {"finalizers": None}}))
        wait_for(lambda: status(node).get("nodeObject") == {"deleted": True, "eligible": False},
                 "the Node gone", SERVE_WITHIN, daemon)
        assert healthz(node) == ("503", False)
        # Without a Node there is no zone: hints cannot apply, every endpoint is used.
        wait_for(lambda: answers(12) == {"hello from web-1", "hello from web-2"},
                 "spread without a zone", SERVE_WITHIN, daemon)
        log = daemon.text()
        assert "forbidden" not in log and "node changed" in log, log
    finally:
        cp.kubectl("delete", "node", NODE, "--ignore-not-found", "--wait=false")
        cp.kubectl("patch", "node", NODE, "--type=merge", "-p",
                   json.dumps({"metadata": {"finalizers": None}}), check=False)
        cp.kubectl("delete", "service", name, "--ignore-not-found")
        cp.kubectl("delete", "endpointslice", f"{name}-1", "--ignore-not-found")


NO_NODES_RBAC = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: kubeshim-nonodes, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kubeshim-nonodes}
rules:
  - {apiGroups: [""], resources: ["services"], verbs: ["get", "list", "watch"]}
  - {apiGroups: ["discovery.k8s.io"], resources: ["endpointslices"],
     verbs: ["get", "list", "watch"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kubeshim-nonodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubeshim-nonodes}
subjects: [{kind: ServiceAccount, name: kubeshim-nonodes, namespace: kube-system}]
"""


def test_identity_without_nodes_gets_one_clear_403_and_serves_services(
    bridged: ControlPlane, node: Netns, start_kubeshim: Callable[[Path], Kubeshim],
    tmp_path: Path,
) -> None:
    from tests.peers.cluster import write_kubeconfig

    cp = bridged
    cp.kubectl("apply", "-f", "-", input=NO_NODES_RBAC)
    token = cp.kubectl("create", "token", "kubeshim-nonodes", "-n", "kube-system").stdout.strip()
    kubeconfig = write_kubeconfig(tmp_path / "nonodes.kubeconfig", cp.server, cp.ca_file,
                                  "kubeshim-nonodes", token)
    daemon = start_kubeshim(kubeconfig)
    wait_for(lambda: 'forbidden: cannot list resource "nodes"' in daemon.text(),
             "the nodes 403", RECONNECT_WITHIN, daemon)
    name = f"nonodes-{SUFFIX}"
    apply(cp, service(name, 80, 8080), endpoint_slice(name, [WEB[0]], 8080))
    try:
        wait_for(lambda: curl(node, f"http://{served_at(node, name)}/") == "hello from web-1",
                 "Services served without the nodes permission", RECONNECT_WITHIN, daemon)
        time.sleep(5)  # several more attempts at the nodes (backoff from 0.5 s)
        log = daemon.text()
        assert count(log, 'forbidden: cannot list resource "nodes"') == 1, log
        assert "kubeshim-nonodes" in log and "deploy/rbac.yaml" in log, log
        assert count(log, "forbidden") == 1, log  # services and endpointslices are allowed
        assert healthz(node) == ("200", True)  # an unknown Node is eligible, as kube-proxy
        assert daemon.alive()
    finally:
        cp.kubectl("delete", "service", name)
        cp.kubectl("delete", "endpointslice", f"{name}-1")
