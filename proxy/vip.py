"""Where service addresses are served: the VIP interface (netlink) or the loopback mapping.

Interface mode assigns ClusterIPs, externalIPs and LoadBalancer ingress IPs to a dedicated
interface, like IPVS mode's kube-ipvs0: a dummy device, or a bridge without ports on kernels
without the dummy driver (a port-less bridge that is up still delivers traffic for its own
addresses locally). Addresses are /32 and /128 so no route to the service CIDR appears.

Loopback mode needs no privileges: each address maps to one in 127.64.0.0/10 that keeps the low
22 bits, so addresses of one service CIDR never collide (kube-apiserver caps an IPv4 service
range at /12, i.e. 20 host bits). 10.96.0.10 maps to 127.96.0.10.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import ip_family

log = get_logger("proxy")

LOOPBACK_BASE = int(ipaddress.IPv4Address("127.64.0.0"))
LOOPBACK_HOST_BITS = 22


T = TypeVar("T")
_thread = threading.local()


def _iproute() -> Any:
    """An IPRoute for the calling thread. pyroute2's sync API drives its own asyncio loop, which
    cannot nest inside a running loop and cannot be uvloop (no AF_NETLINK there): netlink work
    runs on `NetlinkWorker`'s thread with a plain selector loop."""
    from pyroute2 import IPRoute

    loop = getattr(_thread, "loop", None)
    if loop is None:
        loop = _thread.loop = asyncio.SelectorEventLoop()
    return IPRoute(use_event_loop=loop)


class NetlinkWorker:
    """One thread that performs every netlink call, awaited from the event loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kubeshim-netlink")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class VipError(Exception):
    """An address that cannot be served; the message says what and why."""


class LoopbackMapper:
    """ClusterIP -> bindable loopback address, a pure function of the address."""

    def address(self, ip: str) -> str:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if addr.version == 6:
            # ::1 is the only IPv6 loopback address; there is nothing to map onto.
            return ip
        if addr.is_loopback:
            return ip
        low = int(addr) & ((1 << LOOPBACK_HOST_BITS) - 1)
        return str(ipaddress.IPv4Address(LOOPBACK_BASE | low))

    def check(self, ip: str) -> None:
        if ipaddress.ip_address(ip).version == 6:
            raise VipError(
                f"IPv6 address {ip} cannot be served in loopback mode (::1 is the only IPv6 "
                "loopback address); run as root with --vip-mode interface"
            )


class InterfaceVips:
    """Addresses on the VIP interface, created on start; only this object edits it."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.kind = ""
        self._ipr: Any = None
        self._index = 0
        self.assigned: set[str] = set()

    def prepare(self, adopt: bool = False) -> None:
        """Create the interface if missing (dummy, else port-less bridge); drop stale addresses,
        or, when taking over from a running kubeshim (`adopt`), keep them as assigned: they
        carry its traffic until this process serves the same addresses.

        This and the other methods run on the NetlinkWorker thread."""
        from pyroute2.netlink.exceptions import NetlinkError

        self._ipr = _iproute()
        found = self._ipr.link_lookup(ifname=self.ifname)
        if not found:
            for kind in ("dummy", "bridge"):
                try:
                    self._ipr.link("add", ifname=self.ifname, kind=kind)
                    self.kind = kind
                    break
                except NetlinkError as e:
                    log.debug("vip interface kind unavailable", kind=kind, reason=e.args[-1])
            else:
                raise VipError(f"cannot create interface {self.ifname} (no dummy or bridge driver)")
            found = self._ipr.link_lookup(ifname=self.ifname)
        else:
            self.kind = "existing"
        self._index = found[0]
        self._ipr.link("set", index=self._index, state="up")
        stale = [
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in self._ipr.get_addr(index=self._index)
            if a["scope"] == 0  # global scope; the kernel's own link-local ones stay
        ]
        if adopt:
            self.assigned.update(ip for ip, _ in stale)
            stale = []
        for ip, prefix in stale:
            self._ipr.addr("del", index=self._index, address=ip, prefixlen=prefix)
        if stale:
            log.info("removed stale service addresses", interface=self.ifname, count=len(stale))
        log.info("vip interface ready", interface=self.ifname, kind=self.kind)

    def add(self, ip: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        if ip in self.assigned:
            return
        v6 = ip_family(ip) == 6
        try:
            # IFA_F_NODAD (0x02): no duplicate address detection, so a v6 VIP is bindable at once.
            self._ipr.addr("add", index=self._index, address=ip, prefixlen=128 if v6 else 32,
                           **({"flags": 0x02} if v6 else {}))
        except NetlinkError as e:
            if e.code != 17:  # EEXIST
                raise VipError(f"cannot assign {ip} to {self.ifname}: {e.args[-1]}") from None
        self.assigned.add(ip)

    def remove(self, ip: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        if ip not in self.assigned:
            return
        self.assigned.discard(ip)
        v6 = ip_family(ip) == 6
        try:
            self._ipr.addr("del", index=self._index, address=ip, prefixlen=128 if v6 else 32)
        except NetlinkError as e:
            log.warning("cannot remove service address", address=ip, reason=e.args[-1])

    def close(self, delete_interface: bool = True) -> None:
        for ip in list(self.assigned):
            self.remove(ip)
        if delete_interface and self.kind in ("dummy", "bridge") and self._index:
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                self._ipr.link("del", index=self._index)
            except NetlinkError as e:
                log.warning("cannot delete vip interface", interface=self.ifname,
                            reason=e.args[-1])
        self._ipr.close()


def remove_interface(ifname: str) -> bool:
    """Delete a VIP interface left by an interface-mode run (its Service addresses would still
    answer ARP and reach host sockets); True if there was one."""
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])
    return bool(found)


