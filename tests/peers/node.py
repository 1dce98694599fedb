"""A real one- or two-node Kubernetes cluster on this machine, no container engine, no registry.

Owns the nodes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
containerd (Debian's, with runc and the CNI bridge plugin) in one network and mount namespace
of their own; with two nodes, a second kubelet and containerd in another; and their teardown:
processes, mounts, cgroups and kernel settings.

    python tests/peers/node.py up [--proxy kubeshim|kube-proxy|none] [--nodes 1|2] [--workdir DIR]

prints a kubeconfig for 127.0.0.1 and serves until Ctrl-C/SIGTERM. With `--proxy kubeshim`
(the default) kubeshim is installed as README.md tells users (`kubectl apply -k deploy/`,
only the ConfigMap's API server address changed) and runs on every node; `kube-proxy` runs
kube-proxy (nftables) on every node and CoreDNS on node-1 instead, for comparison; `none`
leaves the nodes without a Service proxy or DNS.

Layout (cgroup v1 machines, 2 cores):
- `up` (this process, in the root namespaces) keeps a socat bridge from 127.0.0.1:<port> to a
  Unix socket in the work dir, so kubectl outside reaches the API server inside;
- `_inside` (under `unshare --net --mount`) runs node-1: its address is 192.168.130.10 on a
  veth; Pods get 10.244.0.0/24 on the CNI bridge cni0; the API server listens on the
  namespace's addresses (loopback, the veth, the bridge). Everything the kubelet, containerd
  and the CNI plugins mount stays in that mount namespace and vanishes with it.
- With `--nodes 2`, a second `_inside` runs node-2 in namespaces of its own (a sibling of
  node-1's, work dir DIR/node-2): the veth's other end is its eth0 (192.168.130.11), its Pods
  get 10.244.1.0/24, and each node routes the other's Pod CIDR through it. Its kubelet and
  kube-proxy reach the API server at 192.168.130.10; nothing else can (the root namespace only
  through the bridge). Its containerd has its own root, state and socket, and tmpfs mounts of
  its own over /run/containerd and /var/lib/cni.
- Images (tests/peers/images.py) are imported into each node's containerd with `ctr images
  import`, so nothing is pulled.

Teardown, also after a crash of the insides: every process left in the cluster's cgroups (both
nodes' runtime shims and containers included; node-2's cgroups are inside node-1's) is
killed, the cgroups removed, and the kernel settings the kubelet changes (vm.overcommit_memory,
kernel.panic, kernel.panic_on_oops) put back by the last node of this host to end (nodes of
several checkouts may run at once; the settings from before the first are kept in
/run/kubeshim-node/sysctls.json). `node.py down --workdir DIR` does the same for a run whose
`up` was killed outright.
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NodeSpec:
    """One node's name, address on the link between the nodes, and Pod CIDR."""

    name: str
    ip: str
    pod_cidr: str


# node-1 runs the control plane too; node-2 joins it when asked for two nodes, once node-1 is
# Ready. node-1 gives each Node the Pod CIDR its bridge serves (assign_pod_cidr).
NODES = (NodeSpec("node-1", "192.168.130.10", "10.244.0.0/24"),
         NodeSpec("node-2", "192.168.130.11", "10.244.1.0/24"))
