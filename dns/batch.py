"""Batched UDP serving: recvmmsg(2) in, sendmmsg(2) out, one system call per batch of queries.

Owns one UDP socket per bind, its preallocated message arrays and the send queue. Under load a
client keeps many queries outstanding; reading them with one recvmmsg and answering the ready
ones with one sendmmsg pays the per-syscall cost once per batch instead of once per datagram.

The arrays are allocated once per socket: BATCH message headers, each with one iovec over its
own 64 KiB slot (a whole UDP payload, so a datagram is never cut short) and its own
sockaddr_storage. A reply is written over its query in the same slot and goes back to the
address recvmmsg stored there: no address is decoded on the answered path. A query whose exact
bytes were answered before is served in the loop itself (`DNSServer.answer`'s first level: the
stored reply goes after the query's id, already in place); every other goes through `answer`.
Replies that are not ready at once (forwarded names) and the rest of a partial sendmmsg go
through `sendto`, which queues behind EAGAIN and drains when the socket is writable.

Python's socket module has neither call, so they come from libc through ctypes; `available()`
says whether they exist here (else the server keeps its DatagramProtocol path).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import mmap
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeshim.dns.server import DNSServer
    from kubeshim.dns.wire import Query

BATCH = 64  # datagrams per recvmmsg / sendmmsg
ROUNDS = 8  # batches read per wakeup before other callbacks get their turn
SLOT = 65536  # bytes per datagram slot: the largest UDP payload fits
SOCKADDR = 128  # sizeof(struct sockaddr_storage)
SEND_QUEUE = 4096  # replies held while the socket's send buffer is full; beyond, dropped


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


_HDR = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IOVec)
_LEN_AT = _MMsgHdr.msg_len.offset
_NAMELEN_AT = _MsgHdr.msg_namelen.offset
_IOV_LEN_AT = _IOVec.iov_len.offset
_U32 = struct.Struct("@I")
_SIZE = struct.Struct("@N")  # size_t
_PTR = struct.Struct("@P")


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


_CALLS = _load() if sys.platform.startswith("linux") else None


def available() -> bool:
    """True when libc has recvmmsg and sendmmsg (Linux, glibc or musl)."""
    return _CALLS is not None


async def open_batched(server: DNSServer, host: str, port: int) -> BatchedUDP:
    """A non-blocking UDP socket bound to (host, port), served in batches on the running loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    error: OSError | None = None
    for family, type_, proto, _name, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        return BatchedUDP(server, sock, loop)
    raise error or OSError(f"cannot bind UDP on {host}:{port}")


