"""KubeProxyConfiguration files and flags -> Options: honoured fields, ignored ones, bad files."""

from __future__ import annotations

from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeshim.cli import build_parser, options_from_args
from kubeshim.cluster.errors import ConfigError
from kubeshim.config import (
    Options,
    expand_nodeport_addresses,
    load_config_file,
    parse_duration,
    parse_host_port,
)

HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def load(tmp_path: Path, body: str, opts: Options | None = None) -> Options:
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + body)
    opts = opts or Options()
    load_config_file(path, opts)
    return opts


# (name, file body, {Options attribute, or proxy./dns. and the component's: expected value})
HONOURED: list[tuple[str, str, dict[str, Any]]] = [
    ("empty file keeps the defaults", "",
     {"healthz_bind_address": "0.0.0.0:10256", "metrics_bind_address": "127.0.0.1:10249",
      "proxy.udp_timeout": 30.0, "proxy.tcp_idle_timeout": 86400.0, "ignored": []}),
    ("hostnameOverride is trimmed and lower-cased", "hostnameOverride: ' Node-1 '\n",
     {"proxy.node_name": "node-1"}),
    ("bindAddress is the node's primary IP", "bindAddress: 192.0.2.7\n",
     {"node_ip": "192.0.2.7", "healthz_bind_address": "0.0.0.0:10256"}),
    ("an IPv6 bindAddress moves the default endpoints to IPv6", "bindAddress: '2001:db8::7'\n",
     {"node_ip": "2001:db8::7", "healthz_bind_address": "[::]:10256",
      "metrics_bind_address": "[::1]:10249"}),
    ("the unspecified bindAddress sets no node IP", "bindAddress: 0.0.0.0\n", {"node_ip": ""}),
    ("healthz and metrics addresses", "healthzBindAddress: 127.0.0.1:20256\n"
     "metricsBindAddress: '[::1]:20249'\n",
     {"healthz_bind_address": "127.0.0.1:20256", "metrics_bind_address": "[::1]:20249"}),
    ("an empty healthzBindAddress means the default, as kube-proxy defaults it",
     "healthzBindAddress: ''\n", {"healthz_bind_address": "0.0.0.0:10256"}),
    ("dual-stack clusterCIDR", "clusterCIDR: 10.244.0.0/16, fd00:10:244::/56\n",
     {"proxy.cluster_cidrs": ["10.244.0.0/16", "fd00:10:244::/56"]}),
    ("nodePortAddresses CIDRs and keywords",
     "nodePortAddresses: [192.0.2.0/24, localhost, primary]\n",
     {"proxy.nodeport_addresses": ["192.0.2.0/24", "127.0.0.0/8", "::1/128", "primary"]}),
    ("'primary' means bindAddress when it is set",
     "bindAddress: 192.0.2.7\nnodePortAddresses: [primary]\n",
     {"proxy.nodeport_addresses": ["192.0.2.7/32"]}),
    ("nodePortAddresses set but empty means every address", "nodePortAddresses: []\n",
     {"proxy.nodeport_addresses": []}),
    ("the kubeconfig of clientConnection", "clientConnection: {kubeconfig: /etc/k/kc.yaml}\n",
     {"kubeconfig": Path("/etc/k/kc.yaml"), "ignored": []}),
    ("conntrack timeouts are the proxy's idle timeouts",
     "conntrack: {tcpEstablishedTimeout: 24h0m0s, udpTimeout: 45s}\n",
     {"proxy.tcp_idle_timeout": 86400.0, "proxy.udp_timeout": 45.0, "ignored": []}),
    ("the user-space mode's udpIdleTimeout", "udpIdleTimeout: 250ms\n",
     {"proxy.udp_timeout": 0.25}),
    ("klog verbosity 4 is debug", "logging: {verbosity: 4}\n", {"log_level": "debug"}),
    ("klog verbosity 2 is info", "logging: {verbosity: 2}\n", {"log_level": "info"}),
    ("null fields are not set", "hostnameOverride: null\nconntrack: null\n",
     {"proxy.node_name": "", "ignored": []}),
    ("the dns section",
     "dns:\n  clusterDomain: Cluster.Example.\n  binds: ['127.0.0.1:5353', '[::1]']\n"
     "  upstreams: [192.0.2.53]\n  ttl: 5\n  negativeTTL: 10\n  podRecords: disabled\n"
     "  cacheSize: 100\n  enabled: true\n",
     {"dns.zone": "cluster.example", "dns.binds": [("127.0.0.1", 5353), ("::1", 53)],
      "dns.upstreams": [("192.0.2.53", 53)], "dns.ttl": 5, "dns.negative_ttl": 10,
      "dns.pod_records": "disabled", "dns.answer_cache_size": 100, "dns_enabled": True}),
    ("dns upstream cache and reverse zones",
     "dns: {upstreamCacheSize: 50, upstreamMaxTTL: 60, reverseCIDRs: [10.96.0.0/12]}\n",
     {"dns.upstream_cache_size": 50, "dns.upstream_max_ttl": 60,
      "dns.reverse_cidrs": ["10.96.0.0/12"]}),
    ("dns can be switched off", "dns: {enabled: false}\n", {"dns_enabled": False}),
    ("dns serve-stale timers (RFC 8767 section 5)",
     "dns: {serveStaleMax: 72h0m0s, serveStaleClientTimeout: 1500ms, serveStaleRecheck: 1m}\n",
     {"dns.serve_stale_max": 259200.0, "dns.serve_stale_client_timeout": 1.5,
      "dns.serve_stale_recheck": 60.0}),
    ("dns response rate limits", "dns: {responsesPerSecond: 50, allPerSecond: 500, slip: 3}\n",
     {"dns.rrl_responses_per_second": 50.0, "dns.rrl_all_per_second": 500.0,
      "dns.rrl_slip": 3}),
    ("serve-stale off", "dns: {serveStaleMax: 0s}\n", {"dns.serve_stale_max": 0.0}),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in HONOURED],
                         ids=[c[0] for c in HONOURED])
