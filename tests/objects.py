"""Builders of Services and EndpointSlices for DNS tests (defaults suited to name lookups:
a ClusterIP Service with one "http" port), decoded through the real wire model, and the
ClusterState holding them. Proxy tests, which always name the ports, use tests/proxy_helpers.py."""

from __future__ import annotations

from typing import Any

from kubeshim.cluster.model import decode
from kubeshim.cluster.state import ClusterState


def service(name: str, ns: str = "default", ip: str | None = "10.96.0.10", **spec: Any) -> Any:
    """A Service; `ip=None` leaves clusterIP unset, `ip="None"` makes it headless."""
    body: dict[str, Any] = {"ports": [{"name": "http", "port": 80}]}
    if ip is not None:
        body["clusterIP"] = ip
    body.update(spec)
    return decode("Service", {"metadata": {"name": name, "namespace": ns}, "spec": body})


def endpoint_slice(
    svc: str,
    endpoints: list[dict[str, Any]],
    ns: str = "default",
    ports: list[dict[str, Any]] | None = None,
    name: str | None = None,
    address_type: str = "IPv4",
) -> Any:
    """An EndpointSlice of Service `svc` (named `<svc>-1` unless `name` is given)."""
    return decode(
        "EndpointSlice",
        {
            "metadata": {
                "name": name or f"{svc}-1",
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": svc},
            },
            "addressType": address_type,
            "ports": [{"name": "http", "port": 8080}] if ports is None else ports,
            "endpoints": endpoints,
        },
    )


def synced_state(*objects: Any) -> ClusterState:
    """A ClusterState whose Service and EndpointSlice lists are exactly `objects`."""
    state = ClusterState()
    state.replace("Service", [o for o in objects if o.kind == "Service"])
    state.replace("EndpointSlice", [o for o in objects if o.kind == "EndpointSlice"])
    return state