class BatchedUDP:
    """One UDP socket answered in batches; also the transport forwarded replies leave by."""

    def __init__(
        self, server: DNSServer, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        assert _CALLS is not None, "recvmmsg/sendmmsg are not available"
        self._recvmmsg, self._sendmmsg = _CALLS
        self.server = server
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.closing = False
        self.largest_batch = 0  # most datagrams one recvmmsg returned (for status and tests)
        self.batches = 0  # recvmmsg calls that returned datagrams
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        # Payload slots: anonymous memory, only the pages datagrams touch are ever committed.
        self._slots = mmap.mmap(-1, BATCH * SLOT)
        self._names = bytearray(BATCH * SOCKADDR)
        self._iovs = bytearray(BATCH * _IOV)
        self._hdrs = bytearray(BATCH * _HDR)
        self._views = (
            ctypes.c_char.from_buffer(self._slots),
            (ctypes.c_char * len(self._names)).from_buffer(self._names),
            (_IOVec * BATCH).from_buffer(self._iovs),
            (_MMsgHdr * BATCH).from_buffer(self._hdrs),
        )
        slots, names, iovs, hdrs = (ctypes.addressof(v) for v in self._views)
        self._names_at, self._iovs_at, self._hdrs_at = names, iovs, hdrs
        iov_array = self._views[2]
        hdr_array = self._views[3]
        for i in range(BATCH):
            iov_array[i].iov_base = slots + i * SLOT
            iov_array[i].iov_len = SLOT
            msg = hdr_array[i].msg_hdr
            msg.msg_name = names + i * SOCKADDR
            msg.msg_namelen = SOCKADDR
            msg.msg_iov = iovs + i * _IOV
            msg.msg_iovlen = 1
        # recvmmsg overwrites name lengths and sendmmsg needs reply lengths: after each round
        # the entries it used are restored from these pristine copies.
        self._hdrs_template = memoryview(bytes(self._hdrs))
        self._iovs_template = memoryview(bytes(self._iovs))
        loop.add_reader(self.fd, self._on_readable)

    # --- transport surface (what the server and forwarded replies use) ---------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        if name == "sockname":
            return self.sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.remove_reader(self.fd)
        if self._queue:
            self.loop.remove_writer(self.fd)
            self._queue.clear()
        self.sock.close()

    def sendto(self, packet: bytes, addr: Any) -> None:
        """Send one reply now, or queue it behind a full send buffer (dropped past SEND_QUEUE)."""
        if self.closing:
            return
        if self._queue:
            if len(self._queue) < SEND_QUEUE:
                self._queue.append((packet, addr))
            return
        try:
            self.sock.sendto(packet, addr)
        except (BlockingIOError, InterruptedError):
            self._queue.append((packet, addr))
            self.loop.add_writer(self.fd, self._on_writable)
        except OSError:
            pass  # a client that went away (or a filter refusing it): as error_received, ignore

    # --- serving ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        hdrs, iovs = self._hdrs, self._iovs
        for _ in range(ROUNDS):
            n = self._recvmmsg(self.fd, self._hdrs_at, BATCH, socket.MSG_DONTWAIT, None)
            if n <= 0:
                return  # EAGAIN (drained), or an error queued by ICMP: nothing to read now
            try:
                self._answer_batch(n)
            finally:
                # Back to pristine for the next recvmmsg. Slice copies, not ctypes.memmove:
                # a foreign call costs more than these bytes.
                hdrs[: n * _HDR] = self._hdrs_template[: n * _HDR]
                iovs[: n * _IOV] = self._iovs_template[: n * _IOV]
            if n < BATCH:
                return

    def _answer_batch(self, n: int) -> None:
        """Answer the n datagrams recvmmsg stored; send the ready replies with one sendmmsg."""
        server = self.server
        server.metrics.requests_udp += n
        self.batches += 1
        if n > self.largest_batch:
            self.largest_batch = n
        answer = server.answer
        answered = server.answers.entries  # cleared in place, never replaced
        rcodes = server.metrics.rcodes
        slots, hdrs, iovs = self._slots, self._hdrs, self._iovs
        u32, size_t = _U32, _SIZE
        ready = 0  # replies gathered at the front of the header array
        hits = 0
        for i in range(n):
            at = i * SLOT
            data = slots[at : at + u32.unpack_from(hdrs, i * _HDR + _LEN_AT)[0]]
            entry = answered.get(data[2:])
            if entry is not None:
                # DNSServer.answer's first level, inlined: the reply after the id goes right
                # after the query's id, which is already in place in the slot.
                hits += 1
                rcodes[entry[1]] += 1
                size = len(entry[0]) + 2
                slots[at + 2 : at + size] = entry[0]
                size_t.pack_into(iovs, i * _IOV + _IOV_LEN_AT, size)
                if i != ready:
                    h = i * _HDR
                    hdrs[ready * _HDR : ready * _HDR + _HDR] = hdrs[h : h + _HDR]
                ready += 1
                continue
            out = answer(data, False)
            if out.__class__ is bytes:
                size = len(out)
                if size > SLOT:
                    self.sendto(out, self._address(i))
                    continue
                slots[at : at + size] = out
                size_t.pack_into(iovs, i * _IOV + _IOV_LEN_AT, size)
                if i != ready:
                    # An earlier datagram got no reply here: move this header up; it still
                    # points at its own slot and address.
                    h = i * _HDR
                    hdrs[ready * _HDR : ready * _HDR + _HDR] = hdrs[h : h + _HDR]
                ready += 1
            elif out is not None:
                self._slow(out, self._address(i))  # type: ignore[arg-type]
        server.answer_hits += hits
        if ready:
            self._send_ready(ready)

    def _slow(self, query: Query, addr: Any) -> None:
        server = self.server
        if server.saturated():
            self.sendto(server.refuse(query), addr)
        else:
            server.spawn(self._forward(query, addr))

    async def _forward(self, query: Query, addr: Any) -> None:
        packet = await self.server.forward(query, False)
        self.sendto(packet, addr)

    def _send_ready(self, count: int) -> None:
        if self._queue:
            sent = 0  # keep the order behind replies already waiting
        else:
            sent = self._sendmmsg(self.fd, self._hdrs_at, count, socket.MSG_DONTWAIT)
            if sent == count:
                return
            if sent < 0:
                # The first message failed: EAGAIN queues them all; any other error (a vanished
                # client's address, a filter) is that message's alone, the rest are retried.
                sent = 0 if ctypes.get_errno() in (errno.EAGAIN, errno.EINTR) else 1
        # Rare: the send buffer filled (or one message failed) part way. The rest go one by one.
        hdrs = self._hdrs
        for k in range(sent, count):
            h = k * _HDR
            name = _PTR.unpack_from(hdrs, h)[0]
            i = (name - self._names_at) // SOCKADDR
            size = _SIZE.unpack_from(self._iovs, i * _IOV + _IOV_LEN_AT)[0]
            self.sendto(self._slots[i * SLOT : i * SLOT + size], self._address_at(h, i))

    def _on_writable(self) -> None:
        queue = self._queue
        while queue:
            packet, addr = queue[0]
            try:
                self.sock.sendto(packet, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            queue.popleft()
        self.loop.remove_writer(self.fd)

    # --- addresses (only off the answered path) -------------------------------------------------

    def _address(self, i: int) -> Any:
        return self._address_at(i * _HDR, i)

    def _address_at(self, h: int, i: int) -> Any:
        namelen = _U32.unpack_from(self._hdrs, h + _NAMELEN_AT)[0]
        return sockaddr(bytes(self._names[i * SOCKADDR : i * SOCKADDR + namelen]))


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