def test_honoured_fields(tmp_path: Path, body: str, expected: dict[str, Any]) -> None:
    opts = load(tmp_path, body)
    for attr, value in expected.items():
        assert attrgetter(attr)(opts) == value, attr


# (name, file body, the ignored lines expected, in order)
IGNORED: list[tuple[str, str, list[str]]] = [
    ("a whole mode section is one line",
     "mode: nftables\nnftables: {masqueradeAll: true, syncPeriod: 30s, minSyncPeriod: 1s}\n",
     ["mode: kubeshim is its own user-space mode",
      "nftables: no nftables rules: traffic is proxied in user space"]),
    ("zero values, as kube-proxy --write-config-to prints them, are not reported",
     "iptables: {masqueradeAll: false, masqueradeBit: 0, minSyncPeriod: 0s}\nportRange: ''\n"
     "featureGates: {}\n", []),
    ("the specific reason wins over its section's",
     "conntrack: {udpStreamTimeout: 300s, maxPerCore: 32768}\n",
     ["conntrack.udpStreamTimeout: one idle timeout per UDP flow: conntrack.udpTimeout",
      "conntrack: no kernel conntrack entries are made for proxied traffic"]),
    ("client settings other than the kubeconfig",
     "clientConnection: {kubeconfig: /k, qps: 5, burst: 10, contentType: "
     "application/vnd.kubernetes.protobuf}\n",
     ["clientConnection: kubeshim opens two list+watch streams and always asks for JSON"]),
    ("feature gates and the sync period",
     "featureGates: {SomeGate: true}\nconfigSyncPeriod: 15m0s\noomScoreAdj: -999\n",
     ["featureGates: kubeshim has no feature gates",
      "configSyncPeriod: changes are applied as they arrive; there is no periodic resync",
      "oomScoreAdj: set it with the service manager (systemd OOMScoreAdjust=, the pod spec)"]),
]


@pytest.mark.parametrize(("body", "lines"), [c[1:] for c in IGNORED], ids=[c[0] for c in IGNORED])
def test_ignored_fields_are_listed_once_with_a_reason(tmp_path: Path, body: str,
                                                      lines: list[str]) -> None:
    assert load(tmp_path, body).ignored == lines


