"""Worker processes: one control process, N-1 more processes serving the same listeners.

The control process is the daemon as with one worker: it holds the watch (the API server sees
one client per node, as with kube-proxy) and the ClusterState, owns the nftables table, the ops
endpoints and the health-check nodePorts, and serves traffic itself. It sends every change its
state publishes (the ServiceChanges, the Node, the sync status) to each worker over a socket
pair; a worker mirrors them into its own ClusterState (`ClusterState.mirror`) and serves the
transparent listeners and DNS binds, which every process opens with SO_REUSEPORT, so the kernel
balances connections, flows and queries across the processes.

Every second a worker reports its counters (per Service port, per endpoint, open connections
and flows); the control process adds them into `kubeshim status` and /metrics. A worker that
exits is started again (its totals are kept, its open connections are gone with it); the others
keep theirs. When the control process goes, its workers get SIGTERM (PR_SET_PDEATHSIG) and
drain like it does.

Frames on the socket pair: a 4-byte big-endian length, then the message. Towards a worker,
the state's own types in msgpack, typed on both ends by msgspec (10k Services encode in 0.1 s,
where pickle takes 1.4 s, and decode in half of pickle's time); back, the reports as a pickle
(both ends are this program, started by the control process itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import Node
from kubeshim.cluster.state import ClusterState, ServiceChange

log = get_logger("workers")

MAX_WORKERS = 4  # the default's cap: beyond it the node's other work needs the CPUs more
REPORT_PERIOD = 1.0
RESTART_BACKOFF = (0.2, 10.0)  # first delay after a crash, and the most
_HEADER = struct.Struct("!I")
SEND_CHUNK = 1000  # Services encoded per loop iteration
FIRST_SYNC_WAIT = 0.01  # how often sending looks whether this process's first sync is done
PR_SET_PDEATHSIG = 1


def default_workers(vip_mode: str) -> int:
    """The CPUs this process may use (its affinity mask), at most MAX_WORKERS, in tproxy mode;
    one elsewhere (interface and loopback listeners are not shared)."""
    if vip_mode != "tproxy":
        return 1
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


# What the control process sends: ("changes", the ServiceChanges, the Node, whether the Node
# was deleted, whether the state is synced).
StateMessage = tuple[str, list[ServiceChange], Node | None, bool, bool]
_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(StateMessage)


def frame(message: Any) -> bytes:
    """A worker's report."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def state_frame(message: StateMessage) -> bytes:
    body = _STATE_ENCODER.encode(message)
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> bytes | None:
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next report, or None at the end of the stream."""
    body = await _read(reader)
    return None if body is None else pickle.loads(body)


async def read_state_frame(reader: asyncio.StreamReader) -> StateMessage | None:
    """The next state message, or None at the end of the stream."""
    body = await _read(reader)
    return None if body is None else _STATE_DECODER.decode(body)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the control process exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Worker:
    """The control process's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        # Whether the whole state has started to go to it: messages queued before that are
        # in that state already, so it skips them.
        self.ready = False
        self.restarts = 0
        self.started = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)


# A worker and the writer of one link to it (a restarted worker has a new one).
Link = tuple[Worker, "asyncio.StreamWriter | None"]


