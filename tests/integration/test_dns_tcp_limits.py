"""DNS over TCP under hostile clients, on real sockets: connection caps in total and per
client, the read timeout for a message that never completes, and write backpressure (a client
pipelining queries for large answers and never reading leaves the server's RSS bounded).

The RSS test runs the server in its own process (so the measurement is the server's alone)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from dnslib import DNSRecord
from test_dns_batch import serving

ROOT = Path(__file__).resolve().parents[2]
BIG = "big.default.svc.cluster.local"  # headless, 300 endpoints: ~4.8 KB per TCP answer
WEB = "web.default.svc.cluster.local"


def frame(name: str, qid: int = 1) -> bytes:
    q = DNSRecord.question(name)
    q.header.id = qid
    packed = bytes(q.pack())
    return len(packed).to_bytes(2, "big") + packed


async def ask_tcp(port: int, name: str = WEB) -> DNSRecord:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame(name))
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2), "big")
        return DNSRecord.parse(await reader.readexactly(size))
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except (ConnectionResetError, TimeoutError):
        return False


async def test_connection_caps_in_total_and_per_client() -> None:
    async with serving(tcp_max_connections=6, tcp_max_connections_per_client=3) as server:
        port = server.addresses[0][1]
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        # A fourth from the same address is closed at once; the three keep working.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(reader, 2)
        writer.close()
        r, w = held[0]
        w.write(frame(WEB))
        size = int.from_bytes(await r.readexactly(2), "big")
        assert DNSRecord.parse(await r.readexactly(size)).rr
        # Another client address (127.0.0.2 is loopback too) still gets in, up to the total.
        other = ("127.0.0.2", 0)
        more = [await asyncio.open_connection("127.0.0.1", port, local_addr=other) for _ in "abc"]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.3", 0)
        )
        assert await closed_by_server(reader, 2)  # total cap of 6 reached
        assert server.tcp_refused == 2
        for _, w in held + more:
            w.close()
        await asyncio.sleep(0.2)
        assert (await ask_tcp(port)).rr  # slots are given back when connections close


async def test_a_message_that_never_completes_is_closed_after_the_read_timeout() -> None:
    async with serving(tcp_read_timeout=0.5, tcp_idle_timeout=30) as server:
        port = server.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(WEB)[:10])  # length says more is coming; it never does
        started = time.monotonic()
        assert await closed_by_server(reader, 5)
        assert 0.4 < time.monotonic() - started < 3
        assert (await ask_tcp(port)).rr


SERVE = """
import asyncio, sys
sys.path.insert(0, "tests/integration")
from test_dns_batch import serving
from test_dns_server import synced_state
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

async def main():
    server = DNSServer(synced_state(), DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[]))
    await server.start()
    print(server.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_pipelining_client_that_never_reads_leaves_rss_bounded() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        idle = rss_mb(proc.pid)
        hostile = socket.create_connection(("127.0.0.1", port))
        hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hostile.settimeout(0.2)
        burst = frame(BIG) * 1000
        sent = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # full: the server stopped reading us
                sent += hostile.send(burst)
        peak = rss_mb(proc.pid)
        # Other clients are still answered while the hostile one is parked.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as good:
            good.sendall(frame(WEB))
            size = int.from_bytes(good.recv(2), "big")
            assert DNSRecord.parse(good.recv(size)).rr
        assert sent > 1 << 20, "the client could not even send its queries"
        assert peak - idle < 100, f"RSS grew {peak - idle:.0f} MB (idle {idle:.0f} MB)"
        hostile.close()
    finally:
        proc.terminate()
        proc.wait(10)
