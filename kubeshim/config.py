"""Daemon options: defaults, then a KubeProxyConfiguration file, then flags.

`--config FILE` reads a kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration, the file
kube-proxy itself takes, optionally with a `dns:` section of kubeshim's own. Fields a user-space
proxy can honour map onto `Options`; the others are listed once at start with the reason they
do not apply. Flags use kube-proxy's names where they mean the same thing and win over the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
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
    # bindAddress: the node's primary IP, when set (kube-proxy does not bind to it either).
    node_ip: str = ""
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
    dns_cache_size: int = 10000  # wire answers for cluster names
    dns_upstream_cache_size: int = 10000  # upstream answers, each of positive and negative
    dns_upstream_max_ttl: int = 3600
    dns_reverse_cidrs: list[str] = field(default_factory=list)
    # operations
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
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
    """The node's nameservers: the default upstreams (CoreDNS's `forward . /etc/resolv.conf`)."""
    servers: list[tuple[str, int]] = []
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return servers


# --- the KubeProxyConfiguration file ------------------------------------------------------

_DUR = "duration"  # a Go duration string: metav1.Duration decodes only from a string
_NUM = "number"
_MAP = "map"
_LIST = "list"

# Every field of kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration (k8s.io/kube-proxy
# config/v1alpha1/types.go, with componentbase ClientConnectionConfiguration and logsapi
# LoggingConfiguration). kube-proxy decodes its file strictly, so a field outside this tree is
# an error here too, not something silently dropped.
_SCHEMA: dict[str, Any] = {
    "featureGates": _MAP,
    "clientConnection": {"kubeconfig": str, "acceptContentTypes": str, "contentType": str,
                         "qps": _NUM, "burst": int},
    "logging": {"format": str, "flushFrequency": object, "verbosity": int, "vmodule": _LIST,
                "options": _MAP},
    "hostnameOverride": str,
    "bindAddress": str,
    "healthzBindAddress": str,
    "metricsBindAddress": str,
    "bindAddressHardFail": bool,
    "enableProfiling": bool,
    "showHiddenMetricsForVersion": str,
    "mode": str,
    "iptables": {"masqueradeBit": int, "masqueradeAll": bool, "localhostNodePorts": bool,
                 "snatNodeInternalIP": bool, "syncPeriod": _DUR, "minSyncPeriod": _DUR},
    "ipvs": {"syncPeriod": _DUR, "minSyncPeriod": _DUR, "scheduler": str, "excludeCIDRs": _LIST,
             "strictARP": bool, "tcpTimeout": _DUR, "tcpFinTimeout": _DUR, "udpTimeout": _DUR},
    "nftables": {"masqueradeBit": int, "masqueradeAll": bool, "syncPeriod": _DUR,
                 "minSyncPeriod": _DUR},
    "winkernel": {"networkName": str, "sourceVip": str, "enableDSR": bool,
                  "rootHnsEndpointName": str, "forwardHealthCheckVip": bool},
    "detectLocalMode": str,
    "detectLocal": {"bridgeInterface": str, "interfaceNamePrefix": str},
    "clusterCIDR": str,
    "nodePortAddresses": _LIST,
    "oomScoreAdj": int,
    "conntrack": {"maxPerCore": int, "min": int, "tcpEstablishedTimeout": _DUR,
                  "tcpCloseWaitTimeout": _DUR, "tcpBeLiberal": bool, "udpTimeout": _DUR,
                  "udpStreamTimeout": _DUR},
    "configSyncPeriod": _DUR,
    "portRange": str,
    "windowsRunAsService": bool,
    # The user-space mode's idle timeout for UDP flows, dropped from the file with that mode
    # (Kubernetes 1.26). kubeshim is a user-space proxy, so it still reads it.
    "udpIdleTimeout": _DUR,
    # kubeshim's own section (cluster DNS), see _DNS_SCHEMA.
    "dns": _MAP,
}

# Fields kubeshim reads from the file; everything else that is set is reported as ignored.
_HONOURED = {
    "hostnameOverride", "bindAddress", "healthzBindAddress", "metricsBindAddress",
    "clusterCIDR", "nodePortAddresses", "clientConnection.kubeconfig",
    "conntrack.tcpEstablishedTimeout", "conntrack.udpTimeout", "udpIdleTimeout",
    "logging.verbosity", "dns",
}

# Why the other fields do not apply (matched by the longest prefix), reported once at start.
_IGNORED_REASONS = {
    "featureGates": "kubeshim has no feature gates",
    "clientConnection": "kubeshim opens two list+watch streams and always asks for JSON",
    "logging": "only logging.verbosity is read (4 or more: debug); use --log-level",
    "bindAddressHardFail": "a port that cannot be bound is logged and the rest keeps serving",
    "enableProfiling": "no profiling endpoint",
    "showHiddenMetricsForVersion": "kubeshim has no hidden metrics",
    "mode": "kubeshim is its own user-space mode",
    "iptables": "no iptables rules: traffic is proxied in user space",
    "ipvs": "no IPVS: traffic is proxied in user space",
    "nftables": "no nftables rules: traffic is proxied in user space",
    "winkernel": "Linux only",
    "windowsRunAsService": "Linux only",
    "detectLocalMode": "the proxy sees each client's address on its socket",
    "detectLocal": "the proxy sees each client's address on its socket",
    "oomScoreAdj": "set it with the service manager (systemd OOMScoreAdjust=, the pod spec)",
    "conntrack": "no kernel conntrack entries are made for proxied traffic",
    "conntrack.udpStreamTimeout": "one idle timeout per UDP flow: conntrack.udpTimeout",
    "configSyncPeriod": "changes are applied as they arrive; there is no periodic resync",
    "portRange": "no user-space port range is allocated",
}

# kubeshim's `dns:` section: field -> (Options attribute, expected type).
_DNS_SCHEMA: dict[str, tuple[str, Any]] = {
    "enabled": ("dns", bool),
    "clusterDomain": ("cluster_domain", str),
    "binds": ("dns_binds", _LIST),
    "upstreams": ("upstreams", _LIST),
    "ttl": ("dns_ttl", int),
    "negativeTTL": ("dns_negative_ttl", int),
    "podRecords": ("pod_records", str),
    "cacheSize": ("dns_cache_size", int),
    "upstreamCacheSize": ("dns_upstream_cache_size", int),
    "upstreamMaxTTL": ("dns_upstream_max_ttl", int),
    "reverseCIDRs": ("dns_reverse_cidrs", _LIST),
}
POD_RECORDS = ("disabled", "insecure", "verified")

# nodePortAddresses keywords (types.go): 'primary' is the node's primary address(es).
_NODEPORT_KEYWORDS = {"localhost": ["127.0.0.0/8", "::1/128"], "all": ["0.0.0.0/0", "::/0"]}


def _type_name(expected: Any) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", _DUR: "a duration string "
            "like 30s or 15m0s", _NUM: "a number", _MAP: "a mapping", _LIST: "a list"}.get(
        expected, str(expected))


def _type_ok(value: Any, expected: Any) -> bool:
    if value is None or expected is object:
        return True  # null is "not set", as in Go's JSON decoding
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _NUM:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == _DUR or expected is str:
        return isinstance(value, str)
    if expected == _MAP:
        return isinstance(value, dict)
    if expected == _LIST:
        return isinstance(value, list)
    return False


def _check_fields(node: dict[str, Any], schema: dict[str, Any], prefix: str,
                  errors: list[str]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in schema:
            errors.append(f"{name}: unknown field")
        elif isinstance(schema[key], dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a mapping, got {value!r}")
            else:
                _check_fields(value, schema[key], name + ".", errors)
        elif not _type_ok(value, schema[key]):
            errors.append(f"{name}: expected {_type_name(schema[key])}, got {value!r}")


def _is_set(value: Any) -> bool:
    """Go's zero values count as not set (a file written by kube-proxy lists every field)."""
    return value not in (None, "", 0, False, {}, [], "0s")


