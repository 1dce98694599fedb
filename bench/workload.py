"""What the contenders serve: the Services/EndpointSlices of a run, and the same records
written as a dnsmasq hosts file, plus the dnsperf query files.

One generator feeds kubeshim (a manifest folder or the fake API server) and dnsmasq (hosts and
srv-host lines), so both answer the same names with the same number of records.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from typing import Any

from .lab import POD_IP

NAMESPACE = "bench"
ZONE = "cluster.local"
SERVICE_BASE = int(ipaddress.IPv4Address("10.96.0.0"))

# The data-plane services: name -> (ClusterIP, port, protocol, backend port on POD_IP).
DATA_SERVICES = {
    "http": ("10.96.0.10", 80, "TCP", 8080),
    "iperf": ("10.96.0.11", 5201, "TCP", 5201),
    "udp": ("10.96.0.12", 53, "UDP", 5353),
}


def service(name: str, cluster_ip: str, ports: list[tuple[str, int, str]],
            headless: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-svc-{name}"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "None" if headless else cluster_ip,
            "clusterIPs": ["None"] if headless else [cluster_ip],
            "ipFamilies": ["IPv4"],
            "selector": {"app": name},
            "ports": [
                {"name": pname, "port": port, "protocol": proto, "targetPort": port}
                for pname, port, proto in ports
            ],
        },
    }


def endpoint_slice(service_name: str, addresses: list[str], ports: list[tuple[str, int, str]],
                   suffix: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{suffix}",
            "namespace": NAMESPACE,
            "uid": f"uid-eps-{service_name}-{suffix}",
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        "endpoints": [
            {
                "addresses": [addr],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "bench-node",
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE,
                              "name": f"{service_name}-{i}"},
            }
            for i, addr in enumerate(addresses)
        ],
    }


def data_plane_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, (ip, port, proto, backend_port) in DATA_SERVICES.items():
        out.append(service(name, ip, [("p", port, proto)]))
        out.append(endpoint_slice(name, [POD_IP], [("p", backend_port, proto)]))
    return out


def _ip(n: int) -> str:
    return str(ipaddress.IPv4Address(SERVICE_BASE + n))


def _pod_ip(n: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.128.0.0")) + n))


# --- DNS records -------------------------------------------------------------------------------


class DNSRecords:
    """`clusterip` ClusterIP services with a named port (A + SRV) and `headless` headless
    services with `per_headless` endpoints each (multi-A)."""

    def __init__(self, clusterip: int = 100, headless: int = 50, per_headless: int = 3) -> None:
        self.clusterip = [(f"svc-{i}", _ip(1000 + i)) for i in range(clusterip)]
        self.headless = [
            (f"hl-{i}", [_pod_ip(1000 + i * per_headless + j) for j in range(per_headless)])
            for i in range(headless)
        ]

    def objects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        ports = [("http", 8080, "TCP")]
        for name, ip in self.clusterip:
            out.append(service(name, ip, [("http", 80, "TCP")]))
            out.append(endpoint_slice(name, [_pod_ip(9000)], ports))
        for name, ips in self.headless:
            out.append(service(name, "None", ports, headless=True))
            out.append(endpoint_slice(name, ips, ports))
        return out

    def fqdn(self, name: str) -> str:
        return f"{name}.{NAMESPACE}.svc.{ZONE}"

    def dnsmasq_conf(self, answer_ip: dict[str, str]) -> tuple[str, str]:
        """(hosts file, conf lines): the A records (as `answer_ip` maps ClusterIPs, so dnsmasq
        gives the same addresses kubeshim does) and one SRV per ClusterIP service port."""
        hosts, conf = [], []
        for name, ip in self.clusterip:
            hosts.append(f"{answer_ip.get(ip, ip)} {self.fqdn(name)}")
            conf.append(f"srv-host=_http._tcp.{self.fqdn(name)},{self.fqdn(name)},80,0,100")
        for name, ips in self.headless:
            hosts.extend(f"{ip} {self.fqdn(name)}" for ip in ips)
        return "\n".join(hosts) + "\n", "\n".join(conf) + "\n"

    def cluster_queries(self, n: int = 20000, seed: int = 1) -> Iterator[str]:
        """The cluster-name mix: 50% ClusterIP A hits, 20% headless A (3 records), 15% SRV,
        15% NXDOMAIN under the service zone."""
        rnd = random.Random(seed)
        for _ in range(n):
            r = rnd.random()
            if r < 0.50:
                yield f"{self.fqdn(rnd.choice(self.clusterip)[0])} A"
            elif r < 0.70:
                yield f"{self.fqdn(rnd.choice(self.headless)[0])} A"
            elif r < 0.85:
                yield f"_http._tcp.{self.fqdn(rnd.choice(self.clusterip)[0])} SRV"
            else:
                yield f"nosuch-{rnd.randrange(100000)}.{NAMESPACE}.svc.{ZONE} A"


UPSTREAM_NAMES = [f"host-{i}.example.test" for i in range(200)]


def upstream_hosts() -> str:
    return "".join(f"192.0.2.{1 + i % 250} {name}\n" for i, name in enumerate(UPSTREAM_NAMES))


def forward_queries(n: int = 20000, seed: int = 2) -> Iterator[str]:
    rnd = random.Random(seed)
    for _ in range(n):
        yield f"{rnd.choice(UPSTREAM_NAMES)} A"


# --- control plane scale -------------------------------------------------------------------------


def scale_objects(services: int, endpoints_per_service: int = 10) -> list[dict[str, Any]]:
    """`services` ClusterIP Services, each with one EndpointSlice of `endpoints_per_service`
    ready endpoints (addresses nothing listens on: only the probes below carry traffic)."""
    out: list[dict[str, Any]] = []
    ports = [("http", 8080, "TCP")]
    for i in range(services):
        name = f"s{i}"
        out.append(service(name, service_ip(i), [("http", 80, "TCP")]))
        out.append(endpoint_slice(
            name,
            [_pod_ip(100000 + i * endpoints_per_service + j) for j in range(endpoints_per_service)],
            ports,
        ))
    return out


def service_ip(i: int) -> str:
    """ClusterIP of scale Service number i."""
    return _ip(20000 + i)


PROBE_TCP = ("probe-tcp", "10.96.0.30", 80)   # endpoint flips between two id servers
PROBE_DNS = "probe-dns"                        # headless; its endpoint address flips
PROBE_PORTS = (9001, 9002)


def probe_objects(generation: int) -> list[dict[str, Any]]:
    """The probe services; `generation` picks which endpoint is current."""
    name, ip, port = PROBE_TCP
    out = [
        service(name, ip, [("http", port, "TCP")]),
        endpoint_slice(name, [POD_IP], [("http", PROBE_PORTS[generation % 2], "TCP")]),
        service(PROBE_DNS, "None", [("http", 8080, "TCP")], headless=True),
        endpoint_slice(PROBE_DNS, [probe_dns_ip(generation)], [("http", 8080, "TCP")]),
    ]
    return out


def probe_dns_ip(generation: int) -> str:
    return f"10.250.{(generation >> 8) & 255}.{generation & 255}"
