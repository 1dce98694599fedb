"""The daemon as an operator runs it: a config file, a manifest folder, observed with curl, dig,
prometheus_client's parser and `kubeshim status`, then SIGTERM.

Everything is on loopback: the daemon in loopback VIP mode, backends on 127.x addresses, DNS on a
free port with an upstream port nothing listens on. Daemons are ended by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_dns_port, free_port

ROOT = Path(__file__).resolve().parents[2]
NODE = "test-node"
# Addresses of this run (distinct per pid, so parallel runs do not collide).
NET = f"127.77.{os.getpid() % 250}"
CLUSTER_IP = f"10.100.{os.getpid() % 250}.7"


def run(*argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def curl(url: str) -> tuple[int, str]:
    """(HTTP status, body), or (-curl exit code, '')."""
    proc = run("curl", "-sS", "--max-time", "3", "-w", "\n%{http_code}", url)
    if proc.returncode:
        return -proc.returncode, ""
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


def wait_for(predicate: Any, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def web_slice(ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 18080}],
        "endpoints": [
            {"addresses": [f"{NET}.1"], "nodeName": NODE, "conditions": {"ready": ready}},
            {"addresses": [f"{NET}.2"], "nodeName": "other-node", "conditions": {"ready": True}},
        ],
    }


def web_service(hc_port: int) -> dict[str, Any]:
    # A LoadBalancer with externalTrafficPolicy Local gets a health-check nodePort; no
    # nodePorts (allocateLoadBalancerNodePorts: false) keeps the test off fixed ports.
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                 "allocateLoadBalancerNodePorts": False, "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": hc_port,
                 "ports": [{"name": "http", "port": 80, "targetPort": 18080}]},
    }


class Daemon:
    def __init__(self, tmp: Path, extra: list[str] | None = None, config: str | None = None
                 ) -> None:
        self.healthz, self.metrics = free_port(), free_port()
        self.dns = free_dns_port()
        self.hc = free_port()
        self.manifests = tmp / "manifests"
        self.manifests.mkdir(exist_ok=True)
        self.write_manifests()
        self.config = tmp / "kube-proxy.yaml"
        self.config.write_text(config if config is not None else f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: {NODE}
healthzBindAddress: 127.0.0.1:{self.healthz}
metricsBindAddress: 127.0.0.1:{self.metrics}
nodePortAddresses: [127.0.0.0/8]
mode: iptables
iptables: {{masqueradeAll: true, syncPeriod: 30s}}
dns:
  binds: ["127.0.0.1:{self.dns}"]
  upstreams: ["127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"]
""")
        self.log = tmp / "kubeshim.log"
        argv = [sys.executable, "-m", "kubeshim", "run", "--config", str(self.config),
                "--manifests", str(self.manifests), "--vip-mode", "loopback", *(extra or [])]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def write_manifests(self, ready: bool = True) -> None:
        path = self.manifests / "web.yaml"
        tmp = path.with_name(".web.yaml.tmp")
        tmp.write_text(yaml.safe_dump_all([web_service(self.hc), web_slice(ready)]))
        tmp.rename(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.healthz}{path}"

    def murl(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics}{path}"

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def backends() -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, str(ROOT / "examples/backend.py"), f"web-{i}",
                               f"{NET}.{i}", "18080"], start_new_session=True)
             for i in (1, 2)]
    try:
        for i in (1, 2):
            wait_for(lambda i=i: curl(f"http://{NET}.{i}:18080/")[0] == 200, timeout=30,
                     what="backend")
        yield
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=5)


@pytest.fixture
def daemon(tmp_path: Path, backends: None) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        # Generous: the machine may be busy; nothing here measures speed.
        wait_for(lambda: curl(d.url("/healthz"))[0] == 200 or d.proc.poll() is not None,
                 timeout=30, what="healthz")
        assert d.proc.poll() is None, d.log_text()
        try:
            wait_for(lambda: '"default/web"' in curl(d.murl("/status"))[1], timeout=30,
                     what="web served")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{d.log_text()}") from None
        yield d
    finally:
        d.stop()


def metrics(d: Daemon) -> dict[str, list[Any]]:
    status, text = curl(d.murl("/metrics"))
    assert status == 200
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def dig(d: Daemon, name: str) -> list[str]:
    proc = run("dig", "@127.0.0.1", "-p", str(d.dns), "+short", "+tries=1", "+time=2", name)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_config_file_drives_the_daemon(daemon: Daemon) -> None:
    d = daemon
    log = d.log_text()
    # Fields a user-space proxy cannot honour are listed once, with the reason.
    assert log.count("configuration field ignored") == 2, log
    assert 'field="mode: kubeshim is its own user-space mode"' in log
    assert "iptables: no iptables rules" in log

    status, body = curl(d.url("/livez"))
    assert status == 200 and set(json.loads(body)) <= {"lastUpdated", "currentTime", "healthy",
                                                        "status"}

    # DNS from the dns: section, answering the address the ClusterIP is served at.
    (vip,) = dig(d, "web.default.svc.cluster.local")
    seen = {curl(f"http://{vip}/")[1].strip() for _ in range(6)}
    assert seen == {"hello from web-1", "hello from web-2"}


