"""The daemon: one event loop wiring a source -> ClusterState -> proxy and DNS, plus ops HTTP.

Start order: the descriptor limit is raised, then ops endpoints, then the data plane and DNS
(they hold back until the state is synced), then the source. Stop order (SIGTERM/SIGINT): the
source, then the proxy drains connections up to the deadline and removes its VIPs, then DNS and
the ops endpoints. SIGHUP re-reads the configuration (file and flags): a bad file is reported
and changes nothing; the log level applies at once, other changed fields at the next start.
With --control-socket, a later `--takeover` process receives the listening sockets; this one
then stops as on SIGTERM but leaves the addresses to it (kubeshim/takeover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from typing import Any

from prometheus_client import REGISTRY

from kubeshim import takeover
from kubeshim.cluster import handover
from kubeshim.cluster import log as logs
from kubeshim.cluster.errors import ConfigError
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.state import ClusterState
from kubeshim.config import Options
from kubeshim.limits import raise_nofile
from kubeshim.ops import Health, OpsServer, build_apps, serve
from kubeshim.proxy.healthcheck import ServiceHealthServer
from kubeshim.sources import make_source
from kubeshim.workers import ControlLink, WorkerPool, default_workers

log = get_logger("daemon")

# How soon the collect-and-freeze after the first sync looks again while bulk work runs.
BULK_RECHECK = 0.05


class Daemon:
    def __init__(self, opts: Options, reload: Callable[[], Options] | None = None,
                 argv: list[str] | None = None, worker_fd: int | None = None) -> None:
        self.opts = opts
        self._reload = reload
        # The command line that started this process (worker processes get the same), and,
        # in a worker, its link to the control process (kubeshim/workers.py).
        self.argv = argv or []
        self.worker_fd = worker_fd
        self.workers = 1
        self.pool: WorkerPool | None = None
        self.descriptor_limit = 0
        self.ops: dict[str, OpsServer] = {}
        self.state = ClusterState(proxy_name=opts.proxy_name, node_name=opts.proxy.node_name)
        # kube-proxy uses twice its sync period (default 30 s) as the health timeout.
        self.health = Health(timeout=60.0, probe=self._health_probe,
                             node_eligible=lambda: self.state.node_eligible,
                             families=self._families)
        self._started_mono = time.monotonic()
        self.proxier: Any = None
        self.dns: Any = None
        self.service_health: ServiceHealthServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._handing_over = False
        self._frozen = False

    # --- wiring -------------------------------------------------------------------------

    def _build_proxier(self) -> Any:
        from kubeshim.proxy.proxier import Proxier

        # The configured proxy plus what this process learnt at start. A copy: the proxier
        # changes its own (tproxy falls back to interface mode where the kernel refuses).
        config = replace(self.opts.proxy, descriptor_limit=self.descriptor_limit,
                         adopt=self.opts.takeover and self.worker_fd is None,
                         worker=self.worker_fd is not None, workers=self.workers)
        return Proxier(self.state, config)

    def _build_dns(self) -> Any:
        from kubeshim.dns.server import DNSServer

        o = self.opts
        allowed = o.dns.allowed_clients
        if o.dns_allowed_clients_default:
            # The node itself asking a Service address that is local (interface mode) comes
            # from that very address.
            own = [str(ipaddress.ip_network(h)) for h, _ in o.dns.transparent_binds]
            allowed = ["127.0.0.0/8", "::1/128", *o.proxy.cluster_cidrs, *node_networks(), *own]
        # A copy with what start found (validated again, as DNSConfig checks itself).
        config = replace(o.dns, allowed_clients=allowed,
                         reuse_port=self.workers > 1 or self.worker_fd is not None)
        address_map = None
        if self.proxier is not None and self.proxier.config.vip_mode == "loopback":
            address_map = self.proxier.served_address
        return DNSServer(self.state, config, address_map=address_map)

    def _proxy_mode(self) -> str:
        """The capture mode the proxy runs in (after any fallback), "" without a proxy."""
        return self.proxier.config.vip_mode if self.proxier is not None else ""

    def status(self) -> dict[str, Any]:
        """What the daemon serves, for `kubeshim status` (GET /status on the metrics address)."""
        out: dict[str, Any] = {
            "node": self.opts.proxy.node_name,
            "nodeObject": self._node_status(),
            "synced": self.state.synced,
            "generation": self.state.generation,
            "uptimeSeconds": round(time.time() - self.started, 1),
            "healthy": self.health.healthy(),
            "descriptorLimit": self.descriptor_limit,
            "ops": {what: server.status() for what, server in self.ops.items()},
        }
        if self.proxier is not None:
            out["proxy"] = self.proxier.status()
        if self.dns is not None and hasattr(self.dns, "status"):
            out["dns"] = self.dns.status()
        if self.service_health is not None:
            out["healthCheckNodePorts"] = self.service_health.status()
        if self.pool is not None:
            out["workers"] = self.pool.status()
        return out

    @staticmethod
    def _families() -> list[str]:
        """The families kube-proxy would run a proxier for: IPv6 too wherever the kernel has
        it (kube-proxy v1.37 is dual-stack whenever the host supports both)."""
        return ["IPv4", "IPv6"] if os.path.exists("/proc/net/if_inet6") else ["IPv4"]

    def _node_status(self) -> dict[str, Any] | None:
        node = self.state.node
        if node is None:
            return {"deleted": True, "eligible": False} if self.state.node_deleted else None
        return {"zone": node.zone or None, "eligible": node.eligible,
                "deleting": bool(node.metadata.deletion_timestamp),
                "taints": [t.key for t in node.spec.taints or ()]}

    def _on_node(self, before: Any, after: Any) -> None:
        node = self.state.node
        log.info("node changed", node=self.state.node_name,
                 zone=node.zone if node is not None else "-",
                 eligible=self.state.node_eligible,
                 deleted=self.state.node_deleted)

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        o = self.opts
        for line in o.ignored:
            log.warning("configuration field ignored", field=line)
        self.descriptor_limit = raise_nofile()
        takeover_conn = (await self._take_over() if o.takeover and self.worker_fd is None
                         else None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_config)

        worker = self.worker_fd is not None
        vip_mode = o.proxy.vip_mode
        # DNS alone shares its binds in any mode; the proxy only tproxy mode's listeners.
        self.workers = 1 if worker else (
            o.workers or default_workers(vip_mode if o.proxy_enabled else "tproxy"))
        if self.workers > 1 and o.proxy_enabled and vip_mode != "tproxy":
            log.warning("one worker: only tproxy mode's listeners are shared", vip_mode=vip_mode,
                        workers=self.workers)
            self.workers = 1

        healthz_address = o.healthz_bind_address
        if o.healthz_bind_default and vip_mode == "loopback":
            # The lab: nothing outside this host probes the node, so do not listen beyond it.
            healthz_address = "127.0.0.1:10256"
        if (healthz_address or o.metrics_bind_address) and not worker:
            # A worker's control process serves these.
            from kubeshim.config import parse_host_port

            healthz_app, metrics_app = build_apps(self.health, self.status, self._proxy_mode)
            for app, address, what in ((healthz_app, healthz_address, "healthz"),
                                       (metrics_app, o.metrics_bind_address, "metrics")):
                if address:
                    host, port = parse_host_port(address)
                    if port and (server := await serve(app, host, port, what)) is not None:
                        self.ops[what] = server

        if o.proxy_enabled:
            self.proxier = self._build_proxier()
            await self.proxier.start()
            if self.proxier.config.vip_mode != "tproxy":
                self.workers = 1  # tproxy fell back to interface mode
            if not worker:
                self.service_health = ServiceHealthServer(
                    o.proxy.node_name, o.proxy.nodeport_addresses, self.health.healthy,
                    exclude_ifname=o.proxy.vip_interface if self.proxier.vips is not None else "")
                await self.service_health.start()
                self.proxier.attach_service_health(self.service_health)
        dns_start: asyncio.Task[None] | None = None
        if o.dns_enabled:
            self.dns = self._build_dns()
            if worker:
                # A worker joins the DNS sockets' SO_REUSEPORT group once it holds the control
                # process's state: before that, its share of the queries would get SERVFAIL.
                dns_start = asyncio.create_task(self._start_dns_when_synced(), name="dns-start")
            else:
                await self.dns.start()
            if self.proxier is not None:
                answers = self.dns.handler.answers
                # A Service whose served addresses change (a loopback collision resolved)
                # gets fresh answers: the cached ones were computed from the old mapping.
                self.proxier.served_changed = lambda key: answers.invalidate(
                    [("svc", key.namespace, key.name)])
            from kubeshim.dns.metrics import DNSCollector

            dns_metrics = DNSCollector(self.dns)
            REGISTRY.register(dns_metrics)  # CoreDNS's metric names on /metrics
        if self.workers > 1:
            self.pool = WorkerPool(self.state, self.argv, self.workers, self.proxier)
            await self.pool.start()

        control = (takeover.ControlSocket(o.control_socket, self._handed_over)
                   if o.control_socket is not None and self.worker_fd is None else None)
        if takeover_conn is not None:
            ready_task = asyncio.create_task(self._confirm_when_serving(takeover_conn, control))
        elif control is not None:
            control.start()

        source = (ControlLink(self.worker_fd, self.state, self.proxier)
                  if self.worker_fd is not None else make_source(o, self.state))
        self.state.subscribe(self._freeze_after_first_sync)
        self.state.subscribe_node(self._on_node)
        source_task = asyncio.create_task(source.run(), name="source")
        stop_task = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({source_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if source_task in done and not stop_task.done():
            exc = source_task.exception()
            log.error("source stopped", reason=repr(exc) if exc else "ended")
            code = 1
        log.info("shutting down", drain_timeout=o.drain_timeout,
                 handed_over=self._handing_over)
        if takeover_conn is not None:
            ready_task.cancel()
        if control is not None:
            control.close()
        source_task.cancel()
        stop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await source_task
        if self.service_health is not None:
            await self.service_health.stop()
        if self.pool is not None and self.proxier is not None:
            # Workers drain alongside; the capture table their connections use goes last.
            await asyncio.gather(
                self.pool.stop(o.drain_timeout),
                self.proxier.stop(o.drain_timeout, keep_addresses=self._handing_over,
                                  before_cleanup=self.pool.stopped))
        elif self.pool is not None:
            await self.pool.stop(o.drain_timeout)
        elif self.proxier is not None:
            # After a handover the new process serves the addresses: leave them in place.
            await self.proxier.stop(o.drain_timeout, keep_addresses=self._handing_over)
        if dns_start is not None:
            dns_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dns_start
        if self.dns is not None:
            await self.dns.stop()
            REGISTRY.unregister(dns_metrics)
        for server in self.ops.values():
            await server.cleanup()
        log.info("stopped")
        return code

    async def _start_dns_when_synced(self) -> None:
        while not self.state.synced:
            await asyncio.sleep(0.01)
        try:
            await self.dns.start()
        except OSError as e:
            log.error("dns cannot serve", reason=str(e))
            self._stop.set()  # the control process starts the worker again

    # --- restart without a gap (kubeshim/takeover.py) -------------------------------------

    async def _take_over(self) -> socket.socket | None:
        """Receive the running daemon's listening sockets for the components to serve on."""
        path = self.opts.control_socket
        if path is None:
            raise ConfigError("--takeover needs --control-socket PATH")
        try:
            sockets, conn = await asyncio.to_thread(takeover.request, path)
        except (OSError, ValueError) as e:
            log.warning("nothing to take over; starting on fresh sockets", path=str(path),
                        reason=str(e))
            return None
        handover.offer(sockets)
        log.info("took over listening sockets", count=len(sockets), path=str(path))
        return conn

    def _serving(self) -> bool:
        """Synced, and every change applied: the new process can take the traffic alone."""
        if not self.state.synced:
            return False
        p = self.proxier
        return p is None or (p.last_updated > 0 and p.last_queued is None)

    async def _confirm_when_serving(self, conn: socket.socket,
                                    control: takeover.ControlSocket | None) -> None:
        try:
            while not self._serving():
                await asyncio.sleep(0.01)
            leftovers = handover.close_leftovers()
            await asyncio.to_thread(takeover.confirm, conn)
            log.info("serving; the previous process drains now",
                     unused_sockets=len(leftovers))
            if control is not None:
                control.start(took_over=True)
        finally:
            conn.close()

    def _handed_over(self) -> None:
        self._handing_over = True
        self._stop.set()

    def _reload_config(self) -> None:
        """SIGHUP: re-read the configuration; never stops the daemon."""
        if self._reload is None:
            log.info("SIGHUP ignored: no configuration to re-read")
            return
        try:
            new = self._reload()
        except (ConfigError, OSError, ValueError) as e:
            log.error("configuration reload failed; keeping the running configuration",
                      reason=str(e))
            return
        changed = _changed(self.opts, new)
        if new.log_level != self.opts.log_level:
            logs.setup(new.log_level)
            self.opts.log_level = new.log_level
        log.info("configuration reloaded", log_level=new.log_level,
                 restart_needed=",".join(changed) or "-")

    def _freeze_after_first_sync(self, _: object) -> None:
        """Move the first full state out of the collector's reach once it is complete.

        A full collection walks every object; with 10k Services that is a pause of about
        half a second on the data path. Objects that live as long as the state need no
        collection (gc.freeze); later garbage is collected as usual.
        """
        if self.state.synced and not self._frozen:
            self._frozen = True
            # After the callbacks of this change: the proxy's sync of it goes first.
            asyncio.get_running_loop().call_soon(_collect_and_freeze)

    def _health_probe(self) -> tuple[float, float | None]:
        if self.proxier is not None:
            return self.proxier.last_updated, self.proxier.last_queued
        # Without a proxy, the state is applied as it arrives; healthy while starting.
        return (self._started_mono if self.state.synced else 0.0), None


