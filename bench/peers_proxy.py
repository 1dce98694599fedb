"""EndpointSlice change -> traffic with kube-proxy (nftables mode) and kubeshim, both watching a
real kube-apiserver holding N Services x 10 endpoints.

Everything runs inside the bench's namespace (bench/lab.py): a fresh etcd + kube-apiserver from
tests/peers (binaries by tests/peers/build.sh) per scale, objects POSTed to it, then
kube-proxy `--proxy-mode=nftables` (its table exists only in that namespace, and is deleted
after), then kubeshim --vip-mode loopback, one at a time on the subject CPU. For each: the time
from its start to forwarding the probe Service (both apply their first full list at once), its
RSS, and for repeated PATCHes of the probe's EndpointSlice the time from sending the PATCH to
the first new connection that reaches the new endpoint (bench/idserver.py tells which).

`endpoint_change(lab, n, changes, settings)` is the entry point; `python -m bench.peers_run`
runs it standalone. kube-proxy and CoreDNS as throughput contenders are in bench/peers.py.

The namespace has no route for the Service CIDR; `ip route replace local SERVICE_CIDR dev lo`
makes ClusterIPs routable there (on a node the default route does), and kube-proxy's output-hook
DNAT rewrites them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.peers.cluster import SERVICE_CIDR, ControlPlane, Peers, PeersMissing

from .contenders import PYTHON, REPO, UPSTREAM_DNS, loopback_vip
from .control import IDS, _accepts, _stats, _tcp_id
from .lab import POD_IP, BenchError, Lab, Proc, wait_tcp
from .scenarios import Settings
from .workload import (
    NAMESPACE,
    PROBE_PORTS,
    PROBE_TCP,
    endpoint_slice,
    scale_objects,
    service,
    service_ip,
)

NODE = "bench-node"
NODE_IP = "10.244.0.1"
KUBE_PROXY_HEALTHZ = "127.0.0.1:10266"
KUBE_PROXY_METRICS = "127.0.0.1:10259"
# kube-proxy's nftables mode syncs at most once per minSyncPeriod (default 1 s): changes are
# spaced by more than that so each is measured on its own, for both proxies alike.
CHANGE_SPACING = 1.2
READY_TIMEOUT = 300.0


# --- the control plane in the bench namespace -------------------------------------------------


def start_control_plane(lab: Lab, name: str) -> ControlPlane:
    """etcd + kube-apiserver on the namespace's loopback with a Node object and the bench
    namespace; stopped by `cp.stop()`."""
    peers = Peers.find()
    try:
        peers.require("etcd", "kube_apiserver", "kubectl", "kube_proxy")
    except PeersMissing as e:
        raise BenchError(str(e)) from None
    cp = ControlPlane(lab.workdir / name, peers)
    cp.start()
    create(cp, [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        # kube-proxy reads its Node (primary IPs for NodePorts); no kubelet makes one here.
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
         "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
    ])
    lab.sh(f"ip route replace local {SERVICE_CIDR} dev lo")
    return cp


def pin(cp: ControlPlane, cpu: str) -> None:
    """Move etcd and kube-apiserver to `cpu` (after the bulk load, which may use every CPU)."""
    for proc in (cp.etcd, cp.apiserver):
        if proc is not None and proc.pid is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {int(c) for c in cpu.split(",")})


def create(cp: ControlPlane, objects: list[dict[str, Any]], clients: int = 8) -> float:
    """POST `objects` (Namespace, Node, Service, EndpointSlice) to the API server from
    `clients` kept-alive connections at once, in order per kind; returns the seconds it took."""
    t0 = time.monotonic()
    # Namespaces and Nodes first, then Services, then EndpointSlices (any order works for the
    # API server; this is the order a cluster sees them in).
    rank = {"Namespace": 0, "Node": 0, "Service": 1, "EndpointSlice": 2}
    local = threading.local()

    def post(obj: dict[str, Any]) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPSConnection(
                "127.0.0.1", cp.port, timeout=60, context=cp.ssl_context())
        conn.request("POST", _collection(obj), body=json.dumps(obj), headers={
            "Authorization": f"Bearer {cp.admin_token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status not in (201, 409):
            raise BenchError(f"create {obj['kind']} {obj['metadata']['name']}: "
                             f"HTTP {resp.status}: {body[:300]!r}")

    for level in (0, 1, 2):
        batch = [_without_uid(o) for o in objects if rank[o["kind"]] == level]
        with ThreadPoolExecutor(clients) as pool:
            for _ in pool.map(post, batch):
                pass
    return time.monotonic() - t0


def _collection(obj: dict[str, Any]) -> str:
    kind, ns = obj["kind"], obj["metadata"].get("namespace", NAMESPACE)
    return {"Namespace": "/api/v1/namespaces", "Node": "/api/v1/nodes",
            "Service": f"/api/v1/namespaces/{ns}/services",
            "EndpointSlice": f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"}[kind]


def _without_uid(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "uid"}
    return {**obj, "metadata": meta}


# --- kube-proxy --------------------------------------------------------------------------------


def start_kube_proxy(lab: Lab, cp: ControlPlane, cpu: str, name: str = "kube-proxy") -> Proc:
    argv = [
        str(cp.peers.kube_proxy), "--proxy-mode=nftables",
        f"--kubeconfig={cp.admin_kubeconfig}", f"--hostname-override={NODE}",
        f"--healthz-bind-address={KUBE_PROXY_HEALTHZ}",
        f"--metrics-bind-address={KUBE_PROXY_METRICS}",
        "--cluster-cidr=10.244.0.0/16",
        # Leave the conntrack sysctls alone: some are not per-namespace.
        "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0", "--v=2",
    ]
    return lab.start(name, argv, cpu)


def stop_kube_proxy(lab: Lab, proc: Proc) -> None:
    """Stop kube-proxy and delete its tables (it leaves them on exit, as on a node)."""
    lab.stop(proc)
    for table in ("ip kube-proxy", "ip6 kube-proxy"):
        lab.sh(f"nft delete table {table}", check=False)


def _kube_proxy_errors(proc: Proc) -> str:
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines if line[:1] in ("E", "F"))[-3000:]


# --- endpoint change -> traffic ---------------------------------------------------------------


class SlicePatcher:
    """PATCHes an EndpointSlice over one kept-alive HTTPS connection to the API server."""

    def __init__(self, cp: ControlPlane) -> None:
        self.token = cp.admin_token
        self.conn = http.client.HTTPSConnection("127.0.0.1", cp.port, timeout=30,
                                                context=cp.ssl_context())

    def reset(self) -> None:
        """Point the probe back at the first id server (generation 0)."""
        self.patch(f"{PROBE_TCP[0]}-a",
                   {"ports": [{"name": "http", "port": PROBE_PORTS[0], "protocol": "TCP"}]})

    def patch(self, name: str, body: dict[str, Any]) -> None:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/{name}"
        self.conn.request("PATCH", path, body=json.dumps(body), headers={
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/merge-patch+json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise BenchError(f"PATCH {name}: HTTP {resp.status}: {data[:300]!r}")


def _changes(patcher: SlicePatcher, proc: Proc, vip: str, port: int, n: int) -> list[float]:
    """Flip the probe Service between the two id servers n times; per flip, seconds from
    sending the PATCH to the first new connection that reaches the new one."""
    slice_name = f"{PROBE_TCP[0]}-a"
    lat = []
    for g in range(1, n + 1):
        want = IDS[g % 2]
        body = {"ports": [{"name": "http", "port": PROBE_PORTS[g % 2], "protocol": "TCP"}]}
        errors: list[BaseException] = []

        def send(b: dict[str, Any] = body, errs: list[BaseException] = errors) -> None:
            try:
                patcher.patch(slice_name, b)
            except BaseException as e:  # noqa: BLE001 - reported below
                errs.append(e)

        th = threading.Thread(target=send, daemon=True)
        t0 = time.monotonic()
        th.start()
        deadline = t0 + 15
        while _tcp_id(vip, port) != want:
            if time.monotonic() > deadline or not proc.alive() or errors:
                raise BenchError(f"{proc.name}: change {g} not followed "
                                 f"({errors[0] if errors else 'timeout'}):\n{proc.tail()}")
        lat.append(time.monotonic() - t0)
        th.join(15)
        time.sleep(CHANGE_SPACING)
    return lat


def _until_probe(proc: Proc, vip: str, port: int, t0: float, timeout: float) -> float:
    while _tcp_id(vip, port) != IDS[0]:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{proc.name} did not forward the probe within {timeout:.0f} s:\n"
                             f"{proc.tail()}")
        time.sleep(0.02)
    return time.monotonic() - t0


def _last_sync_ms(proc: Proc) -> float | None:
    """kube-proxy's own figure for its last full sync ("SyncProxyRules complete" elapsed)."""
    text = proc.log.read_text(errors="replace")
    found = re.findall(r'"SyncProxyRules complete".*?elapsed="([\d.]+)(µs|us|ms|s)"', text)
    if not found:
        return None
    value, unit = found[-1]
    return float(value) * {"µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def endpoint_change(lab: Lab, services: int, changes: int, s: Settings) -> dict[str, Any]:
    """kube-proxy and kubeshim on one real API server with `services` Services x 10 endpoints."""
    cp = start_control_plane(lab, f"peers-control-{services}")
    procs: list[Proc] = []
    result: dict[str, Any] = {"services": services, "endpoints_per_service": 10,
                              "changes": changes, "change_spacing_s": CHANGE_SPACING}
    try:
        objects = scale_objects(services) + [
            service(PROBE_TCP[0], PROBE_TCP[1], [("http", PROBE_TCP[2], "TCP")]),
            endpoint_slice(PROBE_TCP[0], [POD_IP], [("http", PROBE_PORTS[0], "TCP")]),
        ]
        result["create_s"] = create(cp, objects)
        s.log(f"  {services} services: created {len(objects)} objects in "
              f"{result['create_s']:.1f} s with 8 clients")
        pin(cp, s.load_cpu)
        ids = lab.start(f"peers-idserver-{services}", [
            PYTHON, "-m", "bench.idserver",
            *(f"{POD_IP}:{p}={i.decode()}" for p, i in zip(PROBE_PORTS, IDS, strict=True)),
        ], s.load_cpu, cwd=REPO)
        procs.append(ids)
        wait_tcp(POD_IP, PROBE_PORTS[0], proc=ids)
        patcher = SlicePatcher(cp)

        # kube-proxy
        patcher.reset()
        t0 = time.monotonic()
        kp = start_kube_proxy(lab, cp, s.subject_cpu, f"kube-proxy-{services}")
        try:
            entry: dict[str, Any] = {
                "ready_s": _until_probe(kp, PROBE_TCP[1], PROBE_TCP[2], t0, READY_TIMEOUT)}
            deadline = time.monotonic() + 10  # the log line follows the rules by a moment
            while _last_sync_ms(kp) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            entry["first_sync_ms"] = _last_sync_ms(kp)
            entry["rss_bytes"] = kp.rss_bytes()
            entry["change_tcp"] = _stats(_changes(patcher, kp, PROBE_TCP[1], PROBE_TCP[2],
                                                  changes))
            entry["last_sync_ms"] = _last_sync_ms(kp)
            entry["cpu_s_total"] = kp.cpu_seconds()
            result["kube-proxy-nftables"] = entry
        finally:
            stop_kube_proxy(lab, kp)
        _log(s, services, "kube-proxy-nftables", entry)

        # kubeshim, from the same API server
        vip = loopback_vip(PROBE_TCP[1])
        argv = [PYTHON, "-m", "kubeshim", "run", "--kubeconfig", str(cp.kubeshim_kubeconfig),
                "--vip-mode", "loopback", "--hostname-override", NODE,
                "--dns-bind", "127.0.3.2:53", "--upstream", f"{UPSTREAM_DNS[0]}:{UPSTREAM_DNS[1]}",
                "--healthz-bind-address", "", "--metrics-bind-address", "",
                "--log-level", "warning"]
        patcher.reset()
        t0 = time.monotonic()
        ks = lab.start(f"kubeshim-peers-{services}", argv, s.subject_cpu, cwd=REPO)
        try:
            entry = {"ready_s": _until_probe(ks, vip, PROBE_TCP[2], t0, READY_TIMEOUT)}
            last = loopback_vip(service_ip(services - 1))
            while not _accepts(last, 80):  # every listener open
                if time.monotonic() - t0 > READY_TIMEOUT:
                    raise BenchError(f"kubeshim did not open {last}:80")
                time.sleep(0.02)
            entry["all_listeners_s"] = time.monotonic() - t0
            entry["rss_bytes"] = ks.rss_bytes()
            entry["change_tcp"] = _stats(_changes(patcher, ks, vip, PROBE_TCP[2], changes))
            entry["cpu_s_total"] = ks.cpu_seconds()
            result["kubeshim"] = entry
        finally:
            lab.stop(ks)
        _log(s, services, "kubeshim", entry)
        return result
    finally:
        for p in reversed(procs):
            lab.stop(p)
        cp.stop()


def _log(s: Settings, services: int, name: str, entry: dict[str, Any]) -> None:
    st = entry["change_tcp"]
    s.log(f"  {services} services {name}: ready {entry['ready_s']:.2f} s, RSS "
          f"{entry['rss_bytes'] / 2**20:.0f} MiB, change->traffic p50 {st['p50_ms']:.1f} ms "
          f"p99 {st['p99_ms']:.1f} ms max {st['max_ms']:.1f} ms (n={st['n']})")
