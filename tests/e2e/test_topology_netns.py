"""Topology-aware routing, external policy Local on a ClusterIP Service with externalIPs and the
TCP idle timeout, with real traffic: four pods, a client, kubeshim in a node namespace on a
manifest folder that also holds this node's Node object (zone label).

Topology hints are written as the EndpointSlice controller writes them for each
trafficDistribution value (staging/src/k8s.io/endpointslice/trafficdist: every ready endpoint
gets forZones [its zone], and for PreferSameNode also forNodes [its node]); kubeshim, like
kube-proxy, routes by those hints and this node's zone label. curl from the client asserts where
every connection went.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.daemon import ROOT
from tests.netns import NODE_IP, Lab, LiveConnection
from tests.nodelab import METRICS, Cluster

pytestmark = pytest.mark.e2e

NODE = "node-1"
EXTERNAL_IP = "192.168.78.9"
IDLE_TIMEOUT = 2  # --tcp-idle-timeout for this lab: an idle connection closes within 2-4 s
# pod -> (nodeName, zone) of the endpoint it backs
PLACEMENT = {"pod-a": (NODE, "zone-a"), "pod-b": ("node-2", "zone-a"),
             "pod-c": ("node-3", "zone-b"), "pod-d": ("node-4", "zone-b")}
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def service(name: str, ip: str, ports: list[dict[str, Any]] = HTTP,
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec}}


def slice_(name: str, endpoints: list[dict[str, Any]],
           ports: list[dict[str, Any]] = HTTP_EP) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


def node(zone: str | None, taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": NODE}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": labels},
            "spec": {"taints": taints or []}}


class Lab4(Cluster):
    """Four pods on four nodes in two zones, as PLACEMENT says, and a client."""

    def endpoint(self, pod: str, ready: bool = True, hints: str | None = None,
                 **extra: Any) -> dict[str, Any]:
        """The endpoint of `pod`, with hints as the controller writes for `hints` (a
        trafficDistribution value; None: no hints)."""
        node_name, zone = PLACEMENT[pod]
        ep: dict[str, Any] = {"addresses": [self.pods[pod].ip], "nodeName": node_name,
                              "zone": zone, "conditions": {"ready": ready, "serving": ready}}
        if hints is not None and ready:
            ep["hints"] = {"forZones": [{"name": zone}]}
            if hints == "PreferSameNode":
                ep["hints"]["forNodes"] = [{"name": node_name}]
        ep.update(extra)
        return ep


@pytest.fixture(scope="module")
def lab4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab4]:
    with Lab("tp") as lab:
        c = Lab4(lab, tmp_path_factory.mktemp("manifests"))
        for name in PLACEMENT:
            c.add_pod(name)
        c.pods["pod-a"].popen(["socat", "TCP-LISTEN:7000,fork,reuseaddr", "PIPE"])
        lab.add_host("client")
        c.put(node("zone-a"))
        c.wait_pods()
        c.pods["pod-a"].wait_port("", 7000)
        # One worker: the spreads below count on one round-robin cursor (each worker process
        # keeps its own, docs/operations.md).
        with c.running("--hostname-override", NODE, "--no-dns", "--workers", "1",
                       "--tcp-idle-timeout", f"{IDLE_TIMEOUT}s", "--drain-timeout", "1",
                       ready=lambda: c.full_status()["synced"], what="the proxy to start"):
            yield c


def serving(port: dict[str, Any]) -> list[str]:
    """Where a port of `kubeshim status` takes traffic: its listeners (interface mode) or its
    captured tuples (tproxy mode)."""
    return port.get("listeners") or [e["address"] for e in port.get("capture", [])
                                     if e["verdict"] == "captured"]


def served(c: Lab4, name: str, topology: str | None) -> Callable[[], bool]:
    def check() -> bool:
        port = c.port_status(name)
        return bool(serving(port)) and port.get("topology") == topology
    return check


ALL = {"pod-a", "pod-b", "pod-c", "pod-d"}


@pytest.mark.parametrize("distribution, ip, want, mode", [
    ("PreferClose", "10.96.1.1", {"pod-a", "pod-b"}, "PreferSameZone"),
    ("PreferSameZone", "10.96.1.2", {"pod-a", "pod-b"}, "PreferSameZone"),
    ("PreferSameNode", "10.96.1.3", {"pod-a"}, "PreferSameNode"),
])
def test_traffic_distribution_keeps_every_connection_close(
        lab4: Lab4, distribution: str, ip: str, want: set[str], mode: str) -> None:
    name = distribution.lower()
    lab4.put(service(name, ip, trafficDistribution=distribution),
             slice_(name, [lab4.endpoint(p, hints=distribution) for p in PLACEMENT]))
    lab4.wait(served(lab4, name, mode), f"{name} served with topology")
    got = lab4.spread(f"http://{ip}/", 24)
    assert set(got) == want and sum(got.values()) == 24, got


def test_incomplete_hints_spread_over_every_endpoint(lab4: Lab4) -> None:
    # pod-d's endpoint has no hint (the controller had no zone for it): hints are ignored.
    eps = [lab4.endpoint(p, hints="PreferClose") for p in ("pod-a", "pod-b", "pod-c")]
    eps.append(lab4.endpoint("pod-d"))
    lab4.put(service("partial", "10.96.1.4", trafficDistribution="PreferClose"),
             slice_("partial", eps))
    lab4.wait(served(lab4, "partial", None), "partial served")
    got = lab4.spread("http://10.96.1.4/", 24)
    assert got == {p: 6 for p in ALL}, got


def test_node_hint_falls_back_to_zone_then_to_all(lab4: Lab4) -> None:
    eps = [lab4.endpoint(p, hints="PreferSameNode") for p in PLACEMENT]
    lab4.put(service("samenode", "10.96.1.5", trafficDistribution="PreferSameNode"),
             slice_("samenode", eps))
    lab4.wait(served(lab4, "samenode", "PreferSameNode"), "samenode on-node")
    assert set(lab4.spread("http://10.96.1.5/", 8)) == {"pod-a"}
    # The on-node endpoint stops being ready: no node hint for this node, zone hints apply.
    eps[0] = lab4.endpoint("pod-a", ready=False)
    lab4.put(slice_("samenode", eps))
    lab4.wait(served(lab4, "samenode", "PreferSameZone"), "samenode in-zone")
    assert set(lab4.spread("http://10.96.1.5/", 8)) == {"pod-b"}
    # And the in-zone one too: nothing hinted for zone-a, every ready endpoint.
    eps[1] = lab4.endpoint("pod-b", ready=False)
    lab4.put(slice_("samenode", eps))
    lab4.wait(served(lab4, "samenode", None), "samenode anywhere")
    assert lab4.spread("http://10.96.1.5/", 8) == {"pod-c": 4, "pod-d": 4}


def test_the_nodes_zone_label_decides_and_a_change_applies_at_once(lab4: Lab4) -> None:
    eps = [lab4.endpoint(p, hints="PreferClose") for p in PLACEMENT]
    lab4.put(service("zonal", "10.96.1.6", trafficDistribution="PreferClose"),
             slice_("zonal", eps))
    lab4.wait(served(lab4, "zonal", "PreferSameZone"), "zonal")
    assert set(lab4.spread("http://10.96.1.6/", 12)) == {"pod-a", "pod-b"}
    shown = lab4.lab.node.run([sys.executable, "-m", "kubeshim", "status", "--address", METRICS],
                              cwd=ROOT).stdout
    assert "Node object: zone=zone-a  eligible" in shown and "[PreferSameZone]" in shown, shown
    try:
        lab4.put(node("zone-b"))
        lab4.wait(lambda: lab4.full_status()["nodeObject"]["zone"] == "zone-b", "zone-b")
        lab4.wait(lambda: set(lab4.spread("http://10.96.1.6/", 4)) <= {"pod-c", "pod-d"},
                  "traffic to move to zone-b")
        assert set(lab4.spread("http://10.96.1.6/", 12)) == {"pod-c", "pod-d"}
        lab4.put(node(None))  # no zone label: zone hints cannot apply
        lab4.wait(served(lab4, "zonal", None), "zonal without a zone")
        assert lab4.spread("http://10.96.1.6/", 24) == {p: 6 for p in ALL}
    finally:
        lab4.put(node("zone-a"))


def test_external_policy_local_on_a_cluster_ip_service_with_external_ips(lab4: Lab4) -> None:
    lab4.put(service("extlocal", "10.96.1.7", externalIPs=[EXTERNAL_IP],
                     externalTrafficPolicy="Local"),
             slice_("extlocal", [lab4.endpoint(p) for p in ("pod-a", "pod-b", "pod-c")]))
    lab4.wait(lambda: len(serving(lab4.port_status("extlocal"))) == 2, "extlocal served")
    # External traffic stays on this node's endpoint; cluster traffic uses every endpoint.
    assert set(lab4.spread(f"http://{EXTERNAL_IP}/", 9)) == {"pod-a"}
    assert set(lab4.spread("http://10.96.1.7/", 9)) == {"pod-a", "pod-b", "pod-c"}
    # No local endpoint: external traffic gets none (kube-proxy drops it), internal still works.
    lab4.put(slice_("extlocal", [lab4.endpoint(p) for p in ("pod-b", "pod-c")]))
    lab4.wait(lambda: all(e["usedFor"] == ["internal"]
                          for e in lab4.port_status("extlocal")["endpoints"]), "no local endpoint")
    out = lab4.client.run(["curl", "-sS", "--max-time", "3", f"http://{EXTERNAL_IP}/"],
                          check=False)
    assert out.returncode != 0 and not out.stdout
    assert set(lab4.spread("http://10.96.1.7/", 6)) == {"pod-b", "pod-c"}


def test_idle_connections_close_only_after_the_idle_timeout(lab4: Lab4) -> None:
    echo = [{"name": "echo", "port": 7000, "protocol": "TCP", "targetPort": 7000}]
    lab4.put(service("echo", "10.96.1.8", echo),
             slice_("echo", [lab4.endpoint("pod-a")],
                    [{"name": "echo", "port": 7000, "protocol": "TCP"}]))
    lab4.wait(lambda: bool(serving(lab4.port_status("echo"))), "echo served")
    kept = LiveConnection(lab4.client, "10.96.1.8:7000")
    dropped = LiveConnection(lab4.client, "10.96.1.8:7000")
    try:
        assert kept.echo("one") == "one" and dropped.echo("one") == "one"
        # Traffic more often than the timeout keeps a connection, however long it lives.
        for i in range(6):
            time.sleep(IDLE_TIMEOUT * 0.6)
            assert kept.echo(f"keep {i}") == f"keep {i}"
        # `dropped` has now been idle for > 2x the timeout: closed by the proxy.
        assert dropped.proc.wait(5) == 0
        assert lab4.port_status("echo")["errors"].get("idle_timeout", 0) >= 1
    finally:
        for conn in (kept, dropped):
            if conn.proc.poll() is None:
                conn.proc.kill()
            conn.proc.wait()


def test_healthz_follows_the_nodes_autoscaler_taint(lab4: Lab4) -> None:
    def healthz() -> tuple[int, dict[str, Any]]:
        out = lab4.lab.node.run(["curl", "-sS", "-w", "\n%{http_code}",
                                 "http://127.0.0.1:10256/healthz"])
        body, code = out.stdout.rsplit("\n", 1)
        return int(code), json.loads(body)

    def service_check() -> tuple[int, dict[str, Any]]:
        out = lab4.client.run(["curl", "-sS", "-w", "\n%{http_code}",
                               f"http://{NODE_IP}:32100/"], check=False)
        if out.returncode != 0:
            return 0, {}
        body, code = out.stdout.rsplit("\n", 1)
        return int(code), json.loads(body)

    # A LoadBalancer Service with externalTrafficPolicy Local has a health-check nodePort.
    lab4.put(service("lb-local", "10.96.1.10", [{**HTTP[0], "nodePort": 30100}],
                     type="LoadBalancer", externalTrafficPolicy="Local",
                     healthCheckNodePort=32100),
             slice_("lb-local", [lab4.endpoint("pod-a"), lab4.endpoint("pod-c")]))
    lab4.wait(lambda: service_check()[0] == 200, "the health-check nodePort")
    assert healthz()[0] == 200 and healthz()[1]["nodeEligible"] is True
    taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
    try:
        lab4.put(node("zone-a", [taint]))
        lab4.wait(lambda: healthz()[0] == 503 and healthz()[1]["nodeEligible"] is False, "503")
        # Traffic still flows: eligibility is for load balancers, not for the data plane.
        assert set(lab4.spread("http://10.96.1.10/", 6)) == {"pod-a", "pod-c"}
        # The per-Service checks keep answering for their local endpoints: kube-proxy's
        # service health server asks only whether the proxy is healthy, not the node.
        code, doc = service_check()
        assert (code, doc["localEndpoints"], doc["serviceProxyHealthy"]) == (200, 1, True)
    finally:
        lab4.put(node("zone-a"))
    lab4.wait(lambda: healthz()[0] == 200 and healthz()[1]["nodeEligible"] is True, "200")


def test_sctp_port_is_reported_with_the_kernels_reason_and_tcp_still_served(lab4: Lab4) -> None:
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
             {"name": "sig", "port": 3868, "protocol": "SCTP", "targetPort": 3868}]
    lab4.put(service("mixed", "10.96.1.9", ports),
             slice_("mixed", [lab4.endpoint("pod-c")],
                    [*HTTP_EP, {"name": "sig", "port": 3868, "protocol": "SCTP"}]))

    def errors() -> list[str]:
        for s in lab4.status()["services"]:
            if s["name"] == "default/mixed":
                return s["errors"]  # type: ignore[no-any-return]
        raise KeyError("mixed")

    lab4.wait(lambda: bool(errors()), "the SCTP port to be reported")
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        kernel_has_sctp = True
    except OSError:
        kernel_has_sctp = False
    (error,) = errors()
    assert error.startswith("port default/mixed:sig: SCTP port not served")
    assert ("this kernel has no SCTP" in error) is not kernel_has_sctp
    assert set(lab4.spread("http://10.96.1.9/", 3)) == {"pod-c"}