def _changed(old: Options, new: Options) -> list[str]:
    """The settings that differ ("udp_timeout" of the proxy as "proxy.udp_timeout"), but for
    those applied at once or only reported."""
    out = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name in ("ignored", "log_level") or a == b:
            continue
        if is_dataclass(a):
            out += [f"{f.name}.{g.name}" for g in fields(a)
                    if getattr(a, g.name) != getattr(b, g.name)]
        else:
            out.append(f.name)
    return sorted(out)


def _collect_and_freeze() -> None:
    if not gc.isenabled():
        # Bulk work is under way (the proxy's first sync, paused at its transaction): a
        # collection now would walk everything it built so far, on the way to serving. Its
        # end freezes what it built; look again after it.
        asyncio.get_running_loop().call_later(BULK_RECHECK, _collect_and_freeze)
        return
    gc.collect()
    gc.freeze()


def node_networks() -> list[str]:
    """The networks of this node's own addresses (`ip -j address`), e.g. 10.244.0.0/24 for
    10.244.0.1/24 on a bridge: clients there are the node and its neighbours. Loopback and
    link-local IPv6 are left out; empty when `ip` cannot be run."""
    import json
    import subprocess

    try:
        out = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True,
                             timeout=5, check=True).stdout
        links = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        log.warning("node networks unknown: DNS answers loopback and clusterCIDR clients only")
        return []
    nets: list[str] = []
    for link in links:
        for a in link.get("addr_info", []):
            net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if not (net.is_loopback or net.is_link_local) and str(net) not in nets:
                nets.append(str(net))
    return nets
