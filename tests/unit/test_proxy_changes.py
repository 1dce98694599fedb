"""ServiceChangeTracker: ClusterState's changes accumulate per Service between two syncs, net to
nothing when a Service returns to what was applied, and drain once for every consumer."""

from __future__ import annotations

from typing import Any

import pytest

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.state import ClusterState, EventType, WatchEvent
from kubeshim.proxy.changes import ServiceChangeTracker
from tests.objects import endpoint_slice, service

WEB = NamespacedName("default", "web")
API = NamespacedName("default", "api")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0


@pytest.fixture
def lab() -> tuple[ClusterState, ServiceChangeTracker, Clock]:
    state, tracker, clock = ClusterState(), ServiceChangeTracker(), Clock()
    state.subscribe(lambda changes: tracker.update(changes, clock.now))
    return state, tracker, clock


def put(state: ClusterState, *objects: Any) -> None:
    state.apply([WatchEvent(EventType.MODIFIED, o) for o in objects])


def delete(state: ClusterState, *objects: Any) -> None:
    state.apply([WatchEvent(EventType.DELETED, o) for o in objects])


def ready(*ips: str) -> list[dict[str, Any]]:
    return [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]


def test_changes_merge_into_first_previous_and_last_current(lab: Any) -> None:
    state, tracker, clock = lab
    put(state, service("web"))
    applied = state.services[WEB]
    tracker.take()

    clock.now = 101.0
    put(state, endpoint_slice("web", ready("10.244.0.2")))
    clock.now = 102.0
    put(state, endpoint_slice("web", ready("10.244.0.2", "10.244.0.3")))
    [pending] = tracker.take().values()
    assert pending.previous == applied
    assert pending.current == state.services[WEB]
    assert pending.queued == 101.0  # the first change's time, not the last one's


@pytest.mark.parametrize("steps", [
    pytest.param(["add", "delete"], id="added-then-deleted"),
    pytest.param(["slice", "slice-delete"], id="endpoints-back-to-none"),
    pytest.param(["port-8080", "port-80"], id="spec-changed-back"),
])
def test_a_change_undone_before_the_sync_nets_to_nothing(lab: Any, steps: list[str]) -> None:
    state, tracker, _ = lab
    if steps[0] != "add":
        put(state, service("web"))
        tracker.take()
    objects = {
        "add": service("web"), "delete": service("web"),
        "slice": endpoint_slice("web", ready("10.244.0.2")),
        "slice-delete": endpoint_slice("web", ready("10.244.0.2")),
        "port-8080": service("web", ports=[{"name": "http", "port": 8080}]),
        "port-80": service("web"),
    }
    for step in steps:
        (delete if step.endswith("delete") else put)(state, objects[step])
    assert len(tracker) == 0 and not tracker
    assert tracker.take() == {}
    assert tracker.oldest() is None


def test_other_services_stay_pending_when_one_nets_away(lab: Any) -> None:
    state, tracker, clock = lab
    put(state, service("web"))
    clock.now = 105.0
    put(state, service("api", ip="10.96.0.11"))
    assert tracker.update([], clock.now)  # something still waits
    delete(state, service("web"))
    assert list(tracker.take()) == [API]


def test_a_mark_is_synced_even_without_a_change(lab: Any) -> None:
    state, tracker, clock = lab
    put(state, service("web"))
    tracker.take()
    info = state.services[WEB]

    clock.now = 110.0
    tracker.mark(WEB, info, clock.now)  # e.g. a retry after a failed sync
    [pending] = tracker.take().values()
    assert (pending.previous, pending.current, pending.queued, pending.marked) == (
        info, info, 110.0, True)


def test_a_marked_service_does_not_net_away(lab: Any) -> None:
    state, tracker, clock = lab
    put(state, service("web"))
    tracker.take()
    tracker.mark(WEB, state.services[WEB], clock.now)
    put(state, service("web", ports=[{"name": "http", "port": 8080}]))
    put(state, service("web"))  # back to what was applied, but the retry still stands
    assert WEB in tracker and len(tracker) == 1


def test_a_mark_keeps_the_time_of_the_change_already_pending(lab: Any) -> None:
    state, tracker, clock = lab
    clock.now = 120.0
    put(state, service("web"))
    tracker.mark(WEB, state.services[WEB], 130.0)
    assert tracker.oldest() == 120.0
    [pending] = tracker.take().values()
    assert pending.previous is None and pending.current == state.services[WEB]


def test_take_drains_and_later_changes_start_from_what_was_taken(lab: Any) -> None:
    state, tracker, clock = lab
    put(state, service("web"))
    first = tracker.take()
    assert list(first) == [WEB] and first[WEB].previous is None
    assert tracker.take() == {}

    clock.now = 140.0
    delete(state, service("web"))
    [pending] = tracker.take().values()
    assert pending.previous == first[WEB].current and pending.current is None


def test_oldest_is_the_longest_waiting_service(lab: Any) -> None:
    state, tracker, clock = lab
    clock.now = 150.0
    put(state, service("web"))
    clock.now = 151.0
    put(state, service("api", ip="10.96.0.11"))
    put(state, endpoint_slice("web", ready("10.244.0.2")))  # web waits since 150 still
    assert tracker.oldest() == 150.0
    assert list(tracker.take()) == [WEB, API]  # arrival order
