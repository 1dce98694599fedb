"""A real one-node Kubernetes cluster on this machine, no container engine and no registry.

Owns the node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
containerd (Debian's, with runc and the CNI bridge plugin), all in one network and mount
namespace of their own, and its teardown: processes, mounts, cgroups and kernel settings.

    python tests/peers/node.py up [--proxy kubeshim|kube-proxy|none] [--workdir DIR]

prints a kubeconfig for 127.0.0.1 and serves until Ctrl-C/SIGTERM. With `--proxy kubeshim`
(the default) kubeshim is installed as README.md tells users (`kubectl apply -k deploy/`,
only the ConfigMap's API server address changed); `kube-proxy` runs kube-proxy (nftables) and
CoreDNS instead, for comparison; `none` leaves the node without a Service proxy or DNS.

Layout (cgroup v1 machines, 2 cores):
- `up` (this process, in the root namespaces) keeps a socat bridge from 127.0.0.1:<port> to a
  Unix socket in the work dir, so kubectl outside reaches the API server inside;
- `_inside` (under `unshare --net --mount`) runs the rest: the node's address is 192.168.130.10
  on a veth; Pods get 10.244.0.0/24 on the CNI bridge cni0; the API server listens on the
  namespace's loopback. Everything the kubelet, containerd and the CNI plugins mount stays in
  that mount namespace and vanishes with it.
- Images (tests/peers/images.py) are imported with `ctr images import`, so nothing is pulled.

Teardown, also after a crash of the inside: every process left in the node's cgroups (the
runtime's shims and containers included) is killed, the cgroups removed, and the kernel
settings the kubelet changes (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops) put
back by the last node of this host to end (nodes of several checkouts may run at once; the
settings from before the first are kept in /run/kubeshim-node/sysctls.json).
`node.py down --workdir DIR` does the same for a run whose `up` was killed outright.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the tests package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from tests.peers.cluster import (  # noqa: E402
    REPO,
    SERVICE_CIDR,
    ControlPlane,
    Peers,
    Process,
    free_port,
    write_kubeconfig,
)
from tests.peers.coredns import CoreDNS  # noqa: E402
from tests.peers.images import PAUSE_IMAGE, Builder  # noqa: E402

NODE_NAME = "node-1"
NODE_IP = "192.168.130.10"
NODE_GATEWAY = "192.168.130.1"
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR = "10.244.0.0/24"
CLUSTER_DNS = "10.96.0.10"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# Kernel settings the kubelet sets at start (pkg/kubelet/cm/container_manager_linux.go,
# setupKernelTunables): saved before, restored after.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
CGROUP_ROOT = Path("/sys/fs/cgroup")
READY_TIMEOUT = 300.0
STATE_FILE = "node-state.json"
SYSCTL_REGISTRY = Path("/run/kubeshim-node/sysctls.json")


# --- Host state: cgroups and kernel settings ---------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 ones and the hybrid unified one)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            points.append(Path(fields[4]))
    return points


def make_cgroups(name: str) -> None:
    """/<name> in every hierarchy, with the cpuset filled in (the kubelet's cgroupRoot)."""
    for h in cgroup_hierarchies():
        group = h / name
        group.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (group / knob).exists() and not (group / knob).read_text().strip():
                (group / knob).write_text((h / knob).read_text())
        node = group / "node"
        node.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (node / knob).exists() and not (node / knob).read_text().strip():
                (node / knob).write_text((group / knob).read_text())


def join_cgroups(name: str, pid: int) -> None:
    """Move `pid` into /<name>/node in every hierarchy: all it starts is then accounted there."""
    for h in cgroup_hierarchies():
        procs = h / name / "node" / "cgroup.procs"
        if procs.exists():
            procs.write_text(str(pid))


def _pids_under(group: Path) -> set[int]:
    pids: set[int] = set()
    for procs in group.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def remove_cgroups(name: str, timeout: float = 30.0) -> list[str]:
    """Kill every process under /<name> in every hierarchy, then remove the groups.

    Returns what could not be removed (empty when clean)."""
    groups = [h / name for h in cgroup_hierarchies() if (h / name).is_dir()]
    deadline = time.monotonic() + timeout
    while True:
        pids = set().union(*(_pids_under(g) for g in groups)) - {os.getpid()}
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    left = []
    for g in groups:
        for d in sorted((p for p in g.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        try:
            g.rmdir()
        except OSError as err:
            left.append(f"{g}: {err.strerror}")
    return left


def read_sysctls() -> dict[str, str]:
    return {k: (Path("/proc/sys") / k).read_text().strip() for k in KUBELET_SYSCTLS}


def restore_sysctls(saved: dict[str, str]) -> None:
    for key, value in saved.items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != value:
            path.write_text(value)


@contextlib.contextmanager
def _sysctl_registry() -> Iterator[dict[str, Any]]:
    """The host's record of the kernel settings before any node ran, and the nodes (cgroup
    names) running now, under a lock: nodes of other checkouts may run at the same time."""
    SYSCTL_REGISTRY.parent.mkdir(parents=True, exist_ok=True)
    with open(SYSCTL_REGISTRY.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(SYSCTL_REGISTRY.read_text())
        except (OSError, ValueError):
            state = {}
        # A node whose cgroups are gone has ended, cleanly or not.
        state["nodes"] = [n for n in state.get("nodes", []) if (CGROUP_ROOT / "pids" / n).exists()
                          or (CGROUP_ROOT / "memory" / n).exists()]
        yield state
        if state["nodes"]:
            SYSCTL_REGISTRY.write_text(json.dumps(state))
        else:
            SYSCTL_REGISTRY.unlink(missing_ok=True)


def hold_sysctls(cgroup: str) -> dict[str, str]:
    """Record `cgroup` as a running node; returns the settings to put back when the last
    running node ends (read now when no other node runs)."""
    with _sysctl_registry() as state:
        if not state["nodes"]:
            state["saved"] = read_sysctls()
        state["nodes"].append(cgroup)
        return dict(state["saved"])


def release_sysctls(cgroup: str, saved: dict[str, str]) -> None:
    """`cgroup` has ended: the last running node puts the settings back."""
    with _sysctl_registry() as state:
        state["nodes"] = [n for n in state["nodes"] if n != cgroup]
        if not state["nodes"]:
            restore_sysctls(state.get("saved", saved))


def sysctl_holders() -> list[str]:
    """The nodes running now on this host (their cgroup names)."""
    with _sysctl_registry() as state:
        return list(state["nodes"])


# --- Credentials for the kubelet's server -------------------------------------------------------


def write_client_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA the kubelet trusts for client certs, and the API server's client cert from it.

    The cert's group system:masters lets the kubelet's webhook authorizer (a
    SubjectAccessReview) admit exec, logs and port-forward from the API server."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubelet-client-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
        x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
    ])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (workdir / "kubelet-client-ca.crt", workdir / "apiserver-kubelet-client.crt",
             workdir / "apiserver-kubelet-client.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


class NodeControlPlane(ControlPlane):
    """The control plane plus static tokens for the kubelet and the two controllers."""

    def __init__(self, workdir: Path, peers: Peers) -> None:
        ca = workdir / "kubelet-client-ca.crt"
        cert = workdir / "apiserver-kubelet-client.crt"
        key = workdir / "apiserver-kubelet-client.key"
        super().__init__(workdir, peers, extra_apiserver_args=[
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={cert}",
            f"--kubelet-client-key={key}",
        ])
        self.kubelet_client_ca = ca
        # In-cluster clients dial the Service's ClusterIP or the node address.
        self.serving_sans = [NODE_IP, KUBERNETES_SERVICE_IP, "kubernetes", "kubernetes.default",
                             "kubernetes.default.svc.cluster.local"]
        self.tokens = {
            "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
            "controller-manager": ("system:kube-controller-manager", ""),
            "scheduler": ("system:kube-scheduler", ""),
            # Bound to system:node-proxier by the API server's default RBAC.
            "kube-proxy": ("system:kube-proxy", ""),
        }
        self.token = {role: secrets.token_hex(16) for role in self.tokens}

    def _prepare(self) -> None:
        super()._prepare()
        write_client_ca(self.workdir)
        with open(self.workdir / "tokens.csv", "a") as f:
            for role, (user, group) in self.tokens.items():
                f.write(f'{self.token[role]},{user},{user}-uid,"{group}"\n' if group
                        else f"{self.token[role]},{user},{user}-uid\n")

    def _apiserver_argv(self) -> list[str]:
        replaced = {
            # The Node authorizer for the kubelet's identity, then RBAC.
            "--authorization-mode=RBAC": "--authorization-mode=Node,RBAC",
            # Pods reach the API server through the `kubernetes` Service, whose endpoint is
            # the advertised node address: listen there too (the namespace has no other
            # network than loopback, the node's veth and the Pod bridge).
            "--bind-address=127.0.0.1": "--bind-address=0.0.0.0",
            "--advertise-address=127.0.0.1": f"--advertise-address={NODE_IP}",
            "--endpoint-reconciler-type=none": "--endpoint-reconciler-type=lease",
        }
        return [replaced.get(a, a) for a in super()._apiserver_argv()]

    def kubeconfig_for(self, role: str) -> Path:
        return write_kubeconfig(self.workdir / f"{role}.kubeconfig", self.server, self.ca_file,
                                self.tokens[role][0], self.token[role])


# --- Installing the Service proxy -----------------------------------------------------------------


def install_kubeshim(kubectl: Callable[..., Any], workdir: Path, host: str, port: int) -> None:
    """`kubectl apply -k deploy/` with only the documented ConfigMap values set (README.md,
    "Replace kube-proxy"): apiserver-host/-port as the node reaches the API server."""
    deploy = workdir / "deploy"
    shutil.rmtree(deploy, ignore_errors=True)
    shutil.copytree(REPO / "deploy", deploy)
    configmap = deploy / "configmap.yaml"
    doc = yaml.safe_load(configmap.read_text())
    doc["data"]["apiserver-host"] = host
    doc["data"]["apiserver-port"] = str(port)
    configmap.write_text(yaml.safe_dump(doc, sort_keys=False))
    kubectl("apply", "-k", str(deploy), timeout=60)


# --- The inside: everything in the node's own namespaces ------------------------------------------


class Node:
    """containerd, the control plane, the controllers and the kubelet, inside the namespaces."""

    def __init__(self, workdir: Path, cgroup: str, proxy: str) -> None:
        self.workdir = workdir
        self.cgroup = cgroup
        self.proxy = proxy
        self.peers = Peers.find()
        self.k8s = self.peers.kube_proxy.parent
        self.procs: list[Process] = []
        self.cp = NodeControlPlane(workdir / "control-plane", self.peers)
        self.containerd_sock = workdir / "containerd" / "containerd.sock"

    def _sh(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)

    def _start(self, name: str, argv: Sequence[str]) -> Process:
        proc = Process(name, argv, self.workdir / f"{name}.log")
        self.procs.append(proc)
        proc.start()
        return proc

    def network(self) -> None:
        self._sh("ip", "link", "set", "lo", "up")
        self._sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "uplink0")
        self._sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        self._sh("ip", "link", "set", "uplink0", "up")
        self._sh("ip", "link", "set", "eth0", "up")
        self._sh("ip", "route", "add", "default", "via", NODE_GATEWAY, "dev", "eth0")
        # This namespace's own settings: forwarding, and 127.0.0.1 routable to Pods after
        # DNAT (hostPorts on hostIP 127.0.0.1), as kube-proxy's iptables mode sets on nodes.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        Path("/proc/sys/net/ipv4/conf/all/route_localnet").write_text("1")
        # Runtime state on a tmpfs private to this mount namespace (shim sockets, runc state).
        for d in ("/run/containerd", "/var/lib/cni"):
            Path(d).mkdir(parents=True, exist_ok=True)
            self._sh("mount", "-t", "tmpfs", "tmpfs", d)
        (self.workdir / "resolv.conf").write_text(f"nameserver {NODE_GATEWAY}\n")

    def containerd(self) -> None:
        d = self.workdir / "containerd"
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-bridge.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "node", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        runtime = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc'
        (d / "config.toml").parent.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.containerd_sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # runc cannot set the pause container's oom_score_adj below our own without
  # CAP_SYS_RESOURCE, which root lacks here.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
  [{runtime}]
    runtime_type = "io.containerd.runc.v2"
  [{runtime}.options]
    SystemdCgroup = false
""")
        proc = self._start("containerd", ["containerd", "--config", str(d / "config.toml")])
        proc.wait_until(self.containerd_sock.exists, "serving its socket")
        for image in Builder(peers=self.peers).build()[1:]:
            subprocess.run(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io",
                            "images", "import", str(image.archive)],
                           check=True, capture_output=True, timeout=600)

    def control_plane(self) -> None:
        self.cp.start()
        self.procs += [p for p in (self.cp.etcd, self.cp.apiserver) if p is not None]
        cp = self.cp
        self._start("kube-controller-manager", [
            str(self.k8s / "kube-controller-manager"),
            f"--kubeconfig={cp.kubeconfig_for('controller-manager')}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={cp.workdir / 'sa.key'}",
            f"--root-ca-file={cp.ca_file}",
            f"--cluster-cidr={CLUSTER_CIDR}", "--allocate-node-cidrs=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ])
        self._start("kube-scheduler", [
            str(self.k8s / "kube-scheduler"),
            f"--kubeconfig={cp.kubeconfig_for('scheduler')}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
        ])

    def kubelet(self) -> None:
        d = self.workdir / "kubelet"
        d.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1, which kubelet 1.35+ refuses unless told.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup}",
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cp.kubelet_client_ca)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local",
            "clusterDNS": [CLUSTER_DNS],
            "resolvConf": str(self.workdir / "resolv.conf"),
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "failSwapOn": False,
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "serializeImagePulls": False,
        }
        (d / "config.yaml").write_text(json.dumps(config, indent=1))
        self._start("kubelet", [
            str(self.k8s / "kubelet"), f"--config={d / 'config.yaml'}",
            f"--kubeconfig={self.cp.kubeconfig_for('kubelet')}", f"--root-dir={d}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        ])

    def wait_node_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if not proc.running():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            got = self.cp.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if got.returncode == 0:
                conds = {c["type"]: c["status"] for c in json.loads(got.stdout)["status"].get(
                    "conditions", [])}
                # Pods are admitted only once the controller manager has made the
                # namespace's default ServiceAccount.
                if conds.get("Ready") == "True" and self.cp.kubectl(
                        "get", "serviceaccount", "default", "-n", "default",
                        check=False).returncode == 0:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"node {NODE_NAME} not Ready after {timeout:.0f}s:\n"
                           + "\n".join(p.log_tail(8) for p in self.procs if p.name == "kubelet"))

    def install_proxy(self) -> None:
        if self.proxy == "kubeshim":
            install_kubeshim(self.cp.kubectl, self.workdir, "127.0.0.1", self.cp.port)
        elif self.proxy == "kube-proxy":
            self._kube_proxy_and_coredns()

    def _kube_proxy_and_coredns(self) -> None:
        """The baseline: kube-proxy (nftables) and CoreDNS as node processes, CoreDNS behind
        the kube-dns Service through a hand-written EndpointSlice (it has no Pod)."""
        self._start("kube-proxy", [
            str(self.peers.kube_proxy), f"--kubeconfig={self.cp.kubeconfig_for('kube-proxy')}",
            "--proxy-mode=nftables", f"--hostname-override={NODE_NAME}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            # Pods share one bridge and br_netfilter is not loaded: without SNAT a reply from
            # a backend to a client on the same bridge would skip the reverse NAT.
            "--masquerade-all",
            # Leave the kernel's conntrack limits and timeouts as they are.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            f"--healthz-bind-address={NODE_IP}:10256", "--metrics-bind-address=127.0.0.1:10249",
        ])
        coredns = CoreDNS(self.peers.coredns, self.workdir, self.cp.admin_kubeconfig,
                          f"{NODE_GATEWAY}:53", port=53, host=NODE_IP)
        self.procs.append(coredns.process)
        coredns.start()
        ports = [{"name": "dns", "port": 53, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
        labels = {"k8s-app": "kube-dns"}
        self.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
                 "spec": {"clusterIP": CLUSTER_DNS, "ports": ports}},
                {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "kube-dns-node", "namespace": "kube-system",
                              "labels": {"kubernetes.io/service-name": "kube-dns",
                                         "endpointslice.kubernetes.io/managed-by": "node.py"}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": [NODE_IP], "nodeName": NODE_NAME,
                                "conditions": {"ready": True}}],
                 "ports": ports},
            ]}))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


def _inside(args: argparse.Namespace) -> int:
    """Runs in the node's namespaces; prints `ready` once the node is Ready, serves until
    SIGTERM (or until its parent dies), then stops what it started."""
    workdir = Path(args.workdir)
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = Node(workdir, args.cgroup, args.proxy)
    try:
        timings: dict[str, float] = {}
        for step in (node.network, node.containerd, node.control_plane, node.kubelet,
                     node.wait_node_ready, node.install_proxy):
            began = time.monotonic()
            step()
            timings[step.__name__] = round(time.monotonic() - began, 1)
        (workdir / "inside.json").write_text(json.dumps({
            "apiserver_port": node.cp.port, "timings": timings}))
        print("ready", json.dumps(timings), flush=True)
        while not stop:
            if not all(p.running() for p in node.procs):
                dead = [p for p in node.procs if not p.running()]
                print(f"{dead[0].name} exited:\n{dead[0].log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        node.stop()


# --- The outside: bridge, state, teardown -------------------------------------------------


class Cluster:
    """One node started through `unshare`, reachable on 127.0.0.1; see the module docstring."""

    def __init__(self, workdir: Path, proxy: str = "kubeshim") -> None:
        self.workdir = workdir
        self.proxy = proxy
        self.cgroup = f"kubeshim-node-{os.getpid()}-{secrets.token_hex(3)}"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.peers = Peers.find()
        self.inside: subprocess.Popen[str] | None = None
        self.bridge: Process | None = None
        self.timings: dict[str, float] = {}
        self.sysctls: dict[str, str] = {}
        self.node_apiserver = ("127.0.0.1", 0)

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        self.peers.require()
        for b in ("kubelet", "kube-controller-manager", "kube-scheduler", "agnhost"):
            if not os.access(self.peers.kube_proxy.parent / b, os.X_OK):
                raise RuntimeError(f"{b} missing: run tests/peers/build.sh")
        for tool in ("containerd", "runc", "ctr", "unshare", "socat", "debootstrap"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (scripts/setup.sh installs it)")
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sysctls = hold_sysctls(self.cgroup)
        (self.workdir / STATE_FILE).write_text(json.dumps(
            {"cgroup": self.cgroup, "sysctls": self.sysctls}))
        try:
            # Built here, before the node starts, so the build is not inside its timings.
            Builder(peers=self.peers).build()
            make_cgroups(self.cgroup)
            sock = self.workdir / "apiserver.sock"
            self.bridge = Process("apiserver-bridge", [
                "socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                f"UNIX-CONNECT:{sock}"], self.workdir / "bridge.log")
            self.bridge.start()
            with open(self.workdir / "inside.log", "ab") as log:
                self.inside = subprocess.Popen(
                    ["unshare", "--net", "--mount", "--propagation", "private", "--",
                     sys.executable, str(Path(__file__).resolve()), "_inside",
                     f"--workdir={self.workdir}", f"--cgroup={self.cgroup}",
                     f"--proxy={self.proxy}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                    preexec_fn=self._prepare_inside,
                )
            assert self.inside.stdout is not None
            line = _readline(self.inside.stdout, timeout)
            if not line.startswith("ready"):
                raise RuntimeError(f"the node did not start:\n{_tail(self.workdir / 'inside.log')}")
            self.timings = json.loads(line.split(" ", 1)[1])
            inside = json.loads((self.workdir / "inside.json").read_text())
            # How the node (and kubeshim on it, host network) reaches the API server.
            self.node_apiserver = ("127.0.0.1", int(inside["apiserver_port"]))
            self._inner_bridge(self.node_apiserver[1])
            admin = json.loads((self.workdir / "control-plane" / "admin.kubeconfig").read_text())
            admin["clusters"][0]["cluster"]["server"] = self.server
            self.kubeconfig.write_text(json.dumps(admin, indent=2))
            self.kubeconfig.chmod(0o600)
            self.timings["total"] = round(time.monotonic() - began, 1)
        except BaseException:
            self.stop()
            raise

    def _prepare_inside(self) -> None:
        from tests.peers.cluster import _die_with_parent

        _die_with_parent()
        join_cgroups(self.cgroup, os.getpid())

    def _inner_bridge(self, apiserver_port: int) -> None:
        """socat inside the namespace: the Unix socket to the API server on its loopback."""
        assert self.inside is not None
        sock = self.workdir / "apiserver.sock"
        proc = Process("apiserver-bridge-inside", [
            "nsenter", f"--target={self.inside.pid}", "--net", "--mount", "--",
            "socat", f"UNIX-LISTEN:{sock},fork,unlink-early", f"TCP:127.0.0.1:{apiserver_port}",
        ], self.workdir / "bridge-inside.log")
        proc.start()
        proc.wait_until(sock.exists, "listening", timeout=10)
        self.inner_bridge = proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.peers.kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {result.returncode}: "
                               f"{result.stderr.strip()}")
        return result

    def stop(self) -> list[str]:
        """Stop the node and undo what it changed on the host; returns what was left over."""
        if self.inside is not None and self.inside.poll() is None:
            self.inside.send_signal(signal.SIGTERM)
            try:
                self.inside.wait(60)
            except subprocess.TimeoutExpired:
                self.inside.kill()
                self.inside.wait()
        for proc in (getattr(self, "inner_bridge", None), self.bridge):
            if proc is not None:
                proc.stop()
        left = teardown(self.cgroup, self.sysctls) if self.sysctls else []
        if not left:
            (self.workdir / STATE_FILE).unlink(missing_ok=True)
        return left

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def teardown(cgroup: str, sysctls: dict[str, str]) -> list[str]:
    """Kill what is left in the node's cgroups, remove them, restore the kernel settings."""
    left = remove_cgroups(cgroup)
    release_sysctls(cgroup, sysctls)
    return left


def teardown_from_state(workdir: Path) -> list[str]:
    """teardown() for a run whose `up` was killed, from the state file it left."""
    state_file = workdir / STATE_FILE
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    left = teardown(state["cgroup"], state["sysctls"])
    if not left:
        state_file.unlink()
    return left


def _readline(stream: Any, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            return str(stream.readline())
    return ""


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def cluster(workdir: Path | None = None, proxy: str = "kubeshim") -> Iterator[Cluster]:
    owned = workdir is None
    directory = workdir or Path(tempfile.mkdtemp(prefix=f"kubeshim-node-{os.getpid()}-"))
    c = Cluster(directory, proxy)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        if owned:
            subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=False)


def _up(args: argparse.Namespace) -> int:
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = Path(args.workdir) if args.workdir else None
    with cluster(workdir, args.proxy) as c:
        print(f"kubeconfig  {c.kubeconfig}")
        print(f"server      {c.server}")
        print(f"node        {NODE_NAME} ({NODE_IP}), Pods {POD_CIDR}, proxy: {args.proxy}")
        print(f"ready in    {c.timings}")
        print(f"logs        {c.workdir}/*.log")
        print(f"export KUBECONFIG={c.kubeconfig}")
        print("serving until Ctrl-C / SIGTERM", flush=True)
        while not stop:
            if c.inside is None or c.inside.poll() is not None:
                print("the node exited; see the logs", file=sys.stderr)
                return 1
            time.sleep(0.5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a one-node cluster and serve until interrupted")
    up.add_argument("--workdir", help="keep data, logs and kubeconfigs here")
    up.add_argument("--proxy", choices=("kubeshim", "kube-proxy", "none"), default="kubeshim")
    down = sub.add_parser("down", help="clean up after an `up` that was killed")
    down.add_argument("--workdir", required=True)
    inside = sub.add_parser("_inside")
    inside.add_argument("--workdir", required=True)
    inside.add_argument("--cgroup", required=True)
    inside.add_argument("--proxy", required=True)
    args = parser.parse_args(argv)
    if args.command == "_inside":
        return _inside(args)
    if args.command == "down":
        left = teardown_from_state(Path(args.workdir))
        for line in left:
            print(f"left over: {line}", file=sys.stderr)
        return 1 if left else 0
    return _up(args)


if __name__ == "__main__":
    sys.exit(main())
