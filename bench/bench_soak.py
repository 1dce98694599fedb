"""Soak: the daemon under minutes of churn and hostile clients; RSS, descriptors and errors.

    python bench/bench_soak.py [--minutes 5] [--services 200] [--out bench/results/soak.md]

Runs the real daemon (`kubeshim run --manifests DIR --vip-mode loopback`) over N Services in
front of two loopback backends, then for the whole run, all at once:

- churn: one Service's EndpointSlice file rewritten every 50 ms, a Service file added and
  removed every second;
- hostile clients, each from its own loopback address: idle TCP connections piled on one
  ClusterIP (its backend completes handshakes and never reads), UDP from ever new source
  ports, never-finished requests to /healthz, a DNS-over-TCP client pipelining queries without
  reading, and broken manifests (a symlink loop, a FIFO, /dev/zero behind a link, a file past
  the size limit);
- legitimate probes every 200 ms: curl through another Service, dig over UDP and TCP, /healthz.

Every 5 s it records the daemon's RSS, open descriptors and the probes' error counts, and
prints the table (and writes it as markdown with --out). Success is flat RSS and descriptors
and zero probe errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubeshim.proxy.vip import LoopbackMapper  # noqa: E402
from tests.ports import free_port  # noqa: E402

BACKENDS = ("127.0.4.1", "127.0.4.2")
HOG = "127.0.4.3"  # behind the Service the idle connections pile on: listens, never accepts
BACKEND_PORT = 18997
ZONE = "cluster.local"


def cluster_ip(i: int) -> str:
    return f"10.105.{i // 250}.{i % 250 + 1}"


def manifest(i: int, backend: str) -> str:
    name = f"svc-{i}"
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "soak"},
         "spec": {"clusterIP": cluster_ip(i), "ports": [
             {"name": "http", "port": 80, "targetPort": BACKEND_PORT},
             {"name": "udp", "port": 5353, "protocol": "UDP", "targetPort": BACKEND_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "soak",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": BACKEND_PORT},
                   {"name": "udp", "protocol": "UDP", "port": BACKEND_PORT}],
         "endpoints": [{"addresses": [backend]}]},
    ]
    return "\n---\n".join(json.dumps(o) for o in objs)


def write(folder: Path, i: int, backend: str) -> None:
    tmp = folder / f".svc-{i}.tmp"
    tmp.write_text(manifest(i, backend))
    os.rename(tmp, folder / f"svc-{i}.yaml")


def dns_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


class Soak:
    def __init__(self, folder: Path, services: int, stop: threading.Event) -> None:
        self.folder = folder
        self.services = services
        self.stop = stop
        self.errors: dict[str, int] = {"curl": 0, "dig udp": 0, "dig tcp": 0, "healthz": 0}
        self.probes = 0
        self.hostile: dict[str, int] = {"idle tcp": 0, "udp ports": 0, "slow healthz": 0,
                                        "dns pipelined": 0}
        self.changes = 0
        self.mapper = LoopbackMapper()

    # --- churn ---

    def churn(self) -> None:
        n = 0
        while not self.stop.wait(0.05):
            n += 1
            write(self.folder, 1 + n % (self.services - 1), BACKENDS[n % 2])
            self.changes += 1
            if n % 20 == 0:
                extra = self.folder / "svc-extra.yaml"
                if extra.exists():
                    extra.unlink()
                else:
                    extra.write_text(manifest(self.services + 1, BACKENDS[0]).replace(
                        f"svc-{self.services + 1}", "svc-extra"))

    def broken_files(self) -> None:
        os.symlink(".", self.folder / "loop")
        os.mkfifo(self.folder / "fifo.yaml")
        os.symlink("/dev/zero", self.folder / "zero.yaml")
        with open(self.folder / "huge.yaml", "wb") as f:
            f.truncate(90 * 1024 * 1024)

    # --- hostile clients ---

    def idle_tcp(self) -> None:
        target = (self.mapper.address(cluster_ip(self.services)), 80)
        held: list[socket.socket] = []
        while not self.stop.wait(0.01):
            if len(held) >= 3000:
                held.pop(0).close()
            s = socket.socket()
            s.bind(("127.0.5.2", 0))
            s.settimeout(1)
            try:
                s.connect(target)
                held.append(s)
                self.hostile["idle tcp"] += 1
            except OSError:
                s.close()
        for s in held:
            s.close()

    def udp_ports(self) -> None:
        target = (self.mapper.address(cluster_ip(self.services - 1)), 5353)
        while not self.stop.wait(0.002):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.5.3", 0))
                s.sendto(b"x", target)
                self.hostile["udp ports"] += 1

    def slow_healthz(self, port: int) -> None:
        held: list[socket.socket] = []
        while not self.stop.wait(0.02):
            if len(held) >= 1100:
                held.pop(0).close()
            s = socket.socket()
            s.bind(("127.0.5.4", 0))
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                held.append(s)
                self.hostile["slow healthz"] += 1
            except OSError:
                s.close()
        for s in held:
            s.close()

    def dns_pipeline(self, port: int) -> None:
        msg = dns_query(f"svc-1.soak.svc.{ZONE}", 1)
        frame = struct.pack(">H", len(msg)) + msg
        while not self.stop.is_set():
            s = socket.socket()
            s.bind(("127.0.5.5", 0))
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", port))
                while not self.stop.is_set():
                    s.sendall(frame * 64)  # never reads a reply
                    self.hostile["dns pipelined"] += 64
            except OSError:
                pass
            finally:
                s.close()
            self.stop.wait(0.2)

    # --- legitimate probes ---

    def probe(self, dns_port: int, healthz_port: int) -> None:
        target = self.mapper.address(cluster_ip(0))
        name = f"svc-0.soak.svc.{ZONE}"
        while not self.stop.wait(0.2):
            self.probes += 1
            checks = {
                "curl": ["curl", "-s", "--max-time", "2", f"http://{target}/"],
                "dig udp": ["dig", "+short", "+time=2", "+tries=1", "-p", str(dns_port),
                            "@127.0.0.1", name],
                "dig tcp": ["dig", "+short", "+tcp", "+time=2", "+tries=1", "-p",
                            str(dns_port), "@127.0.0.1", name],
                "healthz": ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "--max-time", "2", f"http://127.0.0.1:{healthz_port}/healthz"],
            }
            for what, argv in checks.items():
                out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
                ok = {"curl": out in BACKENDS, "dig udp": out == target,
                      "dig tcp": out == target, "healthz": out == "200"}[what]
                if not ok:
                    self.errors[what] += 1


def sample(pid: int) -> tuple[float, int]:
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def backend(ip: str) -> subprocess.Popen[bytes]:
    code = ("import socket,sys,threading\n"
            "ip=sys.argv[1];port=int(sys.argv[2])\n"
            "t=socket.socket();t.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "t.bind((ip,port));t.listen(4096)\n"
            "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.bind((ip,port))\n"
            "def udp():\n"
            "  while True:\n"
            "    d,a=u.recvfrom(2048);u.sendto(ip.encode(),a)\n"
            "threading.Thread(target=udp,daemon=True).start()\n"
            "while True:\n"
            "  c,_=t.accept()\n"
            "  try:\n"
            "    c.settimeout(0.2);c.recv(4096);b=ip.encode()\n"
            "    c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n'%len(b)+b)\n"
            "  except OSError: pass\n"
            "  c.close()\n")
    return subprocess.Popen([sys.executable, "-c", code, ip, str(BACKEND_PORT)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--services", type=int, default=200)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    backends = [backend(ip) for ip in BACKENDS]
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="kubeshim-soak-") as tmp:
        folder = Path(tmp, "manifests")
        folder.mkdir()
        for i in range(a.services):
            write(folder, i, BACKENDS[0])
        write(folder, a.services, HOG)
        hog = socket.socket()
        hog.bind((HOG, BACKEND_PORT))
        hog.listen(65535)
        dns, healthz, metrics = free_port(kind=socket.SOCK_DGRAM), free_port(), free_port()
        log_path = Path(tmp, "kubeshim.log")
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kubeshim", "run", "--manifests", str(folder),
                 "--vip-mode", "loopback", "--dns-bind", f"127.0.0.1:{dns}",
                 "--upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}",
                 "--healthz-bind-address", f"127.0.0.1:{healthz}",
                 "--metrics-bind-address", f"127.0.0.1:{metrics}"],
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
                stderr=subprocess.STDOUT)
        soak = Soak(folder, a.services, stop)
        deadline = time.monotonic() + 60
        while subprocess.run(["curl", "-s", "--max-time", "1", "http://"
                              f"{soak.mapper.address(cluster_ip(a.services - 1))}/"],
                             capture_output=True).returncode:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(log_path.read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(1)
        idle_rss, idle_fds = sample(proc.pid)
        soak.broken_files()
        threads = [threading.Thread(target=t, args=args, daemon=True) for t, args in (
            (soak.churn, ()), (soak.idle_tcp, ()), (soak.udp_ports, ()),
            (soak.slow_healthz, (healthz,)), (soak.dns_pipeline, (dns,)),
            (soak.probe, (dns, healthz)))]
        for t in threads:
            t.start()
        rows = []
        start = time.monotonic()
        try:
            while time.monotonic() - start < a.minutes * 60:
                time.sleep(5)
                if proc.poll() is not None:
                    raise SystemExit("daemon died:\n" + log_path.read_text()[-3000:])
                rss, fds = sample(proc.pid)
                rows.append((time.monotonic() - start, rss, fds, soak.probes,
                             dict(soak.errors), soak.changes, dict(soak.hostile)))
                print(f"{rows[-1][0]:6.0f} s  RSS {rss:6.1f} MB  fds {fds:5d}  probes "
                      f"{soak.probes:5d}  errors {sum(soak.errors.values())}  changes "
                      f"{soak.changes}", flush=True)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            for b in backends:
                b.kill()
        tracebacks = log_path.read_text().count("Traceback")
    lines = [
        f"# Soak: {a.minutes:g} min, {a.services} Services, churn and hostile clients",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}."
        f" Command: `python bench/bench_soak.py --minutes {a.minutes:g} "
        f"--services {a.services}`.",
        "",
        f"Idle before the soak: RSS {idle_rss:.1f} MB, {idle_fds} descriptors. Tracebacks in "
        f"the daemon's log: {tracebacks}.",
        "",
        "| t (s) | RSS (MB) | descriptors | probes | probe errors (curl / dig udp / dig tcp / "
        "healthz) | slice edits | hostile: idle tcp / udp ports / slow healthz / dns "
        "pipelined |",
        "|---:|---:|---:|---:|---|---:|---|",
    ]
    for t, rss, fds, probes, errors, changes, hostile in rows:
        lines.append(f"| {t:.0f} | {rss:.1f} | {fds} | {probes} | "
                     f"{' / '.join(str(v) for v in errors.values())} | {changes} | "
                     f"{' / '.join(str(v) for v in hostile.values())} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
