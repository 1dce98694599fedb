"""The kube-dns ClusterIP answered on the node itself: kubeshim's DNS on a transparent bind
(`--dns-transparent-bind 10.96.0.10:53`, IP_TRANSPARENT) receives what a TPROXY rule in the
node hands it, the way a capture layer or NodeLocal DNSCache intercepts the cluster DNS
address. The rule and its policy route are the test's own, in the node namespace it creates.
A pod namespace resolves through the ClusterIP with the glibc resolver, over UDP and TCP, and
nothing listens on the node's own address or on all addresses."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_dns_netns import endpoint_slice, service

from tests.netns import NODE_IP, OUTSIDE_NODE_IP, Lab, Netns

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ZONE = "cluster.local"
KUBE_DNS = "10.96.0.10"
NFT = f"""
table ip dnscapture {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "br0" ip daddr {KUBE_DNS} meta l4proto {{ tcp, udp }} th dport 53 \\
            tproxy to {KUBE_DNS}:53 meta mark set 0x53 accept
    }}
}}
"""


def wait_resolving(pod: Netns, log_path: Path, timeout: float = 20) -> None:
    """Until the pod's resolver (glibc, its resolv.conf) gets the web Service; the daemon's log
    on failure."""
    deadline = time.monotonic() + timeout
    while pod.run(["getent", "hosts", "web"], check=False).returncode != 0:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Netns]]:
    for tool in ("nft", "getent", "dig"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed for this test")
    folder = tmp_path_factory.mktemp("manifests")
    with Lab("dnstp") as lab:
        pod = lab.add_host("pod")
        pod.write_resolv_conf(
            f"search default.svc.{ZONE} svc.{ZONE} {ZONE}\nnameserver {KUBE_DNS}\n"
            "options ndots:5\n"
        )
        (folder / "web.yaml").write_text(yaml.safe_dump_all([
            service("web", "10.96.0.20"), endpoint_slice("web", [(pod.ip, None)])
        ]))
        node = lab.node
        # br_netfilter on for the bridge (this namespace's own switch): TPROXY to the socket's
        # own tuple still delivers, as the ordinary socket lookup finds that socket.
        node.run(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"], check=False)
        node.run(["nft", "-f", "-"], input=NFT)
        node.run(["ip", "rule", "add", "fwmark", "0x53", "lookup", "153"])
        node.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "153"])
        log_path = folder.parent / "kubeshim-tp.log"
        with open(log_path, "w") as log_file:
            daemon = node.popen(
                [sys.executable, "-m", "kubeshim", "run", "--manifests", str(folder),
                 "--no-proxy", "--hostname-override", "node-1",
                 # No --cluster-cidr, no --dns-allowed-client: the pod is let in as a client
                 # on the node's own network (10.244.0.0/24 of br0), the default allow-list.
                 "--dns-transparent-bind", f"{KUBE_DNS}:53",
                 "--upstream", "127.0.0.1:9", "--healthz-bind-address", "",
                 "--metrics-bind-address", ""],
                cwd=ROOT, stderr=log_file,
            )
        node.wait_port(KUBE_DNS, 53, "udp", timeout=20)
        wait_resolving(pod, log_path)
        yield lab, pod
        daemon.terminate()
        daemon.wait(15)
        log = log_path.read_text()
        assert 'allowed="127.0.0.0/8,::1/128,10.244.0.0/24,10.96.0.10/32"' in log, log
        assert "Traceback" not in log


def test_pod_resolves_through_the_kube_dns_clusterip_on_its_node(lab: tuple[Lab, Netns]) -> None:
    _, pod = lab
    out = pod.run(["getent", "hosts", "web"])
    assert out.stdout.split() == ["10.96.0.20", f"web.default.svc.{ZONE}"]
    for transport in ("+notcp", "+tcp"):
        out = pod.run(["dig", f"@{KUBE_DNS}", transport, "+short", f"web.default.svc.{ZONE}"])
        assert out.stdout.split() == ["10.96.0.20"], transport


def test_only_the_clusterip_tuple_is_served(lab: tuple[Lab, Netns]) -> None:
    node, pod = lab[0].node, lab[1]
    listening = node.run(["ss", "-lunH", "sport = :53"]).stdout.split("\n")
    assert [line.split()[3] for line in listening if line.strip()] == [f"{KUBE_DNS}:53"]
    out = pod.run(["dig", f"@{NODE_IP}", "+tries=1", "+time=1", "web.default.svc.cluster.local"],
                  check=False)
    assert "status:" not in out.stdout  # the node's own address does not answer


def kube_dns_service() -> dict[str, object]:
    """deploy/kube-dns.yaml's shape: no selector, no endpoints; each node answers it itself."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": KUBE_DNS, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]},
    }


