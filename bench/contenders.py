"""Starting the backends and every contender, with the configuration each one needs.

Proxy contenders forward the same three services (HTTP, iperf3, UDP/DNS) to the same backends
on POD_IP; DNS contenders serve the same records. Each has a name, the process whose CPU and
memory count (None for the kernel), and where each service is reached through it.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .lab import POD_IP, BenchError, Lab, Proc, wait_dns, wait_tcp
from .workload import (
    DATA_SERVICES,
    DNSRecords,
    data_plane_objects,
    upstream_hosts,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

BACKEND_HTTP = (POD_IP, 8080)
BACKEND_IPERF = (POD_IP, 5201)
BACKEND_UDP = (POD_IP, 5353)
UPSTREAM_DNS = ("127.0.2.9", 53)


def loopback_vip(ip: str) -> str:
    """Where kubeshim --vip-mode loopback serves a ClusterIP: 127.64.0.0/10 keeping the low
    22 bits (10.96.0.10 -> 127.96.0.10)."""
    low = int(ipaddress.IPv4Address(ip)) & ((1 << 22) - 1)
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("127.64.0.0")) + low))


@dataclass
class Contender:
    name: str
    proc: Proc | None  # whose CPU/RSS is measured; None: the work happens in the kernel
    targets: dict[str, tuple[str, int]] = field(default_factory=dict)  # service -> address
    note: str = ""
    # Placement of a contender that runs on two CPUs: its CPUs and where its load runs (None:
    # the run's --subject-cpu / --load-cpu).
    cpus: str | None = None
    load_cpus: str | None = None
    forwards: bool = True  # a DNS contender that forwards other names (authoritative: no)
    # Contenders that cannot run side by side (two kubeshim in tproxy mode own the same
    # nftables table, policy route and capture port): `start` brings this one up, and
    # `activate()` stops the other members of `exclusive` first.
    start: Callable[[], Proc] | None = None
    exclusive: list[Contender] | None = None
    stop: Callable[[Proc], None] | None = None
    cpu: str | None = None  # where `start` pins it

    def activate(self) -> None:
        """Make this contender the one of its exclusive group that runs (a no-op otherwise)."""
        if self.start is None or self.stop is None:
            return
        for other in self.exclusive or ():
            if other is not self and other.proc is not None:
                self.stop(other.proc)
                other.proc = None
        if self.proc is None or not self.proc.alive():
            self.proc = self.start()


# --- backends ----------------------------------------------------------------------------------


def nginx_backend(lab: Lab, cpu: str) -> Proc:
    d = lab.workdir / "nginx-backend"
    d.mkdir(exist_ok=True)
    (d / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 19000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 9000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    server {{
        listen {BACKEND_HTTP[0]}:{BACKEND_HTTP[1]} backlog=65535 reuseport;
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
""")
    proc = lab.start("backend-nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], cpu)
    wait_tcp(*BACKEND_HTTP, proc=proc)
    return proc


def iperf_backend(lab: Lab, cpu: str) -> Proc:
    proc = lab.start("backend-iperf3", ["iperf3", "-s", "-B", BACKEND_IPERF[0],
                                        "-p", str(BACKEND_IPERF[1])], cpu)
    wait_tcp(*BACKEND_IPERF, proc=proc)
    return proc


def dnsmasq(lab: Lab, name: str, cpu: str, listen: tuple[str, int], hosts: str,
            extra: str = "", upstream: tuple[str, int] | None = None, ttl: int = 30) -> Proc:
    """dnsmasq answering from a hosts file (names it knows), NXDOMAIN for the rest of
    cluster.local, forwarding anything else to `upstream` with its cache on."""
    d = lab.workdir / name
    d.mkdir(exist_ok=True)
    (d / "hosts").write_text(hosts)
    lines = [
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces", "user=root",
        f"listen-address={listen[0]}", f"port={listen[1]}", f"addn-hosts={d / 'hosts'}",
        f"local-ttl={ttl}", "cache-size=10000", "dns-forward-max=1000",
        "local=/cluster.local/", "log-facility=-",
    ]
    if upstream is not None:
        lines.append(f"server={upstream[0]}#{upstream[1]}")
    (d / "dnsmasq.conf").write_text("\n".join(lines) + "\n" + extra)
    proc = lab.start(name, ["dnsmasq", "-k", "-C", str(d / "dnsmasq.conf"),
                            f"--pid-file={d / 'pid'}"], cpu)
    return proc


def udp_backend(lab: Lab, cpu: str) -> Proc:
    proc = dnsmasq(lab, "backend-dnsmasq", cpu, BACKEND_UDP, upstream_hosts(), ttl=300)
    wait_dns(*BACKEND_UDP, "host-1.example.test", proc=proc)
    return proc


def upstream_dns(lab: Lab, cpu: str) -> Proc:
    proc = dnsmasq(lab, "upstream-dnsmasq", cpu, UPSTREAM_DNS, upstream_hosts(), ttl=300)
    wait_dns(*UPSTREAM_DNS, "host-1.example.test", proc=proc)
    return proc


# --- proxy contenders --------------------------------------------------------------------------


def direct() -> Contender:
    return Contender("direct", None, {"http": BACKEND_HTTP, "iperf": BACKEND_IPERF,
                                      "udp": BACKEND_UDP}, "no proxy: the limit")


def haproxy(lab: Lab, cpu: str, splice: bool, threads: int = 1) -> Contender:
    name = "haproxy-splice" if splice else "haproxy" + (f"-t{threads}" if threads > 1 else "")
    ip = "127.0.1.2" if splice else ("127.0.1.1" if threads == 1 else "127.0.1.4")
    d = lab.workdir / name
    d.mkdir(exist_ok=True)
    listens = []
    for svc, backend in (("http", BACKEND_HTTP), ("iperf", BACKEND_IPERF)):
        port = DATA_SERVICES[svc][1]
        listens.append(f"listen {svc}\n    bind {ip}:{port}\n"
                       f"    server b1 {backend[0]}:{backend[1]}\n")
    (d / "haproxy.cfg").write_text(
        f"global\n    nbthread {threads}\n    maxconn 4000\n"
        + ("" if splice else "    nosplice\n")
        + "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n"
        "    timeout server 300s\n    maxconn 4000\n"
        + ("    option splice-auto\n" if splice else "")
        + "\n".join(listens)
    )
    proc = lab.start(name, ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], cpu)
    wait_tcp(ip, 80, proc=proc)
    return Contender(name, proc, {"http": (ip, 80), "iperf": (ip, 5201)},
                     f"nbthread {threads}, mode tcp"
                     + (", option splice-auto" if splice else ", nosplice"),
                     cpus=cpu if threads > 1 else None, load_cpus=cpu if threads > 1 else None)


