"""The `kubeshim` command: run the daemon, print what it sees, ask a running daemon its status.

    kubeshim run --manifests examples/manifests --vip-mode loopback
    kubeshim run --kubeconfig ~/.kube/config --hostname-override node-1
    kubeshim state --manifests examples/manifests -o json
    kubeshim status --address 127.0.0.1:10249

Flags carry kube-proxy's names where they mean the same thing; they override --config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from kubeshim.cluster import log as logs
from kubeshim.cluster.errors import ConfigError
from kubeshim.config import (
    Options,
    bad_cidrs,
    expand_nodeport_addresses,
    finish,
    load_config_file,
    parse_duration,
    parse_host_port,
)


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source (choose one)")
    g.add_argument("--manifests", type=Path, metavar="DIR",
                   help="serve the Services/EndpointSlices in DIR (YAML/JSON), following edits")
    g.add_argument("--manifests-poll", action="store_true", default=None,
                   help="follow DIR by polling every 0.5 s instead of inotify (for network "
                   "filesystems, which deliver no inotify events)")
    g.add_argument("--kubeconfig", type=Path, metavar="FILE", help="watch the API server of FILE")
    g.add_argument("--context", help="kubeconfig context (default: current-context)")
    g.add_argument("--in-cluster", action="store_true", default=None,
                   help="use the pod's service account and KUBERNETES_SERVICE_HOST")


def _duration(text: str) -> float:
    """A flag's duration: seconds, or a Go duration like kube-proxy's flags take (30s, 1h)."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeshim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy and DNS daemon")
    _add_source_flags(run)
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file")
    run.add_argument("--hostname-override", metavar="NAME",
                     help="this node's name (traffic policy Local)")
    run.add_argument("--cluster-cidr", metavar="CIDRS", help="pod CIDRs, comma separated")
    run.add_argument("--service-cluster-ip-range", metavar="CIDRS",
                     help="service CIDRs (kube-apiserver's flag), comma separated: ClusterIPs "
                     "read from --manifests must lie in them")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    run.add_argument("--healthz-bind-address", metavar="HOST:PORT",
                     help="default 0.0.0.0:10256 (127.0.0.1:10256 in loopback mode); "
                     "empty disables")
    run.add_argument("--metrics-bind-address", metavar="HOST:PORT",
                     help="default 127.0.0.1:10249; empty disables")
    run.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                     help="on SIGTERM, wait this long for connections to finish (default 15)")
    run.add_argument("--control-socket", type=Path, metavar="PATH",
                     help="a unix socket a later `kubeshim run --takeover` takes the listening "
                     "sockets over from (e.g. /run/kubeshim/control.sock)")
    run.add_argument("--takeover", action="store_true", default=None,
                     help="take over the listening sockets of the daemon at --control-socket, "
                     "serve, then let it drain and exit: a restart without a gap")
    run.add_argument("--workers", type=int, metavar="N",
                     help="processes serving traffic and DNS (tproxy mode; default: the CPUs "
                     "this process may use, at most 4; 1 in interface and loopback mode)")
    run.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--proxy-name",
                     help="claim Services labelled service.kubernetes.io/service-proxy-name=NAME")

    px = run.add_argument_group("proxy")
    px.add_argument("--no-proxy", dest="proxy", action="store_false", default=None, help="DNS only")
    px.add_argument("--vip-mode", choices=["tproxy", "interface", "loopback"],
                    help="tproxy (default as root): nftables hands Service traffic to "
                    "transparent listeners; interface: assign ClusterIPs to --vip-interface; "
                    "loopback (default without root): map them to 127.x")
    px.add_argument("--capture-port", type=int, metavar="PORT",
                    help="tproxy mode: port of the transparent listeners on 127.0.0.1 and ::1 "
                    "(default 10265)")
    px.add_argument("--vip-interface", metavar="NAME", help="default kubeshim0")
    px.add_argument("--nodeport-addresses", metavar="CIDRS",
                    help="CIDRs and 'primary', 'localhost', 'all' (comma separated): "
                    "where NodePorts listen; default all")
    px.add_argument("--balance", choices=["round-robin", "random", "least-connections"])
    px.add_argument("--udp-timeout", "--conntrack-udp-timeout", type=_duration,
                    metavar="DURATION", help="UDP flow idle timeout, e.g. 30s (default 30)")
    px.add_argument("--tcp-idle-timeout", "--conntrack-tcp-timeout-established",
                    type=_duration, metavar="DURATION",
                    help="idle close of a proxied TCP connection, e.g. 2h; 0 never "
                         "(default 24h, as kube-proxy's conntrack)")
    px.add_argument("--max-connections", type=int, metavar="N",
                    help="proxied TCP connections in total (default: from the descriptor limit, "
                    "at most 131072)")
    px.add_argument("--max-connections-per-client", type=int, metavar="N",
                    help="per client address (default: a quarter of --max-connections)")
    px.add_argument("--max-udp-flows", type=int, metavar="N",
                    help="UDP flows in total (default: from the descriptor limit, at most 131072)")
    px.add_argument("--max-udp-flows-per-client", type=int, metavar="N",
                    help="per client address (default: a quarter of --max-udp-flows)")

    dn = run.add_argument_group("dns")
    dn.add_argument("--no-dns", dest="dns", action="store_false", default=None, help="proxy only")
    dn.add_argument("--dns-bind", action="append", metavar="HOST:PORT",
                    help="repeatable; default: the node's bindAddress:53 if set, else "
                         "127.0.0.1:53; 127.0.0.1:5353 in loopback mode (never all addresses)")
    dn.add_argument("--dns-transparent-bind", action="append", metavar="HOST:PORT",
                    help="repeatable; also serve on this (non-local) address with "
                         "IP_TRANSPARENT, e.g. the kube-dns ClusterIP handed over by TPROXY")
    dn.add_argument("--dns-allowed-client", action="append", metavar="CIDR",
                    help="repeatable; clients that may query (others get REFUSED); default: "
                         "loopback, --cluster-cidr and the node's own networks")
    dn.add_argument("--dns-rate-limit", type=float, metavar="PER_SECOND",
                    help="identical UDP responses per second per client /24 (/56), "
                         "slip 2; default 0: off")
    dn.add_argument("--cluster-domain", metavar="ZONE", help="default cluster.local")
    dn.add_argument("--upstream", action="append", metavar="HOST[:PORT]",
                    help="repeatable; default: the nameservers of /etc/resolv.conf")
    dn.add_argument("--dns-ttl", type=int, metavar="SECONDS")
    dn.add_argument("--dns-negative-ttl", type=int, metavar="SECONDS")
    dn.add_argument("--pod-records", choices=["disabled", "insecure", "verified"])

    state = sub.add_parser("state", help="print the Services and endpoints kubeshim sees")
    _add_source_flags(state)
    state.add_argument("-o", "--output", choices=["table", "json"], default="table")
    state.add_argument("--vip-mode", choices=["tproxy", "interface", "loopback"],
                       help="show where each ClusterIP is served in this mode")

    status = sub.add_parser("status", help="ask a running daemon what it serves")
    status.add_argument("--address", default="127.0.0.1:10249", metavar="HOST:PORT",
                        help="the daemon's --metrics-bind-address")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    """Defaults, then --config, then flags."""
    opts = Options()
    if getattr(args, "config", None):
        load_config_file(args.config, opts)
    # flag -> where it goes: an Options attribute, or `proxy.`/`dns.` and the component's field
    simple = {
        "manifests": "manifests", "manifests_poll": "manifests_poll",
        "control_socket": "control_socket", "takeover": "takeover",
        "kubeconfig": "kubeconfig", "context": "context",
        "in_cluster": "in_cluster", "hostname_override": "proxy.node_name",
        "healthz_bind_address": "healthz_bind_address",
        "metrics_bind_address": "metrics_bind_address", "drain_timeout": "drain_timeout",
        "workers": "workers",
        "proxy": "proxy_enabled", "vip_mode": "proxy.vip_mode",
        "vip_interface": "proxy.vip_interface", "capture_port": "proxy.capture_port",
        "balance": "proxy.balance", "udp_timeout": "proxy.udp_timeout",
        "tcp_idle_timeout": "proxy.tcp_idle_timeout",
        "dns": "dns_enabled", "cluster_domain": "dns.zone", "dns_ttl": "dns.ttl",
        "dns_negative_ttl": "dns.negative_ttl", "pod_records": "dns.pod_records",
        "log_level": "log_level", "proxy_name": "proxy_name",
        "max_connections": "proxy.max_connections",
        "max_connections_per_client": "proxy.max_connections_per_client",
        "max_udp_flows": "proxy.max_udp_flows",
        "max_udp_flows_per_client": "proxy.max_udp_flows_per_client",
        "dns_rate_limit": "dns.rrl_responses_per_second",
    }
    for flag, path in simple.items():
        value = getattr(args, flag, None)
        if value is not None:
            target, _, attr = path.rpartition(".")
            setattr(getattr(opts, target) if target else opts, attr, value)
    proxy, dns = opts.proxy, opts.dns
    if getattr(args, "healthz_bind_address", None) is not None:
        opts.healthz_bind_default = False
    if getattr(args, "verbose", False):
        opts.log_level = "debug"
    if getattr(args, "cluster_cidr", None):
        proxy.cluster_cidrs = [c.strip() for c in args.cluster_cidr.split(",") if c.strip()]
        if bad := bad_cidrs(proxy.cluster_cidrs):
            raise ConfigError(f"--cluster-cidr: {'; '.join(bad)}")
    if getattr(args, "service_cluster_ip_range", None):
        opts.service_cidrs = [c for c in args.service_cluster_ip_range.split(",") if c]
        if bad := bad_cidrs(opts.service_cidrs):
            raise ConfigError(f"--service-cluster-ip-range: {bad[0]}")
    if getattr(args, "nodeport_addresses", None):
        proxy.nodeport_addresses = expand_nodeport_addresses(
            [c for c in args.nodeport_addresses.split(",") if c], opts.node_ip)
    if getattr(args, "dns_bind", None):
        dns.binds = [parse_host_port(b, 53) for b in args.dns_bind]
    if getattr(args, "dns_transparent_bind", None):
        dns.transparent_binds = [parse_host_port(b, 53) for b in args.dns_transparent_bind]
    if getattr(args, "dns_allowed_client", None):
        dns.allowed_clients = list(args.dns_allowed_client)
        opts.dns_allowed_clients_default = False
    if getattr(args, "upstream", None):
        dns.upstreams = [parse_host_port(u, 53) for u in args.upstream]
    dns.zone = dns.zone.strip(".")
    if not proxy.node_name:
        import socket

        proxy.node_name = socket.gethostname().lower()
    finish(opts)
    return opts


