"""Whether SCTP Service ports can be served here, and the reason given when they cannot.

A user-space proxy needs the kernel's SCTP sockets (IPPROTO_SCTP); kernels built without SCTP,
or without the sctp module loaded, refuse to create them. kubeshim forwards TCP and UDP only,
so an SCTP port is always reported unserved; the reason says which of the two applies.
"""

from __future__ import annotations

import functools
import socket


@functools.cache
def kernel_sctp_error() -> str | None:
    """Why this kernel cannot open SCTP sockets, or None when it can (probed once)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def sctp_problem() -> str:
    """The status/log reason of an SCTP Service port."""
    error = kernel_sctp_error()
    if error is not None:
        return (f"SCTP port not served: this kernel has no SCTP (socket(IPPROTO_SCTP): {error}; "
                "load the sctp module); the Service's TCP and UDP ports are served")
    return ("SCTP port not served: kubeshim forwards TCP and UDP only; the Service's TCP and "
            "UDP ports are served")