# --- node addresses (NodePorts) -------------------------------------------------------------


def local_addresses(exclude_ifname: str = "") -> list[tuple[str, str]]:
    """(address, interface name) of every address on this host / namespace."""
    out: list[tuple[str, str]] = []
    with _iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            name = names.get(a["index"], "")
            if name == exclude_ifname:
                continue
            ip = a.get_attr("IFA_ADDRESS")
            if a["family"] == socket.AF_INET6 and ipaddress.ip_address(ip).is_link_local:
                continue  # needs a scope id; kube-proxy skips these too
            out.append((ip, name))
    return out


RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class AddressWatch:
    """Calls `changed` on the event loop when an address of this host comes or goes (rtnetlink's
    address multicast groups; the messages are not parsed: the caller reads the addresses
    again)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, changed: Callable[[], None]) -> None:
        self._loop = loop
        self._changed = changed
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        try:
            self._sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except BaseException:
            self._sock.close()
            raise
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # ENOBUFS: messages were lost, which a full read covers anyway
        self._changed()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def local_networks(exclude_ifname: str = "") -> list[str]:
    """The on-link networks of this host's addresses (wider than /32 and /128)."""
    out: set[str] = set()
    with _iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            if names.get(a["index"], "") == exclude_ifname:
                continue
            net = ipaddress.ip_network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}",
                                       strict=False)
            if net.num_addresses > 1 and not net.is_loopback:
                out.add(str(net))
    return sorted(out)


def primary_addresses(addresses: Iterable[tuple[str, str]]) -> list[str]:
    """The node's primary IPs: the first global address of each family on the interface of a
    default route, else the first global (non-loopback) address of each family."""
    addresses = list(addresses)
    default_ifs: set[int] = set()
    with _iproute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_default_routes(family=family):
                if (oif := r.get_attr("RTA_OIF")) is not None:
                    default_ifs.add(oif)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    default_names = {names.get(i) for i in default_ifs}
    out: list[str] = []
    for version in (4, 6):
        ips = [(ip, n) for ip, n in addresses if ipaddress.ip_address(ip).version == version
               and not ipaddress.ip_address(ip).is_loopback]
        pick = [ip for ip, n in ips if n in default_names] or [ip for ip, _ in ips]
        if pick:
            out.append(pick[0])
    return out


def nodeport_addresses(spec: list[str], exclude_ifname: str = "") -> list[str]:
    """kube-proxy's nodePortAddresses: empty = every node address; else addresses in the
    listed CIDRs, plus the primary IPs for the word "primary". Raises ValueError on a bad CIDR."""
    addresses = local_addresses(exclude_ifname)
    if not spec:
        return sorted({ip for ip, _ in addresses})
    chosen: set[str] = set()
    for item in spec:
        if item == "primary":
            chosen.update(primary_addresses(addresses))
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"nodePortAddresses: {item!r} is not a CIDR or 'primary'") from None
        chosen.update(ip for ip, _ in addresses if ipaddress.ip_address(ip) in net)
    return sorted(chosen)