# (name, whole file text, words the error must contain)
BAD: list[tuple[str, str, list[str]]] = [
    ("not YAML", HEAD + "mode: [\n", ["not valid YAML"]),
    ("not a mapping", "- a\n- b\n", ["expected a KubeProxyConfiguration mapping", "list"]),
    ("the wrong kind", "apiVersion: v1\nkind: ConfigMap\n",
     ["expected kind KubeProxyConfiguration", "'ConfigMap'"]),
    ("the wrong apiVersion", "apiVersion: kubeproxy.config.k8s.io/v1alpha2\n"
     "kind: KubeProxyConfiguration\n", ["'kubeproxy.config.k8s.io/v1alpha2'"]),
    ("an unknown field, as kube-proxy's strict decoding says", HEAD + "hostnameOveride: x\n",
     ["hostnameOveride: unknown field"]),
    ("an unknown nested field", HEAD + "conntrack: {udpTimout: 30s}\n",
     ["conntrack.udpTimout: unknown field"]),
    ("a wrongly typed field", HEAD + "nodePortAddresses: 10.0.0.0/8\n",
     ["nodePortAddresses: expected a list"]),
    ("a section that is not a mapping", HEAD + "conntrack: 5\n",
     ["conntrack: expected a mapping"]),
    ("a number where Go wants a duration string", HEAD + "conntrack: {udpTimeout: 30}\n",
     ["conntrack.udpTimeout: expected a duration string"]),
    ("a malformed duration", HEAD + "conntrack: {tcpEstablishedTimeout: 10 minutes}\n",
     ["conntrack.tcpEstablishedTimeout", "not a duration"]),
    ("a malformed duration in an unused field", HEAD + "configSyncPeriod: soon\n",
     ["configSyncPeriod", "not a duration"]),
    ("a bindAddress that is no IP", HEAD + "bindAddress: node-1\n",
     ["bindAddress: 'node-1' is not an IP address"]),
    ("a healthz address without a port", HEAD + "healthzBindAddress: 0.0.0.0\n",
     ["healthzBindAddress", "needs a port"]),
    ("a metrics address with a host name", HEAD + "metricsBindAddress: localhost:10249\n",
     ["metricsBindAddress: not IP:PORT"]),
    ("a port out of range", HEAD + "healthzBindAddress: 0.0.0.0:70000\n",
     ["healthzBindAddress", "port out of range"]),
    ("a bad clusterCIDR", HEAD + "clusterCIDR: 10.244.0.0/16,10.300.0.0/16\n",
     ["clusterCIDR: '10.300.0.0/16' is not a CIDR"]),
    ("a bad nodePortAddresses entry", HEAD + "nodePortAddresses: [everything]\n",
     ["nodePortAddresses: 'everything' is not a CIDR", "'primary', 'localhost' or 'all'"]),
    ("an unknown dns field", HEAD + "dns: {zone: cluster.local}\n",
     ["dns.zone: unknown field", "clusterDomain"]),
    ("a dns field of the wrong type", HEAD + "dns: {ttl: '30'}\n",
     ["dns.ttl: expected an integer"]),
    ("a bad podRecords value", HEAD + "dns: {podRecords: maybe}\n",
     ["dns.podRecords: 'maybe' is not one of disabled, insecure, verified"]),
    ("a bad reverse zone", HEAD + "dns: {reverseCIDRs: [10.96.0.0]}\n",
     ["dns.reverseCIDRs: '10.96.0.0' is not a CIDR"]),
    ("a negative TTL", HEAD + "dns: {negativeTTL: -1}\n", ["dns.negativeTTL: -1 is negative"]),
    ("a bad serve-stale timer", HEAD + "dns: {serveStaleMax: 3days}\n",
     ["dns.serveStaleMax: '3days' is not a duration"]),
    ("a bad upstream", HEAD + "dns: {upstreams: ['192.0.2.1:99999']}\n",
     ["dns.upstreams", "port out of range"]),
    ("every error is named at once", HEAD + "bindAddress: x\ndns: {ttl: -5}\n",
     ["bindAddress:", "dns.ttl:"]),
]


