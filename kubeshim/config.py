"""Daemon options: defaults, then a KubeProxyConfiguration file, then flags.

`--config FILE` reads a kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration, the file
kube-proxy itself takes, optionally with a `dns:` section of kubeshim's own. Fields a user-space
proxy can honour map onto `Options`, whose `proxy` and `dns` are the components' own
configurations (ProxyConfig, DNSConfig); the others are listed once at start with the reason
they do not apply. Flags use kube-proxy's names where they mean the same thing and win over the
file; `finish` then derives what depends on both (the DNS server's default bind).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeGuard, TypeVar, get_args, get_type_hints

import msgspec
import yaml

from kubeshim.cluster.errors import ConfigError
from kubeshim.dns.config import DNSConfig
from kubeshim.proxy.config import ProxyConfig, VipMode

KUBE_PROXY_API = "kubeproxy.config.k8s.io/v1alpha1"
_T = TypeVar("_T")


def _proxy_defaults() -> ProxyConfig:
    # The mode no flag or file chose: tproxy as root (interface without nft), else loopback.
    return ProxyConfig(vip_mode=default_vip_mode())


def _dns_defaults() -> DNSConfig:
    # No binds: the node's default (`finish`). Upstreams: /etc/resolv.conf's, read now.
    return DNSConfig(binds=[])


@dataclass
class Options:
    """Everything the daemon runs with: its own settings, and the proxy's and the DNS server's
    configurations as the components take them (`proxy`, `dns`), filled from the defaults, the
    file and the flags. The daemon adds only what it learns at start (descriptor limit,
    worker processes, the node's networks)."""

    # sources
    manifests: Path | None = None
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    # node: its name is the proxy's `node_name` (hostnameOverride, --hostname-override)
    # bindAddress: the node's primary IP, when set (kube-proxy does not bind to it either).
    node_ip: str = ""
    # Restart without a gap: where a running daemon hands over its sockets, and whether this
    # one takes over from it (kubeshim/takeover.py).
    control_socket: Path | None = None
    takeover: bool = False
    # Follow --manifests by polling, not inotify (network filesystems deliver no inotify events).
    manifests_poll: bool = False
    # kube-apiserver's --service-cluster-ip-range: ClusterIPs read from manifests must lie in it.
    service_cidrs: list[str] = field(default_factory=list)
    # the components and whether each runs (--no-proxy, --no-dns, dns.enabled)
    proxy_enabled: bool = True
    proxy: ProxyConfig = field(default_factory=_proxy_defaults)
    dns_enabled: bool = True
    dns: DNSConfig = field(default_factory=_dns_defaults)
    # True until a flag or the file lists dns.allowedClients: then loopback, the clusterCIDR(s)
    # and the node's own networks may query (found at start).
    dns_allowed_clients_default: bool = True
    # operations
    healthz_bind_address: str = "0.0.0.0:10256"
    # False once a flag or the file set it; in loopback mode the default is then 127.0.0.1.
    healthz_bind_default: bool = True
    metrics_bind_address: str = "127.0.0.1:10249"
    drain_timeout: float = 15.0
    # --workers: processes serving the data plane and DNS (0: the CPUs this process may use,
    # at most MAX_WORKERS, in tproxy mode; 1 otherwise). kubeshim/workers.py.
    workers: int = 0
    log_level: str = "info"
    proxy_name: str = "kubeshim"
    ignored: list[str] = field(default_factory=list)

    def service_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.service_cidrs]


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


# --- the KubeProxyConfiguration file ------------------------------------------------------

# A Go duration ("30s", "15m0s"): metav1.Duration decodes only from a string.
Duration = Annotated[str, msgspec.Meta(description="duration")]


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """A part of the file. kube-proxy decodes strictly, so an unknown field is an error here
    too; every field may be null, which means "not set", as in Go's JSON decoding."""


class ClientConnection(_Section):
    kubeconfig: str | None = None
    accept_content_types: str | None = None
    content_type: str | None = None
    qps: float | None = None
    burst: int | None = None


class Logging(_Section):
    format: str | None = None
    flush_frequency: Any = None
    verbosity: int | None = None
    vmodule: list[Any] | None = None
    options: dict[str, Any] | None = None


