"""This node's Node from a manifest folder drives /healthz: curl sees 503 with
nodeEligible: false while the Node is tainted ToBeDeletedByClusterAutoscaler or being
deleted, and 200 again once it is not (kube-proxy's proxy_health.go)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from kubeshim.cluster.sources.manifests import ManifestSource
from kubeshim.cluster.state import ClusterState
from kubeshim.ops import Health, build_apps, serve
from tests.integration.test_ops_endpoints import curl
from tests.ports import free_port

NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{topology.kubernetes.io/zone: {zone}}}
{deletion}spec:
  taints: {taints}
"""
TAINT = "[{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]"


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def node_yaml(name: str = "node-a", zone: str = "z1", taints: str = "[]",
              deleting: bool = False) -> str:
    deletion = "  deletionTimestamp: '2026-11-30T20:00:00Z'\n" if deleting else ""
    return NODE.format(name=name, zone=zone, taints=taints, deletion=deletion)


async def healthz(url: str) -> tuple[int, dict[str, object]]:
    status, _, body = await curl(url)
    return status, json.loads(body)


async def eventually(url: str, status: int, eligible: bool, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await healthz(url)
        if got[0] == status and got[1]["nodeEligible"] is eligible:
            return
        assert asyncio.get_running_loop().time() < deadline, f"still {got}"
        await asyncio.sleep(0.05)


async def test_taint_and_deletion_turn_healthz_503_and_back(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "empty.yaml").write_text("")
    state = ClusterState(node_name="node-a")
    health = Health(timeout=60, probe=lambda: (0.0, None),
                    node_eligible=lambda: state.node_eligible)
    app, _ = build_apps(health, dict)
    port = free_port()
    runner = await serve(app, "127.0.0.1", port, "healthz")
    assert runner is not None
    source = ManifestSource(folder, state, poll_interval=0.05)
    task = asyncio.create_task(source.run())
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(url + "/healthz", 200, True)  # no Node yet: eligible, as kube-proxy
        write(folder / "node.yaml", node_yaml())
        while state.node is None:
            await asyncio.sleep(0.02)
        status, doc = await healthz(url + "/healthz")
        assert (status, doc["nodeEligible"], state.node_zone) == (200, True, "z1")

        write(folder / "node.yaml", node_yaml(taints=TAINT))
        await eventually(url + "/healthz", 503, False)
        status, doc = await healthz(url + "/livez")
        assert status == 200 and "nodeEligible" not in doc  # liveness ignores the node

        write(folder / "node.yaml", node_yaml())
        await eventually(url + "/healthz", 200, True)

        write(folder / "node.yaml", node_yaml(deleting=True))
        await eventually(url + "/healthz", 503, False)

        # Another node's taint is not ours.
        write(folder / "node.yaml", node_yaml() + "---\n" + node_yaml("node-b", taints=TAINT))
        await eventually(url + "/healthz", 200, True)

        # The Node gone: not eligible until it comes back.
        (folder / "node.yaml").unlink()
        await eventually(url + "/healthz", 503, False)
        write(folder / "node.yaml", node_yaml(zone="z2"))
        await eventually(url + "/healthz", 200, True)
        assert state.node_zone == "z2"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
