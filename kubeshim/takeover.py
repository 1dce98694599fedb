"""Restart without a gap: the control socket of a running daemon, and taking over from it.

    running daemon (--control-socket P)      new daemon (--control-socket P --takeover)
                                        <--  connects to P: "takeover"
    its listening sockets, 250 a message -->  offered to its components (cluster/handover.py)
    keeps serving on them                     loads state, serves on the same sockets
                                        <--  "ready": synced, every listener open
    stops reading, drains, exits,             closes what no component took, then
    leaving VIPs and the capture table        listens on P for the next takeover

Both processes hold the same kernel sockets during the switch, so the kernel keeps queueing
connections and datagrams and either process answers them: no connection is refused and no
query is lost. If the new process dies before "ready", the running one carries on as before.
The control socket is a unix SOCK_SEQPACKET socket (one message per send, descriptors attached
with SCM_RIGHTS), created mode 0600: only the daemon's own user can take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from kubeshim.cluster import handover
from kubeshim.cluster.log import get_logger

log = get_logger("takeover")

# Descriptors per message: the kernel's SCM_MAX_FD is 253.
FDS_PER_MESSAGE = 250
MESSAGE_BYTES = 65536
TAKEOVER = b"takeover"
READY = b"ready"


def request(path: Path, timeout: float = 10.0
            ) -> tuple[dict[handover.SocketKey, socket.socket], socket.socket]:
    """Ask the daemon at `path` for its listening sockets (blocking; run on a thread).

    Returns the sockets and the connection to send "ready" on; raises OSError when nothing
    listens at `path` or the exchange fails."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(TAKEOVER)
        received: dict[handover.SocketKey, socket.socket] = {}
        while True:
            data, fds, _, _ = socket.recv_fds(conn, MESSAGE_BYTES, FDS_PER_MESSAGE)
            if not data:
                raise ConnectionError("the running daemon closed the control connection")
            message = json.loads(data)
            keys = [tuple(k) for k in message.get("sockets", ())]
            if len(keys) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise ConnectionError(f"{len(fds)} descriptors for {len(keys)} sockets")
            for key, fd in zip(keys, fds, strict=True):
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                received[(int(key[0]), str(key[1]), int(key[2]))] = sock
            if message.get("done"):
                break
        conn.settimeout(None)
        return received, conn
    except BaseException:
        conn.close()
        raise


def confirm(conn: socket.socket) -> None:
    """Tell the previous daemon this one serves now; it stops reading and drains."""
    with contextlib.suppress(OSError):
        conn.sendall(READY)
    conn.close()


class ControlSocket:
    """Listens on `path`; hands the listening sockets to a process taking over, and calls
    `handed_over` once that process is ready."""

    def __init__(self, path: Path, handed_over: Callable[[], None]) -> None:
        self.path = path
        self.handed_over = handed_over
        self.sock: socket.socket | None = None
        self._inode = 0
        self._busy = False

    def start(self, took_over: bool = False) -> None:
        """Listen on the path; after a takeover the previous daemon's socket is replaced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if took_over:
                raise OSError
            probe.connect(str(self.path))
            # Another daemon answers there: never take its socket away; only --takeover may.
            log.warning("control socket in use by another kubeshim; not listening",
                        path=str(self.path))
            sock.close()
            return
        except OSError:
            pass
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(4)
        sock.setblocking(False)
        self.sock = sock
        self._inode = self.path.stat().st_ino
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info("control socket listening", path=str(self.path))

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if self._busy:
            conn.close()
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._serve, conn))
        task.add_done_callback(self._served)

    def _serve(self, conn: socket.socket) -> bool:
        """One takeover, on a thread: send the sockets, wait for "ready"."""
        with conn:
            conn.settimeout(10.0)
            if conn.recv(64) != TAKEOVER:
                return False
            sockets = handover.listening_sockets()
            try:
                items = list(sockets.items())
                log.info("handing over listening sockets", count=len(items))
                for start in range(0, len(items) or 1, FDS_PER_MESSAGE):
                    chunk = items[start:start + FDS_PER_MESSAGE]
                    done = start + FDS_PER_MESSAGE >= len(items)
                    body = json.dumps({"sockets": [list(k) for k, _ in chunk], "done": done})
                    socket.send_fds(conn, [body.encode()], [s.fileno() for _, s in chunk])
            finally:
                for sock in sockets.values():
                    sock.close()
            # The new process syncs before it answers: as long as it takes, without a limit.
            conn.settimeout(None)
            return conn.recv(64) == READY

    def _served(self, task: asyncio.Future[bool]) -> None:
        self._busy = False
        if task.cancelled():
            return
        if task.exception() is not None or not task.result():
            log.warning("takeover abandoned; serving on",
                        reason=repr(task.exception()) if task.exception() else "no ready")
            return
        log.info("the new process serves; stopping and draining")
        self.handed_over()

    def close(self) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        # Remove the path only while it is still ours (a new daemon may have bound it).
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
