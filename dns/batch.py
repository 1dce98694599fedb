"""Batched UDP serving: recvmmsg(2) in, sendmmsg(2) out, one system call per batch of queries.

Owns one UDP socket per bind and its send queue; the message arrays and the libc calls are
mmsg.py's. Under load a client keeps many queries outstanding; reading them with one recvmmsg
and answering the ready ones with one sendmmsg pays the per-syscall cost once per batch instead
of once per datagram.

A reply is written over its query in the same slot and goes back to the address recvmmsg
stored there: no address is decoded on the answered path. A query whose exact bytes were
answered before is served in the loop itself (the handler's first level, `Serving.exact`: the
stored reply goes after the query's id, already in place); every other goes through
`Serving.answer`. With a client gate (allow-list, rate limit) every datagram goes through
`answer` with its packed source address. Replies that are not ready at once (forwarded names)
and the rest of a partial sendmmsg go through `sendto`, which queues behind EAGAIN and drains
when the socket is writable.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
from collections.abc import Callable
from typing import Any

from kubeshim.dns import mmsg
from kubeshim.dns.handler import ForwardRequest, Serving
from kubeshim.dns.mmsg import BATCH, HDR, IOV, IOV_LEN_AT, LEN_AT, PTR, SIZE, SLOT, SOCKADDR, U32

ROUNDS = 8  # batches read per wakeup before other callbacks get their turn
SEND_QUEUE = 4096  # replies held while the socket's send buffer is full; beyond, dropped

available = mmsg.available


class BatchedUDP:
    """One UDP socket answered in batches; also the transport forwarded replies leave by."""

    def __init__(
        self, serving: Serving, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        assert mmsg.CALLS is not None, "recvmmsg/sendmmsg are not available"
        self._recvmmsg, self._sendmmsg = mmsg.CALLS
        self.serving = serving
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.closing = False
        self.largest_batch = 0  # most datagrams one recvmmsg returned (for status and tests)
        self.batches = 0  # recvmmsg calls that returned datagrams
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._arrays = mmsg.MessageArrays()
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
        arrays = self._arrays
        for _ in range(ROUNDS):
            n = self._recvmmsg(self.fd, arrays.hdrs_at, BATCH, socket.MSG_DONTWAIT, None)
            if n <= 0:
                return  # EAGAIN (drained), or an error queued by ICMP: nothing to read now
            try:
                self._answer_batch(n)
            finally:
                arrays.restore(n)
            if n < BATCH:
                return

    def _answer_batch(self, n: int) -> None:
        """Answer the n datagrams recvmmsg stored; send the ready replies with one sendmmsg."""
        serving = self.serving
        metrics = serving.metrics
        metrics.requests_udp += n
        self.batches += 1
        if n > self.largest_batch:
            self.largest_batch = n
        answer = serving.answer
        gated = serving.gated
        answered = serving.exact  # cleared in place, never replaced
        rcodes = metrics.rcodes
        arrays = self._arrays
        slots, hdrs, iovs = arrays.slots, arrays.hdrs, arrays.iovs
        u32, size_t = U32, SIZE
        ready = 0  # replies gathered at the front of the header array
        hits = 0
        for i in range(n):
            at = i * SLOT
            data = slots[at : at + u32.unpack_from(hdrs, i * HDR + LEN_AT)[0]]
            client = None
            if gated:
                client = arrays.packed_address(i)
            else:
                entry = answered.get(data[2:])
                if entry is not None:
                    # The handler's first level, inlined: the reply after the id goes right
                    # after the query's id, which is already in place in the slot.
                    hits += 1
                    rcodes[entry[1]] += 1
                    size = len(entry[0]) + 2
                    slots[at + 2 : at + size] = entry[0]
                    size_t.pack_into(iovs, i * IOV + IOV_LEN_AT, size)
                    if i != ready:
                        h = i * HDR
                        hdrs[ready * HDR : ready * HDR + HDR] = hdrs[h : h + HDR]
                    ready += 1
                    continue
            out = answer(data, False, client)
            if type(out) is bytes:
                size = len(out)
                if size > SLOT:
                    self.sendto(out, self._address(i))
                    continue
                slots[at : at + size] = out
                size_t.pack_into(iovs, i * IOV + IOV_LEN_AT, size)
                if i != ready:
                    # An earlier datagram got no reply here: move this header up; it still
                    # points at its own slot and address.
                    h = i * HDR
                    hdrs[ready * HDR : ready * HDR + HDR] = hdrs[h : h + HDR]
                ready += 1
            elif isinstance(out, ForwardRequest):
                serving.forward(out, self._reply_to(self._address(i)), client)
        metrics.answer_hits += hits
        if ready:
            self._send_ready(ready)

    def _reply_to(self, addr: Any) -> Callable[[bytes], None]:
        return lambda packet: self.sendto(packet, addr)

    def _send_ready(self, count: int) -> None:
        arrays = self._arrays
        if self._queue:
            sent = 0  # keep the order behind replies already waiting
        else:
            sent = self._sendmmsg(self.fd, arrays.hdrs_at, count, socket.MSG_DONTWAIT)
            if sent == count:
                return
            if sent < 0:
                # The first message failed: EAGAIN queues them all; any other error (a vanished
                # client's address, a filter) is that message's alone, the rest are retried.
                sent = 0 if mmsg.errno() in (errno.EAGAIN, errno.EINTR) else 1
        # Rare: the send buffer filled (or one message failed) part way. The rest go one by one.
        hdrs = arrays.hdrs
        for k in range(sent, count):
            h = k * HDR
            name = PTR.unpack_from(hdrs, h)[0]
            i = (name - arrays.names_at) // SOCKADDR
            size = SIZE.unpack_from(arrays.iovs, i * IOV + IOV_LEN_AT)[0]
            self.sendto(arrays.slots[i * SLOT : i * SLOT + size], arrays.address(h, i))

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

    def _address(self, i: int) -> Any:
        return self._arrays.address(i * HDR, i)
