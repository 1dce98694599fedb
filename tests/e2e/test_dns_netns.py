"""Cluster DNS end to end: `kubeshim run` in a node namespace, a client namespace resolving short
names through the glibc resolver (and a musl-built getaddrinfo client) with the kubelet's search
path, like a pod.

The client's resolv.conf is what the kubelet writes for a pod in namespace `default`
(`search default.svc.<zone> svc.<zone> <zone>`, `options ndots:5`, the node's DNS address).
kubeshim serves a node-local link-local address (169.254.20.10, NodeLocal DNSCache's), never
the node's own address, and only for the allowed clients (10.244.0.0/25 here): an outsider
on 10.244.0.200 gets REFUSED.
An upstream (dnsmasq in its own namespace) answers one outside name. The daemon serves a
manifest folder with the proxy in interface mode, so `curl http://web/` reaches a pod.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import NODE_IP, Lab, Netns

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ZONE = "cluster.local"
OUTSIDE = ("outside.example", "192.0.2.55")
LINK_LOCAL = "169.254.20.10"
RESOLV_CONF = (
    f"search default.svc.{ZONE} svc.{ZONE} {ZONE}\nnameserver {LINK_LOCAL}\noptions ndots:5\n"
)
OUTSIDER = "10.244.0.200"  # on the node's bridge, outside the allowed 10.244.0.0/25
MANY = [f"10.245.0.{i}" for i in range(1, 101)]  # a headless Service's 100 endpoints
V6_EDGES = ["2001:db8:3333:4444:5555:6666::", "::1"]
UDP53 = "10.96.0.53"  # a UDP Service on port 53, served beside kubeshim's DNS


def service(name: str, cluster_ip: str, port: int = 80, target: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": port, "targetPort": target}],
        },
    }


def endpoint_slice(
    svc: str, pods: list[tuple[str, str | None]], address_type: str = "IPv4"
) -> dict[str, Any]:
    endpoints = []
    for ip, hostname in pods:
        ep: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": True}}
        if hostname:
            ep["hostname"] = hostname
        endpoints.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def udp53_service(pod_ip: str) -> list[dict[str, Any]]:
    """A UDP Service on port 53 (an application's own DNS, say), backed by pod-a's 5353."""
    port = {"name": "dns", "port": 53, "protocol": "UDP"}
    svc = service("udp53", UDP53)
    svc["spec"]["ports"] = [{**port, "targetPort": 5353}]
    eps = endpoint_slice("udp53", [(pod_ip, None)])
    eps["ports"] = [{**port, "port": 5353}]
    return [svc, eps]


class Node:
    def __init__(self, lab: Lab, folder: Path) -> None:
        self.lab = lab
        self.folder = folder
        self.pods: dict[str, Netns] = {}

    @property
    def client(self) -> Netns:
        return self.lab.hosts["client"]

    def write(self, name: str, *docs: dict[str, Any]) -> None:
        path = self.folder / f"{name}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(docs))
        tmp.rename(path)

    def getent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client.run(["getent", *args], check=False, timeout=20)

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}")


def require_tools() -> None:
    for tool in ("getent", "curl", "dnsmasq", "dig"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed for the DNS end-to-end tests")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_tools()
    with Lab("dns") as lab:
        folder = tmp_path_factory.mktemp("manifests")
        n = Node(lab, folder)
        for name in ("pod-a", "pod-b"):
            pod = n.pods[name] = lab.add_host(name)
            pod.popen([sys.executable, str(ROOT / "tests/e2e/proxy_backend.py"), name])
        # pod-a also answers UDP on 5353 with its name: the backend of a UDP Service on port 53.
        n.pods["pod-a"].popen(["socat", "UDP4-RECVFROM:5353,fork", "SYSTEM:echo pod-a"])
        upstream = lab.add_host("upstream")
        upstream.popen(
            [
                "dnsmasq",
                "-k",
                "-C",
                "/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file",
                "--user=root",
                "-p",
                "53",
                f"--address=/{OUTSIDE[0]}/{OUTSIDE[1]}",
            ]
        )
        client = lab.add_host("client")
        client.write_resolv_conf(RESOLV_CONF)
        outsider = lab.add_host("outsider", ip=OUTSIDER)
        outsider.write_resolv_conf(RESOLV_CONF)
        lab.node.run(["ip", "addr", "add", f"{LINK_LOCAL}/32", "dev", "lo"])
        n.write("udp53", *udp53_service(n.pods["pod-a"].ip))
        many = endpoint_slice("many", [(ip, None) for ip in MANY])
        n.write("many", service("many", "None"), many)
        n.write(
            "v6",
            service("v6", "None"),
            endpoint_slice("v6", [(ip, None) for ip in V6_EDGES], address_type="IPv6"),
        )
        a, b = n.pods["pod-a"].ip, n.pods["pod-b"].ip
        n.write("web", service("web", "10.96.0.20"), endpoint_slice("web", [(a, None), (b, None)]))
        n.write("db", service("db", "None"), endpoint_slice("db", [(a, "db-0"), (b, "db-1")]))
        n.write(
            "ext",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": OUTSIDE[0]},
            },
        )
        for pod in n.pods.values():
            pod.wait_port("", 8080)
        upstream.wait_port("", 53, "udp")
        log_path = folder.parent / "kubeshim.log"
        with open(log_path, "w") as log_file:
            daemon = lab.node.popen(
                [
                    sys.executable,
                    "-m",
                    "kubeshim",
                    "run",
                    "--manifests",
                    str(folder),
                    "--vip-mode",
                    "interface",
                    "--hostname-override",
                    "node-1",
                    "--dns-bind",
                    f"{LINK_LOCAL}:53",
                    "--dns-allowed-client",
                    "10.244.0.0/25",
                    "--cluster-domain",
                    ZONE,
                    "--upstream",
                    f"{upstream.ip}:53",
                    "--dns-negative-ttl",
                    "2",
                    "--healthz-bind-address",
                    "",
                    "--metrics-bind-address",
                    "",
                ],
                cwd=ROOT,
                stderr=log_file,
            )
        try:
            lab.node.wait_port(LINK_LOCAL, 53, "udp", timeout=20)
            n.wait(lambda: n.getent("hosts", "web").returncode == 0, "web to resolve")
        except (TimeoutError, AssertionError):
            print(log_path.read_text())
            raise
        yield n
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(15)
        log = log_path.read_text()
        assert "Traceback" not in log, log


def test_short_service_name_through_the_search_path(node: Node) -> None:
    out = node.getent("hosts", "web")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10.96.0.20", f"web.default.svc.{ZONE}"]
    out = node.getent("hosts", "web.default")  # the second search domain
    assert out.stdout.split()[0] == "10.96.0.20"


def test_headless_service_and_its_pods_by_hostname(node: Node) -> None:
    a, b = node.pods["pod-a"].ip, node.pods["pod-b"].ip
    out = node.getent("ahostsv4", "db")
    assert {line.split()[0] for line in out.stdout.splitlines()} == {a, b}
    out = node.getent("hosts", "db-1.db")
    assert out.stdout.split() == [b, f"db-1.db.default.svc.{ZONE}"]


def test_outside_names_are_forwarded_and_missing_names_fail(node: Node) -> None:
    out = node.getent("hosts", OUTSIDE[0])
    assert out.returncode == 0 and out.stdout.split()[0] == OUTSIDE[1]
    assert node.getent("hosts", "nope").returncode == 2  # not found, after every search domain


def test_external_name_resolves_to_its_target(node: Node) -> None:
    out = node.getent("ahostsv4", "ext")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == OUTSIDE[1]


def test_curl_by_service_name_reaches_a_pod(node: Node) -> None:
    seen = set()
    for _ in range(4):
        out = node.client.run(
            ["curl", "-sS", "--max-time", "5", "-H", "Connection: close", "http://web/"]
        )
        seen.add(out.stdout.strip())
    assert seen == {"pod-a", "pod-b"}
    out = node.client.run(["curl", "-sS", "--max-time", "5", "http://db-0.db:8080/"])
    assert out.stdout.strip() == "pod-a"


def test_new_service_resolves_after_a_manifest_edit(node: Node) -> None:
    assert node.getent("hosts", "api").returncode == 2
    node.write(
        "api", service("api", "10.96.0.30"), endpoint_slice("api", [(node.pods["pod-b"].ip, None)])
    )
    node.wait(lambda: node.getent("hosts", "api").returncode == 0, "api to resolve")
    assert node.getent("hosts", "api").stdout.split()[0] == "10.96.0.30"
    (node.folder / "api.yaml").unlink()
    node.wait(lambda: node.getent("hosts", "api").returncode == 2, "api to disappear")


def musl_resolver(tmp: Path) -> Path:
    """tests/e2e/musl_resolve.c built statically against musl (Debian's musl-tools)."""
    if shutil.which("musl-gcc") is None:
        pytest.fail("musl-gcc is needed (apt-get install musl-tools; scripts/setup.sh does)")
    binary = tmp / "musl_resolve"
    subprocess.run(
        ["musl-gcc", "-static", "-O2", "-o", str(binary), str(ROOT / "tests/e2e/musl_resolve.c")],
        check=True,
    )
    return binary


def test_musl_client_gets_addresses_of_a_headless_service_with_100_endpoints(
    node: Node, tmp_path: Path
) -> None:
    # musl (before 1.2.4) asks over UDP with a 512-byte buffer and never retries over TCP:
    # it gets exactly the whole records the truncated reply carries.
    out = node.client.run([str(musl_resolver(tmp_path)), "many"], check=False, timeout=20)
    assert out.returncode == 0, out.stderr
    got = out.stdout.split()
    # 29 A records fit 512 bytes beside `many.default.svc.cluster.local`; the first 29.
    assert sorted(got, key=MANY.index) == MANY[:29], got


def test_glibc_resolver_gets_all_100_endpoints_over_tcp_after_truncation(node: Node) -> None:
    out = node.getent("ahostsv4", "many")
    assert out.returncode == 0, out.stderr
    assert {line.split()[0] for line in out.stdout.splitlines()} == set(MANY)


def test_endpoint_names_of_ipv6_edge_addresses_are_valid_and_resolve(node: Node) -> None:
    out = node.client.run(
        ["dig", f"@{LINK_LOCAL}", "+short", "SRV", f"v6.default.svc.{ZONE}"], timeout=20
    )
    targets = sorted(line.split()[3] for line in out.stdout.splitlines())
    assert targets == [
        f"0--1.v6.default.svc.{ZONE}.",
        f"2001-db8-3333-4444-5555-6666--0.v6.default.svc.{ZONE}.",
    ]
    out = node.getent("ahostsv6", "2001-db8-3333-4444-5555-6666--0.v6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == V6_EDGES[0]


def test_outsiders_are_refused_and_the_node_address_does_not_answer(node: Node) -> None:
    outsider = node.lab.hosts["outsider"]
    for name in (f"web.default.svc.{ZONE}", OUTSIDE[0]):  # cluster names and recursion alike
        out = outsider.run(["dig", f"@{LINK_LOCAL}", "+tries=1", "+time=2", name], timeout=20)
        assert "status: REFUSED" in out.stdout, out.stdout
    assert outsider.run(["getent", "hosts", "web"], check=False, timeout=20).returncode != 0
    # Nothing listens on the node's own address: the pods' DNS is the link-local one.
    out = node.client.run(
        ["dig", f"@{NODE_IP}", "+tries=1", "+time=1", f"web.default.svc.{ZONE}"],
        check=False,
        timeout=20,
    )
    assert "status:" not in out.stdout
    out = node.client.run(["dig", f"@{LINK_LOCAL}", "+short", f"web.default.svc.{ZONE}"])
    assert out.stdout.split() == ["10.96.0.20"]


def test_a_udp_service_on_port_53_is_served_beside_the_dns_server(node: Node) -> None:
    node.lab.node.wait_port(UDP53, 53, "udp", timeout=15)
    answers = []
    for _ in range(3):  # UDP: a datagram lost on a busy machine is retried, as a client would
        out = node.client.run(["socat", "-T3", "-", f"UDP4:{UDP53}:53"], input="hello\n")
        answers.append(out.stdout.strip())
        if answers[-1]:
            break
    assert answers[-1] == "pod-a", answers
    listening = node.lab.node.run(["ss", "-lunH", "sport = :53"]).stdout
    assert "0.0.0.0:53" not in listening and "*:53" not in listening, listening