def nginx_stream(lab: Lab, cpu: str, workers: int = 1) -> Contender:
    name = "nginx-stream" + (f"-w{workers}" if workers > 1 else "")
    ip = "127.0.1.3" if workers == 1 else "127.0.1.5"
    d = lab.workdir / name
    d.mkdir(exist_ok=True)
    reuse = " reuseport" if workers > 1 else ""
    (d / "nginx.conf").write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process {"on" if workers > 1 else "off"};
worker_processes {workers};
worker_rlimit_nofile 19000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 9000; multi_accept on; }}
stream {{
    server {{
        listen {ip}:80 backlog=65535{reuse};
        proxy_pass {BACKEND_HTTP[0]}:{BACKEND_HTTP[1]};
    }}
    server {{ listen {ip}:5201{reuse}; proxy_pass {BACKEND_IPERF[0]}:{BACKEND_IPERF[1]}; }}
    server {{
        listen {ip}:53 udp{reuse};
        proxy_pass {BACKEND_UDP[0]}:{BACKEND_UDP[1]};
        proxy_responses 1;
        proxy_timeout 5s;
    }}
}}
""")
    proc = lab.start(name, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], cpu)
    wait_tcp(ip, 80, proc=proc)
    note = ("1 worker (master_process off)" if workers == 1 else
            f"{workers} workers, reuseport") + ", stream module, UDP proxy_responses 1"
    two = cpu if workers > 1 else None
    return Contender(name, proc, {"http": (ip, 80), "iperf": (ip, 5201), "udp": (ip, 53)},
                     note, cpus=two, load_cpus=two)


def nftables_dnat(lab: Lab) -> Contender:
    """Kernel DNAT in the shape kube-proxy's nftables mode programs it: a verdict map from
    (ClusterIP, protocol, port) to a per-service chain, which picks an endpoint chain with
    numgen and DNATs there. Rules live only in the bench's namespace."""
    elements, chains = [], []
    targets: dict[str, tuple[str, int]] = {}
    for svc, (cluster_ip, port, proto, backend_port) in DATA_SERVICES.items():
        # Outside the service CIDR, so kube-proxy's own table (peers part), which rejects
        # unallocated addresses of its service CIDR, leaves these alone.
        ip = cluster_ip.replace("10.96.", "10.200.", 1)
        lab.add_address(ip)  # the VIP routes locally; DNAT at output rewrites it
        p = proto.lower()
        elements.append(f"{ip} . {p} . {port} : goto service-{svc}")
        chains.append(
            f"chain service-{svc} {{\n numgen random mod 1 vmap {{ 0 : goto endpoint-{svc} }}\n}}\n"
            f"chain endpoint-{svc} {{\n meta l4proto {p} dnat to {POD_IP}:{backend_port}\n}}"
        )
        targets[svc] = (ip, port)
    ruleset = f"""
table ip kubeshim-bench {{
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {", ".join(elements)} }}
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    {chr(10).join(chains)}
}}
"""
    path = lab.workdir / "nftables.nft"
    path.write_text(ruleset)
    lab.sh(f"nft -f {path}")
    # Short-connection runs leave many TIME_WAIT conntrack entries; this namespace's own.
    lab.sh("sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=5", check=False)
    wait_tcp(*targets["http"])
    return Contender("nftables-dnat", None, targets,
                     "kernel DNAT (kube-proxy nftables-mode rule shape), conntrack; "
                     "kernel CPU is not attributed to a process")


