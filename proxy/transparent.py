"""TPROXY mode's IO: the kubeshim nftables table, the policy route, the transparent listeners.

The kernel hands every captured Service tuple to one IP_TRANSPARENT listener per protocol and
family, bound to a loopback address on a port of kubeshim's own (`capture_port`), so no host
program ever collides with a Service port and no Service address is a local address. The
original destination is the accepted socket's own address (TCP) or IP_RECVORIGDSTADDR (UDP);
`CaptureIndex` maps it to the port table. Traffic that arrived on a bridge is NATed instead
(proxy/capture.py) to the redirect listeners, on every address of the next port, which read the
original destination from conntrack (proxy/conntrack.py). Listeners set SO_REUSEPORT, so several
processes could share them.

Outbound sockets carry SO_MARK `BYPASS_MARK`, so the table never captures kubeshim's own
traffic. Where kube-proxy keeps the client's address (a local pod to a ClusterIP, external
traffic under `externalTrafficPolicy: Local`), the outbound socket binds that address with
IP_TRANSPARENT; the endpoint's replies come back through the node and the table's `socket
transparent` rule delivers them to it.

Rules change in one nftables transaction per sync (kube-proxy's knftables runs `nft -f -` for
each; here libnftables applies it in-process, proxy/nft.py); a failed transaction changes
nothing and the whole table is written again.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import NamespacedName, ServicePort, ServicePortName
from kubeshim.cluster.netaddr import ip_family, socket_family
from kubeshim.cluster.state import EndpointInfo, ServicePortInfo
from kubeshim.proxy.budget import Budget
from kubeshim.proxy.capture import (
    BYPASS_MARK,
    CAPTURE_MARK,
    ROUTE_TABLE,
    TABLE,
    CaptureEntry,
    ElementStore,
    ListenPorts,
    Ruleset,
    elements_of,
)
from kubeshim.proxy.config import ProxyConfig
from kubeshim.proxy.conntrack import Conntrack, original_tcp_destination
from kubeshim.proxy.metrics import UDP_SEND_FAILED
from kubeshim.proxy.nft import Nft
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.tcp import ClientSide, TcpFrontend, reset
from kubeshim.proxy.udp import (
    MAX_DATAGRAM,
    READ_BATCH,
    Flow,
    FlowTable,
)

log = get_logger("proxy")

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
SO_MARK = 36
NO_CAPTURE = "no_capture_entry"


class CaptureError(Exception):
    """The capture layer cannot be set up; the message says what and why."""


def _transparent(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def transparent_listener(kind: int, family: int, address: str, port: int,
                         backlog: int, transparent: bool = True) -> socket.socket:
    """A capture listener: IP_TRANSPARENT for TPROXY; a redirect listener has no need of it (and
    must not match the table's `socket transparent` rule, which would let direct traffic in)."""
    if (inherited := handover.take(kind, address, port)) is not None:
        return inherited
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # "::" leaves IPv4 to its own socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            _transparent(sock, family)
        if kind == socket.SOCK_DGRAM:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network header


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def steer_by_client(sock: socket.socket, family: int, processes: int) -> None:
    """Make the kernel pick the socket of a listener's SO_REUSEPORT group by the client's
    address (its last 32 bits modulo `processes`) instead of the connection's 4-tuple, so one
    client's connections all reach one process and its ClientIP affinity table. Where the group
    has fewer sockets than that (a worker starting again) the kernel falls back to the hash."""
    source = 12 if family == socket.AF_INET else 8 + 12  # saddr (IPv6: its last word)
    program = (_SockFilter * 3)(
        _SockFilter(0x20, 0, 0, (SKF_NET_OFF + source) & 0xFFFFFFFF),  # ld [net + source]
        _SockFilter(0x94, 0, 0, processes),  # mod #processes
        _SockFilter(0x16, 0, 0, 0),  # ret a
    )
    fprog = _SockFprog(len(program), program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                    bytes(memoryview(fprog)))


def steer_by_hash(sock: socket.socket) -> None:
    """The kernel's default again: the 4-tuple hash spreads one client's connections."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:  # none attached
            raise


def original_destination(ancillary: Sequence[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The (address, port) a captured datagram was sent to (a sockaddr_in / sockaddr_in6)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack("!H", data[2:4])[0]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack("!H", data[2:4])[0]
    return None


@dataclass(frozen=True, slots=True)
class Target:
    table: PortTable
    external: bool


class CaptureIndex:
    """Original destination -> the port table that serves it."""

    def __init__(self) -> None:
        self.tuples: dict[tuple[str, str, int], Target] = {}  # (protocol, address, port)
        self.nodeports: dict[tuple[str, int, int], Target] = {}  # (protocol, port, family)
        self.addresses: dict[str, int] = {}  # captured Service address -> tuples using it
        self.changed: set[str] = set()  # addresses that appeared or went away since asked

    def lookup(self, protocol: str, address: str, port: int) -> Target | None:
        t = self.tuples.get((protocol, address, port))
        if t is None:
            t = self.nodeports.get((protocol, port, ip_family(address)))
        return t

    def add(self, entry: CaptureEntry, target: Target) -> None:
        if entry.kind == "NodePort":
            self.nodeports[(entry.protocol, entry.port, entry.family)] = target
        else:
            key = (entry.protocol, entry.address, entry.port)
            if key not in self.tuples:
                n = self.addresses[entry.address] = self.addresses.get(entry.address, 0) + 1
                if n == 1:
                    self.changed.add(entry.address)
            self.tuples[key] = target

    def remove(self, entry: CaptureEntry) -> None:
        if entry.kind == "NodePort":
            self.nodeports.pop((entry.protocol, entry.port, entry.family), None)
        elif self.tuples.pop((entry.protocol, entry.address, entry.port), None) is not None:
            n = self.addresses[entry.address] - 1
            if n:
                self.addresses[entry.address] = n
            else:
                del self.addresses[entry.address]
                self.changed.add(entry.address)


class SourcePolicy:
    """Which client addresses an endpoint sees (kube-proxy's masquerade decisions).

    kube-proxy keeps the client's address for traffic from a local pod (detectLocal: the
    cluster CIDRs) to a ClusterIP and for external traffic under a Local policy; it
    masquerades node-originated traffic, external traffic under a Cluster policy and hairpin
    traffic (the endpoint is the client). A client and an endpoint on one link of the node
    would talk directly, past kubeshim, so they get the node's address too.

    Asked once per new connection or flow: the address tests (parsing, network membership)
    are remembered per client and per client and endpoint, up to CACHE_SIZE entries each."""

    CACHE_SIZE = 4096

    def __init__(self, cluster_cidrs: Sequence[str]) -> None:
        self.cluster = [ipaddress.ip_network(c, strict=False) for c in cluster_cidrs]
        self.node_addresses: Collection[str] = ()
        self._links: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._local_pod: dict[str, bool] = {}
        self._same_link: dict[tuple[str, str], bool] = {}

    @property
    def links(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return self._links

    @links.setter
    def links(self, links: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._links = links
        self._same_link.clear()

    def source(self, client: str, endpoint: str, external: bool, table: PortTable) -> str | None:
        if not client or client == endpoint or client in self.node_addresses:
            return None
        if external:
            if not table.external_local:
                return None
        elif not self.local_pod(client):
            return None
        same = self._same_link.get((client, endpoint))
        if same is None:
            addr, ep = ipaddress.ip_address(client), ipaddress.ip_address(endpoint)
            same = any(addr in net and ep in net for net in self._links)
            if len(self._same_link) >= self.CACHE_SIZE:
                self._same_link.clear()
            self._same_link[(client, endpoint)] = same
        return None if same else client

    def local_pod(self, client: str) -> bool:
        if not self.cluster:
            return False
        local = self._local_pod.get(client)
        if local is None:
            addr = ipaddress.ip_address(client)
            local = any(addr in net for net in self.cluster)
            if len(self._local_pod) >= self.CACHE_SIZE:
                self._local_pod.clear()
            self._local_pod[client] = local
        return local


def _unmatched_table() -> PortTable:
    name = ServicePortName(NamespacedName("", ""), "", "TCP")
    return PortTable(ServicePortInfo(name, ServicePort(port=0), ()), 4, "round-robin",
                     lambda: 0.0)


# --- TCP ---------------------------------------------------------------------------------------


class CaptureTcpFrontend(TcpFrontend):
    """The protocol factory of a transparent (or, `redirected`, a redirect) TCP listener: the
    table comes per connection."""

    def __init__(self, capture: Capture, config: ProxyConfig,
                 connections: set[ClientSide], budget: Budget | None = None,
                 redirected: bool = False) -> None:
        super().__init__(_unmatched_table(), False, config, connections, budget)
        self.capture = capture
        self.redirected = redirected

    def __call__(self) -> ClientSide:
        return CapturedClientSide(self)

    def open(self, client: ClientSide, ep: EndpointInfo) -> socket.socket:
        return self.capture.outbound(socket.SOCK_STREAM, client.client_ip, ep, client.external,
                                     client.table)


class CapturedClientSide(ClientSide):
    __slots__ = ()

    def connection_made(self, transport: Any) -> None:
        fe = self.fe
        assert isinstance(fe, CaptureTcpFrontend)
        if fe.redirected:
            local = original_tcp_destination(transport.get_extra_info("socket"))
        else:
            local = transport.get_extra_info("sockname")
        target = fe.capture.index.lookup("TCP", local[0], local[1]) if local else None
        if target is None:
            self.transport = transport
            self.counters.error(NO_CAPTURE)
            self._closed = True
            reset(transport)
            return
        self.table = target.table
        self.counters = target.table.counters
        self.external = target.external
        super().connection_made(transport)


# --- UDP ---------------------------------------------------------------------------------------


class CapturedFlow(Flow):
    """One UDP client of one original destination: the shared flow lifecycle (proxy/udp.py)
    plus a socket that answers from the Service address (bound to it, connected to the client,
    so the kernel hands it the client's next datagrams). A redirected flow's socket is bound to
    the listener's address the NAT chose instead, and conntrack turns its replies back into the
    Service address's."""

    __slots__ = ("down",)

    def __init__(self, udp: CaptureUdp, key: tuple[Any, Any], table: PortTable,
                 endpoint: EndpointInfo, down: socket.socket, up: socket.socket) -> None:
        super().__init__(udp, key, key[0][0], table, endpoint, up)
        self.down = down

    def reply(self, data: bytes) -> None:
        self.down.send(data)

    def readers(self) -> list[tuple[socket.socket, Callable[[], None]]]:
        return [(self.down, self.from_client), (self.up, self.from_endpoint)]

    def from_client(self) -> None:
        recv = self.down.recv
        for _ in range(READ_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.table.counters.error(UDP_SEND_FAILED)
                return
            self.to_endpoint(data)


class CaptureUdp(FlowTable):
    """A transparent UDP listener: first datagrams of new flows arrive here."""

    transparent = True  # a flow's socket binds the Service address

    def __init__(self, capture: Capture, sock: socket.socket, config: ProxyConfig,
                 budget: Budget | None = None) -> None:
        super().__init__(config, budget)
        self.capture = capture
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data, anc, _flags, client = self.sock.recvmsg(MAX_DATAGRAM, 128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            dst = original_destination(anc)
            if dst is None:
                continue
            key = (client[:2], dst)
            flow = self.flows.get(key)
            if flow is None:
                flow = self._new_flow(key, client[:2], dst)
                if flow is None:
                    continue
            flow.to_endpoint(data)

    def service(self, client: tuple[str, int], dst: tuple[str, int]) -> tuple[str, int] | None:
        """The Service tuple a datagram that reached `dst` was sent to."""
        return dst

    def _new_flow(self, key: tuple[Any, Any], client: tuple[str, int],
                  dst: tuple[str, int]) -> CapturedFlow | None:
        service = self.service(client, dst)
        target = self.capture.index.lookup("UDP", *service) if service else None
        if target is None:
            return None
        table = target.table
        ep = self.admit(table, client[0], target.external)
        if ep is None:
            return None
        family = socket_family(dst[0])
        try:
            down = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as e:
            self.no_socket(table, client[0], e)
            return None
        self.have_sockets(table)
        up: socket.socket | None = None
        try:
            down.setblocking(False)
            down.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            down.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
            if self.transparent:
                _transparent(down, family)
            down.bind(dst)
            down.connect(client)
            up = self.capture.outbound(socket.SOCK_DGRAM, client[0], ep, target.external, table)
            up.connect((ep.ip, ep.port))
        except OSError:
            self.not_connected(table, client[0], down, up)
            return None
        flow = CapturedFlow(self, key, table, ep, down, up)
        self.start(flow)
        return flow

    def close(self) -> None:
        self.drop_all()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class RedirectUdp(CaptureUdp):
    """A redirect listener for UDP: a new flow's Service tuple comes from conntrack, and its
    socket binds the listener's own (local) address."""

    transparent = False

    def service(self, client: tuple[str, int], dst: tuple[str, int]) -> tuple[str, int] | None:
        return self.capture.conntrack.original_destination(socket.IPPROTO_UDP, dst, client)


# --- the capture layer -------------------------------------------------------------------------


class Capture:
    """The kubeshim table, its policy route and the transparent listeners of one node."""

    def __init__(self, config: ProxyConfig, connections: set[ClientSide],
                 nodeport_cidrs: Sequence[str] = (), tcp_budget: Budget | None = None,
                 udp_budget: Budget | None = None) -> None:
        self.config = config
        self.tcp_budget = tcp_budget
        self.udp_budget = udp_budget
        self.connections = connections
        self.listen = ListenPorts(config.capture_port)
        self.rules = Ruleset(self.listen, list(config.cluster_cidrs), list(nodeport_cidrs),
                             list(config.dns_capture))
        self.store = ElementStore()
        self.index = CaptureIndex()
        self.sources = SourcePolicy(config.cluster_cidrs)
        self.servers: list[asyncio.AbstractServer] = []
        self.udp: list[CaptureUdp] = []
        self.families: list[int] = []
        self.transactions = 0
        self.nft = Nft()
        self.conntrack = Conntrack()
        self._steered = False
        self._rewrite = False  # the next flush writes the whole table

    # --- lifecycle ---

    async def start(self, netlink: Any, adopt: bool = False) -> None:
        if self.config.worker:
            return  # listeners once the worker has its state: open_listeners()
        if adopt:
            # The table of the process taken over from keeps capturing until the first flush
            # replaces it whole, in one transaction.
            self._rewrite = True
        else:
            await self._nft(self.rules.full(self.store.current()))
        await netlink.call(policy_routes, True)
        await self.open_listeners()

    async def open_listeners(self) -> None:
        """Join (or open) the transparent listeners' SO_REUSEPORT groups."""
        loop = asyncio.get_running_loop()
        lp, backlog = self.listen, self.config.listen_backlog
        for family, address in ((socket.AF_INET, lp.ipv4), (socket.AF_INET6, lp.ipv6)):
            # The TPROXY listeners on loopback, the redirect listeners on every address.
            wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
            socks: list[socket.socket] = []
            try:
                for host, port in ((address, lp.port), (wildcard, lp.redirect)):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        socks.append(transparent_listener(kind, family, host, port, backlog,
                                                          port == lp.port))
            except OSError as e:
                for sock in socks:
                    sock.close()
                if family == socket.AF_INET6 and e.errno in (errno.EADDRNOTAVAIL,
                                                             errno.EAFNOSUPPORT):
                    log.info("no IPv6 capture", reason=e.strerror)
                    continue
                raise CaptureError(f"cannot listen on port {lp.port} or {lp.redirect}: "
                                   f"{e.strerror}") from None
            for (tcp, udp), redirected in ((socks[:2], False), (socks[2:], True)):
                fe = CaptureTcpFrontend(self, self.config, self.connections, self.tcp_budget,
                                        redirected)
                self.servers.append(await loop.create_server(fe, sock=tcp, backlog=backlog))
                flows = RedirectUdp if redirected else CaptureUdp
                self.udp.append(flows(self, udp, self.config, self.udp_budget))
            self.families.append(6 if family == socket.AF_INET6 else 4)
        log.info("capture ready", table=f"inet {TABLE}", port=lp.port, redirect_port=lp.redirect,
                 families=",".join(map(str, self.families)))

    def steer(self, by_client: bool, processes: int) -> None:
        """Worker processes: choose how the kernel spreads new TCP connections over them
        (the program belongs to the whole SO_REUSEPORT group). Captured UDP is looked up
        without the packet, so its first datagrams always go by the 4-tuple hash."""
        if by_client == self._steered:
            return
        for server in self.servers:
            for sock in getattr(server, "sockets", ()):
                if by_client:
                    steer_by_client(sock, sock.family, processes)
                else:
                    steer_by_hash(sock)
        self._steered = by_client
        log.info("worker steering", by="client address" if by_client else "connection hash")

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for udp in self.udp:
            udp.close()
        self.servers.clear()
        self.udp.clear()
        self.conntrack.close()

    async def stop(self, netlink: Any) -> None:
        """Remove the table and the policy route (after the drain)."""
        self.close_listeners()
        if self.config.worker:
            return
        try:
            await self._nft(f"delete table inet {TABLE}\n")
        except CaptureError as e:
            log.warning("cannot remove the capture table", reason=str(e))
        await netlink.call(policy_routes, False)

    # --- rules ---

    def set_service(self, key: NamespacedName, entries: Sequence[CaptureEntry],
                    cluster_ips: Sequence[str]) -> None:
        self.store.replace(key, elements_of(entries, cluster_ips))

    async def flush(self) -> bool:
        """Apply the pending element changes as one transaction; True when applied."""
        text = self.store.pending()
        if self._rewrite:
            text = self.rules.full(self.store.current())
        if not text or self.config.worker:  # a worker's control process writes the table
            self.store.applied()
            return True
        try:
            await self._nft(text)
        except CaptureError as e:
            # The transaction changed nothing: write the whole table as it should be.
            log.error("capture transaction failed, rewriting the table", reason=str(e))
            try:
                await self._nft(self.rules.full(self.store.current()))
            except CaptureError as e2:
                log.error("cannot write the capture table", reason=str(e2))
                return False
        self.store.applied()
        self._rewrite = False
        return True

    async def _nft(self, text: str) -> None:
        # On a thread: the whole table of 10k Services takes a quarter of a second to parse.
        # (Without libnftables, subprocess spawns `nft` with vfork there: forking the daemon
        # itself copies the page tables of a large state, about 0.1 s per transaction.)
        rc, err = await asyncio.get_running_loop().run_in_executor(None, self.nft.run, text)
        self.transactions += 1
        if rc != 0:
            raise CaptureError(err or f"nft exited {rc}")

    # --- outbound ---

    def outbound(self, kind: int, client: str, ep: EndpointInfo, external: bool,
                 table: PortTable) -> socket.socket:
        """A non-blocking socket to `ep` that the table never captures, bound to the client's
        address where kube-proxy would keep it. Refuses an endpoint that is itself a captured
        Service address."""
        if ep.ip in self.index.addresses:
            raise OSError(errno.ELOOP, f"endpoint {ep.ip} is a captured Service address")
        family = socket_family(ep.ip)
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
            source = self.sources.source(client, ep.ip, external, table)
            if source is not None and socket_family(source) == family:
                _transparent(sock, family)
                sock.bind((source, 0))
        except BaseException:
            sock.close()
            raise
        return sock


def policy_routes(add: bool) -> None:
    """fwmark CAPTURE_MARK -> a table whose default route is local (the TPROXY recipe), for both
    families; removes them when `add` is False. Runs on the netlink thread (iproute2 here:
    pyroute2 builds no `local` default route)."""
    for version, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        rule = [version, "rule", "{}", "fwmark", hex(CAPTURE_MARK), "lookup", str(ROUTE_TABLE),
                "priority", "100"]
        route = [version, "route", "{}", "local", default, "dev", "lo", "table", str(ROUTE_TABLE)]
        # A stale rule from an earlier run goes first, so there is exactly one.
        while _ip(rule, "del") == "":
            pass
        if not add:
            _ip(route, "del")
            continue
        for what, argv in (("rule", rule), ("route", route)):
            err = _ip(argv, "add" if what == "rule" else "replace")
            if err and not (version == "-6" and "not supported" in err.lower()):
                raise CaptureError(f"cannot add the capture policy {what}: {err}")


def _ip(argv: list[str], op: str) -> str:
    """Run `ip` with `op` in place of "{}"; "" on success, else the error it printed."""
    import subprocess

    try:
        out = subprocess.run(["ip", *(op if a == "{}" else a for a in argv)],
                             capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return e.strerror or str(e)
    return "" if out.returncode == 0 else (out.stderr.strip() or f"ip exited {out.returncode}")
