"""The proxier in a node namespace, pods and a client in their own namespaces, in both root VIP
modes: interface (Service addresses on kubeshim0) and tproxy (the nftables capture table).

One lab for the module: three pods answering their own name (tests/e2e/proxy_backend.py), two
of them also running dnsmasq, a client, and the proxy running on a manifest folder in the node
namespace. Traffic goes from the client's namespace to ClusterIPs, NodePorts, externalIPs and
LoadBalancer ingress IPs through the node, using curl, wrk, dig and a raw socket.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import NODE_IP, Lab
from tests.nodelab import Cluster, serve_dns
from tests.proxy_helpers import endpoint, endpoint_slice, service

pytestmark = pytest.mark.e2e

NODE = "node-1"
OTHER = "node-2"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
EXTERNAL_IP = "192.168.77.7"
LB_IP = "192.168.77.8"
POD6 = "fd00:244::"  # the lab's IPv6 pod network; the node is ::1 of it
NODE_IP6 = f"{POD6}1"


def enable_ipv6(lab: Lab) -> dict[str, str]:
    """Give the node's bridge and every host an IPv6 address too (dual-stack pods)."""
    lab.node.run(["ip", "-6", "addr", "add", f"{NODE_IP6}/64", "dev", "br0", "nodad"])
    out = {}
    for name, host in lab.hosts.items():
        ip6 = f"{POD6}{host.ip.rsplit('.', 1)[1]}"
        host.run(["ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
        host.run(["ip", "-6", "route", "add", "default", "via", NODE_IP6])
        out[name] = ip6
    return out


def pod_endpoint(cluster: Cluster, pod: str, **kw: Any) -> dict[str, Any]:
    return endpoint(cluster.ip(pod), **kw)


@pytest.fixture(scope="module", params=["interface", "tproxy"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    mode: str = request.param
    with Lab("px" + mode[0]) as lab:
        c = Cluster(lab, tmp_path_factory.mktemp("manifests"))
        c.mode = mode
        if mode == "tproxy":
            c.bridge_with_netfilter()
        for name in ("pod-a", "pod-b", "pod-c"):
            c.add_pod(name)
        lab.add_host("client")
        c.ip6 = enable_ipv6(lab)
        serve_dns(c.pods["pod-b"], "who.test", "10.1.0.2")
        serve_dns(c.pods["pod-c"], "who.test", "10.1.0.3")
        build_manifests(c)
        c.wait_pods()
        # A leftover from an earlier run that did not shut down: cleaned at start.
        lab.node.run(["ip", "link", "add", "kubeshim0", "type", "bridge"])
        lab.node.run(["ip", "addr", "add", "10.96.99.99/32", "dev", "kubeshim0"])
        with c.running("--vip-mode", mode, "--hostname-override", NODE, "--no-dns",
                       "--udp-timeout", "30", "--drain-timeout", "2",
                       ready=lambda: len(c.status()["services"]) == 10 and not any(
                           s["errors"] for s in c.status()["services"])
                       and c.all_processes_serving()):
            yield c


def build_manifests(c: Cluster) -> None:
    a, b, cc = (lambda **kw: pod_endpoint(c, "pod-a", **kw),
                lambda **kw: pod_endpoint(c, "pod-b", **kw),
                lambda **kw: pod_endpoint(c, "pod-c", **kw))
    web_ports = [{**HTTP[0], "nodePort": 30080}]
    c.put(
        service("web", "10.96.0.10", web_ports, type="LoadBalancer", externalIPs=[EXTERNAL_IP],
                status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
        endpoint_slice("web", [a(node=NODE), b(node=NODE), cc(node=NODE)], HTTP_EP),
        service("local-int", "10.96.0.11", HTTP, internalTrafficPolicy="Local"),
        endpoint_slice("local-int", [a(node=NODE), b(node=OTHER), cc(node=OTHER)], HTTP_EP),
        service("local-ext", "10.96.0.12", [{**HTTP[0], "nodePort": 30081}], type="NodePort",
                externalTrafficPolicy="Local"),
        endpoint_slice("local-ext", [a(node=OTHER), b(node=NODE), cc(node=OTHER)], HTTP_EP),
        service("term", "10.96.0.13", HTTP),
        endpoint_slice("term", [a(ready=False, serving=True, terminating=True, node=NODE),
                                b(ready=False, serving=False, terminating=True, node=NODE),
                                cc(ready=False, serving=False, node=NODE)], HTTP_EP),
        service("sticky", "10.96.0.14", HTTP, sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 2}}),
        endpoint_slice("sticky", [a(node=NODE), b(node=NODE), cc(node=NODE)], HTTP_EP),
        service("empty", "10.96.0.15", HTTP),
        endpoint_slice("empty", [], HTTP_EP),
        service("bulk", "10.96.0.16", [{"name": "bulk", "port": 9000, "protocol": "TCP"}]),
        endpoint_slice("bulk", [a(node=NODE)], [{"name": "bulk", "port": 9000}]),
        service("load", "10.96.0.17", HTTP),
        endpoint_slice("load", [a(node=NODE), b(node=NODE), cc(node=NODE)], HTTP_EP),
        service("dual", "10.96.0.18", [{**HTTP[0], "nodePort": 30082}], type="NodePort",
                clusterIPs=["10.96.0.18", "fd00:96::18"], ipFamilies=["IPv4", "IPv6"],
                ipFamilyPolicy="RequireDualStack"),
        endpoint_slice("dual", [a(node=NODE)], HTTP_EP, suffix="v4"),
        endpoint_slice("dual", [endpoint(c.ip6["pod-b"], node=NODE)], HTTP_EP, suffix="v6",
                       address_type="IPv6"),
        service("dns", "10.96.0.53", [{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice("dns", [b(node=NODE), cc(node=NODE)],
                       [{"name": "dns", "port": 53, "protocol": "UDP"}]),
    )


def test_service_addresses_on_the_vip_interface(cluster: Cluster) -> None:
    if cluster.mode == "tproxy":  # no Service address is a local address
        addrs = cluster.lab.node.run(["ip", "-o", "addr"]).stdout
        assert not any(ip in addrs for ip in ("10.96.0.10", "10.96.0.53", EXTERNAL_IP, LB_IP))
        return
    addrs = cluster.lab.node.run(["ip", "-o", "addr", "show", "dev", "kubeshim0"]).stdout
    for ip in ("10.96.0.10", "10.96.0.53", EXTERNAL_IP, LB_IP):
        assert f"inet {ip}/32" in addrs
    routes = cluster.lab.node.run(["ip", "route", "show"]).stdout
    assert "10.96." not in routes  # /32s: no route to the service range appears


def test_stale_addresses_cleaned_at_start(cluster: Cluster) -> None:
    if cluster.mode == "tproxy":  # the whole interface of an earlier interface-mode run goes
        assert "kubeshim0" not in cluster.lab.node.run(["ip", "-o", "link"]).stdout
        return
    addrs = cluster.lab.node.run(["ip", "-o", "addr", "show", "dev", "kubeshim0"]).stdout
    assert "10.96.99.99" not in addrs and "10.96.0.10/32" in addrs


def test_cluster_ip_round_robin_spreads_evenly(cluster: Cluster) -> None:
    names = cluster.spread("http://10.96.0.10/", 30)
    assert names == {"pod-a": 10, "pod-b": 10, "pod-c": 10}


@pytest.mark.parametrize("url", [f"http://{NODE_IP}:30080/", f"http://{EXTERNAL_IP}/",
                                 f"http://{LB_IP}/"], ids=["NodePort", "externalIP", "LB ingress"])
def test_external_addresses_reach_backends(cluster: Cluster, url: str) -> None:
    assert set(cluster.curl(*[url] * 6)) == {"pod-a", "pod-b", "pod-c"}


def test_dual_stack_each_family_reaches_its_own_endpoints(cluster: Cluster) -> None:
    assert set(cluster.curl(*["http://10.96.0.18/"] * 4)) == {"pod-a"}
    assert set(cluster.curl(*["http://[fd00:96::18]/"] * 4)) == {"pod-b"}
    assert set(cluster.curl(*[f"http://[{NODE_IP6}]:30082/"] * 4)) == {"pod-b"}
    if cluster.mode == "interface":
        addrs = cluster.lab.node.run(["ip", "-o", "addr", "show", "dev", "kubeshim0"]).stdout
        assert "inet6 fd00:96::18/128" in addrs


def test_internal_traffic_policy_local_uses_node_local_endpoints(cluster: Cluster) -> None:
    assert set(cluster.curl(*["http://10.96.0.11/"] * 12)) == {"pod-a"}


def test_external_traffic_policy_local(cluster: Cluster) -> None:
    assert set(cluster.curl(*[f"http://{NODE_IP}:30081/"] * 9)) == {"pod-b"}
    # Internal traffic to the same Service still uses every endpoint.
    assert set(cluster.curl(*["http://10.96.0.12/"] * 9)) == {"pod-a", "pod-b", "pod-c"}


def test_terminating_fallback_uses_serving_terminating_endpoints(cluster: Cluster) -> None:
    assert set(cluster.curl(*["http://10.96.0.13/"] * 6)) == {"pod-a"}


def test_client_ip_affinity_pins_and_expires(cluster: Cluster) -> None:
    first = cluster.curl(*["http://10.96.0.14/"] * 6)
    assert len(set(first)) == 1
    time.sleep(2.5)  # timeoutSeconds: 2, counted from the last new connection
    second = cluster.curl(*["http://10.96.0.14/"] * 6)
    assert len(set(second)) == 1 and second[0] != first[0]


def test_no_endpoints_refuses_at_once(cluster: Cluster) -> None:
    start = time.monotonic()
    out = cluster.client.run(["curl", "-sS", "--max-time", "5", "http://10.96.0.15/"],
                             check=False)
    elapsed = time.monotonic() - start
    assert out.returncode == 7, out  # connection refused, by the kernel in both modes
    assert elapsed < 1.0
    if cluster.mode == "interface":  # the address is local, no socket sits on the port
        assert cluster.port_status("empty")["listeners"] == []
    else:  # the SYN never reaches kubeshim
        assert [e["verdict"] for e in cluster.port_status("empty")["capture"]] == ["rejected"]


BULK_CLIENT = r"""
import hashlib, socket, sys
size = 1 << 30
# Streamed from two 1 MiB blocks (never 1 GiB in memory); alternating so order errors show.
blocks = [hashlib.sha256(b"seed").digest() * (1 << 15)]
blocks.append(blocks[0][::-1])
digest = hashlib.sha256()
s = socket.create_connection(("10.96.0.16", 9000))
for i in range(size // len(blocks[0])):
    chunk = blocks[i % 2]
    s.sendall(chunk)
    digest.update(chunk)
s.shutdown(socket.SHUT_WR)  # half-close: the answer still has to come back
reply = b""
while data := s.recv(4096):
    reply += data
print(reply.decode().strip(), f"{size} {digest.hexdigest()}")
"""


def test_half_close_and_1gib_arrive_intact(cluster: Cluster) -> None:
    out = cluster.client.run([sys.executable, "-c", BULK_CLIENT], timeout=120).stdout.split()
    assert len(out) == 4 and out[:2] == out[2:], out


def test_udp_dns_through_cluster_ip_and_flow_moves(cluster: Cluster) -> None:
    def dig() -> str:
        out = cluster.client.run(["dig", "+short", "+tries=1", "+time=2", "-b",
                                  f"{cluster.client.ip}#5353", "@10.96.0.53", "who.test", "A"])
        return out.stdout.strip()

    first = dig()
    assert first in ("10.1.0.2", "10.1.0.3")
    assert [dig() for _ in range(3)] == [first] * 3  # the flow keeps its endpoint
    gone, stay = ("pod-b", "pod-c") if first == "10.1.0.2" else ("pod-c", "pod-b")
    cluster.put(endpoint_slice("dns", [pod_endpoint(cluster, stay, node=NODE)],
                               [{"name": "dns", "port": 53, "protocol": "UDP"}]))
    cluster.wait(lambda: cluster.endpoints_of("dns") == {f"{cluster.ip(stay)}:53"},
                 "the dns endpoint removal")
    assert dig() == ("10.1.0.3" if stay == "pod-c" else "10.1.0.2")


def test_endpoint_removal_under_wrk_load_has_no_errors(cluster: Cluster) -> None:
    def hits(pod: str) -> int:
        out = cluster.client.run(["curl", "-sS", f"http://{cluster.ip(pod)}:8080/hits"])
        return int(out.stdout)

    # Every request on a new connection, so new connections must follow the change.
    wrk = cluster.client.popen(["wrk", "-t1", "-c8", "-d4s", "-H", "Connection: close",
                                "http://10.96.0.17/"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    cluster.put(endpoint_slice("load", [pod_endpoint(cluster, "pod-a", node=NODE),
                                        pod_endpoint(cluster, "pod-b", node=NODE)], HTTP_EP))
    cluster.wait(lambda: len(cluster.endpoints_of("load")) == 2, "the endpoint removal")
    # A connection dialled just before the change may still deliver its request: count once
    # pod-c's hits stop moving (if new connections kept going there, they never would).
    last = hits("pod-c")
    for _ in range(25):
        time.sleep(0.2)
        if (at_removal := hits("pod-c")) == last:
            break
        last = at_removal
    else:
        raise AssertionError("pod-c keeps getting requests after its removal")
    out, _ = wrk.communicate(timeout=30)
    assert wrk.returncode == 0, out
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert requests > 100, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out
    assert hits("pod-c") == at_removal  # no new connection went to the removed endpoint
    assert at_removal > 0


def test_removed_service_loses_its_address_and_listener(cluster: Cluster) -> None:
    cluster.delete("Service/term")
    cluster.wait(lambda: all(s["name"] != "default/term" for s in cluster.status()["services"]),
                 "the service removal")
    if cluster.mode == "interface":
        addrs = cluster.lab.node.run(["ip", "-o", "addr", "show", "dev", "kubeshim0"]).stdout
        assert "10.96.0.13/" not in addrs and "10.96.0.10/32" in addrs
    else:
        # /status drops the Service when the sync takes the change; the table's transaction
        # follows in the same sync.
        def rules() -> str:
            return cluster.lab.node.run(["nft", "list", "table", "inet", "kubeshim"]).stdout

        cluster.wait(lambda: "10.96.0.13" not in rules(), "the capture entries' removal")
        assert "10.96.0.10" in rules()
    out = cluster.client.run(["curl", "-sS", "--max-time", "3", "http://10.96.0.13/"],
                             check=False)
    assert out.returncode != 0
    assert cluster.curl("http://10.96.0.10/")  # the others keep serving


def test_metrics_and_status_count_traffic(cluster: Cluster) -> None:
    web = cluster.port_status("web")
    assert web["connections"] >= 48 and web["bytesOut"] > 0
    if cluster.mode == "tproxy":
        assert web["listeners"] == []
        assert {e["address"]: e["verdict"] for e in web["capture"]} == {
            "10.96.0.10:80/TCP": "captured", "*:30080/TCP": "captured",
            f"{EXTERNAL_IP}:80/TCP": "captured", f"{LB_IP}:80/TCP": "captured"}
        return
    assert web["listeners"] == sorted(["10.96.0.10:80/TCP", f"{NODE_IP}:30080/TCP",
                                       "127.0.0.1:30080/TCP", f"{EXTERNAL_IP}:80/TCP",
                                       f"{LB_IP}:80/TCP"])


def test_prometheus_metrics(cluster: Cluster) -> None:
    out = cluster.metrics()
    assert re.search(r'kubeshim_proxy_connections_total\{port="http",protocol="TCP",'
                     r'service="default/web"\} [1-9]', out), out[:2000]
    assert re.search(r"kubeproxy_sync_proxy_rules_duration_seconds_count [1-9]", out)
    assert re.search(r"kubeproxy_network_programming_duration_seconds_count [1-9]", out)
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in out


def test_shutdown_removes_service_addresses(cluster: Cluster) -> None:
    assert cluster.stop() == 0
    out = cluster.lab.node.run(["ip", "-o", "addr"]).stdout
    assert "10.96.0.10" not in out and EXTERNAL_IP not in out
    assert "kubeshim" not in cluster.lab.node.run(["nft", "list", "tables"]).stdout
