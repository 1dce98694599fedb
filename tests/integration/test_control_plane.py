"""The real control plane fixture (etcd + kube-apiserver from tests/peers) through real clients.

kubectl drives it as each identity; raw HTTPS (urllib) checks status codes and watch streams
the way any API client sees them: RBAC from deploy/rbac.yaml, 403s, 410 Gone after compaction.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.cluster import SERVICE_CIDR, ControlPlane, Peers
from tests.peers.fixtures import require_peers

pytestmark = pytest.mark.peers

NS = "default"


def unique(name: str) -> str:
    return f"{name}-{os.getpid()}-{time.monotonic_ns() % 100000}"


def service_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def slice_manifest(service: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-abc",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
            for a in addresses
        ],
    }


def apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))


def get_json(cp: ControlPlane, *args: str, kubeconfig: Path | None = None) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig).stdout)


def watch_events(
    cp: ControlPlane, path: str, token: str, resource_version: str
) -> tuple[int, list[Any]]:
    """A watch from `resource_version` that the server ends after 1s; (status, events or Status)."""
    query = urllib.parse.urlencode(
        {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "1"}
    )
    status, body = cp.request("GET", f"{path}?{query}", token=token)
    if status != 200:
        return status, [body]
    if isinstance(body, dict):  # one event: the whole body parsed as a single JSON document
        return status, [body]
    return status, [json.loads(line) for line in body.splitlines() if line.strip()]


def is_gone(status: int, events: list[Any]) -> bool:
    """410 Gone, as the HTTP status or as the watch's ERROR event (both are the API's forms)."""
    if status == 410:
        return True
    return any(e.get("type") == "ERROR" and e["object"].get("code") == 410 for e in events)


# --- admin through kubectl -----------------------------------------------------------------


def test_kubectl_creates_and_reads_back_service_and_endpointslice(
    control_plane: ControlPlane,
) -> None:
    cp = control_plane
    name = unique("web")
    apply(cp, service_manifest(name), slice_manifest(name, ["10.244.0.5", "10.244.0.6"]))

    svc = get_json(cp, "service", name, "-n", NS)
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    ]
    assert svc["spec"]["type"] == "ClusterIP"
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(SERVICE_CIDR)

    eps = get_json(cp, "endpointslices", "-n", NS, "-l", f"kubernetes.io/service-name={name}")
    assert [s["metadata"]["name"] for s in eps["items"]] == [f"{name}-abc"]
    [eps_item] = eps["items"]
    assert [e["addresses"] for e in eps_item["endpoints"]] == [["10.244.0.5"], ["10.244.0.6"]]
    assert eps_item["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_apiserver_reports_the_pinned_version(control_plane: ControlPlane) -> None:
    from tests.peers.cluster import pinned_versions

    status, version = control_plane.request("GET", "/version", token=control_plane.admin_token)
    assert status == 200
    assert version["gitVersion"] == pinned_versions()["KUBERNETES_VERSION"]


# --- the kubeshim identity (deploy/rbac.yaml) ------------------------------------------------


def test_kubeshim_identity_is_the_service_account(control_plane: ControlPlane) -> None:
    review = control_plane.kubectl(
        "auth", "whoami", "-o", "json", kubeconfig=control_plane.kubeshim_kubeconfig
    )
    user = json.loads(review.stdout)["status"]["userInfo"]
    assert user["username"] == "system:serviceaccount:kube-system:kubeshim"


def test_kubeshim_identity_lists_and_watches_what_it_serves(control_plane: ControlPlane) -> None:
    cp = control_plane
    name = unique("ro")
    apply(cp, service_manifest(name), slice_manifest(name, ["10.244.0.7"]))

    services = get_json(cp, "services", "-A", kubeconfig=cp.kubeshim_kubeconfig)
    assert name in {s["metadata"]["name"] for s in services["items"]}
    slices = get_json(cp, "endpointslices", "-A", kubeconfig=cp.kubeshim_kubeconfig)
    assert f"{name}-abc" in {s["metadata"]["name"] for s in slices["items"]}
    nodes = cp.kubectl("get", "nodes", kubeconfig=cp.kubeshim_kubeconfig, check=False)
    assert nodes.returncode == 0, nodes.stderr

    # A watch from the list's resourceVersion sees a change made after it.
    for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
        status, listed = cp.request("GET", path, token=cp.kubeshim_token)
        assert status == 200, listed
        other = unique("later")
        apply(cp, service_manifest(other), slice_manifest(other, ["10.244.0.8"]))
        status, events = watch_events(
            cp, path, cp.kubeshim_token, listed["metadata"]["resourceVersion"]
        )
        assert status == 200
        names = {e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED"}
        assert other in names or f"{other}-abc" in names


def test_kubeshim_identity_can_record_events(control_plane: ControlPlane) -> None:
    cp = control_plane
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": unique("kubeshim.event"), "namespace": NS},
        "involvedObject": {"kind": "Node", "name": "node-a"},
        "reason": "Synced",
        "message": "rules synced",
        "type": "Normal",
        "source": {"component": "kubeshim"},
    }
    status, body = cp.request(
        "POST", f"/api/v1/namespaces/{NS}/events", token=cp.kubeshim_token, body=event
    )
    assert status == 201, body


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/secrets", None),
        ("GET", f"/api/v1/namespaces/{NS}/configmaps", None),
        ("POST", f"/api/v1/namespaces/{NS}/services", service_manifest("forbidden")),
        ("DELETE", f"/api/v1/namespaces/{NS}/services/kubernetes", None),
        (
            "POST",
            f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
            slice_manifest("forbidden", []),
        ),
    ],
)
def test_kubeshim_identity_is_forbidden_beyond_its_role(
    control_plane: ControlPlane, method: str, path: str, body: Any
) -> None:
    status, reply = control_plane.request(
        method, path, token=control_plane.kubeshim_token, body=body
    )
    assert status == 403, reply
    assert reply["reason"] == "Forbidden"
    assert "system:serviceaccount:kube-system:kubeshim" in reply["message"]


def test_kubectl_reports_forbidden_for_kubeshim_secrets(control_plane: ControlPlane) -> None:
    result = control_plane.kubectl(
        "get", "secrets", "-A", kubeconfig=control_plane.kubeshim_kubeconfig, check=False
    )
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()


# --- an identity with no role --------------------------------------------------------------


def test_norole_identity_cannot_list_services(control_plane: ControlPlane) -> None:
    cp = control_plane
    status, reply = cp.request("GET", "/api/v1/services", token=cp.norole_token)
    assert status == 403, reply
    assert 'User "norole"' in reply["message"]
    result = cp.kubectl("get", "services", "-A", kubeconfig=cp.norole_kubeconfig, check=False)
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()


def test_unknown_token_is_unauthorized(control_plane: ControlPlane) -> None:
    status, _ = control_plane.request("GET", "/api/v1/services", token="not-a-token")
    assert status == 401


# --- fault helpers -------------------------------------------------------------------------


def test_restart_keeps_port_and_data(control_plane: ControlPlane) -> None:
    cp = control_plane
    name = unique("kept")
    apply(cp, service_manifest(name))
    old_pid = cp.apiserver.pid if cp.apiserver else None
    cp.restart_apiserver()
    assert cp.apiserver is not None and cp.apiserver.pid != old_pid
    assert cp.server == f"https://127.0.0.1:{cp.port}"
    # Same etcd: the object survives; the ServiceAccount token still authenticates.
    assert (
        get_json(cp, "service", name, "-n", NS, kubeconfig=cp.kubeshim_kubeconfig)["metadata"][
            "name"
        ]
        == name
    )


def churned_resource_version(cp: ControlPlane, path: str) -> str:
    """A list's resourceVersion with a few writes after it, still watchable from."""
    status, listed = cp.request("GET", path, token=cp.kubeshim_token)
    assert status == 200, listed
    old_rv: str = listed["metadata"]["resourceVersion"]
    for _ in range(3):
        apply(cp, service_manifest(unique("churn")))
    status, events = watch_events(cp, path, cp.kubeshim_token, old_rv)
    assert status == 200 and not is_gone(status, events), events
    assert {e["type"] for e in events} == {"ADDED"}
    return old_rv