class WorkerPool:
    """Starts the workers, sends them every state change, restarts those that exit."""

    def __init__(self, state: ClusterState, argv: Sequence[str], count: int,
                 proxier: Any) -> None:
        self.state = state
        self.argv = list(argv)
        self.workers = [Worker(i) for i in range(1, count)]
        self.proxier = proxier
        self.stopped = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._sent_synced = False
        # Messages not encoded yet, in order, each with the one link it is for (a worker's
        # whole state) or None (every worker).
        self._outbox: list[tuple[tuple[Any, ...], Link | None]] = []
        self._told_synced = False  # the sync status of the last chunk sent

    async def start(self) -> None:
        self.state.subscribe(self._on_changes)
        self.state.subscribe_node(self._on_node)
        self._tasks.append(asyncio.create_task(self._start_workers(), name="workers-start"))
        self._tasks.append(asyncio.create_task(self._watch_synced(), name="workers-synced"))

    async def _start_workers(self) -> None:
        """Start the workers: at once where each process has a CPU of its own; where they
        would share this process's CPUs, after its first sync, so that their start (imports,
        set-up) does not hold up the first connection. They serve nothing before they hold
        the synced state anyway."""
        cpus = len(os.sched_getaffinity(0))
        if cpus <= len(self.workers) and self.proxier is not None:
            while not self.proxier.last_updated:
                await asyncio.sleep(FIRST_SYNC_WAIT)
        log.info("workers starting", count=len(self.workers) + 1, cpus=cpus)
        for w in self.workers:
            self._tasks.append(asyncio.create_task(self._keep(w), name=f"worker-{w.index}"))

    def status(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"worker": 0, "pid": os.getpid(), "role": "control"}]
        for w in self.workers:
            report = self.proxier.peers.get(w.pid) if self.proxier is not None else None
            out.append({"worker": w.index, "pid": w.pid or None, "restarts": w.restarts,
                        "connections": report["connections"] if report else None,
                        "udpFlows": report["udpFlows"] if report else None,
                        # connections and flows this process of the worker accepted so far
                        "served": sum(p["connectionsTotal"] for p in report["ports"].values())
                        if report else None})
        return out

    # --- changes out ---

    def _message(self, changes: Sequence[ServiceChange]) -> tuple[Any, ...]:
        self._sent_synced = self.state.synced
        return ("changes", list(changes), self.state.node, self.state.node_deleted,
                self.state.synced)

    def _on_changes(self, changes: Sequence[ServiceChange]) -> None:
        # Encoded once the current callbacks are done, SEND_CHUNK Services per loop iteration:
        # the state's other subscribers (this process's own sync of the same changes) go
        # first, and connections are served between the chunks. A worker that connects
        # meanwhile gets the whole state (in chunks too) before any later change.
        self._queue(self._message(changes), None)

    def _queue(self, message: tuple[Any, ...], link: Link | None) -> None:
        self._outbox.append((message, link))
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._send)

    def _connected(self, w: Worker) -> None:
        """A worker's link is up: the whole current state goes to it first, then every change
        as it comes."""
        full = [ServiceChange(k, None, v) for k, v in self.state.services.items()]
        self._queue(("changes", full, self.state.node, self.state.node_deleted,
                     self.state.synced), (w, w.writer))

    def _send(self) -> None:
        """The next chunk of the oldest message to every connected worker. A message's sync
        status goes with its last chunk: a worker that is not synced yet opens its listeners
        only with every Service of the first full state in its index.

        Nothing goes out between the first full state and this process's first sync of it:
        that sync (which polls for the synced state) would otherwise wait for the encoding,
        and, on a busy CPU, for the worker's own sync of what it received, before any
        connection is served. Workers join the listeners only once synced, so the control
        process serves alone until then either way."""
        if self._first_sync_pending():
            asyncio.get_running_loop().call_later(FIRST_SYNC_WAIT, self._send)
            return
        (kind, changes, node, node_deleted, synced), target = self._outbox[0]
        if len(changes) > SEND_CHUNK:
            self._outbox[0] = ((kind, changes[SEND_CHUNK:], node, node_deleted, synced), target)
            # A worker's own whole state says synced only with its last chunk.
            changes, synced = changes[:SEND_CHUNK], self._told_synced and target is None
        else:
            self._outbox.pop(0)
        if target is None:
            self._told_synced = synced
            connected = [w for w in self.workers if w.writer is not None and w.ready]
        else:
            w, writer = target
            connected = []
            if writer is not None and w.writer is writer:  # not a link the worker had before
                w.ready = True
                connected = [w]
        if connected:
            data = state_frame((kind, changes, node, node_deleted, synced))
            for w in connected:
                w.send(data)
        if self._outbox:
            asyncio.get_running_loop().call_soon(self._send)

    def _first_sync_pending(self) -> bool:
        """The state is synced and this process's proxy has not yet applied it once."""
        return self.state.synced and self.proxier is not None and not self.proxier.last_updated

    def _on_node(self, before: Node | None, after: Node | None) -> None:
        self._on_changes(())

    async def _watch_synced(self) -> None:
        # An empty cluster becomes synced without publishing a change: say so too.
        while not self._stopping:
            if self.state.synced != self._sent_synced:
                self._on_changes(())
            await asyncio.sleep(0.05)

    # --- one worker's life ---

    async def _keep(self, w: Worker) -> None:
        delay = RESTART_BACKOFF[0]
        while not self._stopping:
            code = await self._run_once(w)
            if self._stopping:
                return
            w.restarts += 1
            log.warning("worker exited, starting it again", worker=w.index, code=code,
                        restarts=w.restarts)
            # A worker that ran a while restarts at once; one that keeps crashing backs off.
            delay = RESTART_BACKOFF[0] if time.monotonic() - w.started > 30 else min(
                delay * 2, RESTART_BACKOFF[1])
            await asyncio.sleep(delay)

    async def _run_once(self, w: Worker) -> int | None:
        ours, theirs = socket.socketpair()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubeshim", *self.argv, "--worker-fd", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), preexec_fn=_die_with_parent,
                stdin=asyncio.subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            log.error("cannot start a worker", worker=w.index, reason=str(e))
            return None
        finally:
            theirs.close()
        w.started = time.monotonic()
        reader, w.writer = await asyncio.open_connection(sock=ours)
        self._connected(w)
        pid = w.proc.pid
        try:
            while (message := await read_frame(reader)) is not None:
                if message[0] == "report" and self.proxier is not None:
                    self.proxier.peers[pid] = message[1]
        finally:
            w.writer.close()
            w.writer, w.ready = None, False
            code = await w.proc.wait()
            if self.proxier is not None:
                self.proxier.peer_exited(pid)
        return code

    # --- stop ---

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM to every worker (they drain as the control process does), then wait."""
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        deadline = drain_timeout + 5.0
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), deadline)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.stopped.set()


class ControlLink:
    """A worker's source of change: the control process's messages, mirrored into the state;
    and the reports back. The run ends when the control process goes."""

    def __init__(self, fd: int, state: ClusterState, proxier: Any) -> None:
        self.sock = socket.socket(fileno=fd)
        self.state = state
        self.proxier = proxier

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        reporter = asyncio.create_task(self._report(writer))
        try:
            while (message := await read_state_frame(reader)) is not None:
                kind, changes, node, node_deleted, synced = message
                if kind == "changes":
                    self.state.mirror(changes, node, node_deleted, synced)
                    if self.proxier is not None:
                        self.proxier.state_mirrored()
        finally:
            reporter.cancel()
            writer.close()
        raise ConnectionError("the control process closed its link")

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(REPORT_PERIOD)
            if self.proxier is not None:
                writer.write(frame(("report", self.proxier.report())))