# --- kubeshim ----------------------------------------------------------------------------------


def write_manifests(directory: Path, objects: list[dict]) -> None:  # type: ignore[type-arg]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))


KUBESHIM_DNS = ("127.0.2.1", 53)


def kubeshim(lab: Lab, cpu: str, records: DNSRecords, extra_args: list[str] | None = None
             ) -> Contender:
    manifests = lab.workdir / "manifests"
    write_manifests(manifests, data_plane_objects() + records.objects())
    argv = [
        PYTHON, "-m", "kubeshim", "run", "--manifests", str(manifests),
        "--vip-mode", "loopback", "--hostname-override", "bench-node",
        "--dns-bind", f"{KUBESHIM_DNS[0]}:{KUBESHIM_DNS[1]}",
        "--upstream", f"{UPSTREAM_DNS[0]}:{UPSTREAM_DNS[1]}",
        "--healthz-bind-address", "", "--metrics-bind-address", "127.0.0.1:10249",
        "--log-level", "warning", *(extra_args or []),
    ]
    proc = lab.start("kubeshim", argv, cpu, cwd=REPO)
    targets = {svc: (loopback_vip(ip), port) for svc, (ip, port, _, _) in DATA_SERVICES.items()}
    wait_dns(*KUBESHIM_DNS, records.fqdn(records.clusterip[0][0]), proc=proc, timeout=60)
    wait_tcp(*targets["http"], proc=proc, timeout=30)
    return Contender("kubeshim", proc, targets, "--vip-mode loopback, one process (proxy + DNS)")


TPROXY_NET = ("10.96.", "10.201.")  # outside kube-proxy's service CIDR (peers part)
INTERFACE_NET = ("10.96.", "10.202.")


