"""The runtime objects of the proxy: the sockets a Service holds and what it last asked for.

`ServiceRuntime` is the proxier's record of one Service (its listeners, addresses, capture
entries and errors); `Listener` is one open socket serving one ListenerSpec. The sync in
proxier.py is the only writer of both.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, field

from kubeshim.cluster.model import NamespacedName, ServicePortName
from kubeshim.cluster.state import ServiceInfo
from kubeshim.proxy.capture import CaptureEntry
from kubeshim.proxy.listeners import ListenerKey, ListenerSpec
from kubeshim.proxy.table import PortTable
from kubeshim.proxy.tcp import TcpFrontend
from kubeshim.proxy.udp import UdpFrontend

TableKey = tuple[ServicePortName, int]  # (service port, IP family)


class Listener:
    """One open socket serving one ListenerSpec."""

    def __init__(self, spec: ListenerSpec, table: PortTable) -> None:
        self.spec = spec
        self.table = table
        self.server: asyncio.AbstractServer | None = None
        self.tcp: TcpFrontend | None = None
        self.udp: UdpFrontend | None = None

    def retarget(self, spec: ListenerSpec, table: PortTable) -> None:
        """Serve another spec on the same socket (e.g. a renamed port): no close and rebind."""
        if self.udp is not None:
            self.udp.drop_all()  # flows belong to the old table
        self.spec = spec
        self.table = table
        frontend = self.tcp or self.udp
        assert frontend is not None
        frontend.table = table
        frontend.external = spec.external

    def close(self) -> None:
        # Closing a TCP server stops accepting; established connections carry on.
        if self.server is not None:
            self.server.close()
        if self.udp is not None:
            self.udp.close()


@dataclass
class ServiceRuntime:
    key: NamespacedName
    info: ServiceInfo | None = None
    listeners: dict[ListenerKey, Listener] = field(default_factory=dict)
    desired: dict[ListenerKey, ListenerSpec] = field(default_factory=dict)
    vips: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)  # what -> why
    ports: set[TableKey] = field(default_factory=set)  # its entries in Proxier.tables
    capture: list[CaptureEntry] = field(default_factory=list)  # tproxy mode
    endpoint_ips: set[str] = field(default_factory=set)  # tproxy mode: for capture loops
    retries: int = 0


def bind_error(e: OSError, spec: ListenerSpec) -> str:
    k = spec.key
    if e.errno == errno.EADDRINUSE:
        return f"{k} is already in use by another socket"
    if e.errno == errno.EACCES:
        return (f"{k}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE "
                "(or sysctl net.ipv4.ip_unprivileged_port_start=0)")
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{k}: address {k.ip} is not assigned on this node"
    return f"{k}: {e.strerror or e}"
