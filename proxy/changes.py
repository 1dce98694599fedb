"""ServiceChangeTracker: the Service changes not yet applied by the proxy (sans-IO).

kube-proxy's one idea of pending work (pkg/proxy/servicechangetracker.go and
endpointschangetracker.go): ClusterState's changes accumulate here per Service as (previous,
current), the earliest `previous` and the latest `current`; a Service that changed back to
what it was nets to nothing and is dropped. The sync drains the tracker (`take`) and hands
the same changes to everything that follows the applied state: the proxier's tables and
listeners, then the health-check nodePorts (syncProxyRules -> serviceHealthServer.SyncServices
and SyncEndpoints, one source of truth for both).

A Service may also be marked (`mark`) without a change of its own: a retry after a failed sync,
a Node zone change that moves its topology hints. A mark never nets away.

Each pending Service keeps the time its first change was queued: the proxy's health (a change
waiting too long) and kubeproxy_network_programming_duration_seconds are measured from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.state import ServiceChange, ServiceInfo


@dataclass(slots=True)
class PendingChange:
    """One Service's changes since the last sync: `previous` as last applied, `current` as
    now; `queued` when the first of them arrived (monotonic seconds)."""

    key: NamespacedName
    previous: ServiceInfo | None
    current: ServiceInfo | None
    queued: float
    marked: bool = False


class ServiceChangeTracker:
    """Pending changes per Service, between two syncs. Not thread-safe; one loop owns it."""

    def __init__(self) -> None:
        self._items: dict[NamespacedName, PendingChange] = {}

    def update(self, changes: Iterable[ServiceChange], now: float) -> bool:
        """Take ClusterState's changes; True if anything is pending afterwards."""
        items = self._items
        for change in changes:
            pending = items.get(change.key)
            if pending is None:
                pending = items[change.key] = PendingChange(
                    change.key, change.previous, change.current, now)
            else:
                pending.current = change.current
            # Changed back to what the last sync applied: nothing to do (unless marked).
            if not pending.marked and pending.previous == pending.current:
                del items[change.key]
        return bool(items)

    def mark(self, key: NamespacedName, info: ServiceInfo | None, now: float) -> None:
        """Sync `key` (now `info`) again even though it did not change."""
        pending = self._items.get(key)
        if pending is None:
            self._items[key] = PendingChange(key, info, info, now, marked=True)
        else:
            pending.marked = True

    def take(self) -> dict[NamespacedName, PendingChange]:
        """Every pending change, in arrival order; the tracker is empty afterwards."""
        items, self._items = self._items, {}
        return items

    def oldest(self) -> float | None:
        """When the longest-waiting pending change was queued; None when nothing waits."""
        return min((p.queued for p in self._items.values()), default=None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