def kubeshim_interface(lab: Lab, cpu: str) -> Contender:
    """kubeshim in interface mode (Service addresses on kubeshim0, a socket per Service port),
    beside tproxy mode on the same Services. Proxy only, ClusterIPs of its own."""
    objects = data_plane_objects()
    for obj in objects:
        spec = obj.get("spec", {})
        if "clusterIP" in spec:
            ip = spec["clusterIP"].replace(*INTERFACE_NET, 1)
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
    manifests = lab.workdir / "manifests-kubeshim-interface"
    write_manifests(manifests, objects)
    argv = [
        PYTHON, "-m", "kubeshim", "run", "--manifests", str(manifests),
        "--vip-mode", "interface", "--vip-interface", "kubeshim1",
        "--hostname-override", "bench-node", "--no-dns", "--nodeport-addresses", "127.0.0.1/32",
        "--healthz-bind-address", "", "--metrics-bind-address", "", "--log-level", "warning",
    ]
    proc = lab.start("kubeshim-interface", argv, cpu, cwd=REPO)
    targets = {svc: (ip.replace(*INTERFACE_NET, 1), port)
               for svc, (ip, port, _, _) in DATA_SERVICES.items()}
    wait_tcp(*targets["http"], proc=proc, timeout=30)
    return Contender("kubeshim-interface", proc, targets,
                     "--vip-mode interface, one process, proxy only (--no-dns)")


def kubeshim_tproxy(lab: Lab, cpu: str, workers: int = 1,
                    group: list[Contender] | None = None) -> Contender:
    """kubeshim in its default root mode: the nftables TPROXY table hands the Service tuples to
    one transparent listener per protocol and family. Proxy only, its own ClusterIPs (outside
    kube-proxy's service CIDR, so both tables can live in the namespace). Contenders sharing
    `group` run one at a time: each is (re)started for its samples (Contender.activate)."""
    name = "kubeshim-tproxy" + (f"-w{workers}" if workers != 1 else "")
    manifests = lab.workdir / f"manifests-{name}"
    objects = data_plane_objects()
    for obj in objects:
        spec = obj.get("spec", {})
        if "clusterIP" in spec:
            ip = spec["clusterIP"].replace(*TPROXY_NET, 1)
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
    write_manifests(manifests, objects)
    # A route for node-originated connects; the capture table's output hook reroutes them.
    lab.sh(f"ip route replace {TPROXY_NET[1]}0.0/16 dev lo", check=False)
    argv = [
        PYTHON, "-m", "kubeshim", "run", "--manifests", str(manifests),
        "--vip-mode", "tproxy", "--hostname-override", "bench-node", "--no-dns",
        "--service-cluster-ip-range", f"{TPROXY_NET[1]}0.0/16",
        "--healthz-bind-address", "", "--metrics-bind-address", "",
        "--log-level", "warning", "--workers", str(workers),
    ]
    targets = {svc: (ip.replace(*TPROXY_NET, 1), port)
               for svc, (ip, port, _, _) in DATA_SERVICES.items()}

    def start() -> Proc:
        proc = lab.start(name, argv, cpu, cwd=REPO)
        wait_tcp(*targets["http"], proc=proc, timeout=30)
        time.sleep(2.0)  # the workers join the listeners once they have the state
        return proc

    two = cpu if workers > 1 else None
    c = Contender(name, None, targets,
                  f"--vip-mode tproxy, {workers} worker process(es), proxy only (--no-dns)",
                  cpus=two, load_cpus=two, start=start, stop=lab.stop)
    c.cpu = cpu
    if group is not None:
        c.exclusive = group
        group.append(c)
    c.activate()
    return c


def kubeshim_dns_only(lab: Lab, cpu: str, records: DNSRecords, workers: int) -> Contender:
    """kubeshim's DNS server alone (--no-proxy) with `workers` processes on SO_REUSEPORT."""
    name = f"kubeshim-dns-w{workers}"
    listen = ("127.0.2.4", 53) if workers > 1 else ("127.0.2.5", 53)
    manifests = lab.workdir / f"manifests-{name}"
    write_manifests(manifests, records.objects())
    argv = [
        PYTHON, "-m", "kubeshim", "run", "--manifests", str(manifests), "--no-proxy",
        "--hostname-override", "bench-node", "--workers", str(workers),
        "--dns-bind", f"{listen[0]}:{listen[1]}",
        "--upstream", f"{UPSTREAM_DNS[0]}:{UPSTREAM_DNS[1]}",
        "--healthz-bind-address", "", "--metrics-bind-address", "", "--log-level", "warning",
    ]
    proc = lab.start(name, argv, cpu, cwd=REPO)
    wait_dns(*listen, records.fqdn(records.clusterip[0][0]), proc=proc, timeout=60)
    time.sleep(2.0)  # the workers bind once they have the state
    two = cpu if workers > 1 else None
    return Contender(name, proc, {"dns": listen},
                     f"DNS only (--no-proxy), {workers} worker process(es), SO_REUSEPORT",
                     cpus=two, load_cpus=two)