def load_config_file(path: Path, opts: Options) -> None:
    """Apply a KubeProxyConfiguration (plus kubeshim's `dns:` section) onto `opts`.

    Raises ConfigError naming every wrong field; on error `opts` is left unchanged.
    """
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a KubeProxyConfiguration mapping, got "
                          f"{type(doc).__name__}")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind != "KubeProxyConfiguration" or api != KUBE_PROXY_API:
        raise ConfigError(
            f"{path}: expected kind KubeProxyConfiguration, apiVersion {KUBE_PROXY_API}; "
            f"got kind {kind!r}, apiVersion {api!r}"
        )
    body = {k: v for k, v in doc.items() if k not in ("kind", "apiVersion")}
    errors: list[str] = []
    _check_fields(body, _SCHEMA, "", errors)
    new = replace(opts, ignored=list(opts.ignored))
    if not errors:
        _apply(body, new, errors)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    for name, value in vars(new).items():
        setattr(opts, name, value)


def _apply(doc: dict[str, Any], opts: Options, errors: list[str]) -> None:
    def get(*keys: str) -> Any:
        node: Any = doc
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def dur(name: str, value: str) -> float | None:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            errors.append(f"{name}: {e}")
            return None
        if seconds < 0:
            errors.append(f"{name}: must not be negative")
            return None
        return seconds

    if _is_set(v := get("hostnameOverride")):
        # kube-proxy trims and lower-cases the node name (pkg/proxy/util nodeName).
        opts.hostname_override = str(v).strip().lower()
    if _is_set(v := get("bindAddress")):
        # Not a socket address: kube-proxy's idea of the node's primary IP (types.go).
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            errors.append(f"bindAddress: {v!r} is not an IP address")
        else:
            if not ip.is_unspecified:
                opts.node_ip = str(ip)
            if ip.version == 6:
                # kube-proxy's defaults follow the family of bindAddress.
                opts.healthz_bind_address = "[::]:10256"
                opts.metrics_bind_address = "[::1]:10249"
    for field_name, attr in (("healthzBindAddress", "healthz_bind_address"),
                             ("metricsBindAddress", "metrics_bind_address")):
        if _is_set(v := get(field_name)):
            try:
                host, port = parse_host_port(v)
                ipaddress.ip_address(host)
            except (ConfigError, ValueError) as e:
                errors.append(f"{field_name}: {e if isinstance(e, ConfigError) else 'not IP:PORT'}")
            else:
                setattr(opts, attr, v)
    if _is_set(v := get("clusterCIDR")):
        opts.cluster_cidrs = [c.strip() for c in v.split(",") if c.strip()]
        errors += [f"clusterCIDR: {e}" for e in _bad_cidrs(opts.cluster_cidrs)]
    if (v := get("nodePortAddresses")) is not None:
        try:
            opts.nodeport_addresses = expand_nodeport_addresses([str(a) for a in v], opts.node_ip)
        except ConfigError as e:
            errors.append(f"nodePortAddresses: {e}")
    if _is_set(v := get("clientConnection", "kubeconfig")):
        opts.kubeconfig = Path(v)
    for name in ("conntrack.tcpEstablishedTimeout",):
        if _is_set(v := get(*name.split("."))) and (t := dur(name, v)) is not None:
            opts.tcp_idle_timeout = t
    for name in ("udpIdleTimeout", "conntrack.udpTimeout"):
        if _is_set(v := get(*name.split("."))) and (t := dur(name, v)) is not None:
            opts.udp_timeout = t
    if (v := get("logging", "verbosity")) is not None:
        if v < 0:
            errors.append(f"logging.verbosity: {v} is negative")
        # klog's -v: 4 and up is debug output; below that kube-proxy logs steady-state info.
        opts.log_level = "debug" if v >= 4 else "info"
    for name in ("configSyncPeriod", "iptables.syncPeriod", "nftables.syncPeriod"):
        if _is_set(v := get(*name.split("."))):
            dur(name, v)  # still checked: a malformed file is an error even where unused
    if (v := get("dns")) is not None:
        _apply_dns(v, opts, errors)

    reported: set[str] = set()
    for key, value in _leaves(doc):
        if not _is_set(value) or any(key == h or key.startswith(h + ".") for h in _HONOURED):
            continue
        if key in ("logging.options", "logging.flushFrequency", "logging.format") and (
                key != "logging.format" or value == "text"):
            continue  # klog's output tuning; kube-proxy's own defaults set them
        top = max((k for k in _IGNORED_REASONS if key == k or key.startswith(k + ".")),
                  key=len, default="")
        label = top or key
        if label not in reported:
            reported.add(label)
            opts.ignored.append(f"{label}: {_IGNORED_REASONS.get(top, 'not used by kubeshim')}")