@pytest.mark.parametrize(("text", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_files_get_a_clear_error(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    opts = Options()
    with pytest.raises(ConfigError) as err:
        load_config_file(path, opts)
    message = str(err.value)
    assert message.startswith(str(path))
    for word in words:
        assert word in message
    assert opts == Options(), "a rejected file changes nothing"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration: No such file"):
        load_config_file(tmp_path / "absent.yaml", Options())


def test_a_file_written_by_kube_proxy_loads(tmp_path: Path) -> None:
    """The shape `kube-proxy --write-config-to` prints: every field, most at their zero value."""
    doc = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "bindAddress": "0.0.0.0", "bindAddressHardFail": False,
        "clientConnection": {"acceptContentTypes": "", "burst": 10, "contentType":
                             "application/vnd.kubernetes.protobuf", "kubeconfig": "", "qps": 5},
        "clusterCIDR": "", "configSyncPeriod": "15m0s",
        "conntrack": {"maxPerCore": 32768, "min": 131072, "tcpBeLiberal": False,
                      "tcpCloseWaitTimeout": "1h0m0s", "tcpEstablishedTimeout": "24h0m0s",
                      "udpStreamTimeout": "0s", "udpTimeout": "0s"},
        "detectLocal": {"bridgeInterface": "", "interfaceNamePrefix": ""},
        "detectLocalMode": "", "enableProfiling": False, "healthzBindAddress": "0.0.0.0:10256",
        "hostnameOverride": "", "iptables": {"localhostNodePorts": True, "masqueradeAll": False,
                                             "masqueradeBit": 14, "minSyncPeriod": "1s",
                                             "syncPeriod": "30s"},
        "ipvs": {"excludeCIDRs": None, "minSyncPeriod": "0s", "scheduler": "", "strictARP": False,
                 "syncPeriod": "30s", "tcpFinTimeout": "0s", "tcpTimeout": "0s",
                 "udpTimeout": "0s"},
        "logging": {"flushFrequency": 0, "options": {"json": {"infoBufferSize": "0"}},
                    "verbosity": 0},
        "metricsBindAddress": "127.0.0.1:10249", "mode": "", "nftables": {
            "masqueradeAll": False, "masqueradeBit": 14, "minSyncPeriod": "1s",
            "syncPeriod": "30s"},
        "nodePortAddresses": None, "oomScoreAdj": -999, "portRange": "",
        "showHiddenMetricsForVersion": "", "winkernel": {
            "enableDSR": False, "forwardHealthCheckVip": False, "networkName": "",
            "rootHnsEndpointName": "", "sourceVip": ""},
    }
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    opts = Options()
    load_config_file(path, opts)
    assert opts.proxy.tcp_idle_timeout == 86400.0
    assert opts.proxy.udp_timeout == 30.0  # "0s" is kube-proxy's "leave as is"
    assert opts.proxy.nodeport_addresses == []
    assert [line.split(":")[0] for line in opts.ignored] == [
        "clientConnection", "configSyncPeriod", "conntrack", "iptables", "ipvs", "nftables",
        "oomScoreAdj"]


# (name, argv after `run`, {attribute: expected})
FLAGS: list[tuple[str, list[str], dict[str, Any]]] = [
    ("flags win over the file",
     ["--hostname-override", "flag-node", "--healthz-bind-address", "127.0.0.1:1",
      "--udp-timeout", "7"],
     {"proxy.node_name": "flag-node", "healthz_bind_address": "127.0.0.1:1",
      "proxy.udp_timeout": 7.0, "metrics_bind_address": "127.0.0.1:20249"}),
    ("the file's values stay where no flag is given", [],
     {"proxy.node_name": "file-node", "healthz_bind_address": "127.0.0.1:20256",
      "proxy.udp_timeout": 45.0, "dns.zone": "file.local", "dns.upstreams": [("192.0.2.53", 53)]}),
    ("an empty flag disables an endpoint", ["--metrics-bind-address", ""],
     {"metrics_bind_address": ""}),
    ("repeated DNS flags replace the file's lists",
     ["--upstream", "127.0.0.1:5300", "--upstream", "[::1]", "--cluster-domain", "flag.local"],
     {"dns.upstreams": [("127.0.0.1", 5300), ("::1", 53)], "dns.zone": "flag.local"}),
    ("-v is debug", ["-v"], {"log_level": "debug"}),
    ("kube-proxy's conntrack flag names and Go durations",
     ["--conntrack-udp-timeout", "1m", "--conntrack-tcp-timeout-established", "24h"],
     {"proxy.udp_timeout": 60.0, "proxy.tcp_idle_timeout": 86400.0}),
    ("nodePort keywords on the command line", ["--nodeport-addresses", "localhost,10.1.0.0/16"],
     {"proxy.nodeport_addresses": ["127.0.0.0/8", "::1/128", "10.1.0.0/16"]}),
    ("the DNS default bind follows the chosen --vip-mode: loopback has no port 53",
     ["--vip-mode", "loopback"],
     {"proxy.vip_mode": "loopback", "dns.binds": [("127.0.0.1", 5353)]}),
    ("the DNS default bind of a privileged mode", ["--vip-mode", "interface"],
     {"dns.binds": [("127.0.0.1", 53)]}),
    ("transparent binds are served like binds and captured by the proxy",
     ["--vip-mode", "tproxy", "--dns-transparent-bind", "10.96.0.10", "--dns-bind", "[::1]:53"],
     {"dns.binds": [("::1", 53), ("10.96.0.10", 53)],
      "dns.transparent_binds": [("10.96.0.10", 53)], "proxy.dns_capture": [("10.96.0.10", 53)]}),
    ("only transparent binds: no default bind", ["--dns-transparent-bind", "10.96.0.10"],
     {"dns.binds": [("10.96.0.10", 53)]}),
    ("without DNS nothing is captured for it", ["--no-dns", "--dns-transparent-bind", "10.96.0.10"],
     {"dns_enabled": False, "proxy.dns_capture": []}),
    ("allowed DNS clients: the node's default until listed", [],
     {"dns_allowed_clients_default": True, "dns.allowed_clients": []}),
    ("allowed DNS clients listed", ["--dns-allowed-client", "10.0.0.0/8"],
     {"dns_allowed_clients_default": False, "dns.allowed_clients": ["10.0.0.0/8"]}),
]

FLAG_FILE = ("hostnameOverride: file-node\nhealthzBindAddress: 127.0.0.1:20256\n"
             "metricsBindAddress: 127.0.0.1:20249\nconntrack: {udpTimeout: 45s}\n"
             "dns: {clusterDomain: file.local, upstreams: [192.0.2.53]}\n")


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in FLAGS], ids=[c[0] for c in FLAGS])
def test_flags_override_the_file(tmp_path: Path, argv: list[str],
                                 expected: dict[str, Any]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + FLAG_FILE)
    args = build_parser().parse_args(["run", "--config", str(path), "--manifests", "x", *argv])
    opts = options_from_args(args)
    for attr, value in expected.items():
        assert attrgetter(attr)(opts) == value, attr


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("1.2.3.4:53", None, ("1.2.3.4", 53)),
    ("[::1]:5353", None, ("::1", 5353)),
    ("1.2.3.4", 53, ("1.2.3.4", 53)),
    ("::1", 53, ("::1", 53)),
    (":10256", None, ("0.0.0.0", 10256)),
])
def test_parse_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default) == expected