NODE_NAME, NODE_IP, POD_CIDR = NODES[0].name, NODES[0].ip, NODES[0].pod_cidr
NODE_GATEWAY = "192.168.130.1"
CLUSTER_CIDR = "10.244.0.0/16"
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
            **{f"kubelet-{n.name}": (f"system:node:{n.name}", "system:nodes") for n in NODES},
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

    def kubeconfig_for(self, role: str, server: str | None = None,
                       path: Path | None = None) -> Path:
        """`role`'s kubeconfig (for `server`, the loopback address by default)."""
        return write_kubeconfig(path or self.workdir / f"{role}.kubeconfig",
                                server or self.server, self.ca_file,
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
    """One node's containerd and kubelet (node-1: with the control plane and the controllers),
    inside its namespaces.

    With two nodes, node-1 makes the veth link to node-2 (its peer end in node-2's network
    namespace), waits until node-2 is Ready after giving it its kubeconfigs (`join.json` in
    node-2's work dir says they are there), and only then installs the Service proxy."""

    def __init__(self, workdir: Path, cgroup: str, proxy: str, spec: NodeSpec = NODES[0],
                 nodes: int = 1, peer_pid: int = 0) -> None:
        self.workdir = workdir
        self.cgroup = cgroup
        self.proxy = proxy
        self.spec = spec
        self.nodes = nodes
        self.peer_pid = peer_pid
        self.first = spec == NODES[0]
        self.peers = Peers.find()
        self.k8s = self.peers.kube_proxy.parent
        self.procs: list[Process] = []
        # node-2's work dir is inside node-1's: the control plane's (CA, kubeconfigs) is theirs.
        cp_dir = (workdir if self.first else workdir.parent) / "control-plane"
        self.cp = NodeControlPlane(cp_dir, self.peers)
        self.containerd_sock = workdir / "containerd" / "containerd.sock"

    def steps(self) -> list[Callable[[], None]]:
        if not self.first:
            return [self.network, self.containerd, self.wait_join, self.kubelet,
                    self.wait_node_ready, self.install_proxy]
        steps = [self.network, self.containerd, self.control_plane, self.kubelet,
                 self.wait_node_ready]
        if self.nodes > 1:
            steps.append(self.join_node_2)
        return [*steps, self.install_proxy]

    def _sh(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)

    def _start(self, name: str, argv: Sequence[str]) -> Process:
        proc = Process(name, argv, self.workdir / f"{name}.log")
        self.procs.append(proc)
        proc.start()
        return proc

    def _kubeconfig(self, role: str) -> Path:
        """node-1's from its control plane; node-2's as node-1 wrote them for it."""
        return self.cp.kubeconfig_for(role) if self.first else self.workdir / f"{role}.kubeconfig"

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """As the admin on node-1, as this node's kubelet on node-2."""
        kubeconfig = None if self.first else self._kubeconfig(f"kubelet-{self.spec.name}")
        return self.cp.kubectl(*args, kubeconfig=kubeconfig, check=check)

    def network(self) -> None:
        self._sh("ip", "link", "set", "lo", "up")
        if self.nodes == 1:
            self._sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "uplink0")
            self._sh("ip", "link", "set", "uplink0", "up")
        elif self.first:
            # The link between the nodes: one veth, its other end eth0 in node-2's namespace
            # (never the host's: `up` waits until node-2 has a namespace of its own).
            if _netns(self.peer_pid) == _netns(os.getppid()):  # `up`, in the host's
                raise RuntimeError(f"node-2 (pid {self.peer_pid}) is in the host's namespace")
            self._sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                     "netns", str(self.peer_pid))
        else:
            deadline = time.monotonic() + 60
            while subprocess.run(["ip", "link", "show", "eth0"],
                                 capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("no link to node-1 (eth0) after 60s")
                time.sleep(0.1)
        self._sh("ip", "addr", "add", f"{self.spec.ip}/24", "dev", "eth0")
        self._sh("ip", "link", "set", "eth0", "up")
        self._sh("ip", "route", "add", "default", "via", NODE_GATEWAY, "dev", "eth0")
        for other in NODES[:self.nodes]:
            if other != self.spec:
                # Pods of the other node through it (what a CNI's routes or overlay would do).
                self._sh("ip", "route", "add", other.pod_cidr, "via", other.ip, "dev", "eth0",
                         "onlink")
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
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.spec.pod_cidr}]],
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
            # Pod CIDRs are assigned by node-1 (assign_pod_cidr), each the one its node's CNI
            # bridge serves: the range allocator hands them out in registration order and, on
            # a quick re-sync, now and then skips one (node-2 got 10.244.2.0/24).
            f"--cluster-cidr={CLUSTER_CIDR}", "--allocate-node-cidrs=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ])
        self._start("kube-scheduler", [
            str(self.k8s / "kube-scheduler"),
            f"--kubeconfig={cp.kubeconfig_for('scheduler')}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
        ])

    def join_node_2(self) -> None:
        """Give node-2 its kubeconfigs (the API server on node-1's address, which it listens
        on), then wait until node-2 is Ready, so the proxy is installed on both."""
        peer = NODES[1]
        peer_dir = self.workdir / peer.name
        server = f"https://{self.spec.ip}:{self.cp.port}"
        for role in (f"kubelet-{peer.name}", "kube-proxy"):
            self.cp.kubeconfig_for(role, server, peer_dir / f"{role}.kubeconfig")
        (peer_dir / "join.json.tmp").write_text(json.dumps({"server": server}))
        (peer_dir / "join.json.tmp").rename(peer_dir / "join.json")
        assign_pod_cidr(self.kubectl, peer, self.procs, READY_TIMEOUT)
        wait_node_ready(self.kubectl, peer.name, self.procs, READY_TIMEOUT)

    def wait_join(self) -> None:
        """node-2: wait until node-1 is Ready and has written this node's kubeconfigs."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not (self.workdir / "join.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"node-1 gave no kubeconfigs after {READY_TIMEOUT:.0f}s")
            time.sleep(0.2)

    def kubelet(self) -> None:
        d = self.workdir / "kubelet"
        d.mkdir(exist_ok=True)
        # node-2's cgroupRoot is inside node-1's, so the cluster's one cgroup holds everything.
        cgroup_root = f"/{self.cgroup}" if self.first else f"/{self.cgroup}/{self.spec.name}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1, which kubelet 1.35+ refuses unless told.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": cgroup_root,
            "address": self.spec.ip,
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
            f"--kubeconfig={self._kubeconfig(f'kubelet-{self.spec.name}')}",
            f"--root-dir={d}", f"--hostname-override={self.spec.name}",
            f"--node-ip={self.spec.ip}", "--v=1",
        ])

    def wait_node_ready(self, timeout: float = 120.0) -> None:
        if self.first:
            assign_pod_cidr(self.kubectl, self.spec, self.procs, timeout)
        # Pods are admitted only once the controller manager has made the namespace's
        # default ServiceAccount (node-1 waits for it; node-2's kubelet may not read it).
        wait_node_ready(self.kubectl, self.spec.name, self.procs, timeout,
                        ["get", "serviceaccount", "default", "-n", "default"]
                        if self.first else None)
        deadline = time.monotonic() + timeout
        while True:  # node-2: node-1 assigns the CIDR once this node has registered
            node = json.loads(self.kubectl("get", "node", self.spec.name, "-o", "json").stdout)
            got = node["spec"].get("podCIDR")
            if got is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if got != self.spec.pod_cidr:
            raise RuntimeError(f"{self.spec.name} got Pod CIDR {got}, "
                               f"its CNI bridge serves {self.spec.pod_cidr}")

    def install_proxy(self) -> None:
        if self.proxy == "kube-proxy":
            self._kube_proxy()
        if not self.first:
            return  # the DaemonSet, kube-dns and CoreDNS are the cluster's, installed once
        if self.proxy == "kubeshim":
            # The nodes reach the API server on node-1's loopback, or its address when two.
            host = "127.0.0.1" if self.nodes == 1 else self.spec.ip
            install_kubeshim(self.cp.kubectl, self.workdir, host, self.cp.port)
        elif self.proxy == "kube-proxy":
            self._coredns()

    def _kube_proxy(self) -> None:
        self._start("kube-proxy", [
            str(self.peers.kube_proxy), f"--kubeconfig={self._kubeconfig('kube-proxy')}",
            "--proxy-mode=nftables", f"--hostname-override={self.spec.name}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            # Pods share one bridge and br_netfilter is not loaded: without SNAT a reply from
            # a backend to a client on the same bridge would skip the reverse NAT.
            "--masquerade-all",
            # Leave the kernel's conntrack limits and timeouts as they are.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            # kube-proxy's defaults, as deploy/configmap.yaml sets them for kubeshim (e2e's
            # `should check kube-proxy urls` asks localhost:10256 from a hostNetwork Pod).
            "--healthz-bind-address=0.0.0.0:10256", "--metrics-bind-address=127.0.0.1:10249",
        ])

    def _coredns(self) -> None:
        """The baseline's DNS: CoreDNS as a node-1 process behind the kube-dns Service through
        a hand-written EndpointSlice (it has no Pod)."""
        coredns = CoreDNS(self.peers.coredns, self.workdir, self.cp.admin_kubeconfig,
                          f"{NODE_GATEWAY}:53", port=53, host=self.spec.ip)
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
                 "endpoints": [{"addresses": [self.spec.ip], "nodeName": self.spec.name,
                                "conditions": {"ready": True}}],
                 "ports": ports},
            ]}))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


def assign_pod_cidr(kubectl: Callable[..., subprocess.CompletedProcess[str]], spec: NodeSpec,
                    procs: Sequence[Process], timeout: float) -> None:
    """Once Node `spec.name` has registered, set its Pod CIDR to the one its bridge serves (as
    the admin; spec.podCIDR can be set once). Fails if it holds another one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        got = kubectl("get", "node", spec.name, "-o", "json", check=False)
        if got.returncode == 0:
            cidr = json.loads(got.stdout)["spec"].get("podCIDR")
            if cidr is None:
                kubectl("patch", "node", spec.name, "--type=merge", "-p", json.dumps(
                    {"spec": {"podCIDR": spec.pod_cidr, "podCIDRs": [spec.pod_cidr]}}))
                return
            if cidr != spec.pod_cidr:
                raise RuntimeError(f"{spec.name} has Pod CIDR {cidr}, its bridge serves "
                                   f"{spec.pod_cidr}")
            return
        time.sleep(0.2)
    raise RuntimeError(f"{spec.name} did not register within {timeout:.0f}s")


