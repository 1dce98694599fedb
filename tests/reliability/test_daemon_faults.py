"""The daemon under hostile clients and faults, on loopback: one client or one fault never takes
the other Services, DNS over UDP and TCP, or /healthz down, and nothing is withdrawn.

The daemon runs in loopback mode with two Services (web, api) in front of real HTTP backends,
DNS on a free port and small per-client caps so the faults stay quick. Each hostile client
uses its own loopback source address; the checks come from 127.0.0.1 with curl and dig.
"""

from __future__ import annotations

import contextlib
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

from tests.ports import free_dns_port, free_port

ROOT = Path(__file__).resolve().parents[2]
NET = f"127.78.{os.getpid() % 250}"
SVC_NET = f"10.101.{os.getpid() % 250}"
PER_CLIENT = 20


def run(*argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def curl(url: str) -> tuple[int, str]:
    proc = run("curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", url)
    if proc.returncode:
        return -proc.returncode, ""
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def objects(name: str, ip: str, backend: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": ip, "ports": [
             {"name": "http", "port": 80, "targetPort": 18080},
             {"name": "echo", "port": 5353, "protocol": "UDP", "targetPort": 18053}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "protocol": "TCP", "port": 18080},
                   {"name": "echo", "protocol": "UDP", "port": 18053}],
         "endpoints": [{"addresses": [f"{NET}.{backend}"]}]},
    ]


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.healthz, self.metrics = free_port(), free_port()
        self.dns = free_dns_port()
        self.manifests = tmp / "manifests"
        self.manifests.mkdir()
        for name, n in (("web", 1), ("api", 2)):
            (self.manifests / f"{name}.yaml").write_text(
                yaml.safe_dump_all(objects(name, f"{SVC_NET}.{n}", n)))
        self.config = tmp / "config.yaml"
        self.write_config("info")
        self.log = tmp / "kubeshim.log"
        argv = [sys.executable, "-m", "kubeshim", "run", "--config", str(self.config),
                "--manifests", str(self.manifests), "--vip-mode", "loopback",
                "--max-connections-per-client", str(PER_CLIENT),
                "--max-udp-flows-per-client", str(PER_CLIENT)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def write_config(self, level: str, extra: str = "") -> None:
        self.config.write_text(f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
healthzBindAddress: 127.0.0.1:{self.healthz}
metricsBindAddress: 127.0.0.1:{self.metrics}
logging: {{verbosity: {4 if level == "debug" else 2}}}
dns:
  binds: ["127.0.0.1:{self.dns}"]
  upstreams: ["127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"]
{extra}""")

    def status(self) -> dict[str, Any]:
        code, body = curl(f"http://127.0.0.1:{self.metrics}/status")
        assert code == 200, (code, self.log.read_text()[-3000:])
        return json.loads(body)  # type: ignore[no-any-return]

    def served_at(self, name: str) -> str:
        for svc in self.status()["proxy"]["services"]:
            if svc["name"] == f"default/{name}":
                return next(iter(svc["servedAt"].values()))  # type: ignore[no-any-return]
        raise AssertionError(f"{name} not served")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def dig(self, name: str, tcp: bool = False) -> list[str]:
        proc = run("dig", "+short", "+time=2", "+tries=1", *(["+tcp"] if tcp else []),
                   "-p", str(self.dns), "@127.0.0.1", name, "A")
        return proc.stdout.split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    procs = [subprocess.Popen([sys.executable, str(ROOT / "examples/backend.py"), f"b{i}",
                               f"{NET}.{i}", "18080"], start_new_session=True) for i in (1, 2)]
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        for i in (1, 2):
            wait_for(lambda i=i: curl(f"http://{NET}.{i}:18080/")[0] == 200, what="backend")
        wait_for(lambda: d.proc.poll() is not None or curl(
            f"http://127.0.0.1:{d.healthz}/healthz")[0] == 200, what="healthz")
        assert d.proc.poll() is None, d.log.read_text()
        wait_for(lambda: len(d.status()["proxy"]["services"]) == 2, what="services")
        d.idle_rss = d.rss_kib()  # type: ignore[attr-defined]
        yield d
    finally:
        d.stop()
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=5)


def assert_everything_serves(d: Daemon, withdrawals: bool = False) -> None:
    """The other Service, DNS over UDP and TCP, /healthz: all answer; nothing withdrawn (unless
    the test removed something itself)."""
    assert d.proc.poll() is None, d.log.read_text()[-3000:]
    code, body = curl(f"http://{d.served_at('api')}/")
    assert (code, body) == (200, "hello from b2\n")
    name = "web.default.svc.cluster.local"
    assert d.dig(name) == [d.served_at("web")]
    assert d.dig(name, tcp=True) == [d.served_at("web")]
    assert curl(f"http://127.0.0.1:{d.healthz}/healthz")[0] == 200
    log = d.log.read_text()
    if not withdrawals:
        assert "listener closed" not in log and "manifest file removed" not in log
    assert "Traceback" not in log, log[-3000:]
    assert d.rss_kib() - d.idle_rss < 100 * 1024  # type: ignore[attr-defined]


def test_idle_connections_from_one_client_are_capped(daemon: Daemon) -> None:
    host = daemon.served_at("web")
    conns: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(PER_CLIENT * 5):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(2)
            try:
                s.connect((host, 80))
            except ConnectionResetError:  # on loopback the reset can beat connect's return
                refused += 1
                s.close()
                continue
            conns.append(s)
        time.sleep(0.5)
        for s in conns:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    refused += 1
            except BlockingIOError:
                pass  # open and idle: admitted
            except ConnectionResetError:
                refused += 1
        assert refused == PER_CLIENT * 4
        budget = daemon.status()["proxy"]["budget"]["tcpConnections"]
        assert budget["refusedPerClientLimit"] >= PER_CLIENT * 4
        assert budget["perClientLimit"] == PER_CLIENT
        # The same Service still serves another client at once.
        code, body = curl(f"http://{host}/")
        assert (code, body) == (200, "hello from b1\n")
        assert_everything_serves(daemon)
    finally:
        for s in conns:
            s.close()


def test_udp_flows_from_many_source_ports_are_capped(daemon: Daemon) -> None:
    host = daemon.served_at("web")
    socks = []
    try:
        for _ in range(PER_CLIENT * 10):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.3", 0))
            s.sendto(b"x", (host, 5353))
            socks.append(s)
        wait_for(lambda: daemon.status()["proxy"]["budget"]["udpFlows"][
            "refusedPerClientLimit"] >= PER_CLIENT * 9, what="flows refused")
        assert daemon.status()["proxy"]["budget"]["udpFlows"]["active"] <= PER_CLIENT
        assert_everything_serves(daemon)
    finally:
        for s in socks:
            s.close()


def test_slow_requests_to_the_health_port_are_capped_and_timed_out(daemon: Daemon) -> None:
    conns = []
    try:
        for _ in range(100):
            s = socket.socket()
            s.bind(("127.0.0.4", 0))
            s.connect(("127.0.0.1", daemon.healthz))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            conns.append(s)
        assert_everything_serves(daemon)
        ops = daemon.status()["ops"]["healthz"]
        assert ops["refused"] >= 100 - 32, ops
    finally:
        for s in conns:
            s.close()


def test_out_of_descriptors_is_not_a_deletion(daemon: Daemon) -> None:
    pid = daemon.proc.pid
    (daemon.manifests / "late.yaml").write_text(
        yaml.safe_dump_all(objects("late", f"{SVC_NET}.3", 1)))
    wait_for(lambda: len(daemon.status()["proxy"]["services"]) == 3, what="late served")
    late = daemon.served_at("late")
    limit = run("prlimit", "-p", str(pid), "--nofile", "--raw", "--noheadings").stdout.split()

    def exhaust() -> bool:
        # The kernel hands out the lowest free descriptor and fails with EMFILE when that is
        # not below the soft limit: set the limit there, so every open, listing and accept
        # fails. A descriptor closed meanwhile frees a lower slot: then try again.
        fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest = min(set(range(max(fds) + 2)) - fds)
        run("prlimit", "-p", str(pid), f"--nofile={lowest}:{limit[-2]}")
        (daemon.manifests / "sub").mkdir(exist_ok=True)  # a directory event: walk again
        (daemon.manifests / "late.yaml").write_text(
            yaml.safe_dump_all(objects("late", f"{SVC_NET}.3", 2)))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            if "Too many open files" in daemon.log.read_text():
                return True
            time.sleep(0.05)
        (daemon.manifests / "sub").rmdir()
        return False

    try:
        assert any(exhaust() for _ in range(10)), "EMFILE never reached"
        # DNS over UDP needs no new descriptor: it answers, and nothing was withdrawn.
        assert daemon.dig("late.default.svc.cluster.local") == [late]
    finally:
        run("prlimit", "-p", str(pid), f"--nofile={limit[-3]}:{limit[-2]}")
    # Once descriptors are back, the pending edit applies (the retry), and all serves.
    wait_for(lambda: curl(f"http://{daemon.served_at('late')}/")[1] == "hello from b2\n",
             what="late edit applied")
    assert len(daemon.status()["proxy"]["services"]) == 3
    assert_everything_serves(daemon)
    with contextlib.suppress(FileNotFoundError):
        (daemon.manifests / "sub").rmdir()


def test_sighup_reloads_and_never_stops(daemon: Daemon) -> None:
    daemon.write_config("debug")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded log_level=debug" in daemon.log.read_text(),
             what="reload")
    daemon.write_config("info", extra="notAField: 1\n")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reload failed" in daemon.log.read_text(), what="failure")
    assert "notAField: unknown field" in daemon.log.read_text()
    daemon.write_config("info")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded log_level=info" in daemon.log.read_text(),
             what="reload")
    assert_everything_serves(daemon)


def test_loopback_collision_is_reported_and_never_answered(daemon: Daemon) -> None:
    # Loopback mode keeps the low 22 bits: 10.165.x.1 maps where web's 10.101.x.1 is served.
    twin_ip = f"10.165.{os.getpid() % 250}.1"
    path = daemon.manifests / "twin.yaml"
    path.write_text(yaml.safe_dump_all(objects("twin", twin_ip, 2)))
    try:
        def twin_errors() -> list[str]:
            for svc in daemon.status()["proxy"]["services"]:
                if svc["name"] == "default/twin":
                    return svc["errors"]  # type: ignore[no-any-return]
            return []

        wait_for(lambda: any("maps to loopback address" in e for e in twin_errors()),
                 what="collision reported")
        web = daemon.served_at("web")
        assert any(f"which serves {SVC_NET}.1 (service default/web)" in e for e in twin_errors())
        # DNS: the twin exists but is not served here: NODATA, not web's address, not NXDOMAIN.
        out = run("dig", "+time=2", "+tries=1", "-p", str(daemon.dns), "@127.0.0.1",
                  "twin.default.svc.cluster.local", "A").stdout
        assert "status: NOERROR" in out and "ANSWER: 0" in out, out
        assert daemon.dig("web.default.svc.cluster.local") == [web]
        assert curl(f"http://{web}/") == (200, "hello from b1\n")
        assert "maps to loopback address" in daemon.log.read_text()
    finally:
        path.unlink()
    wait_for(lambda: "default/twin" not in {s["name"] for s in daemon.status()["proxy"][
        "services"]}, what="twin gone")
    assert_everything_serves(daemon, withdrawals=True)
