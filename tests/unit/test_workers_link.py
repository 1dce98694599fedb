"""The control process's link to its workers (kubeshim/workers.py): what a worker's state sees,
through a real socket pair, the real frames and the worker's own reader."""

from __future__ import annotations

import asyncio
import socket
import types

import pytest

from kubeshim.cluster.state import ClusterState
from kubeshim.workers import SEND_CHUNK, WorkerPool, read_state_frame
from tests.proxy_helpers import endpoint, endpoint_slice, service

SERVICES = 2 * SEND_CHUNK + 500


async def test_a_large_first_state_reaches_a_worker_in_chunks_synced_only_with_the_last() -> None:
    control, mirror = ClusterState(node_name="n1"), ClusterState(node_name="n1")
    pool = WorkerPool(control, [], 2, None)
    control.subscribe(pool._on_changes)
    ours, theirs = socket.socketpair()
    _, pool.workers[0].writer = await asyncio.open_connection(sock=ours)
    pool._connected(pool.workers[0])  # the link is up before the state is listed
    reader, _ = await asyncio.open_connection(sock=theirs)
    assert (await asyncio.wait_for(read_state_frame(reader), 5))[1:] == ([], None, False, False)

    names = [f"s{i}" for i in range(SERVICES)]
    control.replace("EndpointSlice", [endpoint_slice(n, [endpoint("10.244.0.5")],
                                                     [{"name": "http", "port": 8080}])
                                      for n in names])
    control.replace("Service", [service(n, f"10.96.{i // 250}.{i % 250 + 1}",
                                        [{"name": "http", "port": 80}])
                                for i, n in enumerate(names)])
    assert control.synced
    # Nothing is pickled inside the state's callbacks: the loop runs first.
    assert pool._outbox and pool._outbox[0][0][1]

    synced_after: list[tuple[int, bool]] = []
    while len(mirror.services) < SERVICES:
        kind, changes, node, node_deleted, synced = await asyncio.wait_for(
            read_state_frame(reader), 10)
        assert kind == "changes" and len(changes) <= SEND_CHUNK
        mirror.mirror(changes, node, node_deleted, synced)
        synced_after.append((len(mirror.services), mirror.synced))
    # Three chunks; the worker counts as synced only once it holds every Service.
    assert synced_after == [(SEND_CHUNK, False), (2 * SEND_CHUNK, False), (SERVICES, True)]
    assert mirror.services == control.services
    assert not pool._outbox
    ours.close()
    theirs.close()


async def test_nothing_is_sent_until_this_process_has_synced_once() -> None:
    """The control process's own first sync of the full state goes before the pickling: until
    its proxy has applied the state once (`last_updated`), the workers get nothing."""
    control, mirror = ClusterState(node_name="n1"), ClusterState(node_name="n1")
    proxy = types.SimpleNamespace(last_updated=0.0)  # the Proxier's attribute the pool reads
    pool = WorkerPool(control, [], 2, proxy)
    control.subscribe(pool._on_changes)
    ours, theirs = socket.socketpair()
    _, pool.workers[0].writer = await asyncio.open_connection(sock=ours)
    pool._connected(pool.workers[0])
    reader, _ = await asyncio.open_connection(sock=theirs)
    assert (await asyncio.wait_for(read_state_frame(reader), 5))[1:] == ([], None, False, False)
    control.replace("EndpointSlice", [endpoint_slice("web", [endpoint("10.244.0.5")],
                                                     [{"name": "http", "port": 8080}])])
    control.replace("Service", [service("web", "10.96.0.10", [{"name": "http", "port": 80}])])
    assert control.synced
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read_state_frame(reader), 0.2)
    proxy.last_updated = 1.0
    while not mirror.synced:
        mirror.mirror(*(await asyncio.wait_for(read_state_frame(reader), 5))[1:])
    assert mirror.services == control.services
    ours.close()
    theirs.close()


async def test_a_worker_that_connects_later_gets_the_whole_state_in_chunks_then_changes() -> None:
    """A worker (re)started once the state is large: its whole state goes in chunks too,
    synced only with the last; a change published meanwhile follows it, never overwritten by
    the older copy in the whole state; a message queued for its previous link is dropped."""
    control, mirror = ClusterState(node_name="n1"), ClusterState(node_name="n1")
    pool = WorkerPool(control, [], 2, None)
    control.subscribe(pool._on_changes)
    names = [f"s{i}" for i in range(SERVICES)]
    slices = [endpoint_slice(n, [endpoint("10.244.0.5")], [{"name": "http", "port": 8080}])
              for n in names]
    control.replace("EndpointSlice", slices)
    control.replace("Service", [service(n, f"10.96.{i // 250}.{i % 250 + 1}",
                                        [{"name": "http", "port": 80}])
                                for i, n in enumerate(names)])
    while pool._outbox:  # the first list went out while no worker was connected
        await asyncio.sleep(0.01)
    w = pool.workers[0]
    old_ours, old_theirs = socket.socketpair()
    _, w.writer = await asyncio.open_connection(sock=old_ours)
    pool._connected(w)
    w.writer.close()  # that worker exited at once; it starts again
    w.writer, w.ready = None, False
    ours, theirs = socket.socketpair()
    _, w.writer = await asyncio.open_connection(sock=ours)
    pool._connected(w)
    # The last Service's endpoint moves while the whole state is still going out.
    control.replace("EndpointSlice", [*slices[:-1], endpoint_slice(
        names[-1], [endpoint("10.244.0.6")], [{"name": "http", "port": 8080}])])
    reader, _ = await asyncio.open_connection(sock=theirs)
    synced_after: list[tuple[int, bool]] = []
    while len(synced_after) < 4:  # three chunks of the whole state, then the change
        kind, changes, node, node_deleted, synced = await asyncio.wait_for(
            read_state_frame(reader), 10)
        assert len(changes) <= SEND_CHUNK
        mirror.mirror(changes, node, node_deleted, synced)
        synced_after.append((len(mirror.services), mirror.synced))
    assert not pool._outbox
    assert synced_after == [(SEND_CHUNK, False), (2 * SEND_CHUNK, False), (SERVICES, True),
                            (SERVICES, True)]
    assert mirror.services == control.services
    last = mirror.services[next(reversed(control.services))]
    assert [ep.ip for ep in last.ports[0].endpoints] == ["10.244.0.6"]
    for s in (ours, theirs, old_ours, old_theirs):
        s.close()
