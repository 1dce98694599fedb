"""DNS with worker processes: a worker joins the DNS sockets' SO_REUSEPORT group only once it
holds the control process's state, so no query that reaches it is answered SERVFAIL ("not
synced yet") after the node has answered it. A real daemon with `--workers 2` on loopback,
a manifest folder of a few thousand Services (the state takes the worker a moment to receive),
queries from fresh sockets (the kernel spreads them by source port)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import yaml
from dnslib import RCODE, DNSRecord

from tests.daemon import Daemon

SERVICES = 3000
NAME = "svc-0.default.svc.cluster.local"


def ask(port: int) -> int | None:
    """The rcode of one A query from a new socket, or None without an answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(DNSRecord.question(NAME).pack(), ("127.0.0.1", port))
        try:
            return int(DNSRecord.parse(s.recv(4096)).header.rcode)
        except (TimeoutError, ConnectionRefusedError):
            return None


def sockets_on(port: int) -> int:
    out = subprocess.run(["ss", "-lunH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_a_worker_answers_only_once_it_has_the_state(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--no-proxy", "--workers", "2")
    (d.manifests / "services.yaml").write_text(yaml.safe_dump_all(
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": f"svc-{i}", "namespace": "default"},
         "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                  "ports": [{"port": 80, "name": "http"}]}}
        for i in range(SERVICES)))
    d.start()
    try:
        rcodes: Counter[str] = Counter()
        answered = False
        deadline = time.monotonic() + 60
        after_both = 0
        while after_both < 300:
            assert time.monotonic() < deadline, (rcodes, d.log_text()[-3000:])
            assert d.alive(), d.log_text()
            rcode = ask(d.dns)
            answered = answered or rcode == RCODE.NOERROR
            if answered and rcode is not None:
                # Once the node has answered, every process in the group answers it too.
                rcodes[RCODE.get(rcode)] += 1
            if answered and sockets_on(d.dns) == 2:
                after_both += 1
        assert set(rcodes) == {"NOERROR"}, (rcodes, d.log_text()[-3000:])
    finally:
        d.stop()
