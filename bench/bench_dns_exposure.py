"""DNS exposure benchmark: the amplification factor under a flood of large-answer queries, with
and without response rate limiting, and the failover time from a dead upstream.

    python bench/bench_dns_exposure.py [--rate 5000] [--seconds 5] [--rrl 100] [--slip 2]

Amplification: kubeshim's DNS server (its own process, loopback) serves a headless Service with
100 endpoints; one client socket sends `--rate` queries/s for it with EDNS 4096 (the largest
answer a spoofed query can ask for: ~1.7 KB for a 59-byte query) for `--seconds`, once with
rate limiting off and once at `--rrl` identical responses/s per /24 with slip `--slip`.
Reported: bytes sent and received, full / slipped replies, and the factor (bytes out of the
server / bytes in). A last row sends the same rate of queries for distinct names (pod records,
small answers) under the same limit: a client asking many names is not limited.

Failover: the server's first upstream is a closed loopback port (ICMP port unreachable), the
second a live one; each forwarded name's time from query to answer, versus the same names with
only the live upstream. The per-attempt upstream timeout is the default 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord  # noqa: E402

NAME = "big.bench.svc.cluster.local"

SERVE = """
import asyncio, sys
from kubeshim.cluster.model import decode
from kubeshim.cluster.state import ClusterState
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

async def main(rrl, slip, upstreams):
    state = ClusterState()
    state.replace("Service", [decode("Service", {"metadata": {"name": "big", "namespace": "bench"},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}})])
    state.replace("EndpointSlice", [decode("EndpointSlice", {"metadata": {"name": "big-1",
        "namespace": "bench", "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 80}],
        "endpoints": [{"addresses": [f"10.244.9.{i}"]} for i in range(1, 101)]})])
    config = DNSConfig(binds=[("127.0.0.1", 0)], upstreams=upstreams,
                       rrl_responses_per_second=rrl, rrl_slip=slip)
    server = DNSServer(state, config)
    await server.start()
    print(server.addresses[0][1], flush=True)
    await asyncio.Event().wait()

ups = [(h, int(p)) for h, p in (a.split(":") for a in sys.argv[3:])]
asyncio.run(main(float(sys.argv[1]), int(sys.argv[2]), ups))
"""


def start(rrl: float, slip: int, upstreams: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(rrl), str(slip), *upstreams],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def flood(port: int, rate: int, seconds: float, distinct: bool = False) -> dict[str, float]:
    q = DNSRecord.question(NAME)
    q.add_ar(EDNS0(udp_len=4096))
    query = bytes(q.pack())
    names = [
        bytes(DNSRecord.question(f"10-244-{i >> 8}-{i & 255}.bench.pod.cluster.local").pack())
        for i in range(65536)
    ] if distinct else []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    sent = received = full = slipped = 0
    started = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) - started < seconds + 1.0:
        while now - started < seconds and n < rate * (now - started):
            packet = names[n % len(names)] if names else query
            sock.send(n.to_bytes(4, "big")[-2:] + packet[2:])
            sent += len(packet)
            n += 1
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            received += len(data)
            if data[7] or data[6]:  # ANCOUNT > 0
                full += 1
            else:
                slipped += 1
        time.sleep(0.0005)
    sock.close()
    return {
        "queries": n,
        "query_bytes": len(query),
        "sent": sent,
        "received": received,
        "full": full,
        "slipped": slipped,
        "factor": received / sent if sent else 0.0,
    }


class Upstream(asyncio.DatagramProtocol):
    """A live upstream answering every A question with one record."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = DNSRecord.parse(data)
        reply = q.reply()
        reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        self.transport.sendto(bytes(reply.pack()), addr)  # type: ignore[attr-defined]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def failover(names: int) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
    live = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    out: dict[str, list[float]] = {}
    try:
        dead = f"127.0.0.1:{closed_port()}"
        for label, ups in (("live only", [live]), ("dead first", [dead, live])):
            proc, port = await asyncio.to_thread(start, 0, 2, ups)
            try:
                times = []
                for i in range(names):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                    sock.connect(("127.0.0.1", port))
                    q = DNSRecord.question(f"n{i}-{label[0]}.example")
                    began = time.perf_counter()
                    await loop.sock_sendall(sock, bytes(q.pack()))
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
                    times.append(time.perf_counter() - began)
                    sock.close()
                    assert DNSRecord.parse(data).rr, "no answer"
                out[label] = times
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        transport.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=5000, help="flood queries per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rrl", type=float, default=100.0, help="replies/s per /24 when limited")
    ap.add_argument("--slip", type=int, default=2)
    ap.add_argument("--names", type=int, default=200, help="forwarded names timed for failover")
    args = ap.parse_args()
    print(f"flood: {args.rate} q/s for {args.seconds:.0f} s of A {NAME} (100 records), EDNS 4096")
    print(f"{'rate limit':>22} {'queries':>8} {'bytes in':>10} {'bytes out':>11} {'full':>6}"
          f" {'slipped':>8} {'factor':>7}")
    for rrl in (0.0, args.rrl):
        proc, port = start(rrl, args.slip, [])
        try:
            r = flood(port, args.rate, args.seconds)
        finally:
            proc.terminate()
            proc.wait(10)
        label = "off" if not rrl else f"{rrl:.0f}/s per /24, slip {args.slip}"
        print(f"{label:>22} {r['queries']:8.0f} {r['sent']:10.0f} {r['received']:11.0f}"
              f" {r['full']:6.0f} {r['slipped']:8.0f} {r['factor']:6.1f}x")
    proc, port = start(args.rrl, args.slip, [])
    try:
        r = flood(port, args.rate, args.seconds, distinct=True)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"{'distinct names, limited':>22} {r['queries']:8.0f} {r['sent']:10.0f}"
          f" {r['received']:11.0f} {r['full']:6.0f} {r['slipped']:8.0f} {r['factor']:6.1f}x")
    times = asyncio.run(failover(args.names))
    print(f"forwarded names, {args.names} each, upstream timeout 2 s:")
    for label, ts in times.items():
        ms = sorted(t * 1000 for t in ts)
        p99 = ms[int(len(ms) * 0.99) - 1]
        print(f"{label:>12}: median {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms,"
              f" max {ms[-1]:.2f} ms")


if __name__ == "__main__":
    main()