def test_expired_history_makes_an_old_watch_gone(control_plane: ControlPlane) -> None:
    cp = control_plane
    path = f"/api/v1/namespaces/{NS}/services"
    old_rv = churned_resource_version(cp, path)
    assert cp.expire_history() > int(old_rv)
    status, events = watch_events(cp, path, cp.kubeshim_token, old_rv)
    assert is_gone(status, events), (status, events)
    # A fresh list gives a version to watch from again.
    status, listed = cp.request("GET", path, token=cp.kubeshim_token)
    fresh_rv = listed["metadata"]["resourceVersion"]
    status, events = watch_events(cp, path, cp.kubeshim_token, fresh_rv)
    assert status == 200 and not is_gone(status, events)


def test_compaction_alone_is_gone_without_watch_cache(
    new_control_plane: Callable[..., ControlPlane],
) -> None:
    # Without the watch cache every watch is served by etcd, so compaction alone expires it.
    cp = new_control_plane(extra_apiserver_args=["--watch-cache=false"])
    path = f"/api/v1/namespaces/{NS}/services"
    old_rv = churned_resource_version(cp, path)
    assert cp.compact_etcd() > int(old_rv)
    status, events = watch_events(cp, path, cp.kubeshim_token, old_rv)
    assert is_gone(status, events), (status, events)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_up_serves_until_sigterm_and_ends_its_processes(
    kube_peers: Peers, tmp_path: Path
) -> None:
    require_peers(kube_peers, "etcd", "kube_apiserver", "kubectl")
    script = Path(__file__).resolve().parents[1] / "peers" / "cluster.py"
    workdir = tmp_path / "cp"
    proc = subprocess.Popen(
        [sys.executable, str(script), "up", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("serving until"):
                break
            key, _, value = line.partition(" ")
            lines[key] = value.strip()
        else:
            pytest.fail(
                f"cluster.py up ended early ({proc.wait()}): "
                f"{proc.stderr.read() if proc.stderr else ''}"
            )
        admin = Path(lines["admin"])
        result = subprocess.run(
            [str(kube_peers.kubectl), f"--kubeconfig={admin}", "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout.strip() == "ok", result.stderr
        children = _children(proc.pid)
        assert len(children) == 2  # etcd and kube-apiserver
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in children)


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