def wait_node_ready(kubectl: Callable[..., subprocess.CompletedProcess[str]], name: str,
                    procs: Sequence[Process], timeout: float,
                    also: Sequence[str] | None = None) -> None:
    """Until Node `name` is Ready (and `kubectl *also` succeeds); fails early when one of
    `procs` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        got = kubectl("get", "node", name, "-o", "json", check=False)
        if got.returncode == 0:
            conds = {c["type"]: c["status"] for c in json.loads(got.stdout)["status"].get(
                "conditions", [])}
            if conds.get("Ready") == "True" and (
                    also is None or kubectl(*also, check=False).returncode == 0):
                return
        time.sleep(0.5)
    raise RuntimeError(f"node {name} not Ready after {timeout:.0f}s:\n"
                       + "\n".join(p.log_tail(8) for p in procs if p.name == "kubelet"))


def _inside(args: argparse.Namespace) -> int:
    """Runs in one node's namespaces; prints `ready` once the node is Ready (node-1: and the
    proxy installed), serves until SIGTERM (or until its parent dies), then stops what it
    started. A SIGTERM while starting ends the start at once."""
    workdir = Path(args.workdir)
    stop = False
    started = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        if not started:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = Node(workdir, args.cgroup, args.proxy, NODES[args.node - 1], args.nodes,
                args.peer_pid)
    try:
        timings: dict[str, float] = {}
        for step in node.steps():
            began = time.monotonic()
            step()
            timings[step.__name__] = round(time.monotonic() - began, 1)
        if node.first:
            (workdir / "inside.json").write_text(json.dumps({
                "apiserver_port": node.cp.port, "timings": timings}))
        started = True
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
    """One node, or two, each started through `unshare`; the API server reachable on 127.0.0.1.
    See the module docstring."""

    def __init__(self, workdir: Path, proxy: str = "kubeshim", nodes: int = 1) -> None:
        if not 1 <= nodes <= len(NODES):
            raise ValueError(f"nodes must be 1 to {len(NODES)}, not {nodes}")
        self.workdir = workdir
        self.proxy = proxy
        self.specs = NODES[:nodes]
        self.cgroup = f"kubeshim-node-{os.getpid()}-{secrets.token_hex(3)}"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.peers = Peers.find()
        # node-1's inside process (the control plane's), and every node's by name.
        self.inside: subprocess.Popen[str] | None = None
        self.insides: dict[str, subprocess.Popen[str]] = {}
        self.bridge: Process | None = None
        self.timings: dict[str, float] = {}
        self.sysctls: dict[str, str] = {}
        self.node_apiserver = ("127.0.0.1", 0)

    def node_workdir(self, spec: NodeSpec) -> Path:
        return self.workdir if spec == NODES[0] else self.workdir / spec.name

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
            # node-2 first: node-1 puts the other end of its link into node-2's namespace.
            for spec in reversed(self.specs):
                self.insides[spec.name] = self._start_inside(spec)
            self.inside = self.insides[NODE_NAME]
            self.timings = self._wait_ready(timeout)
            inside = json.loads((self.workdir / "inside.json").read_text())
            # How the nodes (and kubeshim on them, host network) reach the API server: node-1's
            # loopback, or its address when another node must reach it too.
            self.node_apiserver = ("127.0.0.1" if len(self.specs) == 1 else NODE_IP,
                                   int(inside["apiserver_port"]))
            self._inner_bridge(int(inside["apiserver_port"]))
            admin = json.loads((self.workdir / "control-plane" / "admin.kubeconfig").read_text())
            admin["clusters"][0]["cluster"]["server"] = self.server
            self.kubeconfig.write_text(json.dumps(admin, indent=2))
            self.kubeconfig.chmod(0o600)
            self.timings["total"] = round(time.monotonic() - began, 1)
        except BaseException:
            self.stop()
            raise

    def _start_inside(self, spec: NodeSpec) -> subprocess.Popen[str]:
        """`_inside` for one node in new network and mount namespaces, in its own cgroup."""
        first = spec == NODES[0]
        workdir = self.node_workdir(spec)
        workdir.mkdir(parents=True, exist_ok=True)
        group = self.cgroup if first else f"{self.cgroup}/{spec.name}"
        if not first:
            make_cgroups(group)
            (workdir / "join.json").unlink(missing_ok=True)  # node-1 writes it when Ready
        argv = ["unshare", "--net", "--mount", "--propagation", "private", "--",
                sys.executable, str(Path(__file__).resolve()), "_inside",
                f"--workdir={workdir}", f"--cgroup={self.cgroup}", f"--proxy={self.proxy}",
                f"--node={NODES.index(spec) + 1}", f"--nodes={len(self.specs)}"]
        if first and len(self.specs) > 1:
            peer = self.insides[NODES[1].name].pid
            # unshare(2) runs after the fork: wait until node-2 has its own network
            # namespace, or node-1 would put the link's other end into this one.
            deadline = time.monotonic() + 10
            while _netns(peer) == _netns(os.getpid()):
                if time.monotonic() > deadline:
                    raise RuntimeError("node-2 has no network namespace of its own after 10s")
                time.sleep(0.01)
            argv.append(f"--peer-pid={peer}")

        def prepare() -> None:
            from tests.peers.cluster import _die_with_parent

            _die_with_parent()
            join_cgroups(group, os.getpid())

        with open(workdir / "inside.log", "ab") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=log, text=True, preexec_fn=prepare)

    def _wait_ready(self, timeout: float) -> dict[str, float]:
        """Until every node's inside says `ready`; fails with a node's log once it exits."""
        import select

        timings: dict[str, float] = {}
        pending = dict(self.insides)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(pending)} not ready after {timeout:.0f}s")
            streams = {p.stdout: name for name, p in pending.items() if p.stdout is not None}
            readable, _, _ = select.select(list(streams), [], [], 1.0)
            for stream in readable:
                name = streams[stream]
                line = str(stream.readline())
                if not line.startswith("ready"):
                    log = self.node_workdir(NODES[[n.name for n in NODES].index(name)])
                    raise RuntimeError(f"{name} did not start:\n{_tail(log / 'inside.log')}")
                steps = json.loads(line.split(" ", 1)[1])
                prefix = "" if name == NODE_NAME else f"{name}."
                timings.update({f"{prefix}{k}": v for k, v in steps.items()})
                del pending[name]
        return timings

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

    def on_node(self, name: str, *argv: str,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `argv` in node `name`'s network namespace (as its host network)."""
        pid = self.insides[name].pid
        return subprocess.run(["nsenter", f"--target={pid}", "--net", "--", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> list[str]:
        """Stop the nodes and undo what they changed on the host; returns what was left over."""
        running = [p for p in self.insides.values() if p.poll() is None]
        for inside in running:
            inside.send_signal(signal.SIGTERM)
        for inside in running:
            try:
                inside.wait(60)
            except subprocess.TimeoutExpired:
                inside.kill()
                inside.wait()
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


def _netns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def processes_in_netns(inode: int) -> list[int]:
    """The pids of the processes in the network namespace `inode` (none once a node is gone)."""
    found = []
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            if ns.stat().st_ino == inode:
                found.append(int(ns.parts[2]))
        except OSError:
            continue
    return found


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


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def cluster(workdir: Path | None = None, proxy: str = "kubeshim",
            nodes: int = 1) -> Iterator[Cluster]:
    owned = workdir is None
    directory = workdir or Path(tempfile.mkdtemp(prefix=f"kubeshim-node-{os.getpid()}-"))
    c = Cluster(directory, proxy, nodes)
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
    with cluster(workdir, args.proxy, args.nodes) as c:
        print(f"kubeconfig  {c.kubeconfig}")
        print(f"server      {c.server}")
        for spec in c.specs:
            print(f"node        {spec.name} ({spec.ip}), Pods {spec.pod_cidr}, "
                  f"pid {c.insides[spec.name].pid} (nsenter --target PID --net), "
                  f"logs {c.node_workdir(spec)}/*.log")
        print(f"proxy       {args.proxy}")
        print(f"ready in    {c.timings}")
        print(f"export KUBECONFIG={c.kubeconfig}")
        print("serving until Ctrl-C / SIGTERM", flush=True)
        while not stop:
            exited = [name for name, p in c.insides.items() if p.poll() is not None]
            if exited:
                print(f"{exited[0]} exited; see its inside.log", file=sys.stderr)
                return 1
            time.sleep(0.5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a one- or two-node cluster, serve until interrupted")
    up.add_argument("--workdir", help="keep data, logs and kubeconfigs here")
    up.add_argument("--proxy", choices=("kubeshim", "kube-proxy", "none"), default="kubeshim")
    up.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                    help="node-2 joins node-1 (which runs the control plane) when 2")
    down = sub.add_parser("down", help="clean up after an `up` that was killed")
    down.add_argument("--workdir", required=True)
    inside = sub.add_parser("_inside")
    inside.add_argument("--workdir", required=True)
    inside.add_argument("--cgroup", required=True)
    inside.add_argument("--proxy", required=True)
    inside.add_argument("--node", type=int, default=1)
    inside.add_argument("--nodes", type=int, default=1)
    inside.add_argument("--peer-pid", type=int, default=0)
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
