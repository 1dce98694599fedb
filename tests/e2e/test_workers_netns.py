"""Worker processes end to end: kubeshim --vip-mode tproxy --workers 2 in a node namespace.

Real connections (curl, and long-lived sockets from a client pod) through a ClusterIP: both
processes serve from the shared transparent listeners, status counts them as one proxy, a
worker killed with SIGKILL is started again while the control process's connections carry on,
and ClientIP affinity holds although each process keeps its own table. The tests run in order:
the last one adds a ClientIP Service, which changes how the kernel spreads connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import NODE_IP, Lab, wait_until
from tests.nodelab import Cluster
from tests.proxy_helpers import endpoint, endpoint_slice, service

pytestmark = pytest.mark.e2e

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
VIP = "10.96.0.10"
STICKY = "10.96.0.14"
# Holds N keep-alive connections to the VIP; on each stdin line asks once more on every one
# and prints the answers (or the error) as a JSON list.
HOLDER = """
import json, socket, sys
conns = [socket.create_connection((sys.argv[1], 80), timeout=3) for _ in range(int(sys.argv[2]))]
def ask(c):
    try:
        c.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while not data.endswith(b"\\n") or b"\\r\\n\\r\\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return "closed"
            data += chunk
        return data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip()
    except OSError as e:
        return type(e).__name__
for line in sys.stdin:
    print(json.dumps([ask(c) for c in conns]), flush=True)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Lab("wrk") as lab:
        c = Cluster(lab, tmp_path_factory.mktemp("manifests"))
        for name in ("pod-a", "pod-b"):
            c.add_pod(name)
        lab.add_host("client")
        c.bridge_with_netfilter()
        c.put(service("web", VIP, HTTP),
              endpoint_slice("web", [endpoint(c.ip("pod-a")), endpoint(c.ip("pod-b"))], HTTP_EP))
        c.wait_pods()
        with c.running("--vip-mode", "tproxy", "--workers", "2", "--hostname-override", "node-1",
                       "--dns-bind", f"{NODE_IP}:53", "--upstream", f"{NODE_IP}:5399",
                       "--cluster-cidr", "10.244.0.0/16", "--drain-timeout", "2",
                       ready=lambda: c.status()["workers"]["serving"] == 2,
                       what="both processes serving"):
            yield c


def workers(c: Cluster) -> list[dict[str, Any]]:
    return c.full_status()["workers"][1:]  # type: ignore[no-any-return]


def test_both_processes_serve_and_status_counts_them_as_one(cluster: Cluster) -> None:
    c = cluster
    before = c.port_status("web")["connectionsTotal"]
    served_before = workers(c)[0]["served"]
    answers = c.curl(*[f"http://{VIP}/"] * 120)
    assert len(answers) == 120 and set(answers) <= {"pod-a", "pod-b"}, answers
    # Every connection counted once, whichever process took it (reports come each second).
    c.wait(lambda: c.port_status("web")["connectionsTotal"] - before == 120,
           "status to count the 120 connections", 5)
    # The kernel spread them over both processes (2^-119 that one took them all).
    in_worker = workers(c)[0]["served"] - served_before
    assert 0 < in_worker < 120, in_worker
    endpoints = {e["address"]: e for e in c.port_status("web")["endpoints"]}
    assert set(endpoints) == {f"{c.ip('pod-a')}:8080", f"{c.ip('pod-b')}:8080"}
    # /metrics (served by the control process) counts the worker's connections too.
    total = next(float(line.rsplit(" ", 1)[1]) for line in c.metrics().splitlines()
                 if line.startswith("kubeshim_proxy_connections_total{")
                 and 'service="default/web"' in line)
    assert total == c.port_status("web")["connectionsTotal"]


def test_dns_is_served_by_every_process(cluster: Cluster) -> None:
    # Each query from its own source port: the kernel spreads them over the processes'
    # SO_REUSEPORT sockets; every one is answered from the same state.
    c = cluster
    for _ in range(30):
        out = c.client.run(["dig", "+short", "+tries=1", "+time=2", f"@{NODE_IP}",
                            "web.default.svc.cluster.local"])
        assert out.stdout.split() == [VIP], out.stdout
    assert workers(c)[0]["restarts"] == 0