def _run(opts: Options, args: argparse.Namespace, argv: list[str]) -> int:
    import uvloop

    from kubeshim.daemon import Daemon

    return uvloop.run(Daemon(opts, reload=lambda: options_from_args(args), argv=argv,
                             worker_fd=args.worker_fd).run())


def _state(opts: Options, output: str, vip_mode: str | None) -> int:
    from kubeshim.cluster.state import ClusterState
    from kubeshim.sources import make_source
    from kubeshim.statusview import print_state, state_as_json

    state = ClusterState(proxy_name=opts.proxy_name)
    if opts.manifests is not None:
        from kubeshim.cluster.sources.manifests import ManifestSource

        ManifestSource(opts.manifests, state, service_cidrs=opts.service_networks()).load_once()
    else:
        source = make_source(opts, state)

        async def until_synced() -> None:
            task = asyncio.create_task(source.run())
            while not state.synced and not task.done():
                await asyncio.sleep(0.05)
            task.cancel()
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]

        asyncio.run(asyncio.wait_for(until_synced(), timeout=60))
    if output == "json":
        print(json.dumps(state_as_json(state, vip_mode), indent=2))
    else:
        print_state(state, vip_mode)
    return 0


def _status(address: str, output: str) -> int:
    import urllib.error
    import urllib.request

    from kubeshim.statusview import print_status

    host, port = parse_host_port(address)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
    except (urllib.error.URLError, OSError) as e:
        print(f"kubeshim status: cannot reach the daemon at {url}: {e}", file=sys.stderr)
        return 1
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        print_status(data)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args.address, args.output)
        opts = options_from_args(args)
        logs.setup(opts.log_level)
        if args.command == "state":
            return _state(opts, args.output, args.vip_mode)
        return _run(opts, args, argv)
    except ConfigError as e:
        print(f"kubeshim: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
