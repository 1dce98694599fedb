"""Cluster records (dns/records.py): ClusterState in, DNS replies out, no sockets."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import QTYPE, RCODE, DNSLabel, DNSQuestion, DNSRecord

from kubeshim.cluster.state import ClusterState, EventType, WatchEvent
from kubeshim.dns.config import DNSConfig
from kubeshim.dns.records import ClusterRecords
from tests.objects import endpoint_slice, service, synced_state

ZONE = "cluster.local"


def ask(records: ClusterRecords, name: str, qtype: str = "A") -> DNSRecord:
    resolution = records.resolve(DNSRecord.question(name, qtype))
    assert resolution is not None, f"{name} was not answered from the cluster"
    return resolution.reply


def answers(reply: DNSRecord) -> list[tuple[str, str, str]]:
    return [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr]


def is_negative(reply: DNSRecord, rcode: int) -> bool:
    soa = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
    return reply.header.rcode == rcode and not reply.rr and len(soa) == 1 and bool(reply.header.aa)


@pytest.fixture
def cluster() -> ClusterRecords:
    state = synced_state(
        service(
            "web",
            ip="10.96.0.20",
            clusterIPs=["10.96.0.20", "fd00::20"],
            ipFamilies=["IPv4", "IPv6"],
        ),
        service(
            "db",
            ip="None",
            ports=[{"name": "postgres", "port": 5432}],
        ),
        endpoint_slice(
            "db",
            [
                {"addresses": ["10.244.0.5"], "hostname": "db-0"},
                {"addresses": ["10.244.0.6"], "hostname": "db-1"},
                {"addresses": ["10.244.0.7"]},
                {"addresses": ["10.244.0.8"], "hostname": "db-3", "conditions": {"ready": False}},
            ],
            ports=[{"name": "postgres", "port": 5432}],
        ),
        service("ext", ip=None, type="ExternalName", externalName="example.org", ports=[]),
        service(
            "multi",
            ns="other",
            ip="10.96.1.1",
            ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        ),
    )
    return ClusterRecords(state, DNSConfig(zone=ZONE, ttl=30, negative_ttl=7, upstreams=[]))


def test_cluster_ip_a_and_aaaa_per_family(cluster: ClusterRecords) -> None:
    reply = ask(cluster, "web.default.svc.cluster.local", "A")
    assert answers(reply) == [("web.default.svc.cluster.local.", "A", "10.96.0.20")]
    assert reply.header.aa and reply.rr[0].ttl == 30
    reply = ask(cluster, "web.default.svc.cluster.local", "AAAA")
    assert answers(reply) == [("web.default.svc.cluster.local.", "AAAA", "fd00::20")]


def test_names_are_case_insensitive(cluster: ClusterRecords) -> None:
    reply = ask(cluster, "WEB.Default.SVC.cluster.LOCAL", "A")
    assert [rr.rdata for rr in reply.rr][0].__str__() == "10.96.0.20"


def test_headless_lists_ready_endpoints_only(cluster: ClusterRecords) -> None:
    reply = ask(cluster, "db.default.svc.cluster.local")
    assert sorted(a[2] for a in answers(reply)) == ["10.244.0.5", "10.244.0.6", "10.244.0.7"]


def test_headless_hostname_and_dashed_endpoint_names(cluster: ClusterRecords) -> None:
    assert answers(ask(cluster, "db-1.db.default.svc.cluster.local")) == [
        ("db-1.db.default.svc.cluster.local.", "A", "10.244.0.6")
    ]
    assert answers(ask(cluster, "10-244-0-7.db.default.svc.cluster.local"))[0][2] == "10.244.0.7"
    # Not ready: no name (spec 2.4.1 speaks of ready endpoints).
    assert is_negative(ask(cluster, "db-3.db.default.svc.cluster.local"), RCODE.NXDOMAIN)


def test_headless_srv_one_per_endpoint_with_additional_addresses(cluster: ClusterRecords) -> None:
    reply = ask(cluster, "_postgres._tcp.db.default.svc.cluster.local", "SRV")
    targets = sorted(str(rr.rdata.target) for rr in reply.rr)
    assert targets == [
        "10-244-0-7.db.default.svc.cluster.local.",
        "db-0.db.default.svc.cluster.local.",
        "db-1.db.default.svc.cluster.local.",
    ]
    assert {rr.rdata.port for rr in reply.rr} == {5432}
    extra = sorted((str(rr.rname), str(rr.rdata)) for rr in reply.ar)
    assert extra == [
        ("10-244-0-7.db.default.svc.cluster.local.", "10.244.0.7"),
        ("db-0.db.default.svc.cluster.local.", "10.244.0.5"),
        ("db-1.db.default.svc.cluster.local.", "10.244.0.6"),
    ]


def test_srv_for_a_named_port_and_for_the_service_name(cluster: ClusterRecords) -> None:
    reply = ask(cluster, "_dns._udp.multi.other.svc.cluster.local", "SRV")
    assert [
        (rr.rdata.priority, rr.rdata.weight, rr.rdata.port, str(rr.rdata.target)) for rr in reply.rr
    ] == [(0, 100, 53, "multi.other.svc.cluster.local.")]
    assert answers(reply)[0][0] == "_dns._udp.multi.other.svc.cluster.local."
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.ar] == [
        ("multi.other.svc.cluster.local.", "10.96.1.1")
    ]
    # Wrong protocol for the port name: the name does not exist.
    assert is_negative(
        ask(cluster, "_dns._tcp.multi.other.svc.cluster.local", "SRV"), RCODE.NXDOMAIN
    )
    # On the service name itself, every port (CoreDNS).
    reply = ask(cluster, "multi.other.svc.cluster.local", "SRV")
    assert sorted(rr.rdata.port for rr in reply.rr) == [53, 80]
    assert {rr.rdata.weight for rr in reply.rr} == {50}


def test_external_name_is_a_cname_for_any_type(cluster: ClusterRecords) -> None:
    for qtype in ("A", "AAAA", "CNAME"):
        assert answers(ask(cluster, "ext.default.svc.cluster.local", qtype)) == [
            ("ext.default.svc.cluster.local.", "CNAME", "example.org.")
        ]


def test_ptr_for_cluster_ips_and_headless_endpoints(cluster: ClusterRecords) -> None:
    assert answers(ask(cluster, "20.0.96.10.in-addr.arpa", "PTR")) == [
        ("20.0.96.10.in-addr.arpa.", "PTR", "web.default.svc.cluster.local.")
    ]
    import ipaddress

    v6 = ipaddress.ip_address("fd00::20").reverse_pointer
    assert answers(ask(cluster, v6, "PTR"))[0][2] == "web.default.svc.cluster.local."
    assert (
        answers(ask(cluster, "5.0.244.10.in-addr.arpa", "PTR"))[0][2]
        == "db-0.db.default.svc.cluster.local."
    )
    # Unknown addresses are not ours without a configured reverse CIDR: forwarded.
    assert cluster.resolve(DNSRecord.question("9.9.9.10.in-addr.arpa", "PTR")) is None


def test_reverse_cidr_makes_unknown_addresses_nxdomain() -> None:
    state = synced_state(service("web", ip="10.96.0.20"))
    records = ClusterRecords(state, DNSConfig(upstreams=[], reverse_cidrs=["10.96.0.0/16"]))
    reply = ask(records, "9.9.96.10.in-addr.arpa", "PTR")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert str(reply.auth[0].rname) == "96.10.in-addr.arpa."
    assert records.resolve(DNSRecord.question("9.9.97.11.in-addr.arpa", "PTR")) is None


def test_nxdomain_and_nodata_follow_coredns(cluster: ClusterRecords) -> None:
    nx, nodata = RCODE.NXDOMAIN, RCODE.NOERROR
    assert is_negative(ask(cluster, "nope.default.svc.cluster.local"), nx)
    assert is_negative(ask(cluster, "web.nope.svc.cluster.local"), nx)
    assert is_negative(ask(cluster, "x.y.z.web.default.svc.cluster.local"), nx)
    assert is_negative(ask(cluster, "foo.cluster.local"), nx)
    # Empty non-terminals and names without that type.
    assert is_negative(ask(cluster, "default.svc.cluster.local"), nodata)
    assert is_negative(ask(cluster, "svc.cluster.local"), nodata)
    assert is_negative(ask(cluster, "cluster.local", "A"), nodata)
    assert is_negative(ask(cluster, "nope.svc.cluster.local"), nx)  # no services in that namespace
    assert is_negative(ask(cluster, "web.default.svc.cluster.local", "MX"), nodata)
    assert is_negative(ask(cluster, "db.default.svc.cluster.local", "AAAA"), nodata)
    # The SOA says how long to keep it: TTL and minimum are the negative TTL (RFC 2308).
    soa = ask(cluster, "nope.default.svc.cluster.local").auth[0]
    assert soa.ttl == 7 and soa.rdata.times[4] == 7 and str(soa.rname) == "cluster.local."


def test_soa_at_apex_and_version_txt(cluster: ClusterRecords) -> None:
    assert answers(ask(cluster, "cluster.local", "SOA"))[0][1] == "SOA"
    assert answers(ask(cluster, "dns-version.cluster.local", "TXT")) == [
        ("dns-version.cluster.local.", "TXT", '"1.1.0"')
    ]


def test_headless_without_ready_endpoints_is_nxdomain() -> None:
    state = synced_state(
        service("h", ip="None"),
        endpoint_slice("h", [{"addresses": ["10.244.0.9"], "conditions": {"ready": False}}]),
    )
    records = ClusterRecords(state, DNSConfig(upstreams=[]))
    assert is_negative(ask(records, "h.default.svc.cluster.local"), RCODE.NXDOMAIN)


def test_publish_not_ready_addresses_lists_every_endpoint() -> None:
    state = synced_state(
        service("h", ip="None", publishNotReadyAddresses=True),
        endpoint_slice("h", [{"addresses": ["10.244.0.9"], "conditions": {"ready": False}}]),
    )
    records = ClusterRecords(state, DNSConfig(upstreams=[]))
    assert answers(ask(records, "h.default.svc.cluster.local"))[0][2] == "10.244.0.9"


@pytest.mark.parametrize(
    ("mode", "name", "want"),
    [
        ("insecure", "10-1-2-3.default.pod.cluster.local", "10.1.2.3"),
        ("insecure", "10-1-2.default.pod.cluster.local", None),
        ("verified", "10-244-0-5.default.pod.cluster.local", "10.244.0.5"),
        ("verified", "10-244-0-5.other.pod.cluster.local", None),  # endpoint of another namespace
        ("verified", "10-1-2-3.default.pod.cluster.local", None),
        ("disabled", "10-244-0-5.default.pod.cluster.local", None),
    ],
)
def test_pod_records(mode: str, name: str, want: str | None) -> None:
    state = synced_state(
        service("h", ip="None"), endpoint_slice("h", [{"addresses": ["10.244.0.5"]}])
    )
    records = ClusterRecords(state, DNSConfig(upstreams=[], pod_records=mode))  # type: ignore[arg-type]
    reply = ask(records, name)
    if want is None:
        assert is_negative(reply, RCODE.NXDOMAIN)
    else:
        assert answers(reply) == [(name + ".", "A", want)]


def test_servfail_until_synced_never_nxdomain() -> None:
    state = ClusterState()
    records = ClusterRecords(state, DNSConfig(upstreams=[]))
    resolution = records.resolve(DNSRecord.question("nope.default.svc.cluster.local"))
    assert resolution is not None and not resolution.cacheable
    assert resolution.reply.header.rcode == RCODE.SERVFAIL
    state.replace("Service", [])
    state.replace("EndpointSlice", [])
    assert ask(records, "nope.default.svc.cluster.local").header.rcode == RCODE.NXDOMAIN


def test_names_outside_the_zone_are_not_ours(cluster: ClusterRecords) -> None:
    assert cluster.resolve(DNSRecord.question("example.com")) is None


def test_address_map_serves_clusterips_where_traffic_works() -> None:
    state = synced_state(service("web", ip="10.96.0.20"))
    records = ClusterRecords(state, DNSConfig(upstreams=[]), address_map=lambda ip: "127.0.10.1")
    assert answers(ask(records, "web.default.svc.cluster.local"))[0][2] == "127.0.10.1"


def test_changes_report_the_names_they_make_stale() -> None:
    state = synced_state(service("web", ip="10.96.0.20"))
    records = ClusterRecords(state, DNSConfig(upstreams=[], pod_records="verified"))
    before = records.resolve(DNSRecord.question("web.default.svc.cluster.local"))
    assert before is not None and before.deps == (("svc", "default", "web"),)
    stale: list[set[object]] = []
    state.subscribe(lambda changes: stale.append(records.apply(changes)))
    state.apply([WatchEvent(EventType.ADDED, service("api", ip="10.96.0.30"))])
    assert stale[-1] == {("svc", "default", "api"), ("ptr", "10.96.0.30")}
    state.apply([WatchEvent(EventType.ADDED, service("a", ns="fresh", ip="10.96.0.31"))])
    assert ("ns", "fresh") in stale[-1]
    state.apply(
        [WatchEvent(EventType.ADDED, endpoint_slice("web", [{"addresses": ["10.244.0.9"]}]))]
    )
    assert stale[-1] == {("svc", "default", "web"), ("ptr", "10.96.0.20"), ("pod", "default")}
    assert answers(ask(records, "10-244-0-9.default.pod.cluster.local"))[0][2] == "10.244.0.9"
    state.apply([WatchEvent(EventType.DELETED, service("api", ip="10.96.0.30"))])
    assert records.resolve(DNSRecord.question("30.0.96.10.in-addr.arpa", "PTR")) is None


def test_ipv6_endpoints_at_the_edges_get_valid_names_in_srv_and_ptr() -> None:
    edges = ["2001:db8:3333:4444:5555:6666::", "::1"]
    state = synced_state(
        service("v6", ip="None", ports=[{"name": "http", "port": 80}], ipFamilies=["IPv6"]),
        endpoint_slice(
            "v6",
            [{"addresses": [ip]} for ip in edges],
            ports=[{"name": "http", "port": 80}],
            address_type="IPv6",
        ),
    )
    records = ClusterRecords(state, DNSConfig(reverse_cidrs=["2001:db8::/32"]))
    reply = ask(records, "_http._tcp.v6.default.svc.cluster.local", "SRV")
    targets = sorted(str(rr.rdata.target) for rr in reply.rr)
    assert targets == [
        "0--1.v6.default.svc.cluster.local.",
        "2001-db8-3333-4444-5555-6666--0.v6.default.svc.cluster.local.",
    ]
    assert {str(rr.rname) for rr in reply.ar} == set(targets)
    name = "2001-db8-3333-4444-5555-6666--0.v6.default.svc.cluster.local"
    assert answers(ask(records, name, "AAAA")) == [(name + ".", "AAAA", edges[0])]
    ptr = ask(records, ipaddress.ip_address(edges[0]).reverse_pointer, "PTR")
    assert [str(rr.rdata) for rr in ptr.rr] == [name + "."]


def test_a_dotted_label_is_not_the_cluster_name_it_spells() -> None:
    state = synced_state(service("web", ip="10.96.0.20"))
    records = ClusterRecords(state, DNSConfig())
    # `web\\.default.svc.cluster.local`: labels "web.default", "svc", "cluster", "local".
    dotted = DNSRecord(q=DNSQuestion(DNSLabel([b"web.default", b"svc", b"cluster", b"local"])))
    resolution = records.resolve(dotted)
    assert resolution is not None and resolution.reply.header.rcode == RCODE.NXDOMAIN
    # The single label `web.default` is not in the zone at all: forwarded, never the Service.
    assert records.resolve(DNSRecord(q=DNSQuestion(DNSLabel([b"web.default"])))) is None
    assert answers(ask(records, "web.default.svc.cluster.local"))[0][2] == "10.96.0.20"
