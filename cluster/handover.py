"""Listening sockets handed from a running kubeshim to the one taking over from it.

A restart without a gap (`kubeshim run --takeover`) moves every listening socket the daemon owns
(proxy listeners, transparent capture listeners, DNS over UDP and TCP, ops endpoints) to the new
process as a descriptor over a unix socket (SCM_RIGHTS). Both processes then hold the same
kernel sockets: nothing is closed or rebound, so no SYN, queued connection or datagram is lost,
and whichever process reads first answers. The old process stops reading once the new one says
it is ready, and drains.

This module owns the two ends that need no knowledge of which component made a socket:
`listening_sockets()` finds them among the process's descriptors (TCP sockets in LISTEN, bound
unconnected UDP sockets), and `take()` gives a component the inherited socket for the address
it is about to bind, instead of a new one. Whatever no component takes is closed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

SocketKey = tuple[int, str, int]  # (SOCK_STREAM | SOCK_DGRAM, address, port)

_inherited: dict[SocketKey, socket.socket] = {}


def key_of(kind: int, host: str, port: int) -> SocketKey:
    with contextlib.suppress(ValueError):
        host = ipaddress.ip_address(host.split("%")[0]).compressed
    return (kind, host, port)


def _describe(sock: socket.socket) -> SocketKey | None:
    """The key of a socket worth handing over, or None."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if not name[1]:
        return None  # unbound
    if sock.type == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
    elif sock.type == socket.SOCK_DGRAM:
        try:
            sock.getpeername()
            return None  # a connected flow or upstream socket, not a listener
        except OSError:
            pass
    else:
        return None
    return key_of(sock.type, name[0], name[1])


def listening_sockets() -> dict[SocketKey, socket.socket]:
    """Duplicates of this process's listening sockets, by address (the caller closes them)."""
    found: dict[SocketKey, socket.socket] = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(entry)))
        except OSError:
            continue  # not a socket, or closed meanwhile
        key = _describe(sock)
        if key is None or key in found:
            sock.close()
        else:
            sock.setblocking(False)
            found[key] = sock
    return found


def offer(sockets: dict[SocketKey, socket.socket]) -> None:
    """Sockets received from the previous process, for components to take."""
    _inherited.update(sockets)


def take(kind: int, host: str, port: int) -> socket.socket | None:
    """The inherited socket bound to (host, port) for `kind`, if there is one."""
    return _inherited.pop(key_of(kind, host, port), None)


def close_leftovers() -> list[SocketKey]:
    """Close what no component took; returns their keys."""
    keys = list(_inherited)
    for sock in _inherited.values():
        with contextlib.suppress(OSError):
            sock.close()
    _inherited.clear()
    return keys
