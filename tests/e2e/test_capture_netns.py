"""tproxy mode end to end: the node namespace runs kubeshim with its nftables capture table.

The lab: pods behind the node's bridge (10.244.0.0/24), a pod routed on its own veth the way
Calico or kindnet attach one (10.244.1.5/32), and, on a second segment (192.168.50.0/24), an
off-node client and an on-link neighbour. Real traffic (curl, socat, dig, ping, a UDP socket)
checks what kube-proxy does in the kernel: exact tuples captured, other ports rejected, no
endpoints refused at once, Local policies dropping, source ranges, ipMode Proxy, NodePorts on
any current address, locally originated traffic, client addresses kept, no ARP for Service
addresses, and host programs on Service ports untouched.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.daemon import ROOT
from tests.netns import NODE_IP, OUTSIDE_NODE_IP, Lab
from tests.nodelab import (
    DNS,
    HTTP,
    HTTP_EP,
    METRICS,
    NODE,
    OTHER,
    ROUTED_POD,
    Cluster,
    serve_dns,
)
from tests.proxy_helpers import endpoint, endpoint_slice, service

pytestmark = pytest.mark.e2e

CLIENT = "192.168.50.2"
NEIGHBOUR = "192.168.50.3"
EXTERNAL_IP = "192.168.50.7"  # on the outside segment, like an L2-announced address
LB_IP = "192.168.77.8"
PROXY_LB_IP = "192.168.77.9"
LOCAL_LB_IP = "192.168.77.20"
FW_LB_IP = "192.168.77.30"
SRC_LB_IP = "192.168.77.40"
KUBE_DNS = "10.96.0.100"
ZONE = "cluster.local"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Lab("cap") as lab:
        c = Cluster(lab, tmp_path_factory.mktemp("manifests"))
        for name in ("pod-a", "pod-b"):
            c.add_pod(name)
        c.add_pod("pod-r", ROUTED_POD, routed=True)
        serve_dns(c.pods["pod-b"], "who.test", "10.1.0.2")
        lab.add_host("client")  # a pod on the bridge, the "client" Cluster expects
        lab.add_outside("outside", CLIENT)
        lab.add_outside("neighbour", NEIGHBOUR)
        lab.node.run(["ip", "route", "add", "default", "via", CLIENT])
        # br_netfilter runs the capture rules in the bridge pass (bridged traffic is NATed to
        # the redirect listeners), as on clusters with a bridge CNI.
        c.bridge_with_netfilter()
        # Announced routes: the outside reaches the LoadBalancer range and the externalIP
        # through the node (the externalIP is on-link for the neighbour, which just asks ARP).
        lab.hosts["outside"].run(["ip", "route", "add", "192.168.77.0/24", "via", OUTSIDE_NODE_IP])
        lab.hosts["outside"].run(["ip", "route", "add", EXTERNAL_IP, "via", OUTSIDE_NODE_IP])
        build_manifests(c)
        c.wait_pods()
        # Host programs of the node on ports that Services use, and on one that none uses.
        for port in (80, 2222, 30080):
            lab.node.popen(["socat", f"TCP-LISTEN:{port},fork,reuseaddr", "SYSTEM:echo host"])
        lab.node.popen(["socat", "UDP-RECVFROM:53,fork,reuseaddr", "SYSTEM:echo host"])
        with c.running("--vip-mode", "tproxy", "--hostname-override", NODE,
                       "--dns-transparent-bind", f"{KUBE_DNS}:53", "--upstream", "127.0.0.1:9",
                       "--cluster-cidr", "10.244.0.0/16", "--drain-timeout", "2",
                       ready=lambda: len(c.status()["services"]) == 10
                       and c.all_processes_serving()):
            yield c


def build_manifests(c: Cluster) -> None:
    def ep(pod: str, node: str = NODE) -> dict[str, Any]:
        return endpoint(c.ip(pod), node=node)

    c.put(
        service("web", "10.96.0.10", [{**HTTP[0], "nodePort": 30080}], type="LoadBalancer",
                externalIPs=[EXTERNAL_IP],
                status={"loadBalancer": {"ingress": [{"ip": LB_IP},
                                                     {"ip": PROXY_LB_IP, "ipMode": "Proxy"}]}}),
        endpoint_slice("web", [ep("pod-a"), ep("pod-b")], HTTP_EP),
        service("empty", "10.96.0.15", [HTTP[0], {**DNS[0], "targetPort": 53}]),
        endpoint_slice("empty", [], HTTP_EP),
        service("local-lb", "10.96.0.20", [{**HTTP[0], "nodePort": 30090}], type="LoadBalancer",
                externalTrafficPolicy="Local",
                status={"loadBalancer": {"ingress": [{"ip": LOCAL_LB_IP}]}}),
        endpoint_slice("local-lb", [ep("pod-b", OTHER)], HTTP_EP),
        service("fw", "10.96.0.30", HTTP, type="LoadBalancer",
                loadBalancerSourceRanges=[f"{NEIGHBOUR}/32", "10.244.0.0/16"],
                status={"loadBalancer": {"ingress": [{"ip": FW_LB_IP}]}}),
        endpoint_slice("fw", [ep("pod-a")], HTTP_EP),
        service("src", "10.96.0.40", HTTP, type="LoadBalancer", externalTrafficPolicy="Local",
                status={"loadBalancer": {"ingress": [{"ip": SRC_LB_IP}]}}),
        endpoint_slice("src", [ep("pod-r")], HTTP_EP),
        service("dns", "10.96.0.53", DNS),
        endpoint_slice("dns", [ep("pod-b")], DNS),
        service("ssh", "10.96.0.60", [{"name": "ssh", "port": 2222, "protocol": "TCP",
                                       "targetPort": 8080}]),
        endpoint_slice("ssh", [ep("pod-a")], [{"name": "ssh", "port": 8080, "protocol": "TCP"}]),
        service("loop", "10.96.0.70", HTTP),
        endpoint_slice("loop", [endpoint("10.96.0.10")], HTTP_EP),
        service("later", "10.96.0.80", HTTP),
        endpoint_slice("later", [ep("pod-a")], HTTP_EP),
        # kube-dns without endpoints: its ClusterIP tuples go to kubeshim's own DNS server.
        service("kube-dns", KUBE_DNS, [{"name": "dns", "port": 53, "protocol": "UDP"},
                                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
        endpoint_slice("kube-dns", [], [{"name": "dns", "port": 53, "protocol": "UDP"}]),
    )


def capture_of(c: Cluster, service_name: str) -> dict[str, str]:
    for s in c.status()["services"]:
        if s["name"] == f"default/{service_name}":
            return {e["address"]: e["verdict"] for p in s["ports"] for e in p.get("capture", [])}
    raise KeyError(service_name)


def test_service_tuples_reach_endpoints_from_pods_outside_and_the_node(cluster: Cluster) -> None:
    for ns, url in (("client", "http://10.96.0.10/"), ("outside", f"http://{LB_IP}/"),
                    ("outside", f"http://{EXTERNAL_IP}/"),
                    ("outside", f"http://{OUTSIDE_NODE_IP}:30080/"),
                    ("node", "http://10.96.0.10/"), ("node", f"http://{NODE_IP}:30080/")):
        answers = {cluster.timed_curl(ns, url)[1] for _ in range(4)}
        assert answers == {"pod-a", "pod-b"}, (ns, url, answers)


def test_no_service_address_is_local(cluster: Cluster) -> None:
    addrs = cluster.lab.node.run(["ip", "-o", "addr"]).stdout
    for ip in ("10.96.0.10", EXTERNAL_IP, LB_IP):
        assert ip not in addrs
    assert "kubeshim0" not in cluster.lab.node.run(["ip", "-o", "link"]).stdout


def test_host_program_on_a_service_port_is_not_reachable_through_service_addresses(
        cluster: Cluster) -> None:
    # Other ports of a ClusterIP are rejected at once, as kube-proxy's cluster-ips-check does;
    # an externalIP or LB IP is just not an address of the node.
    code, body, took = cluster.timed_curl("client", "http://10.96.0.10:2222/")
    assert code == 7 and took < 1.0, (code, body)
    code, body, _ = cluster.timed_curl("outside", f"http://{EXTERNAL_IP}:2222/", timeout=2)
    assert code != 0 and "host" not in body
    code, body, _ = cluster.timed_curl("outside", f"http://{LB_IP}:2222/", timeout=2)
    assert code != 0 and "host" not in body
    # The Service port itself goes to the endpoint, never to the host program on it ...
    assert cluster.timed_curl("client", "http://10.96.0.60:2222/")[1] == "pod-a"
    # ... which still works on the node's own address (it could bind 0.0.0.0:2222 at all).
    out = cluster.client.run(["socat", "-T2", "-", f"TCP:{NODE_IP}:2222"], input="")
    assert out.stdout.strip() == "host"


def test_udp_service_port_and_host_program_on_port_53_both_work(cluster: Cluster) -> None:
    out = cluster.client.run(["dig", "+short", "+tries=1", "+time=2", "@10.96.0.53",
                              "who.test", "A"])
    assert out.stdout.strip() == "10.1.0.2"
    # The host's UDP :53 program answers on the node address.
    out = cluster.client.run(["socat", "-T2", "-", f"UDP:{NODE_IP}:53"], input="x\n")
    assert out.stdout.strip() == "host"


def test_kube_dns_clusterip_answered_by_the_dns_server_through_the_capture(
        cluster: Cluster) -> None:
    name = f"web.default.svc.{ZONE}"
    for where in (cluster.client, cluster.lab.node):
        for transport in ("+notcp", "+tcp"):
            out = where.run(["dig", f"@{KUBE_DNS}", transport, "+short", "+tries=1", "+time=2",
                             name])
            assert out.stdout.split() == ["10.96.0.10"], (where.name, transport, out.stdout)
    # Nothing listens on port 53 of a node address or of all addresses for it.
    listening = cluster.lab.node.run(["ss", "-lntuH", "sport = :53"]).stdout
    assert f"{KUBE_DNS}:53" in listening and NODE_IP not in listening


def test_no_arp_reply_for_service_addresses(cluster: Cluster) -> None:
    neighbour = cluster.lab.hosts["neighbour"]
    neighbour.run(["ping", "-c1", "-W1", EXTERNAL_IP], check=False)
    neighbour.run(["ping", "-c1", "-W1", OUTSIDE_NODE_IP])
    neigh = neighbour.run(["ip", "neigh", "show"]).stdout
    lines = {line.split()[0]: line for line in neigh.splitlines()}
    assert "lladdr" in lines[OUTSIDE_NODE_IP]  # the node answers for its own address
    assert "lladdr" not in lines.get(EXTERNAL_IP, "FAILED"), neigh


def test_no_endpoints_refused_at_once_tcp_and_udp(cluster: Cluster) -> None:
    code, _, took = cluster.timed_curl("client", "http://10.96.0.15/")
    assert code == 7 and took < 1.0  # connect() refused: the SYN got a reset
    probe = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "s.connect(('10.96.0.15', 53)); s.send(b'x')\n"
        "try:\n    s.recv(10)\nexcept OSError as e:\n    print(type(e).__name__)\n")
    out = cluster.client.run([sys.executable, "-c", probe])
    assert out.stdout.strip() == "ConnectionRefusedError"  # ICMP port unreachable
    assert capture_of(cluster, "empty") == {"10.96.0.15:80/TCP": "rejected",
                                            "10.96.0.15:53/UDP": "rejected"}


def test_verdict_flips_as_a_port_gains_and_loses_its_endpoints(cluster: Cluster) -> None:
    pod_a = [endpoint(cluster.ip("pod-a"), node=NODE)]
    cluster.put(service("flip", "10.96.0.16", HTTP), endpoint_slice("flip", pod_a, HTTP_EP))
    cluster.wait(lambda: capture_of(cluster, "flip") == {"10.96.0.16:80/TCP": "captured"},
                 "the flip service")
    assert cluster.timed_curl("client", "http://10.96.0.16/")[1] == "pod-a"
    for endpoints, verdict in (([], "rejected"), (pod_a, "captured"), ([], "rejected")):
        cluster.put(endpoint_slice("flip", endpoints, HTTP_EP))
        cluster.wait(lambda v=verdict: capture_of(cluster, "flip")  # type: ignore[misc]
                     == {"10.96.0.16:80/TCP": v}, f"the verdict {verdict}")
        code, body, took = cluster.timed_curl("client", "http://10.96.0.16/")
        assert (code, body) == ((7, "") if verdict == "rejected" else (0, "pod-a")), (code, body)
        assert took < 1.0
    # The element changes went through libnftables in-process (pip-nftables is a dependency).
    assert cluster.status()["capture"]["appliedWith"] == "libnftables"


TRANSACTION = r"""
import sys
from kubeshim.proxy.nft import Nft
nft = Nft(library=sys.argv[1] == "library")
print(nft.backend)
table = "inet kubeshim-nft-test"
assert nft.run(f"add table {table}\nadd set {table} s {{ type ipv4_addr; }}\n") == (0, "")
# One batch: the bad second line leaves the first unapplied too.
rc, err = nft.run(f"add element {table} s {{ 10.1.0.1 }}\nadd element {table} nosuch {{ 1 }}\n")
print(rc != 0, "No such file or directory" in err)
assert nft.run(f"add element {table} s {{ 10.1.0.2 }}\n") == (0, "")
print(nft.run(f"delete element {table} s {{ 10.1.0.1 }}\n")[0])
assert nft.run(f"delete table {table}\n") == (0, "")
"""


@pytest.mark.parametrize("how", ["library", "program"])
def test_transactions_apply_whole_or_not_at_all(cluster: Cluster, how: str) -> None:
    out = cluster.lab.node.run([sys.executable, "-c", TRANSACTION, how], cwd=ROOT,
                               check=False)
    assert out.returncode == 0, out.stderr
    backend, failed, deleted = out.stdout.splitlines()
    assert backend == ("libnftables" if how == "library" else "nft -f -")
    assert failed.split() == ["True", "True"]  # failed, with the kernel's reason
    assert deleted != "0"  # 10.1.0.1 was never added


def test_local_policy_without_local_endpoint_drops_outside_but_serves_node_and_pods(
        cluster: Cluster) -> None:
    code, _, took = cluster.timed_curl("outside", f"http://{LOCAL_LB_IP}/", timeout=2)
    assert code == 28 and took >= 1.9  # dropped: the client times out
    code, _, _ = cluster.timed_curl("outside", f"http://{OUTSIDE_NODE_IP}:30090/", timeout=2)
    assert code == 28
    # kube-proxy short-circuits the node's own and its pods' traffic to cluster endpoints.
    assert cluster.timed_curl("node", f"http://{LOCAL_LB_IP}/")[1] == "pod-b"
    assert cluster.timed_curl("client", f"http://{LOCAL_LB_IP}/")[1] == "pod-b"
    assert capture_of(cluster, "local-lb")[f"{LOCAL_LB_IP}:80/TCP"] == "local-only"


def test_load_balancer_source_ranges(cluster: Cluster) -> None:
    code, _, _ = cluster.timed_curl("outside", f"http://{FW_LB_IP}/", timeout=2)
    assert code == 28  # 192.168.50.2 is outside the ranges: dropped
    neighbour = cluster.lab.hosts["neighbour"]
    neighbour.run(["ip", "route", "add", "192.168.77.0/24", "via", OUTSIDE_NODE_IP])
    out = neighbour.run(["curl", "-sS", "--max-time", "3", f"http://{FW_LB_IP}/"])
    assert out.stdout.strip() == "pod-a"
    # The ranges are for the LoadBalancer IP; the ClusterIP is not filtered.
    assert cluster.timed_curl("client", "http://10.96.0.30/")[1] == "pod-a"


def test_ip_mode_proxy_is_not_captured(cluster: Cluster) -> None:
    code, body, _ = cluster.timed_curl("outside", f"http://{PROXY_LB_IP}/", timeout=2)
    assert code != 0 and body == ""
    assert capture_of(cluster, "web")[f"{PROXY_LB_IP}:80/TCP"] == "not-captured"
    rules = cluster.lab.node.run(["nft", "list", "table", "inet", "kubeshim"]).stdout
    assert PROXY_LB_IP not in rules and LB_IP in rules


def test_node_port_on_an_address_added_after_start_and_over_a_host_socket(
        cluster: Cluster) -> None:
    # socat listens on 0.0.0.0:30080 in the node namespace since before kubeshim started.
    cluster.lab.node.run(["ip", "addr", "add", "192.168.50.77/24", "dev", "ext0"])
    assert {cluster.timed_curl("outside", "http://192.168.50.77:30080/")[1]
            for _ in range(4)} == {"pod-a", "pod-b"}


def test_endpoint_sees_the_client_address_where_kube_proxy_keeps_it(cluster: Cluster) -> None:
    # A pod of this node to a ClusterIP: the pod's own address.
    assert cluster.timed_curl("client", "http://10.96.0.40/peer")[1] == cluster.client.ip
    # External traffic under externalTrafficPolicy Local: the client's own address.
    assert cluster.timed_curl("outside", f"http://{SRC_LB_IP}/peer")[1] == CLIENT
    # Where kube-proxy masquerades, the node's address: the node itself, and external
    # traffic under policy Cluster.
    assert cluster.timed_curl("node", "http://10.96.0.40/peer")[1] != CLIENT
    assert cluster.timed_curl("outside", f"http://{LB_IP}/peer")[1] == NODE_IP


def test_endpoint_that_is_a_service_address_is_refused_with_a_status_error(
        cluster: Cluster) -> None:
    errors = [s["errors"] for s in cluster.status()["services"] if s["name"] == "default/loop"]
    assert errors and any("10.96.0.10 is a Service address" in e for e in errors[0]), errors
    code, _, took = cluster.timed_curl("client", "http://10.96.0.70/")
    assert code in (7, 52, 56) and took < 2.0


def test_new_service_captured_and_state_shown(cluster: Cluster) -> None:
    cluster.put(service("new", "10.96.0.90", HTTP),
                endpoint_slice("new", [endpoint(cluster.ip("pod-b"), node=NODE)], HTTP_EP))
    cluster.wait(lambda: capture_of(cluster, "new") == {"10.96.0.90:80/TCP": "captured"},
                 "the new service")
    assert cluster.timed_curl("client", "http://10.96.0.90/")[1] == "pod-b"
    out = cluster.lab.node.run([sys.executable, "-m", "kubeshim", "status",
                                "--address", METRICS], cwd=ROOT).stdout
    assert "captured" in out and "10.96.0.90:80/TCP" in out, out


def test_shutdown_removes_the_table_and_the_policy_route(cluster: Cluster) -> None:
    assert cluster.stop() == 0
    out = cluster.lab.node.run(["nft", "list", "tables"]).stdout
    assert "kubeshim" not in out
    assert "0x4b53" not in cluster.lab.node.run(["ip", "rule"]).stdout
    # Gone with it: nothing answers on the ClusterIP any more.
    with socket.socket() as _:
        pass
    code, _, _ = cluster.timed_curl("client", "http://10.96.0.10/", timeout=1)
    assert code != 0
