"""Daemon options: defaults, then a KubeProxyConfiguration file, then flags.

`--config FILE` reads a kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration, the file
kube-proxy itself takes, optionally with a `dns:` section of kubeshim's own. Fields a user-space
proxy can honour map onto `Options`; the others are listed once at start with the reason they
do not apply. Flags use kube-proxy's names where they mean the same thing and win over the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUBE_PROXY_API = "kubeproxy.config.k8s.io/v1alpha1"


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names it."""


@dataclass
class Options:
    # sources
    manifests: Path | None = None
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    # node
    hostname_override: str = ""
    cluster_cidrs: list[str] = field(default_factory=list)
    # proxy
    proxy: bool = True
    vip_mode: str = ""  # "" = interface as root, loopback otherwise
    vip_interface: str = "kubeshim0"
    nodeport_addresses: list[str] = field(default_factory=list)
    balance: str = "round-robin"
    tcp_idle_timeout: float = 3600.0
    udp_timeout: float = 30.0
    # dns
    dns: bool = True
    dns_binds: list[tuple[str, int]] = field(default_factory=list)
    cluster_domain: str = "cluster.local"
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    dns_ttl: int = 30
    dns_negative_ttl: int = 30
    pod_records: str = "insecure"
    dns_cache_size: int = 10000
    # operations
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    config_sync_period: float = 900.0
    drain_timeout: float = 15.0
    log_level: str = "info"
    proxy_name: str = "kubeshim"
    ignored: list[str] = field(default_factory=list)


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'1.2.3.4:53', '[::1]:53', '1.2.3.4' (with a default port) -> (host, port)."""
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]*)(?::(?P<p>\d+))?", value)
    if m is None or (m["h6"] is None and value.count(":") > 1):
        # A bare IPv6 address without brackets.
        if value.count(":") > 1 and default_port is not None:
            return value, default_port
        raise ConfigError(f"{value!r} is not HOST:PORT")
    host = m["h6"] if m["h6"] is not None else m["h"]
    port = m["p6"] or m["p"]
    if port is None:
        if default_port is None:
            raise ConfigError(f"{value!r} needs a port (HOST:PORT)")
        return host or "0.0.0.0", default_port
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"{value!r}: port out of range")
    return host or "0.0.0.0", int(port)


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The node's nameservers, the default upstreams (like CoreDNS's `forward . /etc/resolv.conf`)."""
    servers: list[tuple[str, int]] = []
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return servers


# KubeProxyConfiguration fields kubeshim cannot honour, and why (reported once at start).
_IGNORED_REASONS = {
    "mode": "kubeshim is its own user-space mode",
    "iptables": "no iptables rules: traffic is proxied in user space",
    "ipvs": "no IPVS: traffic is proxied in user space",
    "nftables": "no nftables rules: traffic is proxied in user space",
    "winkernel": "Linux only",
    "conntrack.maxPerCore": "no kernel conntrack entries are created",
    "conntrack.min": "no kernel conntrack entries are created",
    "conntrack.tcpCloseWaitTimeout": "half-closed connections end with the other side",
    "oomScoreAdj": "set it with the service manager (systemd OOMScoreAdjust=, pod spec)",
    "featureGates": "kubeshim has no feature gates",
    "detectLocalMode": "the client's source address is seen directly",
    "detectLocal": "the client's source address is seen directly",
    "portRange": "no user-space port range is allocated",
    "showHiddenMetricsForVersion": "no hidden metrics",
    "logging": "use --log-level",
    "bindAddressHardFail": "bind failures are reported per address and never fatal",
    "enableProfiling": "no profiling endpoint",
    "clientConnection.acceptContentTypes": "kubeshim always requests JSON",
    "clientConnection.contentType": "kubeshim always requests JSON",
    "clientConnection.qps": "kubeshim makes two list+watch streams only",
    "clientConnection.burst": "kubeshim makes two list+watch streams only",
    "syncPeriod": "changes are applied as they arrive",
    "minSyncPeriod": "changes are applied as they arrive",
}


