"""Parsing cluster names and reverse names (dns/names.py), no sockets."""

from __future__ import annotations

import ipaddress
import re

import pytest

from kubeshim.dns.names import (
    INVALID,
    ClusterName,
    NameKind,
    dashed,
    parse_cluster_name,
    pod_address,
    reverse_address,
    reverse_zone,
    split_zone,
)

S = NameKind.SERVICE


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("", ClusterName(NameKind.APEX)),
        ("dns-version", ClusterName(NameKind.VERSION)),
        ("svc", ClusterName(S)),
        ("pod", ClusterName(NameKind.POD)),
        ("default.svc", ClusterName(S, "default")),
        ("web.default.svc", ClusterName(S, "default", "web")),
        ("web-0.web.default.svc", ClusterName(S, "default", "web", endpoint="web-0")),
        (
            "_http._tcp.web.default.svc",
            ClusterName(S, "default", "web", port="http", protocol="tcp"),
        ),
        ("http.tcp.web.default.svc", ClusterName(NameKind.INVALID)),  # spec form needs underscores
        ("a.b.c.web.default.svc", ClusterName(NameKind.INVALID)),
        ("web.default", ClusterName(NameKind.INVALID)),
        ("default.pod", ClusterName(NameKind.POD, "default")),
        ("10-1-2-3.default.pod", ClusterName(NameKind.POD, "default", "10-1-2-3")),
        ("x.10-1-2-3.default.pod", ClusterName(NameKind.INVALID)),
        ("dns-version.x", ClusterName(NameKind.INVALID)),
    ],
)
def test_parse_cluster_name(name: str, want: ClusterName) -> None:
    assert parse_cluster_name(name.split(".") if name else []) == want


def test_split_zone_keeps_other_zones_out() -> None:
    assert split_zone(["cluster", "local"], "cluster.local") == []
    assert split_zone(
        ["web", "default", "svc", "cluster", "local"], "cluster.local"
    ) == ["web", "default", "svc"]
    assert split_zone(["evilcluster", "local"], "cluster.local") is None
    assert split_zone(["example", "com"], "cluster.local") is None
    assert split_zone(["web.default", "svc.cluster", "local"], "cluster.local") is None


@pytest.mark.parametrize(
    ("label", "want"),
    [
        ("10-244-0-5", "10.244.0.5"),
        ("fd00--5", "fd00::5"),
        ("2001-db8-0-0-0-0-0-1", "2001:db8::1"),
        ("10-244-0", None),
        ("300-1-1-1", None),
        ("web", None),
    ],
)
def test_pod_address(label: str, want: str | None) -> None:
    addr = pod_address(label)
    assert (str(addr) if addr else None) == want


def test_dashed_names_match_coredns() -> None:
    assert dashed("10.244.0.5") == "10-244-0-5"
    assert dashed("fd00::5") == "fd00--5"


@pytest.mark.parametrize(
    ("ip", "want"),
    [
        ("2001:db8:3333:4444:5555:6666::", "2001-db8-3333-4444-5555-6666--0"),
        ("::1", "0--1"),
        ("::", "0--0"),
        ("::ffff:10.0.0.1", "0--ffff-10-0-0-1"),
        ("fd00::", "fd00--0"),
    ],
)
def test_dashed_ipv6_edges_are_valid_rfc1123_labels_that_read_back(ip: str, want: str) -> None:
    name = dashed(ip)
    assert name == want
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)  # RFC 1123 2.1 label
    if "." not in ip:
        assert pod_address(name) == ipaddress.ip_address(ip)


def test_a_label_holding_a_dot_is_no_cluster_name() -> None:
    assert parse_cluster_name(["web.default", "svc"]) == INVALID
    assert parse_cluster_name(["10.244.0.5", "default", "pod"]) == INVALID


@pytest.mark.parametrize(
    ("qname", "want"),
    [
        ("20.0.96.10.in-addr.arpa", "10.96.0.20"),
        ("0.96.10.in-addr.arpa", None),  # a zone, not an address
        ("020.0.96.10.in-addr.arpa", None),  # leading zeros are not an address
        ("256.0.96.10.in-addr.arpa", None),
        (ipaddress.ip_address("fd00::5").reverse_pointer, "fd00::5"),
        ("1.0.ip6.arpa", None),
    ],
)
def test_reverse_address(qname: str, want: str | None) -> None:
    addr = reverse_address(qname)
    assert (str(addr) if addr else None) == want


def test_reverse_zone_rounds_out_to_octets_and_nibbles() -> None:
    assert reverse_zone("10.96.0.0/16") == "96.10.in-addr.arpa"
    assert reverse_zone("10.96.0.0/12") == "10.in-addr.arpa"
    assert (
        reverse_zone("fd00:10:96::/112")
        == ".".join(reversed("fd000010009600000000000000000000"[:28])) + ".ip6.arpa"
    )
