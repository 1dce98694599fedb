"""The control-plane scenario: kubeshim watching N Services x 10 endpoints through the fake API
server (its own process on the load CPU, so its work does not count as kubeshim's).

Measures the time from starting kubeshim to serving everything (DNS answers the last Service,
the probe Service forwards), kubeshim's RSS, and, for repeated EndpointSlice changes, the time
from the moment the fake server wrote the watch event (it reports its CLOCK_MONOTONIC) to
(a) the first new connection reaching the new endpoint and (b) the first DNS answer carrying
the new address.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .contenders import PYTHON, REPO, UPSTREAM_DNS, loopback_vip
from .lab import POD_IP, BenchError, Lab, Proc, dns_query, wait_tcp
from .load import percentile
from .scenarios import Settings, cpu_busy
from .workload import (
    NAMESPACE,
    PROBE_DNS,
    PROBE_PORTS,
    PROBE_TCP,
    ZONE,
    endpoint_slice,
    probe_dns_ip,
    probe_objects,
    scale_objects,
    service_ip,
)

API_PORT = 6443
TOKEN = "bench-token"
DNS = ("127.0.3.1", 53)
METRICS = ("127.0.0.1", 10251)
IDS = (b"A", b"B")


class FakeAPI:
    """Client for the fake server's control endpoint (POST /_control/put?wait=sent)."""

    def __init__(self, ca: Path) -> None:
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.conn = http.client.HTTPSConnection("127.0.0.1", API_PORT, context=self.ctx,
                                                timeout=15)

    def put(self, obj: dict[str, Any]) -> float:
        """Store `obj`; returns the fake server's monotonic time the watch event was sent."""
        self.conn.request("POST", "/_control/put?wait=sent", body=json.dumps(obj),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BenchError(f"fake API put: HTTP {resp.status}: {body[:300]!r}")
        return float(json.loads(body)["sent"])


def _kubeconfig(path: Path, ca: Path) -> None:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "fake", "cluster": {"server": f"https://127.0.0.1:{API_PORT}",
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": "bench", "user": {"token": TOKEN}}],
        "contexts": [{"name": "bench", "context": {"cluster": "fake", "user": "bench"}}],
    }))


def _tcp_id(host: str, port: int) -> bytes:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        return s.recv(16)
    except OSError:
        return b""
    finally:
        s.close()


class _DNSPoller:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.5)
        self.qid = 0

    def answer(self, qname: str) -> bytes:
        """The reply's bytes after the header if NOERROR with answers, else b''."""
        self.qid = (self.qid + 1) & 0xFFFF
        try:
            self.sock.sendto(dns_query(qname, qid=self.qid), DNS)
            while True:
                reply = self.sock.recv(4096)
                if int.from_bytes(reply[:2], "big") == self.qid:
                    break
        except OSError:
            return b""
        if reply[3] & 0x0F or not int.from_bytes(reply[6:8], "big"):
            return b""
        return reply[12:]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stats(lat: list[float]) -> dict[str, float]:
    ms = [x * 1e3 for x in lat]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else float("nan"),
            "min_ms": min(ms) if ms else float("nan")}


def control_plane(lab: Lab, services: int, changes: int, s: Settings,
                  profile: bool = False) -> dict[str, Any]:
    d = lab.workdir / f"control-{services}"
    d.mkdir(exist_ok=True)
    objects = scale_objects(services) + probe_objects(0)
    (d / "objects.json").write_text(json.dumps(objects))
    pki = d / "pki"
    api = lab.start(f"fakeapi-{services}", [
        PYTHON, "-m", "tests.fakeapi", "--port", str(API_PORT), "--pki", str(pki),
        "--objects", str(d / "objects.json"), "--token", TOKEN,
    ], s.load_cpu, cwd=REPO)
    procs: list[Proc] = [api]
    try:
        wait_tcp("127.0.0.1", API_PORT, proc=api, timeout=120)
        ids = lab.start(f"idserver-{services}", [
            PYTHON, "-m", "bench.idserver",
            *(f"{POD_IP}:{p}={i.decode()}" for p, i in zip(PROBE_PORTS, IDS, strict=True)),
        ], s.load_cpu, cwd=REPO)
        procs.append(ids)
        wait_tcp(POD_IP, PROBE_PORTS[0], proc=ids)
        kubeconfig = d / "kubeconfig"
        _kubeconfig(kubeconfig, pki / "ca.crt")
        argv = [
            PYTHON, "-m", "kubeshim", "run", "--kubeconfig", str(kubeconfig),
            "--vip-mode", "loopback", "--hostname-override", "bench-node",
            "--dns-bind", f"{DNS[0]}:{DNS[1]}",
            "--upstream", f"{UPSTREAM_DNS[0]}:{UPSTREAM_DNS[1]}",
            "--healthz-bind-address", "", "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}",
            "--log-level", "warning",
        ]
        t0 = time.monotonic()
        ks = lab.start(f"kubeshim-control-{services}", argv, s.subject_cpu, cwd=REPO)
        procs.append(ks)
        result: dict[str, Any] = {"services": services, "endpoints_per_service": 10}
        result.update(_until_ready(ks, services, t0, timeout=max(60.0, services / 100)))
        result["rss_bytes"] = ks.rss_bytes()
        s.log(f"  {services} services: DNS {result['dns_s']:.2f} s, listeners "
              f"{result['last_listener_s']:.2f} s, all served {result['ready_s']:.2f} s, "
              f"RSS {result['rss_bytes'] / 2**20:.0f} MiB")
        client = FakeAPI(pki / "ca.crt")
        for what, run in (("change_tcp", _tcp_changes), ("change_dns", _dns_changes)):
            busy0, cpu0, t1 = cpu_busy(s.subject_cpu), ks.cpu_seconds(), time.monotonic()
            lat = run(client, ks, changes)
            wall = time.monotonic() - t1
            cpu = (ks.cpu_seconds() - cpu0) / wall
            result[what] = _stats(lat)
            result[what]["raw_ms"] = [round(x * 1e3, 3) for x in lat]
            result[what]["cpu_util"] = cpu
            result[what]["other_load"] = max(0.0, (cpu_busy(s.subject_cpu) - busy0) / wall - cpu)
        if profile:
            # After the measured changes, so py-spy does not disturb them.
            from .profile import finish, record

            folded = lab.workdir / f"profile-changes-{services}.folded"
            seconds = min(6.0, max(3.0, s.seconds))
            spy = record(ks.pid, seconds, folded)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                _tcp_changes(client, ks, 10, first=changes + 1)
                _dns_changes(client, ks, 10, first=changes + 1)
            result["profile"] = finish(spy, folded, seconds)
        result["rss_after_changes_bytes"] = ks.rss_bytes()
        result["cpu_s_total"] = ks.cpu_seconds()
        for what in ("change_tcp", "change_dns"):
            st = result[what]
            s.log(f"  {services} services {what}: p50 {st['p50_ms']:.2f} ms, "
                  f"p99 {st['p99_ms']:.2f} ms, max {st['max_ms']:.2f} ms (n={st['n']}), "
                  f"other load on its CPU {st['other_load']:.2f}")
        return result
    finally:
        for p in reversed(procs):
            lab.stop(p)


