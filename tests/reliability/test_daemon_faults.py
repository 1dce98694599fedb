"""The daemon under hostile clients and faults, on loopback: one client or one fault never takes
the other Services, DNS over UDP and TCP, or /healthz down, and nothing is withdrawn.

The daemon runs in loopback mode with two Services (web, api) in front of real HTTP backends,
DNS on a free port and small per-client caps so the faults stay quick. Each hostile client
uses its own loopback source address; the checks come from 127.0.0.1 with curl and dig.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.daemon import BACKEND_PORT, Daemon, backends, curl, run
from tests.netns import wait_until

NET = f"127.78.{os.getpid() % 250}"
SVC_NET = f"10.101.{os.getpid() % 250}"
PER_CLIENT = 20


def objects(name: str, ip: str, backend: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": ip, "ports": [
             {"name": "http", "port": 80, "targetPort": BACKEND_PORT},
             {"name": "echo", "port": 5353, "protocol": "UDP", "targetPort": 18053}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "protocol": "TCP", "port": BACKEND_PORT},
                   {"name": "echo", "protocol": "UDP", "port": 18053}],
         "endpoints": [{"addresses": [f"{NET}.{backend}"]}]},
    ]


def config(d: Daemon, level: str, extra: str = "") -> str:
    return d.config_text(f"logging: {{verbosity: {4 if level == 'debug' else 2}}}\n{extra}")


def wait_for(check: Any, what: str) -> None:
    wait_until(check, what, timeout=20)  # generous: the machine may be busy


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"), "--vip-mode", "loopback",
               "--max-connections-per-client", str(PER_CLIENT),
               "--max-udp-flows-per-client", str(PER_CLIENT))
    for name, n in (("web", 1), ("api", 2)):
        (d.manifests / f"{name}.yaml").write_text(
            yaml.safe_dump_all(objects(name, f"{SVC_NET}.{n}", n)))
    d.write_config(config(d, "info"))
    with backends(("b1", f"{NET}.1"), ("b2", f"{NET}.2")):
        try:
            d.start().wait_serving(timeout=20)
            wait_for(lambda: len(d.status()["proxy"]["services"]) == 2, "services")
            d.idle_rss = d.rss_kib()  # type: ignore[attr-defined]
            yield d
        finally:
            d.stop()


def assert_everything_serves(d: Daemon, withdrawals: bool = False) -> None:
    """The other Service, DNS over UDP and TCP, /healthz: all answer; nothing withdrawn (unless
    the test removed something itself)."""
    assert d.alive(), d.log_text()[-3000:]
    code, body = curl(f"http://{d.served_at('api')}/")
    assert (code, body) == (200, "hello from b2\n")
    name = "web.default.svc.cluster.local"
    assert d.dig(name) == [d.served_at("web")]
    assert d.dig(name, "+tcp") == [d.served_at("web")]
    assert curl(d.url("/healthz"))[0] == 200
    log = d.log_text()
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
            "refusedPerClientLimit"] >= PER_CLIENT * 9, "flows refused")
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
    pid = daemon.pid
    (daemon.manifests / "late.yaml").write_text(
        yaml.safe_dump_all(objects("late", f"{SVC_NET}.3", 1)))
    wait_for(lambda: len(daemon.status()["proxy"]["services"]) == 3, "late served")
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
            if "Too many open files" in daemon.log_text():
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
    daemon.write_config(config(daemon, "debug"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded log_level=debug" in daemon.log_text(),
             what="reload")
    daemon.write_config(config(daemon, "info", "notAField: 1\n"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reload failed" in daemon.log_text(), "failure")
    assert "notAField: unknown field" in daemon.log_text()
    daemon.write_config(config(daemon, "info"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded log_level=info" in daemon.log_text(),
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
        assert "maps to loopback address" in daemon.log_text()
    finally:
        path.unlink()
    wait_for(lambda: "default/twin" not in {s["name"] for s in daemon.status()["proxy"][
        "services"]}, "twin gone")
    assert_everything_serves(daemon, withdrawals=True)
