"""deploy/: the cluster manifests and the systemd unit.

The manifests go to a real kube-apiserver (tests/peers) with `kubectl apply --dry-run=server
--validate=strict`, which rejects unknown or misplaced fields exactly as a cluster would. The
checks by kind hold them to what kubeshim needs: the capabilities and no more, kube-proxy's
tolerations and priority, a configuration kubeshim accepts, a kube-dns Service whose
ClusterIP the DNS server answers itself (and no node address). The unit file goes through
`systemd-analyze verify`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeshim.cli import build_parser, options_from_args
from kubeshim.config import Options, load_config_file
from tests.peers.cluster import ControlPlane
from tests.peers.fixtures import control_plane, kube_peers, peers_missing  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def objs() -> dict[tuple[str, str], dict[str, Any]]:
    return manifests()


def container(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod = objs[("DaemonSet", "kubeshim")]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return dict(pod["containers"][0])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_daemonset_runs_like_kube_proxy(objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    ds = objs[("DaemonSet", "kubeshim")]
    assert ds["metadata"]["namespace"] == "kube-system"
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == objs[("ServiceAccount", "kubeshim")]["metadata"]["name"]
    c = container(objs)
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    probe = c["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/livez", 10256)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--hostname-override=$(NODE_NAME)" in c["args"]
    # The grace period outlasts the drain, so SIGTERM gets to drain.
    drain = next(float(a.split("=")[1]) for a in c["args"] if a.startswith("--drain-timeout="))
    assert pod["terminationGracePeriodSeconds"] > drain


def test_the_daemon_accepts_its_arguments_and_configuration(
        objs: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    c = container(objs)
    cm = objs[("ConfigMap", "kubeshim")]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in objs[("DaemonSet", "kubeshim")]["spec"]["template"]["spec"]
                  ["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    config_arg = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--config="))
    item = next(i for i in volume["configMap"]["items"]
                if f"{mount['mountPath']}/{i['path']}" == config_arg)
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"][item["key"]])
    opts = Options()
    load_config_file(config, opts)
    assert opts.ignored == [], "the shipped configuration sets nothing kubeshim ignores"
    # Every configMapKeyRef names a key the ConfigMap has.
    for e in c["env"]:
        if ref := e.get("valueFrom", {}).get("configMapKeyRef"):
            assert ref["name"] == cm["metadata"]["name"] and ref["key"] in cm["data"]
    # The argv, with the downward API's values, parses as the daemon would parse it.
    values = {"NODE_NAME": "node-1"}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]
    argv = [a.replace(config_arg, str(config)) for a in argv]
    opts = options_from_args(build_parser().parse_args(argv))
    assert (opts.proxy.node_name, opts.in_cluster, opts.proxy.vip_mode) == (
        "node-1", True, "tproxy")
    # DNS on the kube-dns ClusterIP only: no bind on a node address or on all addresses.
    assert opts.dns.binds == opts.dns.transparent_binds == [("10.96.0.10", 53)]
    assert opts.healthz_bind_address.endswith(":10256")


def test_kube_dns_is_answered_by_kubeshim_on_each_node(
        objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    svc = objs[("Service", "kube-dns")]
    assert svc["metadata"]["namespace"] == "kube-system"
    assert svc["spec"]["clusterIP"] == "10.96.0.10"
    # No selector, so no endpoints: the DNS server holds the ClusterIP's port 53 itself.
    assert "selector" not in svc["spec"]
    ports = {(p["name"], p["protocol"], p["port"]) for p in svc["spec"]["ports"]}
    assert ports == {("dns", "UDP", 53), ("dns-tcp", "TCP", 53)}
    dns = yaml.safe_load(objs[("ConfigMap", "kubeshim")]["data"]["config.yaml"])["dns"]
    assert dns["transparentBinds"] == [f"{svc['spec']['clusterIP']}:53"]
    assert "binds" not in dns
    # No hostPort 53 is claimed on the node.
    assert all(p["containerPort"] != 53 for p in container(objs)["ports"])


def test_manifests_pass_a_real_api_servers_strict_validation(
        control_plane: ControlPlane) -> None:  # noqa: F811
    result = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict",
                                   "-k", str(DEPLOY), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    applied = set(re.findall(r"^(\S+) \S+ \(server dry run\)$", result.stdout, re.M))
    assert {"daemonset.apps/kubeshim", "configmap/kubeshim", "service/kube-dns"} <= applied


def test_the_api_server_rejects_a_broken_daemonset(
        control_plane: ControlPlane, tmp_path: Path) -> None:  # noqa: F811
    """The check above can fail: a misspelt field is refused by strict validation."""
    ds = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(ds))
    result = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f",
                                   str(path), check=False, timeout=60)
    assert result.returncode != 0 and "hostNetwrok" in result.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        peers_missing("systemd-analyze is not installed (apt-get install systemd)")
    unit = (DEPLOY / "kubeshim.service").read_text()
    exe = shutil.which("kubeshim")
    assert exe is not None, "the kubeshim console script is installed (pip install -e .)"
    copy = tmp_path / "kubeshim.service"
    copy.write_text(unit.replace("/usr/local/bin/kubeshim", exe))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kubeshim.service" not in result.stderr, result.stderr


def test_systemd_unit_grants_only_what_kubeshim_needs() -> None:
    lines = dict(
        line.split("=", 1) for line in (DEPLOY / "kubeshim.service").read_text().splitlines()
        if "=" in line and not line.startswith(("#", " ")))
    wanted = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert set(lines["AmbientCapabilities"].split()) == wanted
    assert set(lines["CapabilityBoundingSet"].split()) == wanted
    assert lines["NoNewPrivileges"] == "yes" and lines["DynamicUser"] == "yes"
    assert lines["KillSignal"] == "SIGTERM"
    # The stop timeout outlasts the drain.
    drain = float(re.search(r"--drain-timeout (\S+)", (DEPLOY / "kubeshim.service")
                            .read_text()).group(1))  # type: ignore[union-attr]
    assert float(lines["TimeoutStopSec"]) > drain
