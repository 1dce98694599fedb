"""The Kubernetes programs themselves as contenders: kube-proxy in nftables mode and CoreDNS
(kubernetes + cache plugins), both fed by a real etcd + kube-apiserver (tests/peers/cluster.py,
binaries from tests/peers/build.sh). Everything runs inside the bench's namespace; kube-proxy's
nftables table is that namespace's own. If a peer cannot run, the caller records why.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from .contenders import UPSTREAM_DNS, Contender
from .lab import POD_IP, BenchError, Lab, wait_dns, wait_tcp
from .workload import DATA_SERVICES, NAMESPACE, DNSRecords, endpoint_slice, service

REPO = Path(__file__).resolve().parent.parent
COREDNS = ("127.0.2.3", 53)
KP_OFFSET = 100  # kube-proxy's Services use 10.96.0.(x+100): the nftables-dnat contender has x


def _kp_ip(ip: str) -> str:
    a, b, c, d = ip.split(".")
    return f"{a}.{b}.{c}.{int(d) + KP_OFFSET}"


class Peers:
    """A started control plane plus the peer processes started against it."""

    def __init__(self, lab: Lab) -> None:
        sys.path.insert(0, str(REPO))
        from tests.peers.cluster import ControlPlane, PeersMissing

        self.lab = lab
        self.cp: Any = None
        try:
            cp = ControlPlane(lab.workdir / "control-plane")
            cp.start()
        except (PeersMissing, RuntimeError, OSError) as e:
            raise BenchError(f"real control plane (tests/peers) did not start: {e}") from e
        self.cp = cp

    def close(self) -> None:
        if self.cp is not None:
            self.cp.stop()
            self.cp = None

    def create(self, objects: list[dict[str, Any]]) -> None:
        status, body = self.cp.request("POST", "/api/v1/namespaces", self.cp.admin_token,
                                       {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": NAMESPACE}})
        if status not in (201, 409):
            raise BenchError(f"create namespace {NAMESPACE}: HTTP {status}: {body}")
        # kube-proxy waits (up to 30 s) for its Node before programming anything.
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "bench-node", "labels": {"kubernetes.io/hostname":
                                                              "bench-node"}},
                "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": POD_IP}]}}
        status, body = self.cp.request("POST", "/api/v1/nodes", self.cp.admin_token, node)
        if status not in (201, 409):
            raise BenchError(f"create node bench-node: HTTP {status}: {body}")
        for obj in objects:
            obj = copy.deepcopy(obj)
            obj["metadata"].pop("uid", None)
            path = (f"/api/v1/namespaces/{NAMESPACE}/services" if obj["kind"] == "Service"
                    else f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices")
            status, body = self.cp.request("POST", path, self.cp.admin_token, obj)
            if status not in (201, 409):
                raise BenchError(f"create {obj['kind']} {obj['metadata']['name']}: HTTP {status}:"
                                 f" {str(body)[:300]}")

    def data_plane_objects(self) -> list[dict[str, Any]]:
        out = []
        for name, (ip, port, proto, backend_port) in DATA_SERVICES.items():
            out.append(service(f"kp-{name}", _kp_ip(ip), [("p", port, proto)]))
            out.append(endpoint_slice(f"kp-{name}", [POD_IP], [("p", backend_port, proto)]))
        return out

    # --- kube-proxy, nftables mode -------------------------------------------------------------

    def kube_proxy(self, cpu: str) -> Contender:
        from tests.peers.cluster import Peers as Binaries

        binary = Binaries.find().kube_proxy
        targets = {}
        for name, (ip, port, _, _) in DATA_SERVICES.items():
            vip = _kp_ip(ip)
            self.lab.add_address(vip)  # node-local traffic to the ClusterIP routes locally
            targets[name] = (vip, port)
        proc = self.lab.start("kube-proxy", [
            str(binary), f"--kubeconfig={self.cp.admin_kubeconfig}", "--proxy-mode=nftables",
            "--hostname-override=bench-node", "--cluster-cidr=10.244.0.0/16",
            "--healthz-bind-address=127.0.0.1:10266", "--metrics-bind-address=127.0.0.1:10259",
            "--conntrack-max-per-core=0",  # leave the (global) conntrack table size alone
            "--v=2",
        ], cpu)
        try:
            wait_tcp(*targets["http"], proc=proc, timeout=60)
        except BenchError as e:
            raise BenchError(f"kube-proxy --proxy-mode=nftables did not serve "
                             f"{targets['http']}: {e}") from e
        return Contender("kube-proxy-nft", None, targets,
                         f"kube-proxy {binary.parent.name} --proxy-mode=nftables against a real "
                         "kube-apiserver; kernel CPU is not attributed to a process")

    # --- CoreDNS ---------------------------------------------------------------------------------

    def coredns(self, cpu: str, records: DNSRecords, procs: int = 1) -> Contender:
        from tests.peers.cluster import Peers as Binaries

        binary = Binaries.find().coredns
        listen = COREDNS if procs == 1 else ("127.0.2.8", COREDNS[1])
        d = self.lab.workdir / ("coredns" if procs == 1 else f"coredns-p{procs}")
        d.mkdir(exist_ok=True)
        (d / "Corefile").write_text(f"""
.:{listen[1]} {{
    bind {listen[0]}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.admin_kubeconfig}
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    forward . {UPSTREAM_DNS[0]}:{UPSTREAM_DNS[1]}
}}
""")
        name = "coredns" + (f"-p{procs}" if procs > 1 else "")
        proc = self.lab.start(name, [str(binary), "-conf", str(d / "Corefile")], cpu, cwd=d,
                              env={"GOMAXPROCS": str(procs)})
        wait_dns(*listen, records.fqdn(records.clusterip[-1][0]), proc=proc, timeout=60)
        two = cpu if procs > 1 else None
        return Contender(name, proc, {"dns": listen},
                         f"CoreDNS {binary.parent.name}, kubernetes + cache 30 + forward, "
                         f"GOMAXPROCS {procs}", cpus=two, load_cpus=two)