def expand_nodeport_addresses(values: list[str], node_ip: str = "") -> list[str]:
    """kube-proxy's nodePortAddresses: CIDRs plus 'primary', 'localhost' and 'all'.

    'primary' stays as a keyword for the proxy to resolve, unless bindAddress named the node's
    primary IP, which it then means (types.go: bindAddress overrides the primary IP).
    """
    out: list[str] = []
    for value in values:
        if value in _NODEPORT_KEYWORDS:
            out += _NODEPORT_KEYWORDS[value]
        elif value == "primary":
            out.append(f"{node_ip}/{128 if ':' in node_ip else 32}" if node_ip else "primary")
        else:
            if errs := _bad_cidrs([value]):
                raise ConfigError(errs[0] + " (expected a CIDR, 'primary', 'localhost' or 'all')")
            out.append(value)
    return list(dict.fromkeys(out))


def _bad_cidrs(values: list[str]) -> list[str]:
    bad = []
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
            if "/" not in value:
                raise ValueError
        except ValueError:
            bad.append(f"{value!r} is not a CIDR")
    return bad


def _apply_dns(section: dict[str, Any], opts: Options, errors: list[str]) -> None:
    for key, value in section.items():
        if key not in _DNS_SCHEMA:
            errors.append(f"dns.{key}: unknown field (known: {', '.join(_DNS_SCHEMA)})")
            continue
        attr, expected = _DNS_SCHEMA[key]
        if value is None:
            continue
        if not _type_ok(value, expected):
            errors.append(f"dns.{key}: expected {_type_name(expected)}, got {value!r}")
            continue
        try:
            if key in ("binds", "upstreams"):
                value = [parse_host_port(str(item), 53) for item in value]
            elif key == "reverseCIDRs":
                value = [str(item) for item in value]
                if bad := _bad_cidrs(value):
                    raise ConfigError(bad[0])
            elif key == "clusterDomain":
                value = value.strip(".").lower()
                if not value:
                    raise ConfigError("must not be empty")
            elif key == "podRecords" and value not in POD_RECORDS:
                raise ConfigError(f"{value!r} is not one of {', '.join(POD_RECORDS)}")
            elif expected is int and value < 0:
                raise ConfigError(f"{value} is negative")
        except ConfigError as e:
            errors.append(f"dns.{key}: {e}")
            continue
        setattr(opts, attr, value)


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node and prefix not in ("featureGates", "logging.options"):
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
