"""recvmmsg(2) and sendmmsg(2) through libc (ctypes): the calls and their message arrays.

Owns the foreign plumbing only; batch.py serves DNS with it. Python's socket module has neither
call, so they come from libc; `available()` says whether they exist here.

`MessageArrays` allocates, once per socket, BATCH message headers, each with one iovec over its
own 64 KiB slot (a whole UDP payload, so a datagram is never cut short) and its own
sockaddr_storage. recvmmsg overwrites name lengths and sendmmsg needs reply lengths: after each
round `restore(n)` copies the first n entries back from pristine templates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import socket
import struct
import sys
from typing import Any

BATCH = 64  # datagrams per recvmmsg / sendmmsg
SLOT = 65536  # bytes per datagram slot: the largest UDP payload fits
SOCKADDR = 128  # sizeof(struct sockaddr_storage)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


HDR = ctypes.sizeof(_MMsgHdr)
IOV = ctypes.sizeof(_IOVec)
LEN_AT = _MMsgHdr.msg_len.offset
NAMELEN_AT = _MsgHdr.msg_namelen.offset
IOV_LEN_AT = _IOVec.iov_len.offset
U32 = struct.Struct("@I")
SIZE = struct.Struct("@N")  # size_t
PTR = struct.Struct("@P")


def _load() -> tuple[Any, Any] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fd, vec, count, flags, ptr = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    recvmmsg.argtypes = [fd, vec, count, flags, ptr]  # the last: timeout, always NULL
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [fd, vec, count, flags]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


CALLS = _load() if sys.platform.startswith("linux") else None


def available() -> bool:
    """True when libc has recvmmsg and sendmmsg (Linux, glibc or musl)."""
    return CALLS is not None


def errno() -> int:
    return ctypes.get_errno()


class MessageArrays:
    """BATCH mmsghdrs, iovecs, 64 KiB payload slots and sockaddr slots, wired together."""

    def __init__(self) -> None:
        # Payload slots: anonymous memory, only the pages datagrams touch are ever committed.
        self.slots = mmap.mmap(-1, BATCH * SLOT)
        self.names = bytearray(BATCH * SOCKADDR)
        self.iovs = bytearray(BATCH * IOV)
        self.hdrs = bytearray(BATCH * HDR)
        self._views = (
            ctypes.c_char.from_buffer(self.slots),
            (ctypes.c_char * len(self.names)).from_buffer(self.names),
            (_IOVec * BATCH).from_buffer(self.iovs),
            (_MMsgHdr * BATCH).from_buffer(self.hdrs),
        )
        slots, names, iovs, hdrs = (ctypes.addressof(v) for v in self._views)
        self.names_at, self.hdrs_at = names, hdrs
        iov_array = self._views[2]
        hdr_array = self._views[3]
        for i in range(BATCH):
            iov_array[i].iov_base = slots + i * SLOT
            iov_array[i].iov_len = SLOT
            msg = hdr_array[i].msg_hdr
            msg.msg_name = names + i * SOCKADDR
            msg.msg_namelen = SOCKADDR
            msg.msg_iov = iovs + i * IOV
            msg.msg_iovlen = 1
        self._hdrs_template = memoryview(bytes(self.hdrs))
        self._iovs_template = memoryview(bytes(self.iovs))

    def restore(self, n: int) -> None:
        """Back to pristine for the next recvmmsg. Slice copies, not ctypes.memmove: a foreign
        call costs more than these bytes."""
        self.hdrs[: n * HDR] = self._hdrs_template[: n * HDR]
        self.iovs[: n * IOV] = self._iovs_template[: n * IOV]

    def packed_address(self, i: int) -> bytes:
        """The source address of datagram i, packed (4 or 16 bytes; an IPv4-mapped IPv6
        address as its IPv4 form)."""
        at = i * SOCKADDR
        names = self.names
        if int.from_bytes(names[at : at + 2], sys.byteorder) == socket.AF_INET:
            return bytes(names[at + 4 : at + 8])
        raw = bytes(names[at + 8 : at + 24])
        return raw[12:] if raw[:12] == _V4_MAPPED else raw

    def address(self, h: int, i: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """The source address of the datagram in slot i, whose header is at offset h."""
        namelen = U32.unpack_from(self.hdrs, h + NAMELEN_AT)[0]
        return sockaddr(bytes(self.names[i * SOCKADDR : i * SOCKADDR + namelen]))


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def sockaddr(raw: bytes) -> tuple[str, int] | tuple[str, int, int, int]:
    """A struct sockaddr_in / sockaddr_in6 as the address tuple Python's socket module uses."""
    family = int.from_bytes(raw[0:2], sys.byteorder)  # sa_family_t, host order
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope_id = int.from_bytes(raw[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id
    raise ValueError(f"unsupported address family {family} in a received datagram's address")