def _until_ready(ks: Proc, services: int, t0: float, timeout: float) -> dict[str, float]:
    last = f"s{services - 1}.{NAMESPACE}.svc.{ZONE}"
    vip, port = loopback_vip(PROBE_TCP[1]), PROBE_TCP[2]
    poller = _DNSPoller()
    last_vip = loopback_vip(service_ip(services - 1))
    out: dict[str, float] = {}
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if not ks.alive():
            raise BenchError(f"kubeshim exited {ks.popen.returncode}:\n{ks.tail()}")
        # The last Service's listener accepts (its endpoints lead nowhere: accepting is enough).
        if "last_listener_s" not in out and _accepts(last_vip, 80):
            out["last_listener_s"] = time.monotonic() - t0
        if "dns_s" not in out and poller.answer(last):
            out["dns_s"] = time.monotonic() - t0
        if "proxy_s" not in out and _tcp_id(vip, port) == IDS[0]:
            out["proxy_s"] = time.monotonic() - t0
        if {"dns_s", "proxy_s", "last_listener_s"} <= out.keys():
            out["ready_s"] = max(out.values())
            return out
        time.sleep(0.01)
    raise BenchError(f"kubeshim did not serve {services} services within {timeout:.0f} s "
                     f"(reached: {out}):\n{ks.tail()}\npy-spy dump:\n{_dump(ks)}")


def _dump(ks: Proc) -> str:
    """Where the daemon is stuck, for the error message."""
    try:
        p = subprocess.run(["py-spy", "dump", "--pid", str(ks.pid)], capture_output=True,
                           text=True, timeout=20)
        return "\n".join(p.stdout.splitlines()[:25])
    except (OSError, subprocess.TimeoutExpired) as e:
        return repr(e)


def _changed(client: FakeAPI, obj: dict[str, Any], seen: Any, ks: Proc,
             timeout: float = 10.0) -> float:
    """Put `obj` from a thread while `seen()` is polled here; seconds from the event's send
    time to the first poll that saw its effect."""
    sent: list[float] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            sent.append(client.put(obj))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=put, daemon=True)
    th.start()
    deadline = time.monotonic() + timeout
    while True:
        if seen():
            t_seen = time.monotonic()
            break
        if time.monotonic() > deadline:
            raise BenchError(f"change not visible after {timeout:.0f} s:\n{ks.tail()}")
        if not ks.alive():
            raise BenchError(f"kubeshim exited {ks.popen.returncode}:\n{ks.tail()}")
    th.join(15)
    if errors:
        raise BenchError(f"fake API put failed: {errors[0]!r}")
    if not sent:
        raise BenchError("fake API put did not return")
    return max(0.0, t_seen - sent[0])


def _tcp_changes(client: FakeAPI, ks: Proc, n: int, first: int = 1) -> list[float]:
    vip, port = loopback_vip(PROBE_TCP[1]), PROBE_TCP[2]
    lat = []
    for g in range(first, first + n):
        obj = endpoint_slice(PROBE_TCP[0], [POD_IP], [("http", PROBE_PORTS[g % 2], "TCP")])
        want = IDS[g % 2]
        lat.append(_changed(client, obj, lambda w=want: _tcp_id(vip, port) == w, ks))  # type: ignore[misc]
        time.sleep(0.01)
    return lat


def _dns_changes(client: FakeAPI, ks: Proc, n: int, first: int = 1) -> list[float]:
    poller = _DNSPoller()
    qname = f"{PROBE_DNS}.{NAMESPACE}.svc.{ZONE}"
    lat = []
    for g in range(first, first + n):
        ip = probe_dns_ip(g)
        obj = endpoint_slice(PROBE_DNS, [ip], [("http", 8080, "TCP")])
        want = socket.inet_aton(ip)
        lat.append(_changed(client, obj, lambda w=want: w in poller.answer(qname), ks))  # type: ignore[misc]
        time.sleep(0.01)
    return lat