def nsd(lab: Lab, cpu: str, records: DNSRecords, servers: int = 1) -> Contender:
    """NSD, the authoritative server, with the same cluster.local records as a zone file
    (authoritative only: no forwarded names)."""
    name = "nsd" + (f"-s{servers}" if servers > 1 else "")
    listen = ("127.0.2.6", 53) if servers == 1 else ("127.0.2.7", 53)
    d = lab.workdir / name
    d.mkdir(exist_ok=True)
    zone = ["$ORIGIN cluster.local.", "$TTL 30",
            "@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30",
            "@ IN NS ns.dns.cluster.local.", "ns.dns IN A 127.0.2.6"]
    answer = {ip: loopback_vip(ip) for _, ip in records.clusterip}
    for rname, ip in records.clusterip:
        fq = records.fqdn(rname) + "."
        zone.append(f"{fq} IN A {answer[ip]}")
        zone.append(f"_http._tcp.{fq} IN SRV 0 100 80 {fq}")
    for rname, ips in records.headless:
        zone.extend(f"{records.fqdn(rname)}. IN A {ip}" for ip in ips)
    (d / "cluster.local.zone").write_text("\n".join(zone) + "\n")
    (d / "nsd.conf").write_text(f"""server:
    ip-address: {listen[0]}@{listen[1]}
    server-count: {servers}
    reuseport: {"yes" if servers > 1 else "no"}
    username: ""
    zonesdir: "{d}"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    zonelistfile: "{d}/zone.list"
    database: ""
    verbosity: 0
    hide-version: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: cluster.local
    zonefile: cluster.local.zone
""")
    proc = lab.start(name, ["nsd", "-d", "-c", str(d / "nsd.conf")], cpu)
    wait_dns(*listen, records.fqdn(records.clusterip[0][0]), proc=proc, timeout=30)
    two = cpu if servers > 1 else None
    return Contender(name, proc, {"dns": listen},
                     f"NSD (authoritative), zone file of the same records, server-count "
                     f"{servers}", cpus=two, load_cpus=two, forwards=False)


# --- DNS contenders ----------------------------------------------------------------------------


def dnsmasq_cluster(lab: Lab, cpu: str, records: DNSRecords) -> Contender:
    listen = ("127.0.2.2", 53)
    answer = {ip: loopback_vip(ip) for _, ip in records.clusterip}
    hosts, conf = records.dnsmasq_conf(answer)
    proc = dnsmasq(lab, "dnsmasq", cpu, listen, hosts, extra=conf, upstream=UPSTREAM_DNS)
    wait_dns(*listen, records.fqdn(records.clusterip[0][0]), proc=proc)
    return Contender("dnsmasq", proc, {"dns": listen},
                     "same records from a hosts file + srv-host, local=/cluster.local/, "
                     "cache-size 10000, forwarding to the same upstream")


def kubeshim_dns(ks: Contender) -> Contender:
    return Contender("kubeshim", ks.proc, {"dns": KUBESHIM_DNS}, ks.note)


def coredns_available() -> str | None:
    """Path of a CoreDNS built by tests/peers/build.sh, if any."""
    for base in (Path.home() / ".cache/kubeshim/peers",):
        for cand in sorted(base.glob("**/coredns")) if base.exists() else []:
            if cand.is_file():
                return str(cand)
    return shutil.which("coredns")


def dump_config(contenders: list[Contender]) -> str:
    return json.dumps({c.name: {"targets": c.targets, "note": c.note} for c in contenders})


def must(cond: bool, message: str) -> None:
    if not cond:
        raise BenchError(message)
