"""The cyclic collector around bulk work: paused over it, and the collect-and-freeze after the
first sync held back until the bulk work ends."""

from __future__ import annotations

import asyncio
import gc

from kubeshim import daemon
from kubeshim.cluster.bulk import gc_paused


def test_collect_after_first_sync_waits_for_bulk_work() -> None:
    async def scenario() -> tuple[int, int, int]:
        with gc_paused():
            # The proxy's first sync, paused at its transaction: nothing is collected yet.
            daemon._collect_and_freeze()
            await asyncio.sleep(daemon.BULK_RECHECK * 2)
            during = gc.get_freeze_count()
            garbage = [[]]
            garbage[0].append(garbage)  # a cycle the collection will find
            del garbage
        start = gc.get_freeze_count()
        await asyncio.sleep(daemon.BULK_RECHECK * 3)
        return during, start, gc.get_freeze_count()

    gc.unfreeze()
    try:
        during, start, after = asyncio.run(scenario())
        assert during == 0 and start == 0  # not while the collector was paused
        assert after > 0  # then collected and frozen
    finally:
        gc.unfreeze()
        assert gc.isenabled()
