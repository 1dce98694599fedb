"""The DNS server on real sockets, asked with `dig`: every record form, flags, sections, TTLs,
EDNS and truncation, TCP, invalidation on state changes, the not-yet-synced answer, metrics."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kubeshim.cluster.state import ClusterState, EventType, WatchEvent
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.metrics import DNSCollector
from kubeshim.dns.server import DNSServer
from tests.objects import endpoint_slice, service
from tests.objects import synced_state as state_of

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

Z = "cluster.local"


# --- cluster objects ---------------------------------------------------------------------------


def objects() -> list[Any]:
    big = [{"addresses": [f"10.245.{i // 250}.{i % 250 + 1}"]} for i in range(300)]
    return [
        service(
            "web",
            ip="10.96.0.20",
            clusterIPs=["10.96.0.20", "fd00::20"],
            ipFamilies=["IPv4", "IPv6"],
        ),
        service("db", ip="None", ports=[{"name": "postgres", "port": 5432}]),
        endpoint_slice(
            "db",
            [
                {"addresses": ["10.244.0.5"], "hostname": "db-0"},
                {"addresses": ["10.244.0.6"], "hostname": "db-1"},
                {"addresses": ["10.244.0.8"], "hostname": "db-2", "conditions": {"ready": False}},
            ],
            ports=[{"name": "postgres", "port": 5432}],
        ),
        service("ext", ip=None, type="ExternalName", externalName="example.org", ports=[]),
        service("big", ip="None"),
        endpoint_slice("big", big),
    ]


def synced_state() -> ClusterState:
    return state_of(*objects())


# --- dig -------------------------------------------------------------------------------------


@dataclass
class Dig:
    status: str = ""
    flags: set[str] = field(default_factory=set)
    answer: list[tuple[str, int, str, str]] = field(default_factory=list)
    authority: list[tuple[str, int, str, str]] = field(default_factory=list)
    additional: list[tuple[str, int, str, str]] = field(default_factory=list)
    edns_udp: int | None = None
    text: str = ""


async def dig(port: int, *args: str) -> Dig:
    proc = await asyncio.create_subprocess_exec(
        "dig",
        "@127.0.0.1",
        "-p",
        str(port),
        "+tries=1",
        "+time=2",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return parse_dig(out.decode())


def msg_size(r: Dig) -> int:
    """The reply's size in bytes as dig reports it (`;; MSG SIZE  rcvd: N`)."""
    return int(r.text.rsplit("MSG SIZE  rcvd:", 1)[1].split()[0])


def parse_dig(text: str) -> Dig:
    result = Dig(text=text)
    section: list[tuple[str, int, str, str]] | None = None
    for line in text.splitlines():
        if "status:" in line:
            result.status = line.split("status:")[1].split(",")[0].strip()
        elif line.startswith(";; flags:"):
            result.flags = set(line.split(":")[1].split(";")[0].split())
        elif line.startswith("; EDNS:") and "udp:" in line:
            result.edns_udp = int(line.rsplit("udp:", 1)[1])
        elif line.startswith(";; ANSWER SECTION"):
            section = result.answer
        elif line.startswith(";; AUTHORITY SECTION"):
            section = result.authority
        elif line.startswith(";; ADDITIONAL SECTION"):
            section = result.additional
        elif not line.strip():
            section = None
        elif section is not None and not line.startswith(";"):
            name, ttl, _cls, rtype, *rdata = line.split()
            section.append((name, int(ttl), rtype, " ".join(rdata)))
    return result


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def state() -> ClusterState:
    return synced_state()


@pytest.fixture
async def server(state: ClusterState) -> AsyncIterator[DNSServer]:
    config = DNSConfig(
        binds=[("127.0.0.1", 0)], upstreams=[], ttl=30, negative_ttl=10, tcp_idle_timeout=0.5
    )
    srv = DNSServer(state, config)
    await srv.start()
    yield srv
    await srv.stop()


def port_of(server: DNSServer) -> int:
    return server.addresses[0][1]


# --- records ---------------------------------------------------------------------------------


