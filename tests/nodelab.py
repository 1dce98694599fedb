"""kubeshim on the node of a namespace lab (tests/netns.py), for end-to-end tests.

    with Lab("px") as lab:
        c = Cluster(lab, tmp_path / "manifests")
        c.add_pod("pod-a"); lab.add_host("client")       # a pod answers its name on :8080
        c.put(service(...), endpoint_slice(...))         # the manifest folder, written at once
        c.wait_pods()
        with c.running("--vip-mode", "tproxy", ready=lambda: bool(c.status()["services"])):
            c.curl("http://10.96.0.10/")                 # from the client: ["pod-a"]

The node runs `python -m kubeshim run --manifests FOLDER --metrics-bind-address METRICS ARGS`
with its log in proxy.log beside the folder; /status and /metrics are read with curl inside the
node namespace. Leaving `running` stops the daemon and fails on a Traceback in its log.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import yaml

from tests.daemon import ROOT
from tests.netns import Lab, Netns, wait_until

METRICS = "127.0.0.1:10249"  # the metrics address inside the node namespace
NODE = "node-1"  # --hostname-override: endpoints of this node are local
OTHER = "node-2"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP"}]
ROUTED_POD = "10.244.1.5"  # add_pod(..., routed=True): its own /32, the way Calico attaches one
BACKEND = ROOT / "tests/e2e/proxy_backend.py"  # answers its pod's name on :8080


def manifest(o: Any) -> dict[str, Any]:
    """A manifest from a decoded object (tests/proxy_helpers) or a dict as it is."""
    if isinstance(o, dict):
        return o
    # omit_defaults drops kind/apiVersion; a manifest needs them.
    return {"apiVersion": o.api_version, "kind": o.kind, **msgspec.to_builtins(o)}


def serve_dns(ns: Netns, name: str, address: str) -> None:
    """dnsmasq on port 53 of `ns`, answering `name` (and names below it) with `address`."""
    ns.popen(["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", "--pid-file",
              "--user=root", "-p", "53", f"--address=/{name}/{address}"])


class Cluster:
    """The lab plus the manifest folder kubeshim follows on its node."""

    def __init__(self, lab: Lab, folder: Path) -> None:
        self.lab = lab
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder.parent / "proxy.log"
        self.objects: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, Netns] = {}
        self.ip6: dict[str, str] = {}
        self.proxy: subprocess.Popen[Any] | None = None
        self.mode = "interface"

    @property
    def client(self) -> Netns:
        return self.lab.hosts["client"]

    def ip(self, pod: str) -> str:
        return self.pods[pod].ip

    # --- the lab ---------------------------------------------------------------------------

    def add_pod(self, name: str, ip: str | None = None, routed: bool = False) -> Netns:
        """A pod (tests/netns.py Lab.add_host) answering its name on port 8080."""
        pod = self.pods[name] = self.lab.add_host(name, ip, routed)
        pod.popen([sys.executable, str(BACKEND), name])
        return pod

    def wait_pods(self) -> None:
        for pod in self.pods.values():
            pod.wait_port("", 8080)

    def bridge_with_netfilter(self) -> None:
        """br_netfilter runs the node's IP rules on its bridge ports, as on clusters with a
        bridge CNI (kubeadm requires it): the module is loaded if it is not, and the setting is
        this namespace's own."""
        if not os.path.exists("/proc/sys/net/bridge"):
            subprocess.run(["modprobe", "br_netfilter"], check=True)
        self.lab.node.run(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
                           "net.bridge.bridge-nf-call-ip6tables=1"])
        out = self.lab.node.run(["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"])
        assert out.stdout.strip() == "1"

    # --- the manifest folder ---------------------------------------------------------------

    def put(self, *objs: Any) -> None:
        """Add or replace objects; the folder's file is rewritten at once (atomically)."""
        for o in objs:
            m = manifest(o)
            self.objects[f"{m['kind']}/{m['metadata']['name']}"] = m
        self._write()

    def delete(self, key: str) -> None:
        """Remove the object `key` (kind/name)."""
        del self.objects[key]
        self._write()

    def _write(self) -> None:
        tmp = self.folder.parent / "cluster.yaml.tmp"
        tmp.write_text(yaml.safe_dump_all(list(self.objects.values())))
        os.replace(tmp, self.folder / "cluster.yaml")

    # --- the daemon ------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, *args: str, ready: Callable[[], bool], what: str = "the proxy to serve",
                timeout: float = 20) -> Iterator[Cluster]:
        """kubeshim on the node until the body ends (or a test stopped it); fails with the log
        if it is not `ready` in time, and on a Traceback in its log."""
        with open(self.log, "w") as log_file:
            self.proxy = self.lab.node.popen(
                [sys.executable, "-m", "kubeshim", "run", "--manifests", str(self.folder),
                 "--metrics-bind-address", METRICS, *args], cwd=ROOT, stderr=log_file)
        try:
            try:
                self.wait(ready, what, timeout)
            except TimeoutError:
                print(self.log.read_text())
                raise
            yield self
        finally:
            self.stop()
        log = self.log.read_text()
        assert "Traceback" not in log, log

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        assert self.proxy is not None
        if self.proxy.poll() is None:
            self.proxy.terminate()
        return self.proxy.wait(15)

    def full_status(self) -> dict[str, Any]:
        """The daemon's /status (KeyError until it is served)."""
        out = self.lab.node.run(["curl", "-sS", "--max-time", "2", f"http://{METRICS}/status"],
                                check=False)
        if out.returncode != 0:
            raise KeyError("status not served yet")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        """The proxy's part of /status."""
        return self.full_status()["proxy"]  # type: ignore[no-any-return]

    def port_status(self, service: str) -> dict[str, Any]:
        """The first port of Service default/`service` in /status."""
        for s in self.status()["services"]:
            if s["name"] == f"default/{service}":
                return s["ports"][0]  # type: ignore[no-any-return]
        raise KeyError(service)

    def endpoints_of(self, service: str) -> set[str]:
        return {e["address"] for e in self.port_status(service)["endpoints"]}

    def all_processes_serving(self) -> bool:
        """Every worker process has joined the listeners (tproxy mode with workers)."""
        workers = self.status().get("workers")
        return workers is None or workers["serving"] == workers["configured"]

    def metrics(self) -> str:
        return self.lab.node.run(["curl", "-sS", "--max-time", "2",
                                  f"http://{METRICS}/metrics"]).stdout

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 10) -> None:
        """Until `check` holds; a status not served yet or lacking a Service counts as not yet."""
        wait_until(check, what, timeout, (FileNotFoundError, json.JSONDecodeError, KeyError))

    # --- traffic from the client -----------------------------------------------------------

    def curl(self, *urls: str, extra: tuple[str, ...] = ()) -> list[str]:
        """One curl process fetching every URL on its own connection; the pod names answered."""
        out = self.client.run(["curl", "-sS", "--max-time", "5", "-H", "Connection: close",
                               *extra, *urls])
        return out.stdout.split()

    def timed_curl(self, ns: str, url: str, timeout: float = 3) -> tuple[int, str, float]:
        """(curl exit code, body, seconds) of one request from `ns` ("node" or a host)."""
        where = self.lab.node if ns == "node" else self.lab.hosts[ns]
        start = time.monotonic()
        out = where.run(["curl", "-sS", "--max-time", str(timeout), "-H", "Connection: close",
                         url], check=False)
        return out.returncode, out.stdout.strip(), time.monotonic() - start

    def spread(self, url: str, count: int) -> collections.Counter[str]:
        """`count` connections to `url`, one request each: which pod answered how often."""
        return collections.Counter(self.curl(*[url] * count))
