"""RFC 8767 serve-stale on real sockets, with dig and the glibc resolver (getent) as clients
and an upstream written here that answers only when the test lets it (a slow upstream is a
fault a real server cannot give on demand):

- the client response timer: an expired name whose upstream has not answered yet is answered
  stale (TTL 30) after the upstream was asked, before the upstream replies; the exchange goes
  on and its answer refreshes the cache (the next client gets it, without a new exchange);
- the failure recheck timer: after a failed refresh, the name is answered stale without asking
  upstream again until the timer runs out;
- the maximum stale timer: past it, a failing upstream means SERVFAIL, not an old answer;
- without anything stale the client waits for the upstream, however slow;
- glibc, whose patience (here 3 s) is shorter than the upstream's timeout, gets the stale
  address instead of nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from test_dns_forward import closed_port
from test_dns_server import Dig, dig

from kubeshim.cluster.state import ClusterState
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.server import DNSServer

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

NAME = "www.example"


class SlowUpstream(asyncio.DatagramProtocol):
    """Answers A questions with `address` (TTL `ttl`), at once while `open`, else when the test
    calls `release()` (or never, when it does not)."""

    def __init__(self) -> None:
        self.address = "192.0.2.1"
        self.ttl = 1
        self.open = True
        self.asked = 0
        self.answered = 0
        self.held: list[tuple[DNSRecord, Any]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.asked += 1
        query = DNSRecord.parse(data)
        if self.open:
            self._answer(query, addr)
        else:
            self.held.append((query, addr))

    def release(self) -> None:
        held, self.held = self.held, []
        for query, addr in held:
            self._answer(query, addr)

    def _answer(self, query: DNSRecord, addr: Any) -> None:
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(self.address), ttl=self.ttl))
        assert self.transport is not None
        self.transport.sendto(bytes(reply.pack()), addr)
        self.answered += 1


@asynccontextmanager
async def serving(
    bind: tuple[str, int] = ("127.0.0.1", 0), **options: Any
) -> AsyncIterator[tuple[DNSServer, SlowUpstream]]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(
        SlowUpstream, local_addr=("127.0.0.1", 0)
    )
    state = ClusterState()
    state.replace("Service", [])
    state.replace("EndpointSlice", [])
    port = transport.get_extra_info("sockname")[1]
    config = DNSConfig(binds=[bind], upstreams=[("127.0.0.1", port)], **options)
    server = DNSServer(state, config)
    await server.start()
    try:
        yield server, upstream
    finally:
        await server.stop()
        transport.close()


async def ask(server: DNSServer, *args: str) -> Dig:
    return await dig(server.addresses[0][1], "+time=8", NAME, *args)


async def expire(server: DNSServer) -> None:
    """Wait (really) until the cached answer of NAME (TTL 1) has expired."""
    key = next(iter(server.upstream_cache.positive))
    while not server.upstream_cache.has_stale(key):
        await asyncio.sleep(0.1)


async def test_stale_answer_after_the_client_response_timer_then_the_refreshed_one() -> None:
    async with serving() as (server, upstream):  # the RFC's 1.8 s client response timer
        r = await ask(server)
        assert r.answer == [(NAME + ".", 1, "A", "192.0.2.1")]
        await expire(server)
        upstream.open, upstream.address = False, "192.0.2.2"
        started = time.monotonic()
        r = await ask(server)
        # Answered stale (RFC 8767 section 4: TTL 30) while the upstream still holds the
        # question it was asked first.
        assert r.status == "NOERROR" and r.answer == [(NAME + ".", 30, "A", "192.0.2.1")]
        assert "EDE: 3 (Stale Answer)" in r.text  # RFC 8914 4.4, to EDNS clients
        assert upstream.asked == 2 and upstream.answered == 1 and len(upstream.held) == 1
        assert time.monotonic() - started >= server.config.serve_stale_client_timeout * 0.9
        upstream.release()  # the exchange goes on: its answer refreshes the cache
        r = await ask(server)
        assert r.answer == [(NAME + ".", 1, "A", "192.0.2.2")] and "EDE" not in r.text
        assert upstream.asked == 2  # no new exchange: the late answer was kept


async def test_stop_ends_an_exchange_that_outlived_its_client() -> None:
    async with serving(serve_stale_client_timeout=0.2) as (server, upstream):
        await ask(server)
        await expire(server)
        upstream.open = False
        r = await ask(server)
        assert r.answer == [(NAME + ".", 30, "A", "192.0.2.1")] and len(upstream.held) == 1
        before = asyncio.all_tasks()
        assert len(before) > 1  # the exchange goes on after the client got its answer
        await server.stop()
        assert asyncio.all_tasks() == {asyncio.current_task()}  # and ends with the server


async def test_failed_refresh_is_not_retried_before_the_recheck_timer() -> None:
    options = {"upstream_timeout": 0.3, "forward_deadline": 0.3}
    async with serving(**options) as (server, upstream):
        await ask(server)
        await expire(server)
        upstream.open = False  # and never released: every exchange times out
        r = await ask(server)
        assert r.answer == [(NAME + ".", 30, "A", "192.0.2.1")]
        assert upstream.asked == 2
        r = await ask(server, "+noedns")  # within the failure recheck timer (30 s): stale,
        assert r.answer == [(NAME + ".", 30, "A", "192.0.2.1")]  # upstream not asked
        assert "OPT PSEUDOSECTION" not in r.text  # (no EDNS asked: no OPT, no EDE)
        assert upstream.asked == 2
        # The forwarder's clock (injected) passes the recheck timer: upstream asked again.
        server.forwarder.clock = lambda: time.monotonic() + server.config.serve_stale_recheck
        upstream.open = True
        r = await ask(server)
        assert upstream.asked == 3 and r.answer == [(NAME + ".", 1, "A", "192.0.2.1")]


async def test_past_the_maximum_stale_timer_a_failing_upstream_means_servfail() -> None:
    options = {"upstream_timeout": 0.3, "forward_deadline": 0.3, "serve_stale_max": 1.0}
    async with serving(**options) as (server, upstream):
        await ask(server)
        await expire(server)
        key = next(iter(server.upstream_cache.positive))
        while server.upstream_cache.has_stale(key):  # expired more than serve_stale_max ago
            await asyncio.sleep(0.1)
        upstream.open = False
        r = await ask(server)
        assert r.status == "SERVFAIL" and not r.answer and upstream.asked == 2


async def test_without_a_stale_answer_the_client_waits_for_the_slow_upstream() -> None:
    async with serving(serve_stale_client_timeout=0.2) as (server, upstream):
        upstream.open = False
        answer = asyncio.create_task(ask(server))
        while not upstream.held:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # well past the client response timer: still waiting
        assert not answer.done()
        upstream.release()
        r = await answer
        assert r.answer == [(NAME + ".", 1, "A", "192.0.2.1")] and upstream.asked == 1


async def getent(resolv_conf: str, name: str) -> list[str]:
    """The glibc resolver's IPv4 addresses for `name` (getent ahostsv4), with `resolv_conf`
    mounted over /etc/resolv.conf in a mount namespace of its own."""
    script = 'mount --bind "$1" /etc/resolv.conf && exec getent ahostsv4 "$2"'
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        resolv_conf, name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return sorted({line.split()[0] for line in out.decode().splitlines() if line.strip()})


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to give getent its own resolv.conf")
async def test_glibc_gets_the_stale_address_within_its_patience(tmp_path: Any) -> None:
    # glibc only speaks to port 53: a loopback address of this test's own (no address is
    # assigned: all of 127/8 is local), so nothing else on port 53 is in the way.
    host = f"127.53.{os.getpid() % 250}.{closed_port() % 250 + 1}"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {host}\noptions timeout:3 attempts:1\n")
    # An upstream timeout past glibc's 3 s: only the client response timer answers in time.
    options = {"upstream_timeout": 5.0, "forward_deadline": 5.0}
    async with serving(bind=(host, 53), **options) as (server, upstream):
        assert await getent(str(resolv), NAME) == ["192.0.2.1"]
        await expire(server)
        upstream.open, upstream.address = False, "192.0.2.2"
        assert await getent(str(resolv), NAME) == ["192.0.2.1"]  # stale, in time
        assert upstream.asked == 2 and len(upstream.held) == 1  # asked first, still holding
        upstream.release()
        assert await getent(str(resolv), NAME) == ["192.0.2.2"]
        assert upstream.asked == 2