OUTSIDER = "192.168.50.7"


@pytest.fixture(scope="module")
def interface_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Netns]]:
    """The shipped DaemonSet's shape: interface VIP mode, the kube-dns Service without
    endpoints, the DNS server on its ClusterIP (`--dns-transparent-bind`) and nothing on the
    node's own address. No rule of the test's own: the ClusterIP is on kubeshim0."""
    folder = tmp_path_factory.mktemp("manifests-if")
    with Lab("dnsif") as lab:
        pod = lab.add_host("pod")
        pod.write_resolv_conf(
            f"search default.svc.{ZONE} svc.{ZONE} {ZONE}\nnameserver {KUBE_DNS}\n"
            "options ndots:5\n")
        outsider = lab.add_outside("outsider", OUTSIDER)
        (folder / "web.yaml").write_text(yaml.safe_dump_all([
            service("web", "10.96.0.20"), endpoint_slice("web", [(pod.ip, None)]),
            kube_dns_service()]))
        log_path = folder.parent / "kubeshim-if.log"
        with open(log_path, "w") as log_file:
            daemon = lab.node.popen(
                [sys.executable, "-m", "kubeshim", "run", "--manifests", str(folder),
                 "--vip-mode", "interface", "--hostname-override", "node-1",
                 "--cluster-cidr", "10.244.0.0/16",
                 # Pods, and the node asking the local ClusterIP (whose source is that address).
                 "--dns-allowed-client", "10.244.0.0/16",
                 "--dns-allowed-client", f"{KUBE_DNS}/32",
                 "--dns-transparent-bind", f"{KUBE_DNS}:53",
                 "--upstream", "127.0.0.1:9", "--healthz-bind-address", "",
                 "--metrics-bind-address", ""],
                cwd=ROOT, stderr=log_file)
        wait_resolving(pod, log_path)
        yield lab, outsider
        daemon.terminate()
        daemon.wait(15)
        log = log_path.read_text()
        assert "cannot serve" not in log, log
        assert "Traceback" not in log, log


def test_interface_mode_answers_the_kube_dns_clusterip_itself(
        interface_lab: tuple[Lab, Netns]) -> None:
    lab, _ = interface_lab
    pod, node = lab.hosts["pod"], lab.node
    assert pod.run(["getent", "hosts", "web"]).stdout.split() == [
        "10.96.0.20", f"web.default.svc.{ZONE}"]
    for who in (pod, node):  # a pod, and the node itself (hostNetwork Pods)
        for transport in ("+notcp", "+tcp"):
            out = who.run(["dig", f"@{KUBE_DNS}", transport, "+short", f"web.default.svc.{ZONE}"])
            assert out.stdout.split() == ["10.96.0.20"], (who.name, transport, out.stdout)
    # The DNS server holds the tuple; the proxy opened nothing there, and nothing else listens
    # on port 53 (the node's address does not answer).
    for proto in ("u", "t"):
        listening = node.run(["ss", f"-l{proto}nH", "sport = :53"]).stdout.splitlines()
        assert [line.split()[3] for line in listening if line.strip()] == [f"{KUBE_DNS}:53"]
    out = pod.run(["dig", f"@{NODE_IP}", "+tries=1", "+time=1", f"web.default.svc.{ZONE}"],
                  check=False)
    assert "status:" not in out.stdout


def test_interface_mode_refuses_clients_outside_the_allowed_cidrs(
        interface_lab: tuple[Lab, Netns]) -> None:
    lab, outsider = interface_lab
    outsider.run(["ip", "route", "add", "10.96.0.0/12", "via", OUTSIDE_NODE_IP])
    for name in ("example.org", f"web.default.svc.{ZONE}"):
        out = outsider.run(["dig", f"@{KUBE_DNS}", "+tries=1", "+time=2", name], check=False)
        assert "status: REFUSED" in out.stdout, out.stdout
    out = outsider.run(["dig", f"@{OUTSIDE_NODE_IP}", "+tries=1", "+time=1", "example.org"],
                       check=False)
    assert "status:" not in out.stdout  # nothing listens on the node's addresses