class IPTables(_Section):
    masquerade_bit: int | None = None
    masquerade_all: bool | None = None
    localhost_node_ports: bool | None = None
    snat_node_internal_ip: bool | None = msgspec.field(default=None, name="snatNodeInternalIP")
    sync_period: Duration | None = None
    min_sync_period: Duration | None = None


class IPVS(_Section):
    sync_period: Duration | None = None
    min_sync_period: Duration | None = None
    scheduler: str | None = None
    exclude_cidrs: list[Any] | None = msgspec.field(default=None, name="excludeCIDRs")
    strict_arp: bool | None = msgspec.field(default=None, name="strictARP")
    tcp_timeout: Duration | None = None
    tcp_fin_timeout: Duration | None = None
    udp_timeout: Duration | None = None


class NFTables(_Section):
    masquerade_bit: int | None = None
    masquerade_all: bool | None = None
    sync_period: Duration | None = None
    min_sync_period: Duration | None = None


class WinKernel(_Section):
    network_name: str | None = None
    source_vip: str | None = None
    enable_dsr: bool | None = msgspec.field(default=None, name="enableDSR")
    root_hns_endpoint_name: str | None = None
    forward_health_check_vip: bool | None = None


class DetectLocal(_Section):
    bridge_interface: str | None = None
    interface_name_prefix: str | None = None


class Conntrack(_Section):
    max_per_core: int | None = None
    min: int | None = None
    tcp_established_timeout: Duration | None = None
    tcp_close_wait_timeout: Duration | None = None
    tcp_be_liberal: bool | None = None
    udp_timeout: Duration | None = None
    udp_stream_timeout: Duration | None = None


class DNSSection(_Section):
    """kubeshim's own `dns:` section."""

    enabled: bool | None = None
    cluster_domain: str | None = None
    binds: list[Any] | None = None
    upstreams: list[Any] | None = None
    ttl: int | None = None
    negative_ttl: int | None = msgspec.field(default=None, name="negativeTTL")
    pod_records: str | None = None
    cache_size: int | None = None
    upstream_cache_size: int | None = None
    upstream_max_ttl: int | None = msgspec.field(default=None, name="upstreamMaxTTL")
    reverse_cidrs: list[Any] | None = msgspec.field(default=None, name="reverseCIDRs")
    transparent_binds: list[Any] | None = None
    allowed_clients: list[Any] | None = None
    responses_per_second: float | None = None
    all_per_second: float | None = None
    slip: int | None = None
    ipv4_prefix_length: int | None = msgspec.field(default=None, name="ipv4PrefixLength")
    ipv6_prefix_length: int | None = msgspec.field(default=None, name="ipv6PrefixLength")
    tcp_max_connections: int | None = msgspec.field(default=None, name="tcpMaxConnections")
    tcp_max_connections_per_client: int | None = msgspec.field(
        default=None, name="tcpMaxConnectionsPerClient"
    )
    serve_stale_max: Duration | None = None
    serve_stale_client_timeout: Duration | None = None
    serve_stale_recheck: Duration | None = None


class KubeProxyConfiguration(_Section):
    """Every field of kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration (k8s.io/kube-proxy
    config/v1alpha1/types.go, with componentbase's ClientConnectionConfiguration and logsapi's
    LoggingConfiguration), plus kubeshim's `dns:` section."""

    kind: str | None = None
    api_version: str | None = None
    feature_gates: dict[str, Any] | None = None
    client_connection: ClientConnection | None = None
    logging: Logging | None = None
    hostname_override: str | None = None
    bind_address: str | None = None
    healthz_bind_address: str | None = None
    metrics_bind_address: str | None = None
    bind_address_hard_fail: bool | None = None
    enable_profiling: bool | None = None
    show_hidden_metrics_for_version: str | None = None
    mode: str | None = None
    iptables: IPTables | None = None
    ipvs: IPVS | None = None
    nftables: NFTables | None = None
    winkernel: WinKernel | None = None
    detect_local_mode: str | None = None
    detect_local: DetectLocal | None = None
    cluster_cidr: str | None = msgspec.field(default=None, name="clusterCIDR")
    node_port_addresses: list[Any] | None = None
    oom_score_adj: int | None = None
    conntrack: Conntrack | None = None
    config_sync_period: Duration | None = None
    port_range: str | None = None
    windows_run_as_service: bool | None = None
    # The user-space mode's idle timeout for UDP flows, dropped from the file with that mode
    # (Kubernetes 1.26). kubeshim is a user-space proxy, so it still reads it.
    udp_idle_timeout: Duration | None = None
    dns: DNSSection | None = None


