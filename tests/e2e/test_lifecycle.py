"""The daemon's lifecycle in a namespace lab: SIGTERM drains, removes its VIPs, and a restart
(also after a crash that left addresses behind) serves again.

    node namespace   kubeshim --vip-mode interface (ClusterIPs on kubeshim0), DNS on 10.244.0.1
    pod-a            an echo server on :9000 (socat), the one endpoint of Service `echo`
    client           socat / nc / dig through the ClusterIP 10.96.0.10 and kubeshim's DNS

Needs root (network namespaces); everything is torn down by the Lab, even on failure.
"""

from __future__ import annotations

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

from tests.netns import NODE_IP, Lab, LiveConnection, Netns

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NODE = "lab-node"
CLUSTER_IP = "10.96.0.10"
STALE_IP = "10.96.0.99"
PORT = 9000
HC_PORT = 32100
DRAIN = 8.0

MANIFEST = f"""\
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {CLUSTER_IP}
  clusterIPs: [{CLUSTER_IP}]
  ports: [{{name: tcp, protocol: TCP, port: {PORT}, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{{name: tcp, protocol: TCP, port: {PORT}}}]
endpoints:
- addresses: [10.244.0.2]
  nodeName: {NODE}
  conditions: {{ready: true}}
---
# The same Pod behind a LoadBalancer with externalTrafficPolicy Local: a load balancer probes
# the node's health-check nodePort.
apiVersion: v1
kind: Service
metadata: {{name: echo-lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Local
  healthCheckNodePort: {HC_PORT}
  ports: [{{name: tcp, protocol: TCP, port: {PORT}, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-lb-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo-lb}}
addressType: IPv4
ports: [{{name: tcp, protocol: TCP, port: {PORT}}}]
endpoints:
- addresses: [10.244.0.2]
  nodeName: {NODE}
  conditions: {{ready: true}}
"""


class Kubeshim:
    """One daemon run in the node namespace, ended by its pid."""

    def __init__(self, lab: Lab, tmp: Path, run: int) -> None:
        self.node = lab.node
        self.log = tmp / f"kubeshim-{run}.log"
        unused = _free_udp_port()
        argv = [sys.executable, "-m", "kubeshim", "run", "--manifests", str(tmp / "manifests"),
                "--vip-mode", "interface", "--hostname-override", NODE,
                "--dns-bind", f"{NODE_IP}:53", "--upstream", f"127.0.0.1:{unused}",
                "--healthz-bind-address", "127.0.0.1:10256",
                "--metrics-bind-address", "127.0.0.1:10249",
                "--drain-timeout", str(DRAIN)]
        with self.log.open("w") as out:
            # `ip netns exec` execs the command: the pid is the daemon's.
            self.proc = self.node.popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_serving(self, client: Netns) -> None:
        deadline = time.monotonic() + 40  # generous: a busy machine, nothing timed here
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if connects(client) and CLUSTER_IP in vips(self.node):
                return
            time.sleep(0.1)
        raise AssertionError(f"kubeshim did not serve {CLUSTER_IP}:\n{self.log.read_text()}")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vips(node: Netns) -> list[str]:
    """The addresses on kubeshim0, or [] when the interface is gone."""
    out = node.run(["ip", "-o", "-4", "addr", "show", "dev", "kubeshim0"], check=False)
    if out.returncode != 0:
        assert "does not exist" in out.stderr, out.stderr
        return []
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]


def health_check(client: Netns) -> int:
    """The status a load balancer probing the health-check nodePort gets (0: no answer)."""
    out = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                      f"http://{NODE_IP}:{HC_PORT}/"], check=False)
    return int(out.stdout or 0)


def connects(client: Netns) -> bool:
    """A new TCP connection to the ClusterIP succeeds (nc -z)."""
    return client.run(["nc", "-z", "-w", "2", CLUSTER_IP, str(PORT)], check=False).returncode == 0


