"""kubeshim swapped in for kube-proxy and the cluster DNS on a node of a real control plane.

    root namespace   etcd + kube-apiserver on 127.0.0.1 (tests/peers), kubectl writes objects
    node namespace   kubeshim --kubeconfig (the least-privilege ServiceAccount), once with
                     --vip-mode interface (ClusterIPs on kubeshim0) and once with --vip-mode
                     tproxy (the nftables capture table); NodePorts on 10.244.0.1, DNS on
                     10.244.0.1:53; the API server reached through tests/peers/bridge.py
    pod-a, pod-b     HTTP servers (tests/e2e/proxy_backend.py) whose addresses are in the
                     EndpointSlices; pod-a also runs a UDP echo
    client           the kubelet's resolv.conf for a pod in `default`; curl, wrk, dig, getent

The API server allocates ClusterIPs and NodePorts as in any cluster; the client uses them
exactly as it would with kube-proxy and CoreDNS. Needs root; the Lab removes everything.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns import NODE_IP, Lab, Netns
from tests.peers.bridge import APIBridge
from tests.peers.cluster import SERVICE_CIDR, ControlPlane

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NODE = "swap-node"
ZONE = "cluster.local"
# What the kubelet writes for a pod in `default` whose cluster DNS is the node's address.
RESOLV_CONF = (
    f"search default.svc.{ZONE} svc.{ZONE} {ZONE}\nnameserver {NODE_IP}\noptions ndots:5\n"
)
TAG = f"s{os.getpid()}"
WEB, DB, UDP = f"web-{TAG}", f"db-{TAG}", f"echo-{TAG}"


@dataclass
class Swap:
    cp: ControlPlane
    lab: Lab
    client: Netns
    pods: dict[str, str]  # name -> IP
    log: Path
    daemon: subprocess.Popen[Any]

    def cluster_ip(self, name: str) -> str:
        return self.cp.kubectl("get", "service", name, "-o",
                               "jsonpath={.spec.clusterIP}").stdout

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.daemon.poll() is None, self.log.read_text()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()}")
            time.sleep(0.1)

    def curl(self, url: str) -> str:
        out = self.client.run(["curl", "-sS", "--max-time", "3", url], check=False)
        return out.stdout.strip() if out.returncode == 0 else f"error {out.returncode}"


def slice_of(service: str, pods: dict[str, str], hostnames: bool = False,
             ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    endpoints = []
    for name, ip in pods.items():
        ep: dict[str, Any] = {"addresses": [ip], "nodeName": NODE, "conditions": {"ready": True}}
        if hostnames:
            ep["hostname"] = name
        endpoints.append(ep)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": ports or [{"name": "http", "protocol": "TCP", "port": 8080}]}


def objects(pods: dict[str, str]) -> list[dict[str, Any]]:
    http = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
    return [
        # This node, as its kubelet registers it (kubeshim watches it by name).
        {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": NODE, "labels": {"kubernetes.io/hostname": NODE,
                                     "topology.kubernetes.io/zone": "zone-a"}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": WEB, "namespace": "default"},
         "spec": {"type": "NodePort", "ports": [http]}},
        slice_of(WEB, pods),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": DB, "namespace": "default"},
         "spec": {"clusterIP": "None", "ports": [http]}},
        slice_of(DB, pods, hostnames=True),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": UDP, "namespace": "default"},
         "spec": {"ports": [{"name": "echo", "protocol": "UDP", "port": 5300,
                             "targetPort": 5300}]}},
        slice_of(UDP, {"pod-a": pods["pod-a"]},
                 ports=[{"name": "echo", "protocol": "UDP", "port": 5300}]),
    ]


@pytest.fixture(scope="module", params=["interface", "tproxy"])
def swap(request: pytest.FixtureRequest, control_plane: ControlPlane,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swap]:
    cp = control_plane
    mode: str = request.param
    tmp = tmp_path_factory.mktemp("swap")
    with Lab(tag="sw" + mode[0]) as lab:
        # br_netfilter on for the node's bridge (this namespace's own setting), as on clusters
        # with a bridge CNI: kube-proxy's DNAT and kubeshim's bridge redirect both work there.
        lab.node.run(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
                      "net.bridge.bridge-nf-call-ip6tables=1"])
        pods = {}
        for name in ("pod-a", "pod-b"):
            pod = lab.add_host(name)
            pods[name] = pod.ip
            pod.popen([sys.executable, str(ROOT / "tests/e2e/proxy_backend.py"), name])
        lab.hosts["pod-a"].popen(["socat", "UDP-RECVFROM:5300,fork", "EXEC:cat"])
        client = lab.add_host("client")
        client.write_resolv_conf(RESOLV_CONF)
        for name in pods:
            lab.hosts[name].wait_port("", 8080)
        cp.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objects(pods)}))
        with APIBridge(lab.node, cp.port, tmp):
            log = tmp / "kubeshim.log"
            with log.open("w") as out:
                daemon = lab.node.popen(
                    [sys.executable, "-m", "kubeshim", "run",
                     "--kubeconfig", str(cp.kubeshim_kubeconfig),
                     "--hostname-override", NODE, "--vip-mode", mode,
                     "--nodeport-addresses", f"{NODE_IP}/32",
                     "--dns-bind", f"{NODE_IP}:53", "--upstream", "127.0.0.1:5399",
                     "--healthz-bind-address", "127.0.0.1:10256",
                     "--metrics-bind-address", "127.0.0.1:10249"],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            s = Swap(cp, lab, client, pods, log, daemon)
            try:
                s.wait(lambda: s.curl(f"http://{s.cluster_ip(WEB)}/") in pods, "web served")
                yield s
            finally:
                daemon.terminate()
                daemon.wait(20)
                cp.kubectl("delete", "service", WEB, DB, UDP, check=False)
                cp.kubectl("delete", "endpointslice", f"{WEB}-1", f"{DB}-1", f"{UDP}-1",
                           check=False)
                cp.kubectl("delete", "node", NODE, check=False)
        text = log.read_text()
        assert "Traceback" not in text and "forbidden" not in text, text


def test_cluster_ip_and_name_reach_both_pods(swap: Swap) -> None:
    ip = swap.cluster_ip(WEB)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(SERVICE_CIDR), ip  # allocated
    by_ip = {swap.curl(f"http://{ip}/") for _ in range(8)}
    assert by_ip == set(swap.pods), by_ip
    # By short name, through the kubelet search path and kubeshim's DNS on the node.
    by_name = {swap.curl(f"http://{WEB}/") for _ in range(8)}
    assert by_name == set(swap.pods), by_name
    hosts = swap.client.run(["getent", "hosts", WEB]).stdout.split()
    assert hosts == [ip, f"{WEB}.default.svc.{ZONE}"]


def test_dig_through_the_resolv_conf(swap: Swap) -> None:
    ip = swap.cluster_ip(WEB)
    out = swap.client.run(["dig", "+short", "+search", WEB]).stdout.split()
    assert out == [ip]
    srv = swap.client.run(["dig", "+short", f"_http._tcp.{WEB}.default.svc.{ZONE}", "SRV"])
    assert srv.stdout.split() == ["0", "100", "80", f"{WEB}.default.svc.{ZONE}."]
    headless = swap.client.run(["dig", "+short", f"{DB}.default.svc.{ZONE}"]).stdout.split()
    assert sorted(headless) == sorted(swap.pods.values())
    pod_a = swap.client.run(["getent", "hosts", f"pod-a.{DB}"]).stdout.split()
    assert pod_a[0] == swap.pods["pod-a"]
    ptr = swap.client.run(["dig", "+short", "-x", ip]).stdout.split()
    assert ptr == [f"{WEB}.default.svc.{ZONE}."]


def test_node_port_on_the_node_address(swap: Swap) -> None:
    node_port = swap.cp.kubectl("get", "service", WEB, "-o",
                                "jsonpath={.spec.ports[0].nodePort}").stdout
    assert 30000 <= int(node_port) <= 32767
    seen = {swap.curl(f"http://{NODE_IP}:{node_port}/") for _ in range(6)}
    assert seen == set(swap.pods), seen


def test_udp_service_by_name(swap: Swap) -> None:
    out = swap.client.run(["socat", "-T", "2", "-", f"UDP:{UDP}:5300"], input="ping\n")
    assert out.stdout.strip() == "ping"


def test_wrk_by_name_without_errors(swap: Swap) -> None:
    out = swap.client.run(["wrk", "-t1", "-c8", "-d2s", f"http://{WEB}/"], timeout=30).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert requests > 100, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out


def test_endpoint_change_with_kubectl_moves_traffic(swap: Swap) -> None:
    ip = swap.cluster_ip(WEB)
    swap.cp.kubectl("apply", "-f", "-", input=json.dumps(
        slice_of(WEB, {"pod-b": swap.pods["pod-b"]})))
    try:
        swap.wait(lambda: all(swap.curl(f"http://{ip}/") == "pod-b" for _ in range(4)),
                  "traffic to follow the slice")
    finally:
        swap.cp.kubectl("apply", "-f", "-", input=json.dumps(slice_of(WEB, swap.pods)))
    swap.wait(lambda: {swap.curl(f"http://{ip}/") for _ in range(6)} == set(swap.pods),
              "both pods again")


def healthz(swap: Swap) -> tuple[int, bool]:
    out = swap.lab.node.run(["curl", "-sS", "--max-time", "2", "-w", "\n%{http_code}",
                             "http://127.0.0.1:10256/healthz"])
    body, _, code = out.stdout.rpartition("\n")
    return int(code), bool(json.loads(body)["nodeEligible"])


def test_the_nodes_zone_and_taint_through_kubectl(swap: Swap) -> None:
    """The Node watch: trafficDistribution PreferClose hints (as the EndpointSlice controller
    writes them) keep traffic in this node's zone; the autoscaler's taint turns /healthz 503."""
    close = f"close-{TAG}"
    zones = {"pod-a": "zone-a", "pod-b": "zone-b"}
    sl = slice_of(close, swap.pods)
    for ep, pod in zip(sl["endpoints"], swap.pods, strict=True):
        ep.update(zone=zones[pod], hints={"forZones": [{"name": zones[pod]}]})
    swap.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
        "items": [{"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": close, "namespace": "default"},
                   "spec": {"trafficDistribution": "PreferClose", "ports": [
                       {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}},
                  sl]}))
    try:
        ip = swap.cluster_ip(close)
        swap.wait(lambda: {swap.curl(f"http://{ip}/") for _ in range(8)} == {"pod-a"},
                  "zone-a traffic only")
        swap.cp.kubectl("label", "node", NODE, "topology.kubernetes.io/zone=zone-b",
                        "--overwrite")
        swap.wait(lambda: {swap.curl(f"http://{ip}/") for _ in range(8)} == {"pod-b"},
                  "zone-b traffic only")
        assert healthz(swap) == (200, True)
        swap.cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler=1:NoSchedule")
        swap.wait(lambda: healthz(swap) == (503, False), "503 on the autoscaler's taint")
        swap.cp.kubectl("taint", "node", NODE, "ToBeDeletedByClusterAutoscaler-")
        swap.wait(lambda: healthz(swap) == (200, True), "200 again")
    finally:
        swap.cp.kubectl("label", "node", NODE, "topology.kubernetes.io/zone=zone-a",
                        "--overwrite")
        swap.cp.kubectl("delete", "service", close, check=False)
        swap.cp.kubectl("delete", "endpointslice", f"{close}-1", check=False)
