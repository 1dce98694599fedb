"""Batched UDP replies when the kernel refuses some of them: in a namespace of its own, an
nftables output rule drops replies to one client's port (sendmsg fails with EPERM for those).
Queries from that client and from another are interleaved in one batch; the other client must
get every answer, on the batched path as on the one-datagram-per-callback path."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeshim.dns import batch
from tests.netns import Netns, require_root

ROOT = Path(__file__).resolve().parents[2]
REFUSED_PORT = 40001

CLIENTS = r"""
import asyncio, json, socket, sys, time
import uvloop
from dnslib import DNSRecord
from tests.integration.test_dns_server import synced_state
from kubeshim.dns.batch import BatchedUDP
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

async def main(udp_batch: bool, refused_port: int) -> None:
    config = DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[], udp_batch=udp_batch)
    server = DNSServer(synced_state(), config)
    await server.start()
    port = server.addresses[0][1]
    refused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    refused.bind(("127.0.0.1", refused_port))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (refused, other):
        s.setblocking(False)
    for i in range(20):  # interleaved, all queued before the server reads
        for s, qid in ((refused, i), (other, 100 + i)):
            q = DNSRecord.question("web.default.svc.cluster.local")
            q.header.id = qid
            s.sendto(q.pack(), ("127.0.0.1", port))
    got: dict[str, list[int]] = {"refused": [], "other": []}

    def drain() -> None:  # record the ids of every reply waiting on either socket
        for name, s in (("refused", refused), ("other", other)):
            while True:
                try:
                    got[name].append(DNSRecord.parse(s.recv(4096)).header.id)
                except BlockingIOError:
                    break

    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(got["other"]) < 20:
        await asyncio.sleep(0.01)
        drain()
    await asyncio.sleep(0.2)  # anything late for the refused client would arrive by now
    drain()
    udp = server._udp[0]
    largest = udp.largest_batch if isinstance(udp, BatchedUDP) else 1
    print(json.dumps({**got, "largest_batch": largest, "requests": server.metrics.requests_udp}))
    await server.stop()

uvloop.run(main(sys.argv[1] == "batch", int(sys.argv[2])))
"""


@pytest.fixture
def netns() -> Iterator[Netns]:
    require_root()
    if shutil.which("nft") is None:
        pytest.fail("nft (nftables) is needed for this test")
    ns = Netns(f"ks{os.getpid()}batch")
    try:
        ns.run(["nft", "add", "table", "inet", "refuse"])
        ns.run(
            [
                "nft",
                "add",
                "chain",
                "inet",
                "refuse",
                "out",
                "{ type filter hook output priority 0 ; }",
            ]
        )
        ns.run(
            [
                "nft",
                "add",
                "rule",
                "inet",
                "refuse",
                "out",
                "udp",
                "dport",
                str(REFUSED_PORT),
                "drop",
            ]
        )
        yield ns
    finally:
        ns.delete()


@pytest.mark.parametrize("path", ["batch", "datagram"])
def test_replies_the_kernel_refuses_cost_no_one_else(netns: Netns, path: str) -> None:
    if path == "batch" and not batch.available():
        pytest.skip("libc without recvmmsg/sendmmsg")
    proc = netns.run(
        [sys.executable, "-c", CLIENTS, path, str(REFUSED_PORT)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result["other"]) == list(range(100, 120))
    assert result["refused"] == []
    assert result["requests"] == 40
    if path == "batch":
        assert result["largest_batch"] > 1
