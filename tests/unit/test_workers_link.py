"""The control process's link to its workers (kubeshim/workers.py): what a worker's state sees,
through a real socket pair, the real frames and the worker's own reader."""

from __future__ import annotations

import asyncio
import socket

from kubeshim.cluster.state import ClusterState
from kubeshim.workers import SEND_CHUNK, WorkerPool, read_frame
from tests.proxy_helpers import endpoint, endpoint_slice, service

SERVICES = 2 * SEND_CHUNK + 500


async def test_a_large_first_state_reaches_a_worker_in_chunks_synced_only_with_the_last() -> None:
    control, mirror = ClusterState(node_name="n1"), ClusterState(node_name="n1")
    pool = WorkerPool(control, [], 2, None)
    control.subscribe(pool._on_changes)
    ours, theirs = socket.socketpair()
    _, pool.workers[0].writer = await asyncio.open_connection(sock=ours)
    reader, _ = await asyncio.open_connection(sock=theirs)

    names = [f"s{i}" for i in range(SERVICES)]
    control.replace("EndpointSlice", [endpoint_slice(n, [endpoint("10.244.0.5")],
                                                     [{"name": "http", "port": 8080}])
                                      for n in names])
    control.replace("Service", [service(n, f"10.96.{i // 250}.{i % 250 + 1}",
                                        [{"name": "http", "port": 80}])
                                for i, n in enumerate(names)])
    assert control.synced
    # Nothing is pickled inside the state's callbacks: the loop runs first.
    assert pool._outbox and pool._outbox[0][1]

    synced_after: list[tuple[int, bool]] = []
    while len(mirror.services) < SERVICES:
        kind, changes, node, node_deleted, synced = await asyncio.wait_for(
            read_frame(reader), 10)
        assert kind == "changes" and len(changes) <= SEND_CHUNK
        mirror.mirror(changes, node, node_deleted, synced)
        synced_after.append((len(mirror.services), mirror.synced))
    # Three chunks; the worker counts as synced only once it holds every Service.
    assert synced_after == [(SEND_CHUNK, False), (2 * SEND_CHUNK, False), (SERVICES, True)]
    assert mirror.services == control.services
    assert not pool._outbox
    ours.close()
    theirs.close()
