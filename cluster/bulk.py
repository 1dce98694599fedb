"""Bulk work on the state (a full list, the first read of a manifest folder, the sync of
thousands of Services): the cyclic garbage collector paused over it.

Such work allocates hundreds of thousands of container objects and no cycles; with the
collector on, each young-generation threshold crossing rescans them, and 10k Services take
about twice as long to list (bench/bench_state.py) and a third longer to sync. Reference
counting still frees everything as usual. What the work leaves lives as long as the state:
frozen (gc.freeze) before the collector resumes, it is never rescanned; left unfrozen, the first
collection after it walks every object (about half a second at 10k Services, on the loop).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# A sync of at least this many Services counts as bulk work.
BULK_SERVICES = 1000


@contextlib.contextmanager
def gc_paused(freeze: bool = False) -> Iterator[None]:
    """The cyclic collector off for the duration (process-wide), unless it already is; with
    `freeze`, what exists at the end is moved out of its reach first."""
    if not gc.isenabled():
        yield
        if freeze:
            gc.freeze()
        return
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()
