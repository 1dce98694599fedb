"""Address helpers every layer shares: an address's family, and an address printed with a port.

Addresses reach these helpers already validated (decoded by cluster/model.py or parsed from the
configuration), and only IPv6 text contains a colon (RFC 4291 section 2.2), so the family is that
test. A scoped IPv6 address (fe80::1%eth0) keeps its scope.
"""

from __future__ import annotations

import socket


def ip_family(ip: str) -> int:
    """4 or 6."""
    return 6 if ":" in ip else 4


def socket_family(ip: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6, for a socket that binds or connects to `ip`."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def join_host_port(host: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80' (Go's net.JoinHostPort)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