async def test_clusterip_a_and_aaaa(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, "+norec", f"web.default.svc.{Z}", "A")
    assert r.status == "NOERROR" and "aa" in r.flags and "qr" in r.flags
    assert r.answer == [(f"web.default.svc.{Z}.", 30, "A", "10.96.0.20")]
    assert not r.authority
    r = await dig(p, f"web.default.svc.{Z}", "AAAA")
    assert r.answer == [(f"web.default.svc.{Z}.", 30, "AAAA", "fd00::20")]


async def test_headless_records(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, f"db.default.svc.{Z}")
    assert sorted(a[3] for a in r.answer) == ["10.244.0.5", "10.244.0.6"]  # db-2 is not ready
    r = await dig(p, f"db-1.db.default.svc.{Z}")
    assert r.answer == [(f"db-1.db.default.svc.{Z}.", 30, "A", "10.244.0.6")] and "aa" in r.flags
    r = await dig(p, f"db-2.db.default.svc.{Z}")
    assert r.status == "NXDOMAIN"


async def test_srv_with_additional_addresses(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, f"_postgres._tcp.db.default.svc.{Z}", "SRV")
    assert r.status == "NOERROR" and "aa" in r.flags
    assert sorted(a[3] for a in r.answer) == [
        f"0 50 5432 db-0.db.default.svc.{Z}.",
        f"0 50 5432 db-1.db.default.svc.{Z}.",
    ]
    assert sorted((a[0], a[3]) for a in r.additional) == [
        (f"db-0.db.default.svc.{Z}.", "10.244.0.5"),
        (f"db-1.db.default.svc.{Z}.", "10.244.0.6"),
    ]
    r = await dig(p, f"_http._tcp.web.default.svc.{Z}", "SRV")
    assert [a[3] for a in r.answer] == [f"0 100 80 web.default.svc.{Z}."]
    assert sorted(a[3] for a in r.additional) == ["10.96.0.20", "fd00::20"]
    r = await dig(p, f"web.default.svc.{Z}", "SRV")  # on the service name too, as CoreDNS
    assert [a[3] for a in r.answer] == [f"0 100 80 web.default.svc.{Z}."]


async def test_external_name_cname(server: DNSServer) -> None:
    r = await dig(port_of(server), f"ext.default.svc.{Z}", "A")
    assert r.answer == [(f"ext.default.svc.{Z}.", 30, "CNAME", "example.org.")]


async def test_ptr_records(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, "-x", "10.96.0.20")
    assert r.answer == [("20.0.96.10.in-addr.arpa.", 30, "PTR", f"web.default.svc.{Z}.")]
    assert "aa" in r.flags
    r = await dig(p, "-x", "fd00::20")
    assert [a[3] for a in r.answer] == [f"web.default.svc.{Z}."]
    r = await dig(p, "-x", "10.244.0.5")
    assert [a[3] for a in r.answer] == [f"db-0.db.default.svc.{Z}."]


async def test_pod_and_version_records(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, f"10-244-0-77.default.pod.{Z}")
    assert r.answer == [(f"10-244-0-77.default.pod.{Z}.", 30, "A", "10.244.0.77")]
    r = await dig(p, f"dns-version.{Z}", "TXT")
    assert r.answer == [(f"dns-version.{Z}.", 30, "TXT", '"1.1.0"')]


async def test_nxdomain_and_nodata_carry_the_soa(server: DNSServer) -> None:
    p = port_of(server)
    for name, qtype, status in [
        (f"nope.default.svc.{Z}", "A", "NXDOMAIN"),
        (f"web.nope.svc.{Z}", "A", "NXDOMAIN"),
        (f"nope.svc.{Z}", "A", "NXDOMAIN"),
        (f"default.svc.{Z}", "A", "NOERROR"),
        (f"svc.{Z}", "A", "NOERROR"),
        (f"web.default.svc.{Z}", "MX", "NOERROR"),
        (f"db.default.svc.{Z}", "AAAA", "NOERROR"),
    ]:
        r = await dig(p, "+norec", name, qtype)
        assert (name, r.status) == (name, status)
        assert "aa" in r.flags and not r.answer
        assert len(r.authority) == 1
        soa = r.authority[0]
        assert soa[0] == f"{Z}." and soa[1] == 10 and soa[2] == "SOA"
        assert soa[3].split()[-1] == "10"  # minimum = negative TTL (RFC 2308)


