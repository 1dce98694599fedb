"""Time from start to the first proxied connection with many Services, per root VIP mode.

    python -m bench.bench_capture_start [--services 10000] [--modes tproxy,interface]

As root, in a network namespace of its own (bench/lab.py): N ClusterIP Services with 10
endpoints each from a manifest folder, plus one probe Service whose endpoint is a local
backend. For each mode, kubeshim starts on that folder and the clock runs until an HTTP
request through the probe's ClusterIP is answered (the probe is listed last, so it is among the
last to be served). Prints seconds per mode, and the CPU seconds kubeshim used until then; both
run in the same namespace one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import time
from pathlib import Path

from .contenders import PYTHON, REPO, write_manifests
from .lab import POD_IP, Lab
from .workload import endpoint_slice, scale_objects, service

PROBE_IP = "10.99.255.254"
BACKEND_PORT = 8080


def answered(ip: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(16).startswith(b"HTTP/")
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--modes", default="tproxy,interface")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ks-capture-start-"))
    lab = Lab(work)
    try:
        lab.enter()
        objects = scale_objects(args.services)
        objects += [service("probe", PROBE_IP, [("http", 80, "TCP")]),
                    endpoint_slice("probe", [POD_IP], [("http", BACKEND_PORT, "TCP")])]
        # Files of 2,000 objects: the manifest source caps the size of one file.
        for n in range(0, len(objects), 2000):
            write_manifests(work / "manifests" / f"part-{n // 2000:03d}", objects[n:n + 2000])
        for part in sorted((work / "manifests").glob("part-*")):
            (part / "bench.yaml").rename(work / "manifests" / f"{part.name}.yaml")
            part.rmdir()
        lab.sh("ip route add 10.96.0.0/12 dev lo")  # a node's route towards the Service range
        backend = lab.start("backend", [PYTHON, "-m", "http.server", "--bind", POD_IP,
                                        str(BACKEND_PORT)], "0", cwd=work)
        while not answered(POD_IP, BACKEND_PORT):
            time.sleep(0.05)
        for mode in args.modes.split(","):
            start = time.monotonic()
            proc = lab.start(f"kubeshim-{mode}", [
                PYTHON, "-m", "kubeshim", "run", "--manifests", str(work / "manifests"),
                "--vip-mode", mode, "--no-dns", "--hostname-override", "bench-node",
                "--healthz-bind-address", "", "--metrics-bind-address", "",
                "--log-level", "info"], "1", cwd=REPO)
            while not answered(PROBE_IP, 80):
                if not proc.alive():
                    print(f"{mode}: kubeshim exited:\n{proc.tail()}")
                    return 1
                if time.monotonic() - start > 120:
                    print(f"{mode}: no answer within 120 s")
                    break
                time.sleep(0.02)
            # Its CPU time too: on a busy machine the wall time mostly measures the others.
            print(f"{mode}: first connection {time.monotonic() - start:.2f} s after start, "
                  f"kubeshim CPU {proc.cpu_seconds():.2f} s ({args.services} Services, "
                  f"{args.services * 10} endpoints)", flush=True)
            lab.stop(proc, timeout=30)
        lab.stop(backend)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