class Holder:
    """The client holding `count` keep-alive connections to the web Service open (HOLDER):
    `ask()` sends one request on each and returns each one's answer."""

    def __init__(self, c: Cluster, count: int) -> None:
        self.proc = c.client.popen([sys.executable, "-c", HOLDER, VIP, str(count)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def test_open_connections_are_summed_across_processes(cluster: Cluster) -> None:
    c = cluster
    with Holder(c, 24) as holder:
        assert set(holder.ask()) <= {"pod-a", "pod-b"}
        c.wait(lambda: c.status()["connections"] == 24 and
               sum(e["active"] for e in c.port_status("web")["endpoints"]) == 24,
               "24 open connections in status", 5)
    c.wait(lambda: c.status()["connections"] == 0, "the connections closed in status", 5)


def test_a_killed_worker_restarts_and_the_other_process_keeps_its_connections(
        cluster: Cluster) -> None:
    c = cluster
    with Holder(c, 32) as holder:
        first = holder.ask()
        assert set(first) <= {"pod-a", "pod-b"}, first
        c.wait(lambda: workers(c)[0]["connections"] is not None and
               c.status()["connections"] == 32, "32 connections reported", 5)
        in_worker = workers(c)[0]["connections"]
        old_pid = workers(c)[0]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        # The worker's connections die with it; the control process's carry on.
        time.sleep(0.5)
        second = holder.ask()
        alive = [a for a in second if a in ("pod-a", "pod-b")]
        assert len(alive) == 32 - in_worker, (in_worker, second)
        assert alive, "every connection was on the killed worker (2^-32)"
    wait_until(lambda: workers(c)[0]["pid"] not in (None, old_pid) and
               workers(c)[0]["served"] is not None, "the worker restarted", 15, (KeyError,))
    assert workers(c)[0]["restarts"] == 1
    # New connections keep working throughout, and the new worker takes its share again.
    answers = c.curl(*[f"http://{VIP}/"] * 60)
    assert len(answers) == 60 and set(answers) <= {"pod-a", "pod-b"}, answers


def test_client_ip_affinity_holds_across_processes(cluster: Cluster) -> None:
    # With a ClientIP Service, the kernel picks the process by the client's address (a
    # reuseport program), so the client meets one affinity table.
    c = cluster
    c.put(service("sticky", STICKY, HTTP, sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 2}}),
          endpoint_slice("sticky", [endpoint(c.ip("pod-a")), endpoint(c.ip("pod-b"))], HTTP_EP))
    c.wait(lambda: len(c.status()["services"]) == 2, "the sticky Service served", 10)
    first = c.curl(*[f"http://{STICKY}/"] * 12)
    assert len(set(first)) == 1, first
    time.sleep(2.5)  # timeoutSeconds: 2, counted from the last new connection
    second = c.curl(*[f"http://{STICKY}/"] * 12)
    assert len(set(second)) == 1 and second[0] != first[0], (first, second)


def test_workers_sharing_one_cpu_start_after_the_first_sync(tmp_path: Path) -> None:
    """Where the processes would share one CPU, the worker starts after the control process's
    first sync (its start would hold that up) and then takes its share as usual."""
    with Lab("wr1") as lab:
        c = Cluster(lab, tmp_path / "manifests")
        c.add_pod("pod-a")
        lab.add_host("client")
        c.bridge_with_netfilter()
        # Two Services: a first sync of more than one is logged ("synced services").
        c.put(service("web", VIP, HTTP), endpoint_slice("web", [endpoint(c.ip("pod-a"))],
                                                        HTTP_EP),
              service("other", STICKY, HTTP), endpoint_slice("other", [], HTTP_EP))
        c.wait_pods()
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mask)})  # the daemon inherits a single CPU
        try:
            with c.running("--vip-mode", "tproxy", "--workers", "2", "--no-dns",
                           "--hostname-override", "node-1", "--drain-timeout", "1",
                           ready=lambda: c.status()["workers"]["serving"] == 2,
                           what="both processes serving"):
                os.sched_setaffinity(0, mask)
                log = c.log.read_text()
                assert "workers starting count=2 cpus=1" in log, log
                assert log.index("synced services") < log.index("workers starting"), log
                answers = c.curl(*[f"http://{VIP}/"] * 60)
                assert answers == ["pod-a"] * 60, answers
                c.wait(lambda: (workers(c)[0]["served"] or 0) > 0,
                       "the worker's share of the connections reported", 5)
        finally:
            os.sched_setaffinity(0, mask)
