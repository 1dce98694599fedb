"""The Proxier: turns ClusterState changes into listeners, VIPs and forwarding tables.

Shaped like kube-proxy's syncProxyRules: state changes only accumulate in the change tracker
(proxy/changes.py); a sync soon after (coalesced) returns early until the state is synced, then
drains the tracker, hands the same changes to the health-check nodePorts, and, for those
Services only: updates their port tables (endpoints, balancing), computes their desired
listeners, applies the difference (VIPs, sockets), schedules a retry for what failed, and does
housekeeping (UDP flows of endpoints that went away). An endpoint change touches one port table
and no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from kubeshim.cluster.bulk import BULK_SERVICES, gc_paused
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import NamespacedName, Node, ServicePortName
from kubeshim.cluster.netaddr import ip_family
from kubeshim.cluster.state import ClusterState, ServiceChange, ServiceInfo
from kubeshim.proxy.balancer import Clock, EndpointKey
from kubeshim.proxy.budget import Budget, caps_for_limit
from kubeshim.proxy.capture import CaptureEntry, PortEndpoints, Verdict, capture_entries
from kubeshim.proxy.changes import PendingChange, ServiceChangeTracker
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.healthcheck import ServiceHealthServer
from kubeshim.proxy.listeners import (
    ListenerKey,
    ListenerSpec,
    desired_listeners,
    diff_listeners,
    leave_to_dns,
    vips_of,
)
from kubeshim.proxy.metrics import PortCounters, ProxyMetrics
from kubeshim.proxy.runtime import Listener, ServiceRuntime, TableKey, bind_error
from kubeshim.proxy.sctp import sctp_problem
from kubeshim.proxy.status import WorkerReport, add_counts, port_key, status_document
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.tcp import ClientSide, TcpFrontend, listen_socket
from kubeshim.proxy.transparent import Capture, CaptureError, Target
from kubeshim.proxy.udp import UdpFrontend, bind_socket
from kubeshim.proxy.vip import (
    AddressWatch,
    InterfaceVips,
    LoopbackMapper,
    NetlinkWorker,
    VipError,
    local_addresses,
    local_networks,
    nodeport_addresses,
    remove_interface,
)

log = get_logger("proxy")

RETRY_MIN = 1.0
RETRY_MAX = 30.0
HOUSEKEEPING_PERIOD = 60.0
SYNCED_POLL = 0.05


class Proxier:
    def __init__(self, state: ClusterState, config: ProxyConfig,
                 registry: CollectorRegistry | None = None, clock: Clock = time.monotonic) -> None:
        self.state = state
        self.config = config
        self._clock = clock
        self.metrics = ProxyMetrics(registry) if registry is not None else ProxyMetrics.default()
        self.metrics.collector.add(self, self._counter_rows)
        self.mapper = LoopbackMapper()
        self.vips: InterfaceVips | None = None
        self.capture: Capture | None = None
        self._capture_owners: dict[tuple[int, str, str, int], NamespacedName] = {}
        self._endpoint_users: dict[str, set[NamespacedName]] = {}  # endpoint IP -> Services
        self._netlink = NetlinkWorker()
        self.node_ips: list[str] = []
        self._local_ips: set[str] = set()
        self.tables: dict[TableKey, PortTable] = {}
        self.counters: dict[ServicePortName, PortCounters] = {}
        self.services: dict[NamespacedName, ServiceRuntime] = {}
        self._owners: dict[ListenerKey, NamespacedName] = {}
        self._failing: set[NamespacedName] = set()  # Services with errors
        self._vip_users: dict[str, set[NamespacedName]] = {}
        self.connections: set[ClientSide] = set()
        self._loopback_owner: dict[str, str] = {}  # loopback address -> the address it serves
        # Called with a Service whose served addresses or errors changed.
        self.served_changed: Callable[[NamespacedName], None] | None = None
        caps = caps_for_limit(
            config.descriptor_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            config.max_connections, config.max_connections_per_client, config.max_udp_flows,
            config.max_udp_flows_per_client)
        self.tcp_budget = Budget("connections", caps.connections, caps.connections_per_client)
        self.udp_budget = Budget("udp flows", caps.udp_flows, caps.udp_flows_per_client)
        # What changed since the last sync; the sync drains it for the tables and listeners
        # and then for the health-check nodePorts (`service_health`, the control process's).
        self.changes = ServiceChangeTracker()
        self.service_health: ServiceHealthServer | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._retry_handles: dict[NamespacedName, asyncio.TimerHandle] = {}
        self._housekeeping: asyncio.TimerHandle | None = None
        self._addresses: AddressWatch | None = None
        self._addresses_read: asyncio.Task[None] | None = None
        self._addresses_stale = False
        self._reported: set[tuple[ServicePortName, str]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.last_updated = 0.0
        self.last_queued: float | None = None
        # Worker processes' reports (kubeshim/workers.py), by pid, and the totals of workers
        # that exited: status and metrics count them as one proxy.
        self.peers: dict[int, WorkerReport] = {}
        self.retired: dict[str, PortCounters] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.vip_mode == "tproxy":
            # NodePorts: the configured CIDRs, the word "primary" resolved now; none means
            # every local address, whenever it appears.
            cidrs = [c for c in cfg.nodeport_addresses if c != "primary"]
            if "primary" in cfg.nodeport_addresses:
                cidrs += [ip for ip in await self._netlink.call(nodeport_addresses, ["primary"])]
            capture = Capture(cfg, self.connections, cidrs, self.tcp_budget, self.udp_budget)
            try:
                await capture.start(self._netlink, adopt=cfg.adopt)
                self.capture = capture
                if await self._netlink.call(remove_interface, cfg.vip_interface):
                    log.info("removed the interface of an earlier interface-mode run",
                             interface=cfg.vip_interface)
            except CaptureError as e:
                # Where the kernel has no nftables TPROXY, the Service addresses go on an
                # interface instead.
                await capture.stop(self._netlink)
                log.warning("tproxy capture unavailable, using interface mode", reason=str(e))
                cfg.vip_mode = "interface"
        exclude = cfg.vip_interface if cfg.vip_mode == "interface" else ""
        if cfg.vip_mode == "interface":
            self.vips = InterfaceVips(cfg.vip_interface)
            await self._netlink.call(self.vips.prepare, cfg.adopt)
        self._local_ips = {ip for ip, _ in await self._netlink.call(local_addresses, exclude)}
        self.node_ips = await self._netlink.call(
            nodeport_addresses, list(cfg.nodeport_addresses), exclude)
        if self.capture is not None:
            self.capture.sources.node_addresses = self._local_ips
            self.capture.sources.links = [
                ipaddress.ip_network(n) for n in await self._netlink.call(local_networks, exclude)]
            # A CNI bridge gets its address when the first Pod starts, after kubeshim did.
            self._addresses = AddressWatch(self._loop, self._addresses_changed)
        log.info("proxy starting", vip_mode=cfg.vip_mode, node=cfg.node_name or "-",
                 nodeport_addresses=",".join(self.node_ips) or "-", balance=cfg.balance,
                 max_connections=self.tcp_budget.limit,
                 max_connections_per_client=self.tcp_budget.per_client,
                 max_udp_flows=self.udp_budget.limit,
                 max_udp_flows_per_client=self.udp_budget.per_client)
        self.state.subscribe(self._on_changes)
        self.state.subscribe_node(self._on_node)
        now = time.monotonic()
        self.changes.update((ServiceChange(key, None, info)
                             for key, info in self.state.services.items()), now)
        # Like kube-proxy, healthy while starting: only a change that waits too long counts.
        self.last_queued = now if self.changes else None
        self._schedule()
        self._housekeeping = self._loop.call_later(HOUSEKEEPING_PERIOD, self._housekeep)

    def _addresses_changed(self) -> None:
        self._addresses_stale = True
        if self._addresses_read is None and self._loop is not None:
            self._addresses_read = self._loop.create_task(self._read_addresses())

    async def _read_addresses(self) -> None:
        """The node's addresses and on-link networks again, for the capture's client-address
        decisions (SourcePolicy: a client and an endpoint on one link get the node's address)."""
        try:
            while self._addresses_stale and self.capture is not None:
                self._addresses_stale = False
                await asyncio.sleep(0.05)  # one read for a burst of changes
                ips = {ip for ip, _ in await self._netlink.call(local_addresses, "")}
                nets = await self._netlink.call(local_networks, "")
                self._local_ips.clear()  # shared with the port tables and the capture
                self._local_ips.update(ips)
                self.capture.sources.links = [ipaddress.ip_network(n) for n in nets]
                log.info("node addresses changed", addresses=len(ips), networks=",".join(nets))
        except Exception as e:  # noqa: BLE001 - the next change reads them again
            log.warning("cannot read the node's addresses", reason=str(e))
        finally:
            self._addresses_read = None

    async def stop(self, drain_timeout: float, keep_addresses: bool = False,
                   before_cleanup: asyncio.Event | None = None) -> None:
        """Stop accepting, let open connections finish until the deadline, then remove VIPs
        (unless `keep_addresses`: a process that took over serves them now; once
        `before_cleanup` is set: the workers, whose connections need the capture table, have
        stopped)."""
        self._stopping = True
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
        for handle in self._retry_handles.values():
            handle.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._addresses is not None:
            self._addresses.close()
        if self._addresses_read is not None:
            self._addresses_read.cancel()
        for rt in self.services.values():
            for listener in rt.listeners.values():
                listener.close()
        if self.capture is not None:
            self.capture.close_listeners()
        deadline = time.monotonic() + drain_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("drain deadline passed, closing connections", count=len(self.connections))
            for conn in list(self.connections):
                conn.abort()
            # abort() closes the sockets on a later loop iteration; the resets must leave
            # while the VIPs still exist.
            settle = time.monotonic() + 1.0
            while self.connections and time.monotonic() < settle:
                await asyncio.sleep(0.01)
        for rt in self.services.values():
            rt.listeners.clear()
        if before_cleanup is not None:
            await before_cleanup.wait()
        if self.vips is not None and not keep_addresses:
            await self._netlink.call(self.vips.close)
        if self.capture is not None:
            if keep_addresses:
                self.capture.close_listeners()
            else:
                await self.capture.stop(self._netlink)
        self._netlink.close()
        log.info("proxy stopped")

    # --- change intake -------------------------------------------------------------------------

    def _on_changes(self, changes: Sequence[ServiceChange]) -> None:
        now = time.monotonic()
        if not self.changes.update(changes, now):
            return
        if self.last_queued is None:
            self.last_queued = now
        self.metrics.last_queued.set(time.time())
        self._schedule()

    def _on_node(self, before: Node | None, after: Node | None) -> None:
        # Only the zone label decides endpoints (topology hints); like kube-proxy's
        # NodeTopologyConfig, any other change to the Node leaves the Services alone.
        if (before.zone if before else "") == (after.zone if after else ""):
            return
        # Only Services with zone hints can route differently: the rest are left alone, so a
        # label change costs O(hinted Services), not a resync of the whole node.
        now = time.monotonic()
        hinted = [key for key, info in self.state.services.items() if _has_zone_hints(info)]
        for key in hinted:
            self.changes.mark(key, self.state.services[key], now)
        log.info("node topology changed, resyncing services", node=self.config.node_name,
                 zone=after.zone if after else "-", numServices=len(hinted))
        if not hinted:
            return
        if self.last_queued is None:
            self.last_queued = now
        self._schedule()

    def _schedule(self) -> None:
        if self._stopping or self._loop is None:
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = self._loop.create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while self.changes and not self._stopping:
            if not self.state.synced:
                # Serve nothing half-known: wait for the first full list of both kinds. A list
                # that changes nothing notifies no one, so look again shortly.
                await asyncio.sleep(SYNCED_POLL)
                continue
            await self.sync()
        if (self.config.worker and self.capture is not None and not self.capture.servers
                and self.state.synced and not self._stopping):
            # A worker joins the listeners' groups only with every Service in its index: the
            # control process's table hands it connections at once.
            await self.capture.open_listeners()

    def attach_service_health(self, server: ServiceHealthServer) -> None:
        """Health-check nodePorts follow what the sync applies, starting with what it has."""
        self.service_health = server
        server.update((key, rt.info) for key, rt in self.services.items())

    def state_mirrored(self) -> None:
        """A worker's state took its control process's changes (maybe none, but synced)."""
        self._schedule()

    # --- the sync ----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Apply the dirty Services (kube-proxy's syncProxyRules shape); thousands of them
        (the first sync) with the cyclic GC paused (cluster/bulk.py)."""
        if not self.state.synced:
            return
        start = time.monotonic()
        dirty = self.changes.take()
        if self.service_health is not None:
            # The health-check nodePorts follow the same changes (kube-proxy feeds its
            # serviceHealthServer from the sync too); first, so no failure below skips them.
            self.service_health.update((p.key, p.current) for p in dirty.values())
        bulk = len(dirty) >= BULK_SERVICES
        with gc_paused(freeze=True) if bulk else contextlib.nullcontext():
            await self._apply_changes(dirty, start)

    async def _apply_changes(self, dirty: dict[NamespacedName, PendingChange],
                             start: float) -> None:
        """The sync's steps for the drained changes."""
        failed = 0
        for key, pending in dirty.items():
            try:
                ok = await self._sync_service(key)
            except Exception:
                log.error("service sync failed", service=str(key), exc_info=True)
                ok = False
            if not ok:
                failed += 1
                self._retry_later(key)
            elif (rt := self.services.get(key)) is not None:
                rt.retries = 0
            if self.capture is None:
                self.metrics.network_programming.observe(time.monotonic() - pending.queued)
        if self.capture is not None:
            # A Service address that appeared or went away changes the status of Services
            # whose endpoints use it (a capture loop): look at those again.
            for ip in self.capture.index.changed:
                for user in self._endpoint_users.get(ip, ()):
                    self.changes.mark(user, self.state.services.get(user), time.monotonic())
            self.capture.index.changed.clear()
            # One transaction for the whole batch; the rules are the data plane here.
            if not await self.capture.flush():
                for key in dirty:
                    self._retry_later(key)
            if self.config.workers > 1:
                # ClientIP affinity lives in each process's tables: while a Service asks for
                # it, one client's connections all go to one process.
                self.capture.steer(any(t.affinity is not None for t in self.tables.values()),
                                   self.config.workers)
            now = time.monotonic()
            for pending in dirty.values():
                self.metrics.network_programming.observe(now - pending.queued)
        end = time.monotonic()
        self.metrics.sync_duration.observe(end - start)
        self.metrics.last_sync.set(time.time())
        self.metrics.sync_failures.set(len(self._failing))
        self.last_updated = end
        self.last_queued = self.changes.oldest()
        if len(dirty) > 1 or log.is_debug():
            log.info("synced services", numServices=len(dirty), failed=failed,
                     seconds=round(end - start, 4))

    def _retry_later(self, key: NamespacedName) -> None:
        rt = self.services.get(key)
        if rt is None or self._loop is None or key in self._retry_handles:
            return
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** rt.retries)
        rt.retries += 1

        def retry() -> None:
            self._retry_handles.pop(key, None)
            self.changes.mark(key, self.state.services.get(key), time.monotonic())
            self._schedule()

        self._retry_handles[key] = self._loop.call_later(delay, retry)

    async def _sync_service(self, key: NamespacedName) -> bool:
        """Bring one Service up to date; False if not all of it is served (it is retried).

        The steps: port tables (endpoints), then what serves them (listeners and addresses, or
        capture entries in tproxy mode), then the tables of ports that went away, then errors.
        """
        info = self.state.services.get(key)
        rt = self.services.get(key)
        if rt is None:
            if info is None:
                return True
            rt = self.services[key] = ServiceRuntime(key)
        rt.info = info
        errors: dict[str, str] = {}
        desired, port_names = self._update_tables(rt, info, errors)
        dns_vips: set[str] = set()
        if self.capture is not None:
            # tproxy mode: rules instead of listeners and addresses.
            self._sync_capture(rt, info, errors)
            desired = {}
        elif self.config.vip_mode == "interface" and self.config.dns_capture:
            desired, dns_vips = leave_to_dns(desired, self.config.dns_capture)
        if desired or rt.listeners or rt.vips or dns_vips:
            await self._apply_listeners(rt, desired, errors, dns_vips)
        else:
            rt.desired = {}  # nothing to open, close or claim (always so in tproxy mode)
        self._drop_ports(rt, port_names)
        self._record_errors(rt, errors)
        if info is None:
            del self.services[key]
            if (h := self._retry_handles.pop(key, None)) is not None:
                h.cancel()
            return True
        # A Service that can never be served (e.g. SCTP only) does not retry.
        return all(k in rt.listeners for k in rt.desired)

    def _update_tables(self, rt: ServiceRuntime, info: ServiceInfo | None,
                       errors: dict[str, str]
                       ) -> tuple[dict[ListenerKey, ListenerSpec], set[TableKey]]:
        """Port tables of a proxied Service take its endpoints (before listeners open, so that
        they find them); returns the listeners it wants and its (port, family) tables."""
        desired: dict[ListenerKey, ListenerSpec] = {}
        port_names: set[TableKey] = set()
        if info is None or not info.proxied:
            return desired, port_names
        families = sorted({ip_family(ip) for ip in info.service.cluster_ips})
        if self.capture is None:
            desired, problems = desired_listeners(info, self.node_ips, self.vip_address)
        else:  # tproxy mode: rules, no listeners (only the ports it cannot serve matter)
            problems = [(spi.name, sctp_problem()) for spi in info.ports
                        if spi.spec.protocol == "SCTP"]
        for name, reason in problems:
            errors[f"port {name}"] = reason
            if (name, reason) not in self._reported:
                self._reported.add((name, reason))
                log.warning("service port not served", service=str(rt.key), port=name.port,
                            protocol=name.protocol, reason=reason)
        for spi in info.ports:
            if spi.spec.protocol == "SCTP":
                continue
            counters = self.counters.setdefault(spi.name, PortCounters())
            for family in families:
                tkey = (spi.name, family)
                port_names.add(tkey)
                table = self.tables.get(tkey)
                if table is None:
                    table = self.tables[tkey] = PortTable(
                        spi, family, self.config.balance, self._clock, counters)
                    table.node_addresses = self._local_ips
                    if self.capture is not None:
                        table.local_pod = self.capture.sources.local_pod
                stale = table.update(info.service, spi, self.config.node_name,
                                     self.state.node_zone)
                if stale:
                    self._drop_udp_flows(rt, spi.name, stale)
        return desired, port_names

    async def _apply_listeners(self, rt: ServiceRuntime,
                               desired: dict[ListenerKey, ListenerSpec],
                               errors: dict[str, str], dns_vips: set[str]) -> None:
        """Close, retarget and open sockets; assign Service addresses before binding them and
        release the unused ones after closing. `dns_vips` are addresses wanted for the DNS
        server's own sockets only."""
        key = rt.key
        wanted_vips = vips_of(desired) | dns_vips
        # A port without any endpoint gets no socket, while its address stays claimed: the
        # kernel then refuses connections to it (TCP reset to the SYN, ICMP port unreachable),
        # as kube-proxy's reject rule for a Service without endpoints does
        # (pkg/proxy/nftables/proxier.go, "has no endpoints").
        desired = {k: spec for k, spec in desired.items()
                   if self._port_endpoints(spec.port_name, spec.family).any}
        close, open_ = diff_listeners({k: li.spec for k, li in rt.listeners.items()}, desired)
        for k in close:
            if k in desired and (table := self.tables.get(
                    (desired[k].port_name, desired[k].family))) is not None:
                rt.listeners[k].retarget(desired[k], table)
                continue
            rt.listeners.pop(k).close()
            if self._owners.get(k) == key:
                del self._owners[k]
            log.info("listener closed", service=str(key), address=str(k))
        for ip in rt.vips - wanted_vips:
            await self._release_vip(ip, key)
        for ip in wanted_vips - rt.vips:
            problem = await self._claim_vip(ip, key)
            if problem:
                errors[f"address {ip}"] = problem
        rt.vips = wanted_vips
        for spec in open_:
            if spec.key in rt.listeners:
                continue
            if (ip_problem := errors.get(f"address {spec.service_ip}")) is not None:
                errors[str(spec.key)] = ip_problem
                continue
            if (collision := self._loopback_collision(spec)) is not None:
                errors[f"address {spec.service_ip}"] = collision
                continue
            owner = self._owners.get(spec.key)
            if owner is not None and owner != key:
                errors[str(spec.key)] = f"{spec.key} is already served for service {owner}"
                continue
            try:
                rt.listeners[spec.key] = await self._open(spec)
                self._owners[spec.key] = key
                log.info("listener opened", service=str(key), address=str(spec.key),
                         kind=spec.kind)
            except OSError as e:
                errors[str(spec.key)] = bind_error(e, spec)
        rt.desired = desired

    def _drop_ports(self, rt: ServiceRuntime, port_names: set[TableKey]) -> None:
        """Tables and counters of ports the Service no longer has (their sockets are closed)."""
        for tkey in rt.ports - port_names:
            del self.tables[tkey]
        for name in {n for n, _ in rt.ports} - {n for n, _ in port_names}:
            self.counters.pop(name, None)
        rt.ports = port_names

    def _record_errors(self, rt: ServiceRuntime, errors: dict[str, str]) -> None:
        """Log what started or stopped failing, once each, and tell who cares (DNS answers
        only addresses that are served)."""
        key = rt.key
        for what, why in errors.items():
            if rt.errors.get(what) != why:
                log.error("cannot serve", service=str(key), what=what, reason=why)
        for what in rt.errors.keys() - errors.keys():
            log.info("serving again", service=str(key), what=what)
        if errors.keys() != rt.errors.keys() and self.served_changed is not None:
            self.served_changed(key)
        rt.errors = errors
        if errors:
            self._failing.add(key)
        else:
            self._failing.discard(key)

    def _port_endpoints(self, name: ServicePortName, family: int) -> PortEndpoints:
        table = self.tables.get((name, family))
        if table is None:
            return PortEndpoints(False, False, False)
        return PortEndpoints(table.categorized.has_any, bool(table.internal), bool(table.external))

    def _sync_capture(self, rt: ServiceRuntime, info: ServiceInfo | None,
                      errors: dict[str, str]) -> None:
        """The Service's capture entries into the index and the pending transaction."""
        cap = self.capture
        assert cap is not None
        key = rt.key
        proxied = info is not None and info.proxied
        new = capture_entries(info, self._port_endpoints) if info is not None and proxied else []
        kept: list[CaptureEntry] = []
        for e in new:
            owner = self._capture_owners.get(e.key)
            if owner is not None and owner != key:
                errors[str(e)] = f"{e} is already captured for service {owner}"
            else:
                kept.append(e)
        kept_keys = {e.key for e in kept}
        for e in rt.capture:
            if e.key not in kept_keys:
                cap.index.remove(e)
                del self._capture_owners[e.key]
        for e in kept:
            self._capture_owners[e.key] = key
            if e.verdict == Verdict.NOT_CAPTURED:
                cap.index.remove(e)
            else:
                cap.index.add(e, Target(self.tables[(e.port_name, e.family)],
                                        e.kind != "ClusterIP"))
        rt.capture = kept
        cap.set_service(key, kept, info.service.cluster_ips if info is not None and proxied
                        else [])
        ips = {ep.ip for spi in info.ports for ep in spi.endpoints} if info is not None else set()
        for ip in rt.endpoint_ips - ips:
            users = self._endpoint_users[ip]
            users.discard(key)
            if not users:
                del self._endpoint_users[ip]
        for ip in ips - rt.endpoint_ips:
            if (sharing := self._endpoint_users.get(ip)) is None:
                self._endpoint_users[ip] = {key}
            else:
                sharing.add(key)
        rt.endpoint_ips = ips
        if not proxied or not any(ip in cap.index.addresses for ip in ips):
            return
        for spi in info.ports if info is not None else ():
            for ep in spi.endpoints:
                if ep.ip in cap.index.addresses:
                    errors[f"endpoint {ep.address}"] = (
                        f"{ep.ip} is a Service address that kubeshim captures; connections to "
                        "it are refused (they would loop)")

    async def _open(self, spec: ListenerSpec) -> Listener:
        table = self.tables[(spec.port_name, spec.family)]
        listener = Listener(spec, table)
        loop = asyncio.get_running_loop()
        k = spec.key
        if k.protocol == "TCP":
            sock = listen_socket(k.ip, k.port, self.config.listen_backlog)
            fe = listener.tcp = TcpFrontend(table, spec.external, self.config, self.connections,
                                            self.tcp_budget)
            listener.server = await loop.create_server(fe, sock=sock,
                                                       backlog=self.config.listen_backlog)
        else:
            sock = bind_socket(k.ip, k.port)
            udp = UdpFrontend(table, spec.external, self.config, self.udp_budget)
            await loop.create_datagram_endpoint(lambda: udp, sock=sock)
            listener.udp = udp
        return listener

    async def _claim_vip(self, ip: str, key: NamespacedName) -> str | None:
        users = self._vip_users.setdefault(ip, set())
        users.add(key)
        try:
            if self.vips is not None:
                # An externalIP may be the node's own address; it needs nothing assigned.
                if ip not in self._local_ips and ip not in self.vips.assigned:
                    await self._netlink.call(self.vips.add, ip)
            else:
                self.mapper.check(ip)
        except (VipError, ValueError) as e:
            return str(e)
        return None

    async def _release_vip(self, ip: str, key: NamespacedName) -> None:
        users = self._vip_users.get(ip)
        if users is None:
            return
        users.discard(key)
        if not users:
            del self._vip_users[ip]
            if self.config.vip_mode == "loopback":
                bound = self.mapper.address(ip)
                if self._loopback_owner.get(bound) == ip:
                    del self._loopback_owner[bound]
            if self.vips is not None and ip in self.vips.assigned:
                await self._netlink.call(self.vips.remove, ip)

    def _drop_udp_flows(self, rt: ServiceRuntime, name: ServicePortName,
                        stale: Iterable[tuple[str, int]]) -> None:
        stale = set(stale)
        if self.capture is not None:
            for udp in self.capture.udp:
                udp.drop_endpoints(stale, name)
        for listener in rt.listeners.values():
            if listener.udp is not None and listener.spec.port_name == name:
                listener.udp.drop_endpoints(stale)

    def _housekeep(self) -> None:
        for table in self.tables.values():
            if table.affinity is not None:
                table.affinity.expire()
        if self._loop is not None and not self._stopping:
            self._housekeeping = self._loop.call_later(HOUSEKEEPING_PERIOD, self._housekeep)

    # --- reading -----------------------------------------------------------------------------

    def vip_address(self, ip: str) -> str:
        """Where a ClusterIP / externalIP / LoadBalancer IP is bound."""
        if self.config.vip_mode != "loopback":
            return ip
        return self.mapper.address(ip)

    def served_address(self, ip: str) -> str:
        """Where clients reach `ip` (what DNS answers); '' when its loopback address serves
        another address (see _loopback_collision)."""
        bound = self.vip_address(ip)
        owner = self._loopback_owner.get(bound)
        return bound if owner is None or owner == ip else ""

    def _loopback_collision(self, spec: ListenerSpec) -> str | None:
        """Loopback mode keeps the low 22 bits of an address (proxy/vip.py): two Service
        addresses that differ only above them map to one loopback address. The first to claim
        it keeps it; the other is not served (and DNS does not answer it) until it is free."""
        if self.config.vip_mode != "loopback" or spec.kind == "NodePort":
            return None
        owner = self._loopback_owner.setdefault(spec.key.ip, spec.service_ip)
        if owner == spec.service_ip:
            return None
        users = ", ".join(sorted(str(k) for k in self._vip_users.get(owner, ()))) or "-"
        return (f"{spec.service_ip} maps to loopback address {spec.key.ip}, which serves "
                f"{owner} (service {users}); loopback mode keeps only the low 22 bits")

    def status(self) -> dict[str, Any]:
        return status_document(self)

    def _counter_rows(self) -> Iterable[tuple[str, str, str, PortCounters]]:
        for name in self.counters:
            yield str(name.service), name.port, name.protocol, self.port_counters(name)

    # --- worker processes ----------------------------------------------------------------------

    def report(self) -> WorkerReport:
        """What this process counts, for its control process (a worker's periodic report)."""
        return {
            "ports": {port_key(name): c.as_dict() for name, c in self.counters.items()},
            "active": {f"{port_key(name)}/{family}": {f"{ip}/{port}": n
                                                    for (ip, port), n in table.active.items()}
                       for (name, family), table in self.tables.items() if table.active},
            "connections": len(self.connections),
            "udpFlows": self._udp_flows(),
            "serving": self.capture is not None and bool(self.capture.servers),
        }

    def peer_exited(self, pid: int) -> None:
        """A worker is gone: its open connections with it, its totals kept (counters never go
        backwards)."""
        report = self.peers.pop(pid, None)
        for key, d in (report or {}).get("ports", {}).items():
            c = self.retired.setdefault(key, PortCounters())
            add_counts(c, d, totals_only=True)

    def port_counters(self, name: ServicePortName) -> PortCounters:
        """This port's counters across this process and its workers."""
        own = self.counters.get(name)
        if not self.peers and not self.retired:
            return own if own is not None else PortCounters()
        merged = PortCounters()
        key = port_key(name)
        if own is not None:
            add_counts(merged, own.as_dict())
        if (old := self.retired.get(key)) is not None:
            add_counts(merged, old.as_dict())
        for report in self.peers.values():
            if (d := report["ports"].get(key)) is not None:
                add_counts(merged, d)
        return merged

    def peer_active(self, table: PortTable, key: EndpointKey) -> int:
        name = f"{port_key(table.name)}/{table.family}"
        ep = f"{key[0]}/{key[1]}"
        return sum(r["active"].get(name, {}).get(ep, 0) for r in self.peers.values())

    def _udp_flows(self) -> int:
        return (sum(len(li.udp.flows) for rt in self.services.values()
                    for li in rt.listeners.values() if li.udp is not None)
                + (sum(len(u.flows) for u in self.capture.udp) if self.capture is not None else 0))



def _has_zone_hints(info: ServiceInfo) -> bool:
    return any(ep.zone_hints for spi in info.ports for ep in spi.endpoints)
