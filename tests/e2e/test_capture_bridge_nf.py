"""tproxy mode for pods behind a bridge while br_netfilter runs the node's rules on it.

With net.bridge.bridge-nf-call-iptables=1 (bridge CNI plugins; kubeadm requires it) the prerouting
hook runs in the bridge pass, where TPROXY cannot deliver; kubeshim NATs those packets to its
redirect listeners instead (proxy/capture.py). The node namespace here has br_netfilter on for
its bridge, kubeshim runs with the default mode, and real clients (curl, dig, socat, a UDP
socket) on the bridge check that Service traffic is served, that the kernel's verdicts hold, what
the endpoint sees, and that the redirect listeners are reached only through the redirect.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import NODE_IP, OUTSIDE_NODE_IP, Lab
from tests.nodelab import (
    BACKEND,
    DNS,
    HTTP,
    HTTP_EP,
    NODE,
    OTHER,
    ROUTED_POD,
    Cluster,
    serve_dns,
)
from tests.proxy_helpers import endpoint, endpoint_slice, service

pytestmark = pytest.mark.e2e

LATE_CIDR = "192.168.50.0/24"  # a second bridge's Pods, whose bridge appears after the start
FW_LB_IP = "192.168.77.30"
KUBE_DNS = "10.96.0.100"
REDIRECT_PORT = 10266  # --capture-port's default + 1
SERVICES = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Lab("brnf") as lab:
        c = Cluster(lab, tmp_path_factory.mktemp("manifests"))
        for name in ("pod-a", "pod-b"):
            c.add_pod(name)
        c.add_pod("pod-r", ROUTED_POD, routed=True)
        serve_dns(c.pods["pod-b"], "who.test", "10.1.0.2")
        lab.add_host("client")  # a pod on the bridge
        c.bridge_with_netfilter()
        build_manifests(c)
        c.wait_pods()
        # A host program on a NodePort: the capture wins over it.
        lab.node.popen(["socat", "TCP-LISTEN:30080,fork,reuseaddr", "SYSTEM:echo host"])
        # No --vip-mode: the default as root, with br_netfilter on.
        with c.running("--hostname-override", NODE, "--cluster-cidr",
                       f"10.244.0.0/16,{LATE_CIDR}",
                       "--dns-transparent-bind", f"{KUBE_DNS}:53", "--upstream", "127.0.0.1:9",
                       "--drain-timeout", "1",
                       ready=lambda: len(c.status()["services"]) == SERVICES):
            yield c


def build_manifests(c: Cluster) -> None:
    def ep(pod: str, node: str = NODE) -> dict[str, Any]:
        return endpoint(c.ip(pod), node=node)

    c.put(
        service("web", "10.96.0.10", [{**HTTP[0], "nodePort": 30080}], type="NodePort"),
        endpoint_slice("web", [ep("pod-a"), ep("pod-b")], HTTP_EP),
        service("empty", "10.96.0.15", [HTTP[0], {**DNS[0], "targetPort": 53}]),
        endpoint_slice("empty", [], HTTP_EP),
        service("dns", "10.96.0.53", DNS),
        endpoint_slice("dns", [ep("pod-b")], DNS),
        service("on-bridge", "10.96.0.41", HTTP),
        endpoint_slice("on-bridge", [ep("pod-a")], HTTP_EP),
        service("routed", "10.96.0.42", HTTP),
        endpoint_slice("routed", [ep("pod-r")], HTTP_EP),
        # internalTrafficPolicy Local with its only endpoint on another node: dropped.
        service("local", "10.96.0.20", HTTP, internalTrafficPolicy="Local"),
        endpoint_slice("local", [ep("pod-b", OTHER)], HTTP_EP),
        service("fw", "10.96.0.30", HTTP, type="LoadBalancer",
                loadBalancerSourceRanges=[f"{ROUTED_POD}/32"],
                status={"loadBalancer": {"ingress": [{"ip": FW_LB_IP}]}}),
        endpoint_slice("fw", [ep("pod-a")], HTTP_EP),
        service("kube-dns", KUBE_DNS, [{"name": "dns", "port": 53, "protocol": "UDP"},
                                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
        endpoint_slice("kube-dns", [], [{"name": "dns", "port": 53, "protocol": "UDP"}]),
    )


UDP_PROBE = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
    "s.connect((sys.argv[1], int(sys.argv[2]))); s.send(b'x')\n"
    "try:\n    s.recv(10)\n    print('answered')\n"
    "except OSError as e:\n    print(type(e).__name__)\n")


def test_default_mode_is_tproxy_with_bridge_netfilter_on(cluster: Cluster) -> None:
    out = cluster.lab.node.run(["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"])
    assert out.stdout.strip() == "1"
    status = cluster.status()
    assert status["vipMode"] == "tproxy"
    assert status["capture"]["redirectPort"] == REDIRECT_PORT
    assert "kubeshim0" not in cluster.lab.node.run(["ip", "-o", "link"]).stdout


def test_pod_to_cluster_ip_tcp(cluster: Cluster) -> None:
    assert set(cluster.spread("http://10.96.0.10/", 8)) == {"pod-a", "pod-b"}
    # A NodePort on the bridge's address, over a host program on the same port.
    assert {cluster.timed_curl("client", f"http://{NODE_IP}:30080/")[1]
            for _ in range(4)} == {"pod-a", "pod-b"}


def test_pod_to_cluster_ip_udp(cluster: Cluster) -> None:
    # Each dig is a new flow (a new source port): each one's Service tuple comes from conntrack.
    for _ in range(3):
        out = cluster.client.run(["dig", "+short", "+tries=1", "+time=2", "@10.96.0.53",
                                  "who.test", "A"])
        assert out.stdout.strip() == "10.1.0.2"
    # One client socket, several datagrams of one flow.
    out = cluster.client.run(["socat", "-T2", "-", "UDP:10.96.0.53:53"], input="", check=False)
    assert out.returncode == 0


def test_kube_dns_cluster_ip_answered_by_the_dns_server(cluster: Cluster) -> None:
    for transport in ("+notcp", "+tcp"):
        out = cluster.client.run(["dig", f"@{KUBE_DNS}", transport, "+short", "+tries=1",
                                  "+time=2", "web.default.svc.cluster.local"])
        assert out.stdout.split() == ["10.96.0.10"], (transport, out.stdout)


def test_no_endpoints_and_other_ports_refused_at_once(cluster: Cluster) -> None:
    for url in ("http://10.96.0.15/", "http://10.96.0.10:2222/"):
        code, _, took = cluster.timed_curl("client", url)
        assert code == 7 and took < 1.0, (url, code)  # the SYN got a reset
    for address, port in (("10.96.0.15", "53"), ("10.96.0.53", "54")):
        out = cluster.client.run([sys.executable, "-c", UDP_PROBE, address, port])
        assert out.stdout.strip() == "ConnectionRefusedError", (address, port)  # ICMP


def test_local_policy_drops_and_source_ranges_filter(cluster: Cluster) -> None:
    code, _, took = cluster.timed_curl("client", "http://10.96.0.20/", timeout=2)
    assert code == 28 and took >= 1.9  # dropped: the client times out
    code, _, _ = cluster.timed_curl("client", f"http://{FW_LB_IP}/", timeout=2)
    assert code == 28  # the bridged pod is outside the ranges
    assert cluster.timed_curl("pod-r", f"http://{FW_LB_IP}/")[1] == "pod-a"


def test_endpoint_sees_what_is_documented(cluster: Cluster) -> None:
    client, routed = cluster.client.ip, ROUTED_POD
    # Client and endpoint on the node's bridge: they would talk past kubeshim, so the node's
    # address.
    assert cluster.timed_curl("client", "http://10.96.0.41/peer")[1] == NODE_IP
    # A bridged pod to a routed endpoint, and a routed pod to a bridged endpoint: their own.
    assert cluster.timed_curl("client", "http://10.96.0.42/peer")[1] == client
    assert cluster.timed_curl("pod-r", "http://10.96.0.41/peer")[1] == routed


def test_redirect_listeners_reached_only_through_the_redirect(cluster: Cluster) -> None:
    listening = cluster.lab.node.run(["ss", "-lntuH", f"sport = :{REDIRECT_PORT}"]).stdout
    assert "0.0.0.0:" in listening
    for where, address in ((cluster.client, NODE_IP), (cluster.lab.node, "127.0.0.1")):
        out = where.run(["curl", "-sS", "--max-time", "2", f"http://{address}:{REDIRECT_PORT}/"],
                        check=False)
        assert out.returncode == 7, (where.name, out.returncode)  # refused
        out = where.run([sys.executable, "-c", UDP_PROBE, address, str(REDIRECT_PORT)])
        assert out.stdout.strip() == "ConnectionRefusedError", where.name


def test_a_bridge_that_appears_after_the_start(cluster: Cluster) -> None:
    """A CNI bridge gets its address when the first Pod starts, after kubeshim did: a client and
    an endpoint behind it still get the node's address (on that bridge) towards each other."""
    lab = cluster.lab
    late = lab.add_outside("late-pod", "192.168.50.2")  # creates the ext0 bridge now
    client = lab.add_outside("late-client", "192.168.50.3")
    late.popen([sys.executable, str(BACKEND), "late-pod"])
    late.wait_port("", 8080)
    cluster.put(service("late", "10.96.0.43", HTTP),
                endpoint_slice("late", [endpoint(late.ip, node=NODE)], HTTP_EP))
    cluster.wait(lambda: any(s["name"] == "default/late" and s["ports"][0]["endpoints"]
                             for s in cluster.status()["services"]), "the late Service")
    for _ in range(4):  # each process of the node, whichever accepts
        out = client.run(["curl", "-sS", "--max-time", "3", "http://10.96.0.43/peer"],
                         check=False)
        assert out.stdout.strip() == OUTSIDE_NODE_IP, out.stderr
