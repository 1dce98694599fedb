"""A real Kubernetes control plane on loopback: etcd and kube-apiserver, as built by build.sh.

Owns finding the peer binaries (the envtest layout, or KUBEBUILDER_ASSETS), generating the
credentials a fresh cluster needs, starting and stopping the two processes by pid, and the
fault helpers tests use (etcd compaction, kube-apiserver restart). Independent of kubeshim.

    python tests/peers/cluster.py up     # prints the kubeconfigs, serves until Ctrl-C/SIGTERM

Three identities, each with its own kubeconfig:
  admin    a static token in group system:masters;
  kubeshim the kube-system/kubeshim ServiceAccount bound by deploy/rbac.yaml, through a token
           from the TokenRequest API, so it has exactly that ClusterRole's rights;
  norole   a static token user bound to nothing (only what system:authenticated gets).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RBAC_MANIFEST = REPO / "deploy" / "rbac.yaml"
SERVICE_CIDR = "10.96.0.0/12"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class PeersMissing(RuntimeError):
    """A peer binary is not there: tests/peers/build.sh has not been run."""


# --- Finding the binaries ---------------------------------------------------------------


def pinned_versions(path: Path = HERE / "versions.env") -> dict[str, str]:
    """The KEY=value pins build.sh builds from."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


def peers_dir() -> Path:
    return Path(os.environ.get("KUBESHIM_PEERS_DIR") or Path.home() / ".cache/kubeshim/peers")


@dataclass(frozen=True)
class Peers:
    """Paths of the real Kubernetes programs."""

    kube_apiserver: Path
    etcd: Path
    kubectl: Path
    kube_proxy: Path
    coredns: Path

    @classmethod
    def find(cls) -> Peers:
        """The built peers; KUBEBUILDER_ASSETS, when set, supplies apiserver, etcd and kubectl."""
        pins = pinned_versions()
        k8s = peers_dir() / "k8s" / f"{pins['KUBERNETES_VERSION'].lstrip('v')}-linux-amd64"
        coredns = peers_dir() / "coredns" / f"{pins['COREDNS_VERSION'].lstrip('v')}-linux-amd64"
        assets = (
            Path(os.environ["KUBEBUILDER_ASSETS"]) if os.environ.get("KUBEBUILDER_ASSETS") else k8s
        )
        return cls(
            kube_apiserver=assets / "kube-apiserver",
            etcd=assets / "etcd",
            kubectl=assets / "kubectl",
            kube_proxy=k8s / "kube-proxy",
            coredns=coredns / "coredns",
        )

    def require(self, *names: str) -> None:
        """Raise PeersMissing naming every absent binary among `names` (all when empty)."""
        wanted = names or tuple(self.__dataclass_fields__)
        missing = [
            str(getattr(self, n)) for n in wanted if not os.access(getattr(self, n), os.X_OK)
        ]
        if missing:
            raise PeersMissing(
                f"missing peer binaries: {', '.join(missing)}; "
                "run tests/peers/build.sh to build them"
            )