def _durations(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    """The file paths ("conntrack.udpTimeout") of the Duration fields, for error messages."""
    out: set[str] = set()
    hints = get_type_hints(struct, include_extras=True)
    for f in msgspec.structs.fields(struct):
        hint = hints[f.name]
        path = prefix + f.encode_name
        args = [a for a in get_args(hint) if a is not type(None)]
        if hint is Duration or Duration in args:
            out.add(path)
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                out |= _durations(arg, path + ".")
    return out


_DURATION_FIELDS = _durations(KubeProxyConfiguration)
_TYPE_WORDS = {"str": "a string", "int": "an integer", "bool": "true or false",
               "float": "a number", "object": "a mapping", "array": "a list"}
_MSGSPEC_ERROR = re.compile(r"(?:Expected `(?P<want>[^`]+)`, got `\w+`|Object contains unknown "
                            r"field `(?P<unknown>[^`]+)`)(?: - at `\$(?P<at>[^`]*)`)?")


def _decode_errors(doc: dict[str, Any]) -> tuple[KubeProxyConfiguration | None, list[str]]:
    """Decode `doc`, naming every wrong field (field by field: msgspec stops at the first)."""
    try:
        return msgspec.convert(doc, KubeProxyConfiguration), []
    except msgspec.ValidationError:
        pass
    fields = {f.encode_name: f for f in msgspec.structs.fields(KubeProxyConfiguration)}
    errors: list[str] = []
    for key, value in doc.items():
        if key not in fields:
            errors.append(f"{key}: unknown field")
            continue
        try:
            msgspec.convert({key: value}, KubeProxyConfiguration)
        except msgspec.ValidationError as e:
            errors.append(_describe(str(e), doc))
    return None, errors


def _describe(message: str, doc: dict[str, Any]) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.dns.ttl`" -> "dns.ttl: expected an integer,
    got '30'", in the words kubeshim's messages have always used."""
    m = _MSGSPEC_ERROR.search(message)
    if m is None:
        return message
    path = [p for p in re.split(r"\.|\[(\d+)\]", m["at"] or "") if p]
    if m["unknown"] is not None:
        name = ".".join([*path, m["unknown"]])
        if path == ["dns"]:
            return f"{name}: unknown field (known: {', '.join(_DNS_FIELDS)})"
        return f"{name}: unknown field"
    value: Any = doc
    for part in path:
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    name = ".".join(path)
    if name in _DURATION_FIELDS:
        return f"{name}: expected a duration string like 30s or 15m0s, got {value!r}"
    want = m["want"].removesuffix(" | null")
    return f"{name}: expected {_TYPE_WORDS.get(want, want)}, got {value!r}"


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
    "detectLocalMode": "only ClusterCIDR (clusterCIDR, --cluster-cidr) tells local pods apart",
    "detectLocal": "only ClusterCIDR (clusterCIDR, --cluster-cidr) tells local pods apart",
    "oomScoreAdj": "set it with the service manager (systemd OOMScoreAdjust=, the pod spec)",
    "conntrack": "no kernel conntrack entries are made for proxied traffic",
    "conntrack.udpStreamTimeout": "one idle timeout per UDP flow: conntrack.udpTimeout",
    "configSyncPeriod": "changes are applied as they arrive; there is no periodic resync",
    "portRange": "no user-space port range is allocated",
}

# kubeshim's `dns:` section: file field -> the DNSConfig fields it sets ("enabled" is the
# daemon's: Options.dns_enabled).
_DNS_FIELDS: dict[str, tuple[str, ...]] = {
    "enabled": (), "clusterDomain": ("zone",), "binds": ("binds",),
    "upstreams": ("upstreams",), "ttl": ("ttl",), "negativeTTL": ("negative_ttl",),
    "podRecords": ("pod_records",), "cacheSize": ("answer_cache_size",),
    # One size for the positive and the negative store of upstream answers.
    "upstreamCacheSize": ("upstream_cache_size", "upstream_negative_cache_size"),
    "upstreamMaxTTL": ("upstream_max_ttl",),
    "reverseCIDRs": ("reverse_cidrs",), "transparentBinds": ("transparent_binds",),
    "allowedClients": ("allowed_clients",), "responsesPerSecond": ("rrl_responses_per_second",),
    "allPerSecond": ("rrl_all_per_second",),
    "slip": ("rrl_slip",), "ipv4PrefixLength": ("rrl_ipv4_prefix",),
    "ipv6PrefixLength": ("rrl_ipv6_prefix",), "tcpMaxConnections": ("tcp_max_connections",),
    "tcpMaxConnectionsPerClient": ("tcp_max_connections_per_client",),
    "serveStaleMax": ("serve_stale_max",),
    "serveStaleClientTimeout": ("serve_stale_client_timeout",),
    "serveStaleRecheck": ("serve_stale_recheck",),
}
POD_RECORDS = ("disabled", "insecure", "verified")

# nodePortAddresses keywords (types.go): 'primary' is the node's primary address(es).
_NODEPORT_KEYWORDS = {"localhost": ["127.0.0.0/8", "::1/128"], "all": ["0.0.0.0/0", "::/0"]}


def _is_set(value: _T | None) -> TypeGuard[_T]:
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
    cfg, errors = _decode_errors(doc)
    new = copy.deepcopy(opts)
    if cfg is not None:
        _apply(cfg, doc, new, errors)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    for name, value in vars(new).items():
        setattr(opts, name, value)


def _apply(cfg: KubeProxyConfiguration, doc: dict[str, Any], opts: Options,
           errors: list[str]) -> None:
    """Map the honoured fields of a decoded file onto `opts`; `doc` is the file as read, for
    the report of fields that do not apply."""

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

    proxy = opts.proxy
    if _is_set(v := cfg.hostname_override):
        # kube-proxy trims and lower-cases the node name (pkg/proxy/util nodeName).
        proxy.node_name = v.strip().lower()
    if _is_set(v := cfg.bind_address):
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
    for field_name, v in (("healthzBindAddress", cfg.healthz_bind_address),
                          ("metricsBindAddress", cfg.metrics_bind_address)):
        if _is_set(v):
            attr = "healthz_bind_address" if field_name[0] == "h" else "metrics_bind_address"
            try:
                host, port = parse_host_port(v)
                ipaddress.ip_address(host)
            except (ConfigError, ValueError) as e:
                errors.append(f"{field_name}: {e if isinstance(e, ConfigError) else 'not IP:PORT'}")
            else:
                setattr(opts, attr, v)
                if attr == "healthz_bind_address":
                    opts.healthz_bind_default = False
    if _is_set(cidrs := cfg.cluster_cidr):
        proxy.cluster_cidrs = [c.strip() for c in cidrs.split(",") if c.strip()]
        errors += [f"clusterCIDR: {e}" for e in bad_cidrs(proxy.cluster_cidrs)]
    if (addresses := cfg.node_port_addresses) is not None:
        try:
            proxy.nodeport_addresses = expand_nodeport_addresses([str(a) for a in addresses],
                                                                 opts.node_ip)
        except ConfigError as e:
            errors.append(f"nodePortAddresses: {e}")
    if cfg.client_connection and _is_set(v := cfg.client_connection.kubeconfig):
        opts.kubeconfig = Path(v)
    conntrack = cfg.conntrack or Conntrack()
    if _is_set(v := conntrack.tcp_established_timeout) and (
            t := dur("conntrack.tcpEstablishedTimeout", v)) is not None:
        proxy.tcp_idle_timeout = t
    for name, v in (("udpIdleTimeout", cfg.udp_idle_timeout),
                    ("conntrack.udpTimeout", conntrack.udp_timeout)):
        if _is_set(v) and (t := dur(name, v)) is not None:
            proxy.udp_timeout = t
    if cfg.logging and (verbosity := cfg.logging.verbosity) is not None:
        if verbosity < 0:
            errors.append(f"logging.verbosity: {verbosity} is negative")
        # klog's -v: 4 and up is debug output; below that kube-proxy logs steady-state info.
        opts.log_level = "debug" if verbosity >= 4 else "info"
    for name, v in (("configSyncPeriod", cfg.config_sync_period),
                    ("iptables.syncPeriod", (cfg.iptables or IPTables()).sync_period),
                    ("nftables.syncPeriod", (cfg.nftables or NFTables()).sync_period)):
        if _is_set(v):
            dur(name, v)  # still checked: a malformed file is an error even where unused
    if cfg.dns is not None:
        _apply_dns(cfg.dns, opts, errors)

    honoured = set(_HONOURED)
    if cfg.detect_local_mode == "ClusterCIDR":
        honoured.add("detectLocalMode")  # the default with clusterCIDR set, and what is done
    reported: set[str] = set()
    for key, value in _leaves({k: v for k, v in doc.items() if k not in ("kind", "apiVersion")}):
        if not _is_set(value) or any(key == h or key.startswith(h + ".") for h in honoured):
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


def finish(opts: Options) -> None:
    """What follows from the settings once the file and the flags are read: the DNS server's
    default bind, its transparent binds served like binds, and the DNS tuples the proxy's
    capture hands to them."""
    dns = opts.dns
    if not dns.binds and not dns.transparent_binds:
        # Never all addresses by default: that would answer (and recurse for) anyone who
        # reaches the node, and take port 53 from UDP Services. Pods reach kubeshim at the
        # address the kubelet's clusterDNS names (see deploy/ and the README). Without
        # privileges (loopback mode) port 53 cannot be bound.
        dns.binds = [(opts.node_ip or "127.0.0.1", 53) if opts.proxy.vip_mode != "loopback"
                     else ("127.0.0.1", 5353)]
    dns.binds = [*dns.binds, *(b for b in dns.transparent_binds if b not in dns.binds)]
    opts.proxy.dns_capture = list(dns.transparent_binds) if opts.dns_enabled else []


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
            if errs := bad_cidrs([value]):
                raise ConfigError(errs[0] + " (expected a CIDR, 'primary', 'localhost' or 'all')")
            out.append(value)
    return list(dict.fromkeys(out))


def bad_cidrs(values: list[str]) -> list[str]:
    bad = []
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
            if "/" not in value:
                raise ValueError
        except ValueError:
            bad.append(f"{value!r} is not a CIDR")
    return bad


def _apply_dns(section: DNSSection, opts: Options, errors: list[str]) -> None:
    for f in msgspec.structs.fields(DNSSection):
        key, value = f.encode_name, getattr(section, f.name)
        if value is None:
            continue
        try:
            if key in ("binds", "upstreams", "transparentBinds"):
                value = [parse_host_port(str(item), 53) for item in value]
            elif key in ("reverseCIDRs", "allowedClients"):
                value = [str(item) for item in value]
                if bad := bad_cidrs(value):
                    raise ConfigError(bad[0])
            elif key == "clusterDomain":
                value = value.strip(".").lower()
                if not value:
                    raise ConfigError("must not be empty")
            elif key.startswith("serveStale"):
                try:
                    value = parse_duration(value)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            elif key == "podRecords" and value not in POD_RECORDS:
                raise ConfigError(f"{value!r} is not one of {', '.join(POD_RECORDS)}")
            elif key == "ipv4PrefixLength" and (value % 8 or not 8 <= value <= 32):
                raise ConfigError(f"{value} is not 8, 16, 24 or 32")
            elif key == "ipv6PrefixLength" and (value % 8 or not 8 <= value <= 128):
                raise ConfigError(f"{value} is not a multiple of 8 up to 128")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"{value} is negative")
        except ConfigError as e:
            errors.append(f"dns.{key}: {e}")
            continue
        if key == "enabled":
            opts.dns_enabled = value
        elif key in ("binds", "upstreams") and not value:
            continue  # an empty list is the default (`finish`, /etc/resolv.conf)
        if key == "allowedClients":
            opts.dns_allowed_clients_default = False
        for attr in _DNS_FIELDS[key]:
            setattr(opts.dns, attr, value)


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


def default_vip_mode() -> VipMode:
    """tproxy as root where nft is installed (the proxy falls back to interface mode when the
    kernel refuses the table); interface as root otherwise; loopback without root."""
    if os.geteuid() != 0:
        return "loopback"
    return "tproxy" if shutil.which("nft") else "interface"