async def test_client_case_is_echoed(server: DNSServer) -> None:
    p = port_of(server)
    await dig(p, f"web.default.svc.{Z}")  # cached in lower case
    for name in (f"WeB.DeFault.svc.{Z}", f"WEB.default.SVC.{Z}"):
        r = await dig(p, name)
        assert r.answer == [(name + ".", 30, "A", "10.96.0.20")]
        assert f";{name}.\t" in r.text  # the question section too


# --- transport -------------------------------------------------------------------------------


async def test_edns_is_echoed_only_when_sent(server: DNSServer) -> None:
    p = port_of(server)
    r = await dig(p, "+bufsize=1232", f"web.default.svc.{Z}")
    assert r.edns_udp == 4096
    r = await dig(p, "+noedns", f"web.default.svc.{Z}")
    assert r.edns_udp is None and r.answer


async def test_truncation_and_tcp_for_big_answers(server: DNSServer) -> None:
    p = port_of(server)
    name = f"big.default.svc.{Z}"
    # Over UDP: as many whole records as the client's size holds, in order, with TC (what
    # CoreDNS sends), so a client that never retries over TCP still gets addresses.
    for args, limit, fit in (
        (("+noedns",), 512, 29),  # 12 header + 45 question + 29 x 16
        (("+bufsize=1232",), 1232, 73),  # ... + 11 OPT
        (("+bufsize=4096",), 4096, 252),  # 300 records do not fit 4096 either
    ):
        r = await dig(p, *args, "+ignore", name)
        assert "tc" in r.flags and r.status == "NOERROR", args
        assert 0 < msg_size(r) <= limit and msg_size(r) + 16 > limit, args
        assert [a[3] for a in r.answer] == [f"10.245.{i // 250}.{i % 250 + 1}" for i in range(fit)]
        assert r.edns_udp == (None if limit == 512 else 4096)
    r = await dig(p, "+tcp", name)
    assert len(r.answer) == 300 and "tc" not in r.flags
    r = await dig(p, name)  # dig retries over TCP on its own
    assert len(r.answer) == 300
    r = await dig(p, "+bufsize=4096", f"db.default.svc.{Z}")  # small answers fit
    assert "tc" not in r.flags and len(r.answer) == 2


async def test_tcp_pipelined_queries_and_idle_timeout(server: DNSServer) -> None:
    from dnslib import DNSRecord

    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    names = [f"web.default.svc.{Z}", f"db.default.svc.{Z}", f"nope.default.svc.{Z}"]
    frames = b""
    for i, name in enumerate(names):
        q = DNSRecord.question(name)
        q.header.id = 100 + i
        packed = bytes(q.pack())
        frames += len(packed).to_bytes(2, "big") + packed
    writer.write(frames)  # all three in one segment
    replies = {}
    for _ in names:
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = DNSRecord.parse(await reader.readexactly(size))
        replies[reply.header.id] = reply
    assert sorted(replies) == [100, 101, 102]
    assert str(replies[100].rr[0].rdata) == "10.96.0.20"
    assert len(replies[101].rr) == 2
    assert replies[102].header.rcode == 3
    # Idle for longer than tcp_idle_timeout (0.5 s): the server closes.
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


# --- state changes ---------------------------------------------------------------------------


async def test_service_change_is_visible_in_the_next_answer(
    server: DNSServer, state: ClusterState
) -> None:
    p = port_of(server)
    name = f"web.default.svc.{Z}"
    assert (await dig(p, name)).answer[0][3] == "10.96.0.20"
    assert (await dig(p, name)).answer[0][3] == "10.96.0.20"  # now from the cache
    await dig(p, f"ext.default.svc.{Z}", "CNAME")
    state.apply([WatchEvent(EventType.MODIFIED, service("web", ip="10.96.0.21"))])
    assert (await dig(p, name)).answer[0][3] == "10.96.0.21"
    assert (await dig(p, "-x", "10.96.0.21")).answer[0][3] == f"{name}."
    # A cached NXDOMAIN goes as soon as the service appears.
    assert (await dig(p, f"api.default.svc.{Z}")).status == "NXDOMAIN"
    state.apply([WatchEvent(EventType.ADDED, service("api", ip="10.96.0.30"))])
    assert (await dig(p, f"api.default.svc.{Z}")).answer[0][3] == "10.96.0.30"
    # Endpoints becoming ready show in the headless answer.
    state.apply(
        [
            WatchEvent(
                EventType.MODIFIED,
                endpoint_slice(
                    "db",
                    [{"addresses": ["10.244.0.9"], "hostname": "db-9"}],
                    ports=[{"name": "postgres", "port": 5432}],
                ),
            )
        ]
    )
    assert [a[3] for a in (await dig(p, f"db.default.svc.{Z}")).answer] == ["10.244.0.9"]
    state.apply([WatchEvent(EventType.DELETED, service("web", ip="10.96.0.21"))])
    assert (await dig(p, name)).status == "NXDOMAIN"
    # Unrelated names stayed cached throughout.
    hits = server.metrics.answer_hits
    assert (await dig(p, f"ext.default.svc.{Z}", "CNAME")).answer[0][3] == "example.org."
    assert server.metrics.answer_hits == hits + 1