def live_connection(client: Netns) -> LiveConnection:
    """One TCP connection through the ClusterIP; socat lingers 0.5 s after a half-close."""
    return LiveConnection(client, f"{CLUSTER_IP}:{PORT}", "-t", "0.5")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Netns, Path]]:
    with Lab(tag="lc") as lab:
        pod = lab.add_host("pod-a")
        client = lab.add_host("client")
        pod.popen(["socat", f"TCP-LISTEN:{PORT},fork,reuseaddr", "PIPE"])
        pod.wait_port("", PORT)
        (tmp_path / "manifests").mkdir()
        (tmp_path / "manifests" / "echo.yaml").write_text(MANIFEST)
        yield lab, client, tmp_path


def test_sigterm_drains_live_connections_and_removes_vips(lab: Any) -> None:
    lab, client, tmp = lab
    daemon = Kubeshim(lab, tmp, 1)
    daemon.wait_serving(client)
    live = live_connection(client)
    assert live.echo("before") == "before"
    deadline = time.monotonic() + 10
    while health_check(client) != 200:
        assert time.monotonic() < deadline, "no health-check nodePort"
        time.sleep(0.1)

    daemon.signal(signal.SIGTERM)
    # New connections are refused at once (the listener is closed, the VIP still local)...
    deadline = time.monotonic() + 3
    while connects(client):
        assert time.monotonic() < deadline, "new connections still accepted after SIGTERM"
        time.sleep(0.05)
    started = time.monotonic()
    assert not connects(client)
    assert time.monotonic() - started < 1.5, "refused, not timed out"
    # ...while the live one keeps working, and the daemon waits for it.
    for i in range(3):
        assert live.echo(f"draining {i}") == f"draining {i}"
        time.sleep(0.3)
    assert daemon.proc.poll() is None, "the daemon must wait for the live connection"
    assert CLUSTER_IP in vips(lab.node)
    # Load balancers see the node go at once: its health-check nodePort is closed.
    assert health_check(client) == 0

    closed = time.monotonic()
    live.close()
    assert daemon.proc.wait(timeout=DRAIN + 5) == 0, daemon.log.read_text()
    # It ended when the connection did, well before the drain deadline.
    assert time.monotonic() - closed < DRAIN - 2, daemon.log.read_text()
    assert vips(lab.node) == [], "service addresses left behind"
    assert "drain deadline passed" not in daemon.log.read_text()


def test_the_drain_deadline_ends_stuck_connections(lab: Any) -> None:
    lab, client, tmp = lab
    daemon = Kubeshim(lab, tmp, 1)
    daemon.wait_serving(client)
    live = live_connection(client)
    assert live.echo("hello") == "hello"
    sent = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DRAIN + 10) == 0, daemon.log.read_text()
    took = time.monotonic() - sent
    assert DRAIN - 0.5 < took < DRAIN + 6, took
    assert "drain deadline passed" in daemon.log.read_text()
    assert live.proc.wait(timeout=5) is not None  # the client saw its connection end
    assert vips(lab.node) == []


def test_restart_after_a_crash_cleans_stale_addresses(lab: Any) -> None:
    lab, client, tmp = lab
    first = Kubeshim(lab, tmp, 1)
    first.wait_serving(client)
    first.signal(signal.SIGKILL)  # no chance to clean up
    first.proc.wait(timeout=5)
    assert CLUSTER_IP in vips(lab.node)
    lab.node.run(["ip", "addr", "add", f"{STALE_IP}/32", "dev", "kubeshim0"])

    second = Kubeshim(lab, tmp, 2)
    second.wait_serving(client)
    assert sorted(vips(lab.node)) == [CLUSTER_IP, "10.96.0.11"], "a stale address stays"
    live = live_connection(client)
    assert live.echo("again") == "again"
    live.close()
    answer = client.run(["dig", f"@{NODE_IP}", "+short", "+tries=1", "+time=2",
                         "echo.default.svc.cluster.local"]).stdout.split()
    assert answer == [CLUSTER_IP]
    second.signal(signal.SIGTERM)
    assert second.proc.wait(timeout=DRAIN + 5) == 0, second.log.read_text()
    assert vips(lab.node) == []
