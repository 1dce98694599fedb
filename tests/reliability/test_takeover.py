"""Restart without a gap: `kubeshim run --takeover` under load loses no query and no connection.

A daemon serves a Service and DNS on loopback with --control-socket. While dnsperf sends
queries at a steady rate and wrk opens a new connection per request through the Service, a
second daemon takes over, and the first drains and exits. dnsperf must lose no query, wrk must
see no socket error and no non-2xx answer, and a probe that queries every few milliseconds
reports the longest pause between answers across the switch.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ports import free_dns_port, free_port

ROOT = Path(__file__).resolve().parents[2]
NET = f"127.80.{os.getpid() % 250}"
CLUSTER_IP = f"10.104.{os.getpid() % 250}.1"
NAME = "web.default.svc.cluster.local"


def query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


class Probe(threading.Thread):
    """Queries every 5 ms; records when answers came and how many went unanswered."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answered: list[float] = []
        self.unanswered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            qid = 0
            while not self.stop.is_set():
                qid = (qid + 1) & 0xFFFF
                s.sendto(query(NAME, qid), ("127.0.0.1", self.port))
                try:
                    while struct.unpack(">H", s.recv(512)[:2])[0] != qid:
                        pass
                    self.answered.append(time.monotonic())
                except TimeoutError:
                    self.unanswered += 1
                time.sleep(0.005)

    def longest_gap(self) -> float:
        times = self.answered
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, object]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIP": CLUSTER_IP,
                  "ports": [{"name": "http", "port": 80, "targetPort": 18080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 18080}],
         "endpoints": [{"addresses": [f"{NET}.1"]}]},
    ]))
    backend = subprocess.Popen([sys.executable, str(ROOT / "examples/backend.py"), "b1",
                                f"{NET}.1", "18080"], start_new_session=True)
    dns = free_dns_port()
    argv = [sys.executable, "-m", "kubeshim", "run", "--manifests", str(manifests),
            "--vip-mode", "loopback", "--dns-bind", f"127.0.0.1:{dns}",
            "--upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}",
            "--healthz-bind-address", f"127.0.0.1:{free_port()}",
            "--metrics-bind-address", f"127.0.0.1:{free_port()}",
            "--control-socket", str(tmp_path / "control.sock"), "--drain-timeout", "5"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *extra: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("w") as out:
            proc = subprocess.Popen([*argv, *extra], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        yield {"start": start, "dns": dns, "tmp": tmp_path}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        os.kill(backend.pid, signal.SIGTERM)
        backend.wait(timeout=5)


def serving(dns: int, service: str) -> bool:
    dig = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "-p", str(dns), "@127.0.0.1",
                          NAME], capture_output=True, text=True)
    curl = subprocess.run(["curl", "-s", "--max-time", "1", f"http://{service}/"],
                          capture_output=True, text=True)
    return bool(dig.stdout.strip()) and curl.stdout == "hello from b1\n"


def test_takeover_under_load_loses_nothing(node: dict[str, object]) -> None:
    from kubeshim.proxy.vip import LoopbackMapper

    start, dns, tmp = node["start"], node["dns"], node["tmp"]
    assert callable(start) and isinstance(dns, int) and isinstance(tmp, Path)
    service = LoopbackMapper().address(CLUSTER_IP)
    old = start("old")
    deadline = time.monotonic() + 30
    while not serving(dns, service):
        assert old.poll() is None and time.monotonic() < deadline, (tmp / "old.log").read_text()
        time.sleep(0.1)

    queries = tmp / "queries.txt"
    queries.write_text(f"{NAME} A\n")
    seconds = 8
    dnsperf = subprocess.Popen(["dnsperf", "-s", "127.0.0.1", "-p", str(dns), "-d", str(queries),
                                "-l", str(seconds), "-Q", "300", "-c", "1", "-t", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A new connection per request: the backend answers HTTP/1.0 and closes.
    wrk = subprocess.Popen(["wrk", "-t1", "-c4", f"-d{seconds}s", "--timeout", "2s",
                            f"http://{service}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = Probe(dns)
    probe.start()
    time.sleep(2)
    switch = time.monotonic()
    new = start("new", "--takeover")
    old.wait(timeout=30)
    switched = time.monotonic() - switch
    dns_out, _ = dnsperf.communicate(timeout=60)
    wrk_out, _ = wrk.communicate(timeout=60)
    probe.stop.set()
    probe.join()

    old_log = (tmp / "old.log").read_text()
    new_log = (tmp / "new.log").read_text()
    assert old.returncode == 0, old_log
    assert "handed_over=True" in old_log, old_log
    assert "took over listening sockets" in new_log, new_log
    assert new.poll() is None, new_log
    lost = re.search(r"Queries lost:\s+(\d+)", dns_out)
    completed = re.search(r"Queries completed:\s+(\d+)", dns_out)
    assert lost and completed, dns_out
    assert int(lost.group(1)) == 0, dns_out
    assert int(completed.group(1)) > 300 * (seconds - 1), dns_out
    requests = re.search(r"(\d+) requests in", wrk_out)
    assert requests and int(requests.group(1)) > 100, wrk_out
    assert "Socket errors" not in wrk_out and "Non-2xx" not in wrk_out, wrk_out
    assert probe.unanswered == 0
    # Serving alone afterwards.
    assert serving(dns, service)
    print(f"\ntakeover: old process gone {switched:.2f} s after the new one started; "
          f"dnsperf {completed.group(1)} queries, 0 lost; wrk {requests.group(1)} new "
          f"connections, 0 errors; longest pause between probe answers "
          f"{probe.longest_gap() * 1000:.1f} ms")