@pytest.mark.parametrize(("text", "seconds"), [
    ("15m0s", 900.0), ("250ms", 0.25), ("1h30m", 5400.0), ("0s", 0.0), ("1.5s", 1.5), (7, 7.0),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_expand_nodeport_addresses_dedups() -> None:
    assert expand_nodeport_addresses(["all", "0.0.0.0/0"]) == ["0.0.0.0/0", "::/0"]


def test_tcp_idle_timeout_defaults_to_kube_proxys_24h() -> None:
    # kube-proxy never closes an idle proxied connection before its conntrack entry expires
    # (conntrack.tcpEstablishedTimeout, 24h by default); the old default here was 1h.
    from kubeshim.cli import build_parser
    from kubeshim.config import Options
    from kubeshim.proxy.config import ProxyConfig

    assert Options().proxy.tcp_idle_timeout == 86400.0
    assert ProxyConfig(vip_mode="loopback").tcp_idle_timeout == 86400.0
    args = build_parser().parse_args(["run", "--manifests", "."])
    assert args.tcp_idle_timeout is None  # unset on the command line: the Options default


def test_a_reload_names_the_component_fields_that_changed() -> None:
    import copy

    from kubeshim.daemon import _changed

    old = Options()
    new = copy.deepcopy(old)
    new.proxy.udp_timeout, new.dns.ttl, new.drain_timeout = 5.0, 1, 3.0
    new.log_level = "debug"  # applied at once, not reported
    assert _changed(old, new) == ["dns.ttl", "drain_timeout", "proxy.udp_timeout"]
    assert _changed(old, copy.deepcopy(old)) == []