async def test_servfail_until_synced_then_answers() -> None:
    state = ClusterState()
    srv = DNSServer(state, DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[]))
    await srv.start()
    try:
        p = port_of(srv)
        for _ in range(2):
            r = await dig(p, f"web.default.svc.{Z}")
            assert r.status == "SERVFAIL" and "aa" not in r.flags
        objs = objects()
        state.replace("Service", [o for o in objs if o.kind == "Service"])
        assert (await dig(p, f"web.default.svc.{Z}")).status == "SERVFAIL"  # slices not listed yet
        state.replace("EndpointSlice", [o for o in objs if o.kind == "EndpointSlice"])
        assert (await dig(p, f"web.default.svc.{Z}")).answer[0][3] == "10.96.0.20"
    finally:
        await srv.stop()


async def test_address_map_points_a_records_at_served_addresses(state: ClusterState) -> None:
    srv = DNSServer(
        state,
        DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[]),
        address_map=lambda ip: "127.0.96.20" if ip == "10.96.0.20" else ip,
    )
    await srv.start()
    try:
        r = await dig(port_of(srv), f"web.default.svc.{Z}")
        assert r.answer[0][3] == "127.0.96.20"
    finally:
        await srv.stop()


async def test_metrics_count_requests_responses_and_cache(server: DNSServer) -> None:
    p = port_of(server)
    for _ in range(3):
        await dig(p, f"web.default.svc.{Z}")
    await dig(p, f"nope.default.svc.{Z}")
    await dig(p, "+tcp", f"web.default.svc.{Z}")
    registry = CollectorRegistry()
    registry.register(DNSCollector(server))
    text = generate_latest(registry).decode()
    zone = f'zone="{Z}."'
    assert f'coredns_dns_requests_total{{proto="udp",server="dns://",{zone}}} 4.0' in text
    assert f'coredns_dns_requests_total{{proto="tcp",server="dns://",{zone}}} 1.0' in text
    assert f'coredns_dns_responses_total{{rcode="NOERROR",server="dns://",{zone}}} 4.0' in text
    assert f'coredns_dns_responses_total{{rcode="NXDOMAIN",server="dns://",{zone}}} 1.0' in text
    assert 'coredns_cache_hits_total{cache="answer",server="dns://",type="cluster"} 2.0' in text
    assert 'coredns_cache_entries{cache="answer",server="dns://",type="cluster"}' in text
    assert "coredns_dns_request_duration_seconds_bucket" in text


async def test_stop_closes_open_tcp_connections(state: ClusterState) -> None:
    srv = DNSServer(state, DNSConfig(binds=[("127.0.0.1", 0)], upstreams=[], tcp_idle_timeout=60))
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(srv))
    await asyncio.wait_for(srv.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_ipv6_bind(state: ClusterState) -> None:
    srv = DNSServer(state, DNSConfig(binds=[("::1", 0)], upstreams=[]))
    try:
        await srv.start()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        port = srv.addresses[0][1]
        proc = await asyncio.create_subprocess_exec(
            "dig",
            "@::1",
            "-p",
            str(port),
            "+tries=1",
            "+time=2",
            f"web.default.svc.{Z}",
            "AAAA",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        r = parse_dig(out.decode())
        assert r.answer == [(f"web.default.svc.{Z}.", 30, "AAAA", "fd00::20")]
    finally:
        await srv.stop()
