"""The daemon as an operator runs it: a config file, a manifest folder, observed with curl, dig,
prometheus_client's parser and `kubeshim status`, then SIGTERM.

Everything is on loopback: the daemon in loopback VIP mode, backends on 127.x addresses, DNS on a
free port with an upstream port nothing listens on. Daemons are ended by pid.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import BACKEND_PORT, Daemon, backends, curl, run
from tests.netns import wait_until
from tests.ports import free_port

NODE = "test-node"
# Addresses of this run (distinct per pid, so parallel runs do not collide).
NET = f"127.77.{os.getpid() % 250}"
CLUSTER_IP = f"10.100.{os.getpid() % 250}.7"


def web_slice(ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": BACKEND_PORT}],
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
                 "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT}]},
    }


class OpsDaemon(Daemon):
    """The daemon on a kube-proxy config file with node settings and one Service, web: a
    LoadBalancer with externalTrafficPolicy Local, one endpoint on this node."""

    def __init__(self, tmp: Path, *args: str, config: str | None = None) -> None:
        super().__init__(tmp, "--vip-mode", "loopback", *args)
        self.hc = free_port()
        self.write_manifests()
        self.write_config(config if config is not None else self.config_text(f"""\
hostnameOverride: {NODE}
nodePortAddresses: [127.0.0.0/8]
mode: iptables
iptables: {{masqueradeAll: true, syncPeriod: 30s}}
"""))

    def write_manifests(self, ready: bool = True) -> None:
        path = self.manifests / "web.yaml"
        tmp = path.with_name(".web.yaml.tmp")
        tmp.write_text(yaml.safe_dump_all([web_service(self.hc), web_slice(ready)]))
        tmp.rename(path)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[OpsDaemon]:
    d = OpsDaemon(tmp_path)
    with backends(("web-1", f"{NET}.1"), ("web-2", f"{NET}.2")):
        try:
            d.start().wait_serving()
            try:
                wait_until(lambda: '"default/web"' in curl(d.murl("/status"))[1], "web served",
                           timeout=30)
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{d.log_text()}") from None
            yield d
        finally:
            d.stop()


def metrics(d: OpsDaemon) -> dict[str, list[Any]]:
    status, text = curl(d.murl("/metrics"))
    assert status == 200
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_config_file_drives_the_daemon(daemon: OpsDaemon) -> None:
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
    (vip,) = d.dig("web.default.svc.cluster.local")
    seen = {curl(f"http://{vip}/")[1].strip() for _ in range(6)}
    assert seen == {"hello from web-1", "hello from web-2"}


def test_metrics_endpoint(daemon: OpsDaemon) -> None:
    d = daemon
    d.dig("web.default.svc.cluster.local")
    (vip,) = d.dig("web.default.svc.cluster.local")
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


def test_health_check_node_port_follows_endpoints(daemon: OpsDaemon) -> None:
    d = daemon
    hc = f"http://127.0.0.1:{d.hc}/"
    wait_until(lambda: curl(hc)[0] == 200, "health check", timeout=20)
    body = json.loads(curl(hc)[1])
    assert body == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1,
                    "serviceProxyHealthy": True}
    d.write_manifests(ready=False)  # the only local endpoint stops being ready
    wait_until(lambda: curl(hc)[0] == 503, "503 from the health check", timeout=20)
    assert json.loads(curl(hc)[1])["localEndpoints"] == 0


def test_kubeshim_status_shows_what_is_served(daemon: OpsDaemon) -> None:
    d = daemon
    address = f"127.0.0.1:{d.metrics}"
    table = run(sys.executable, "-m", "kubeshim", "status", "--address", address)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert f"node {NODE}" in out and "healthy=True" in out
    assert "default/web" in out and f"{CLUSTER_IP} -> " in out
    assert f"{NET}.1:{BACKEND_PORT}(ready)" in out and f"{NET}.2:{BACKEND_PORT}(ready)" in out
    assert "Health-check nodePorts" in out and str(d.hc) in out
    assert "dns: zone cluster.local" in out
    doc = json.loads(run(sys.executable, "-m", "kubeshim", "status", "--address", address,
                         "-o", "json").stdout)
    web = next(s for s in doc["proxy"]["services"] if s["name"] == "default/web")
    assert web["clusterIPs"] == [CLUSTER_IP]
    down = run(sys.executable, "-m", "kubeshim", "status", "--address",
               f"127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the daemon" in down.stderr


def test_nothing_is_logged_per_request(daemon: OpsDaemon) -> None:
    d = daemon
    (vip,) = d.dig("web.default.svc.cluster.local")
    before = d.log_text()
    for _ in range(20):
        assert curl(f"http://{vip}/")[0] == 200
        d.dig("web.default.svc.cluster.local")
        d.dig("nope.default.svc.cluster.local")
    assert curl(d.url("/healthz"))[0] == 200
    assert d.log_text() == before


def test_sigterm_stops_cleanly(daemon: OpsDaemon) -> None:
    d = daemon
    assert d.stop() == 0
    assert curl(d.url("/healthz"))[0] == -7
    assert curl(f"http://127.0.0.1:{d.hc}/")[0] == -7
    assert "stopped" in d.log_text().splitlines()[-1]


def test_flags_override_the_file(tmp_path: Path) -> None:
    flag_port = free_port()
    d = OpsDaemon(tmp_path, "--healthz-bind-address", f"127.0.0.1:{flag_port}", "--no-dns")
    try:
        d.start().wait_serving(f"http://127.0.0.1:{flag_port}/healthz")
        assert curl(d.url("/healthz"))[0] == -7  # the file's port is not used
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(("config", "words"), [
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
     "conntrack: {udpTimeout: 30}\n", "conntrack.udpTimeout: expected a duration string"),
    ("apiVersion: v1\nkind: ConfigMap\n", "expected kind KubeProxyConfiguration"),
], ids=["bad-field", "wrong-kind"])
def test_a_bad_config_file_stops_the_start(tmp_path: Path, config: str, words: str) -> None:
    d = OpsDaemon(tmp_path, config=config).start()
    assert d.proc is not None and d.proc.wait(timeout=20) == 2
    log = d.log_text()
    assert words in log and str(d.config) in log
    assert "Traceback" not in log