# --- Processes ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """One child process, logging to a file, ended by its own pid."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so it is only
        # armed from the main thread: a restart from a worker thread (asyncio.to_thread) must
        # not take the process down when that worker exits. Such a child is still ended by
        # pid when the control plane stops.
        main = threading.current_thread() is threading.main_thread()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if main else None,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until(
        self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT
    ) -> None:
        """Poll `ready()` until true; fail with the log's tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited before {what}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not {what} after {timeout:.0f}s:\n{self.log_tail()}")


# --- Credentials -------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_serving_certs(
    directory: Path, extra_sans: Sequence[str] = ()
) -> tuple[Path, Path, Path]:
    """A throwaway CA and a serving cert for 127.0.0.1/localhost (and `extra_sans`, IPs or DNS
    names); returns (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeshim-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    *(_san(name) for name in extra_sans),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    paths[2].chmod(0o600)
    return paths


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> Path:
    """A kubeconfig (JSON is valid YAML) with one cluster, one user and one context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --- The control plane -------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver on loopback with free ports and a fresh data dir under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        peers: Peers | None = None,
        rbac_manifest: Path = RBAC_MANIFEST,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.peers = peers or Peers.find()
        self.rbac_manifest = rbac_manifest
        self.extra_apiserver_args = list(extra_apiserver_args)
        # Names and addresses the serving certificate carries besides loopback.
        self.serving_sans: list[str] = []
        self.etcd_port = free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_hex(16)
        self.norole_token = secrets.token_hex(16)
        self.kubeshim_token = ""
        self.ca_file = workdir / "ca.crt"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.kubeshim_kubeconfig = workdir / "kubeshim.kubeconfig"
        self.norole_kubeconfig = workdir / "norole.kubeconfig"
        self.etcd: Process | None = None
        self.apiserver: Process | None = None
        self.ready_seconds = 0.0

    # Lifecycle

    def start(self) -> None:
        """Start etcd, then kube-apiserver; wait for /readyz; apply RBAC; write the kubeconfigs."""
        self.peers.require("etcd", "kube_apiserver", "kubectl")
        began = time.monotonic()
        try:
            self._prepare()
            self._start_etcd()
            self._start_apiserver()
            self._bootstrap_identities()
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - began

    def stop(self) -> None:
        """End kube-apiserver, then etcd, by the pids this object started."""
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "etcd-data").mkdir(mode=0o700)
        write_serving_certs(self.workdir, self.serving_sans)
        # ServiceAccount token signing key (SEC1 PEM, which the apiserver reads) and its
        # public half for verification.
        signing = ec.generate_private_key(ec.SECP256R1())
        sa_key = self.workdir / "sa.key"
        sa_key.write_bytes(
            signing.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        sa_key.chmod(0o600)
        (self.workdir / "sa.pub").write_bytes(
            signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        # Static token file: token,user,uid,"group1,group2" (the apiserver's CSV format).
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n'
            f"{self.norole_token},norole,norole-uid\n"
        )
        tokens.chmod(0o600)
        write_kubeconfig(
            self.admin_kubeconfig, self.server, self.ca_file, "admin", self.admin_token
        )
        write_kubeconfig(
            self.norole_kubeconfig, self.server, self.ca_file, "norole", self.norole_token
        )

    def _start_etcd(self) -> None:
        peer_url = f"http://127.0.0.1:{free_port()}"
        self.etcd = Process(
            "etcd",
            [
                str(self.peers.etcd),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # A test cluster's data is thrown away: skip fsync, which dominates start-up.
                "--unsafe-no-fsync",
                # One member: a short election timeout makes it leader sooner.
                "--heartbeat-interval=20",
                "--election-timeout=200",
                "--log-level=warn",
            ],
            self.workdir / "etcd.log",
        )
        self.etcd.start()
        self.etcd.wait_until(self._etcd_healthy, "healthy")

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
            return bool(json.load(resp).get("health") == "true")

    def _apiserver_argv(self) -> list[str]:
        w = self.workdir
        return [
            str(self.peers.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={w / 'certs'}",
            f"--tls-cert-file={w / 'apiserver.crt'}",
            f"--tls-private-key-file={w / 'apiserver.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            # The default/kubernetes Service would get 127.0.0.1 as its endpoint, which
            # endpoint validation rejects (loopback); keep the Service, skip the endpoints.
            "--endpoint-reconciler-type=none",
            *self.extra_apiserver_args,
        ]

    def _start_apiserver(self) -> None:
        self.apiserver = Process(
            "kube-apiserver", self._apiserver_argv(), self.workdir / "apiserver.log"
        )
        self.apiserver.start()
        self.apiserver.wait_until(self._apiserver_ready, "ready (/readyz)")

    def _apiserver_ready(self) -> bool:
        status, _ = self.request("GET", "/readyz", token=self.admin_token, timeout=2)
        return status == 200

    def _bootstrap_identities(self) -> None:
        """Apply deploy/rbac.yaml and mint a ServiceAccount token for the kubeshim identity."""
        # kube-system is made by a controller inside the apiserver shortly after start.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            applied = self.kubectl("apply", "-f", str(self.rbac_manifest), check=False)
            if applied.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"kubectl apply {self.rbac_manifest} failed: {applied.stderr}")
            time.sleep(0.1)
        minted = self.kubectl("create", "token", "kubeshim", "-n", "kube-system", "--duration=48h")
        self.kubeshim_token = minted.stdout.strip()
        write_kubeconfig(
            self.kubeshim_kubeconfig, self.server, self.ca_file, "kubeshim", self.kubeshim_token
        )

    # Fault helpers

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port against the same etcd."""
        assert self.apiserver is not None, "control plane not started"
        self.apiserver.stop()
        self._start_apiserver()

    def stop_apiserver(self) -> None:
        assert self.apiserver is not None, "control plane not started"
        self.apiserver.stop()

    def start_apiserver(self) -> None:
        self._start_apiserver()

    def etcd_revision(self) -> int:
        """etcd's current revision (the header of a range read through the v3 JSON gateway)."""
        reply = self._etcd_post(
            "/v3/kv/range", {"key": base64.b64encode(b"/").decode(), "limit": 1}
        )
        return int(reply["header"]["revision"])

    def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd's history up to `revision` (default: now); returns that revision.

        Resource versions older than it are then gone from etcd. The apiserver's watch
        cache still serves its own recent history, so a watch from such a version succeeds
        until the cache is rebuilt (expire_history) or when --watch-cache=false.
        """
        revision = self.etcd_revision() if revision is None else revision
        self._etcd_post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def expire_history(self) -> int:
        """Make every resourceVersion issued so far too old to watch from; returns etcd's
        compacted revision.

        Compacts etcd, then restarts kube-apiserver so its watch cache starts over from
        the compacted store: a watch from an older version then gets the watch event
        ERROR with a Status of code 410, reason Expired ("too old resource version").
        """
        revision = self.compact_etcd()
        self.restart_apiserver()
        return revision

    def _etcd_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.etcd_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            reply: dict[str, Any] = json.load(resp)
            return reply

    # Clients

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        timeout: float = 10,
    ) -> tuple[int, Any]:
        """One HTTPS request to the apiserver; returns (status, decoded JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl (admin identity unless `kubeconfig` says otherwise)."""
        argv = [
            str(self.peers.kubectl),
            f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
            *args,
        ]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[1:])} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result


@contextlib.contextmanager
def control_plane(workdir: Path | None = None, **kwargs: Any) -> Iterator[ControlPlane]:
    """A started control plane in `workdir` (default: a fresh temporary one, removed after)."""
    owned = workdir is None
    directory = (
        Path(tempfile.mkdtemp(prefix=f"kubeshim-cp-{os.getpid()}-")) if workdir is None else workdir
    )
    cp = ControlPlane(directory, **kwargs)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)


# --- CLI ---------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = Path(args.workdir) if args.workdir else None
    try:
        with control_plane(workdir) as cp:
            print(f"server      {cp.server}  (ready in {cp.ready_seconds:.1f}s)")
            print(f"etcd        {cp.etcd_url}")
            print(f"admin       {cp.admin_kubeconfig}")
            print(f"kubeshim    {cp.kubeshim_kubeconfig}")
            print(f"norole      {cp.norole_kubeconfig}")
            print(f"logs        {cp.workdir}/{{etcd,apiserver}}.log")
            print("serving until Ctrl-C / SIGTERM", flush=True)
            while not stop:
                if not (cp.etcd and cp.etcd.running() and cp.apiserver and cp.apiserver.running()):
                    print("a control-plane process exited; see the logs", file=sys.stderr)
                    return 1
                time.sleep(0.2)
    except PeersMissing as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start etcd + kube-apiserver and serve until interrupted")
    up.add_argument(
        "--workdir", help="keep data, certs, logs and kubeconfigs here (kept afterwards)"
    )
    sub.add_parser("peers", help="print the peer binary paths")
    args = parser.parse_args(argv)
    if args.command == "peers":
        for name, path in vars(Peers.find()).items():
            print(f"{name:15} {path}")
        return 0
    return _up(args)


if __name__ == "__main__":
    sys.exit(main())