def load_config_file(path: Path, opts: Options) -> None:
    """Apply a KubeProxyConfiguration (plus a kubeshim `dns:` section) onto `opts`."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read configuration: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a KubeProxyConfiguration mapping")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind != "KubeProxyConfiguration" or api != KUBE_PROXY_API:
        raise ConfigError(
            f"{path}: expected kind KubeProxyConfiguration, apiVersion {KUBE_PROXY_API}; "
            f"got kind {kind!r}, apiVersion {api!r}"
        )

    def dur(value: Any, name: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {name}: {e}") from None

    seen: set[str] = set()

    def take(*keys: str) -> Any:
        node: Any = doc
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        seen.add(".".join(keys))
        return node

    if (v := take("hostnameOverride")):
        opts.hostname_override = str(v)
    if (v := take("healthzBindAddress")) is not None:
        opts.healthz_bind_address = str(v)
    if (v := take("metricsBindAddress")) is not None:
        opts.metrics_bind_address = str(v)
    if (v := take("bindAddress")) is not None and str(v) not in ("0.0.0.0", "::", ""):
        # kube-proxy's userspace mode served on bindAddress; kubeshim's NodePorts do the same
        # when nodePortAddresses does not say otherwise.
        opts.nodeport_addresses = opts.nodeport_addresses or [str(v) + ("/32" if ":" not in str(v) else "/128")]
    if (v := take("clusterCIDR")):
        opts.cluster_cidrs = [c.strip() for c in str(v).split(",") if c.strip()]
    if (v := take("nodePortAddresses")) is not None:
        opts.nodeport_addresses = [str(a) for a in v]
    if (v := take("clientConnection", "kubeconfig")):
        opts.kubeconfig = Path(str(v))
    if (v := take("conntrack", "tcpEstablishedTimeout")) is not None:
        opts.tcp_idle_timeout = dur(v, "conntrack.tcpEstablishedTimeout")
    if (v := take("conntrack", "udpTimeout")) is not None:
        opts.udp_timeout = dur(v, "conntrack.udpTimeout")
    if (v := take("udpIdleTimeout")) is not None:
        opts.udp_timeout = dur(v, "udpIdleTimeout")
    if (v := take("configSyncPeriod")) is not None:
        opts.config_sync_period = dur(v, "configSyncPeriod")
    if (v := take("dns")) is not None:
        _load_dns_section(path, v, opts)
    seen.update({"kind", "apiVersion"})

    for key, value in _leaves(doc):
        if key in seen or any(key.startswith(s + ".") for s in seen) or value in (None, "", {}, []):
            continue
        top = next((k for k in _IGNORED_REASONS if key == k or key.startswith(k + ".")), None)
        reason = _IGNORED_REASONS.get(top or "", "") or "not used by kubeshim"
        opts.ignored.append(f"{key}: {reason}")


def _load_dns_section(path: Path, section: Any, opts: Options) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: dns: expected a mapping")
    known = {"clusterDomain", "binds", "upstreams", "ttl", "negativeTTL", "podRecords", "cacheSize",
             "enabled"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{path}: dns: unknown field(s) {', '.join(sorted(unknown))}")
    if "enabled" in section:
        opts.dns = bool(section["enabled"])
    if "clusterDomain" in section:
        opts.cluster_domain = str(section["clusterDomain"]).strip(".")
    if "binds" in section:
        opts.dns_binds = [parse_host_port(str(b), 53) for b in section["binds"]]
    if "upstreams" in section:
        opts.upstreams = [parse_host_port(str(u), 53) for u in section["upstreams"]]
    if "ttl" in section:
        opts.dns_ttl = int(section["ttl"])
    if "negativeTTL" in section:
        opts.dns_negative_ttl = int(section["negativeTTL"])
    if "podRecords" in section:
        opts.pod_records = str(section["podRecords"])
    if "cacheSize" in section:
        opts.dns_cache_size = int(section["cacheSize"])


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out: list[tuple[str, Any]] = []
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, node)]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_duration(value: Any) -> float:
    """A Go duration ('15m0s', '250ms') or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if text in ("0", ""):
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration like 15m0s or 250ms")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def default_vip_mode() -> str:
    return "interface" if os.geteuid() == 0 else "loopback"
