"""ManifestSource on a real folder: initial load of every supported file shape, then files
added, edited, broken, repaired and deleted while it runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.sources.manifests import ManifestSource
from kubeshim.cluster.state import ClusterState, ServiceChange

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"

SVC = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: 80}}]
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}
"""


def manifest(name: str, ip: str, *endpoints: str) -> str:
    eps = "\n".join(f"- addresses: [{e}]" for e in endpoints) or "[]"
    return SVC.format(name=name, ip=ip) + "---\n" + SLICE.format(name=name, endpoints=eps)


def key(name: str, ns: str = "default") -> NamespacedName:
    return NamespacedName(ns, name)


def endpoints(state: ClusterState, name: str) -> list[str]:
    info = state.services.get(key(name))
    return [e.ip for e in info.ports[0].endpoints] if info and info.ports else []


def write(path: Path, text: str) -> None:
    """Write like an editor that saves atomically: a temp file renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        r.getMessage() + "".join(f" {k}={v}" for k, v in getattr(r, "kv", {}).items())
        for r in caplog.records
    )


class Running:
    def __init__(self, folder: Path) -> None:
        self.state = ClusterState()
        self.changes: list[ServiceChange] = []
        self.state.subscribe(self.changes.extend)
        self.source = ManifestSource(folder, self.state, poll_interval=0.05)
        self.task = asyncio.create_task(self.source.run())


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Callable[[], Running]]:
    started: list[Running] = []

    def start() -> Running:
        r = Running(tmp_path)
        started.append(r)
        return r

    yield start
    for r in started:
        r.task.cancel()


def test_load_once_reads_examples_lists_and_json(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "ex")
    (tmp_path / "ex" / "nested").mkdir()
    # What `kubectl get svc -o json` prints: a typed list whose items omit kind.
    (tmp_path / "ex" / "nested" / "svc.json").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ServiceList",
                "metadata": {"resourceVersion": "9"},
                "items": [
                    {
                        "metadata": {"name": "api", "namespace": "prod"},
                        "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 443}]},
                    }
                ],
            }
        )
    )
    (tmp_path / "ex" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    )
    (tmp_path / "ex" / ".hidden.yaml").write_text(manifest("hidden", "10.96.9.9"))
    (tmp_path / "ex" / "web.yaml~").write_text(manifest("backup", "10.96.9.8"))
    state = ClusterState()
    ManifestSource(tmp_path / "ex", state).load_once()
    assert state.synced
    assert sorted(str(k) for k in state.services) == [
        "default/db",
        "default/docs",
        "default/web",
        "infra/mesh-gateway",
        "infra/resolver",
        "prod/api",
    ]
    assert [e.ip for e in state.services[key("web")].ports[0].endpoints] == [
        "127.0.0.21",
        "127.0.0.22",
        "127.0.0.23",
    ]
    assert state.services[key("resolver", "infra")].ports[0].endpoints[0].port == 1053
    assert not state.services[key("mesh-gateway", "infra")].proxied


async def test_add_edit_delete_while_running(tmp_path: Path, running) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1", "10.0.0.1"))
    r = running()
    await wait_for(lambda: r.state.synced and endpoints(r.state, "a") == ["10.0.0.1"])
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yml", manifest("b", "10.96.0.2", "10.0.0.2"))
    await wait_for(lambda: endpoints(r.state, "b") == ["10.0.0.2"])
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1", "10.0.0.1", "10.0.0.3"))
    await wait_for(lambda: endpoints(r.state, "a") == ["10.0.0.1", "10.0.0.3"])
    (tmp_path / "sub" / "b.yml").unlink()
    await wait_for(lambda: key("b") not in r.state.services)
    assert key("a") in r.state.services
    # Each edit reached subscribers once: add a, add b, edit a, delete b.
    assert [(str(c.key), c.previous is None, c.current is None) for c in r.changes] == [
        ("default/a", True, False),
        ("default/b", True, False),
        ("default/a", False, False),
        ("default/b", False, True),
    ]


async def test_broken_file_is_reported_and_keeps_serving(tmp_path: Path, running, caplog) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1", "10.0.0.1"))
    write(tmp_path / "b.yaml", manifest("b", "10.96.0.2", "10.0.0.2"))
    r = running()
    await wait_for(lambda: len(r.state.services) == 2)
    write(tmp_path / "a.yaml", "kind: Service\nmetadata: {name: a\n  bad: [")  # a YAML error
    write(tmp_path / "b.yaml", manifest("b", "10.96.0.2", "10.0.0.2", "10.0.0.4"))
    await wait_for(lambda: endpoints(r.state, "b") == ["10.0.0.2", "10.0.0.4"])
    text = log_text(caplog)
    assert (
        f"manifest skipped; keeping its previous objects file={tmp_path / 'a.yaml'}"
        in text
    )
    assert text.count("manifest skipped") == 1  # once per episode, not per look
    assert endpoints(r.state, "a") == ["10.0.0.1"]  # the half-written file's objects are kept
    # An invalid object: named and skipped, its file's other objects still apply.
    write(
        tmp_path / "a.yaml",
        manifest("a", "10.96.0.1", "10.0.0.1") + "---\n" + SVC.format(name="c", ip="10.96.0.300"),
    )
    await wait_for(lambda: "object=default/c" in log_text(caplog))
    assert "reason=field spec.clusterIP: '10.96.0.300' is not an IP address" in log_text(caplog)
    assert sorted(r.state.services) == [key("a"), key("b")]


async def test_same_object_in_two_files_last_path_wins(tmp_path: Path, running, caplog) -> None:
    write(tmp_path / "1.yaml", SVC.format(name="a", ip="10.96.0.1"))
    write(tmp_path / "2.yaml", SVC.format(name="a", ip="10.96.0.2"))
    r = running()
    await wait_for(lambda: r.state.synced)
    assert r.state.services[key("a")].service.cluster_ips == ["10.96.0.2"]
    assert "object defined in two files, the later path wins" in log_text(caplog)
    (tmp_path / "2.yaml").unlink()
    await wait_for(lambda: r.state.services[key("a")].service.cluster_ips == ["10.96.0.1"])


async def test_configmap_style_symlink_swap(tmp_path: Path, running) -> None:
    # A ConfigMap volume: files are symlinks into ..data, which is swapped atomically.
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "svc.yaml").write_text(manifest("a", "10.96.0.1", "10.0.0.1"))
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/svc.yaml", tmp_path / "svc.yaml")
    r = running()
    await wait_for(lambda: endpoints(r.state, "a") == ["10.0.0.1"])
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "svc.yaml").write_text(manifest("a", "10.96.0.1", "10.0.0.9"))
    os.symlink("..v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await wait_for(lambda: endpoints(r.state, "a") == ["10.0.0.9"])