def test_metrics_endpoint(daemon: Daemon) -> None:
    d = daemon
    dig(d, "web.default.svc.cluster.local")
    (vip,) = dig(d, "web.default.svc.cluster.local")
    assert curl(f"http://{vip}/")[0] == 200
    m = metrics(d)
    # process metrics, kube-proxy's sync and health metrics, CoreDNS's and the proxy's own.
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                 "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                 "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                 "kubeproxy_sync_proxy_rules_duration_seconds_count",
                 "kubeproxy_proxy_healthz_total", "coredns_dns_requests_total",
                 "kubeshim_proxy_connections_total"):
        assert name in m, name
    assert m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][0].value > time.time() - 60
    assert sum(s.value for s in m["coredns_dns_requests_total"]) >= 2
    web = [s for s in m["kubeshim_proxy_connections_total"]
           if s.labels["service"] == "default/web"]
    assert web and web[0].value >= 1


def test_health_check_node_port_follows_endpoints(daemon: Daemon) -> None:
    d = daemon
    hc = f"http://127.0.0.1:{d.hc}/"
    wait_for(lambda: curl(hc)[0] == 200, timeout=20, what="health check")
    body = json.loads(curl(hc)[1])
    assert body == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1,
                    "serviceProxyHealthy": True}
    d.write_manifests(ready=False)  # the only local endpoint stops being ready
    wait_for(lambda: curl(hc)[0] == 503, timeout=20, what="503 from the health check")
    assert json.loads(curl(hc)[1])["localEndpoints"] == 0


def test_kubeshim_status_shows_what_is_served(daemon: Daemon) -> None:
    d = daemon
    address = f"127.0.0.1:{d.metrics}"
    table = run(sys.executable, "-m", "kubeshim", "status", "--address", address)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert f"node {NODE}" in out and "healthy=True" in out
    assert "default/web" in out and f"{CLUSTER_IP} -> " in out
    assert f"{NET}.1:18080(ready)" in out and f"{NET}.2:18080(ready)" in out
    assert "Health-check nodePorts" in out and str(d.hc) in out
    assert "dns: zone cluster.local" in out
    doc = json.loads(run(sys.executable, "-m", "kubeshim", "status", "--address", address,
                         "-o", "json").stdout)
    web = next(s for s in doc["proxy"]["services"] if s["name"] == "default/web")
    assert web["clusterIPs"] == [CLUSTER_IP]
    down = run(sys.executable, "-m", "kubeshim", "status", "--address",
               f"127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the daemon" in down.stderr


def test_nothing_is_logged_per_request(daemon: Daemon) -> None:
    d = daemon
    (vip,) = dig(d, "web.default.svc.cluster.local")
    before = d.log_text()
    for _ in range(20):
        assert curl(f"http://{vip}/")[0] == 200
        dig(d, "web.default.svc.cluster.local")
        dig(d, "nope.default.svc.cluster.local")
    assert curl(d.url("/healthz"))[0] == 200
    assert d.log_text() == before


def test_sigterm_stops_cleanly(daemon: Daemon) -> None:
    d = daemon
    assert d.stop() == 0
    assert curl(d.url("/healthz"))[0] == -7
    assert curl(f"http://127.0.0.1:{d.hc}/")[0] == -7
    assert "stopped" in d.log_text().splitlines()[-1]


def test_flags_override_the_file(tmp_path: Path) -> None:
    flag_port = free_port()
    d = Daemon(tmp_path, extra=["--healthz-bind-address", f"127.0.0.1:{flag_port}",
                                "--no-dns"])
    try:
        wait_for(lambda: curl(f"http://127.0.0.1:{flag_port}/healthz")[0] == 200,
                 timeout=30, what="healthz on the flag's port")
        assert curl(d.url("/healthz"))[0] == -7  # the file's port is not used
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(("config", "words"), [
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
     "conntrack: {udpTimeout: 30}\n", "conntrack.udpTimeout: expected a duration string"),
    ("apiVersion: v1\nkind: ConfigMap\n", "expected kind KubeProxyConfiguration"),
], ids=["bad-field", "wrong-kind"])
def test_a_bad_config_file_stops_the_start(tmp_path: Path, config: str, words: str) -> None:
    d = Daemon(tmp_path, config=config)
    assert d.proc.wait(timeout=20) == 2
    log = d.log_text()
    assert words in log and str(d.config) in log
    assert "Traceback" not in log
