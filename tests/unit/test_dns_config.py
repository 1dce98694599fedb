"""DNS options (dns/config.py): resolv.conf upstreams and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeshim.dns.config import DNSConfig, resolv_conf_nameservers


def test_nameservers_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch example.com\nnameserver 10.0.0.2\n"
        "nameserver fd00::53 # v6\n;nameserver 10.9.9.9\noptions ndots:5\n"
    )
    assert resolv_conf_nameservers(conf) == [("10.0.0.2", 53), ("fd00::53", 53)]
    assert resolv_conf_nameservers(tmp_path / "missing") == []


def test_zone_is_normalised_and_bad_values_are_named() -> None:
    assert DNSConfig(zone="Cluster.Local.", upstreams=[]).zone == "cluster.local"
    with pytest.raises(ValueError, match="pod records mode 'maybe'"):
        DNSConfig(pod_records="maybe", upstreams=[])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        DNSConfig(zone=".", upstreams=[])
