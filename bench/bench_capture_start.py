"""Time from start to the first proxied connection with many Services, per root VIP mode.

    python -m bench.bench_capture_start [--services 10000] [--modes tproxy,interface]
        [--workers 1,2] [--cpus 1] [--baseline OTHER_CHECKOUT] [--rounds N] [--manifests DIR]

As root, in a network namespace of its own (bench/lab.py): N ClusterIP Services with 10
endpoints each from a manifest folder, plus one probe Service whose endpoint is a local
backend. For each mode and worker count, kubeshim starts on that folder and the clock runs
until an HTTP request through the probe's ClusterIP is answered (the probe is listed last, so
it is among the last to be served; a new probe connection starts every 20 ms). kubeshim runs
on the CPUs of --cpus (a taskset list; default CPU 1, its workers too), the backend on CPU 0.
Prints seconds per run, the CPU seconds kubeshim used until then (its processes, live and
ended) and its resident memory; all run in the same namespace one after the other.
With --baseline, the kubeshim of another checkout runs too, alternating with this one in each
round, so both see the same machine. --manifests keeps the generated folder there and reuses
it on the next run with the same --services (writing it takes about a minute at 10k).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .contenders import PYTHON, REPO, write_manifests
from .lab import POD_IP, Lab
from .workload import endpoint_slice, scale_objects, service

PROBE_IP = "10.99.255.254"
PROBE_INTERVAL = 0.02  # a new connection attempt this often
PROBE_PATIENCE = 2.0  # an attempt is given up after this long (its SYN retransmits at 1 s)
BACKEND_PORT = 8080


class Prober:
    """A new connection to (ip, port) every PROBE_INTERVAL, the earlier ones left pending: until
    the capture rules have the probe's address, its SYN is dropped (the node's route sends it to
    lo, which does not forward it), so an attempt that waited to time out would add up to its
    timeout to the measurement."""

    def __init__(self, ip: str, port: int) -> None:
        self.address = (ip, port)
        self.pending: dict[socket.socket, float] = {}

    def answered(self) -> bool:
        """Start one attempt, wait PROBE_INTERVAL for any to connect; True once one of them
        got an HTTP answer."""
        now = time.monotonic()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        s.connect_ex(self.address)
        self.pending[s] = now
        for old in [o for o, t in self.pending.items() if now - t > PROBE_PATIENCE]:
            old.close()
            del self.pending[old]
        _, ready, _ = select.select([], list(self.pending), [], PROBE_INTERVAL)
        for s in ready:
            del self.pending[s]
            with s:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    continue  # refused, unreachable
                s.setblocking(True)
                s.settimeout(2)
                with contextlib.suppress(OSError):
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if s.recv(16).startswith(b"HTTP/"):
                        return True
        return False

    def close(self) -> None:
        for s in self.pending:
            s.close()
        self.pending.clear()


def answered(ip: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(16).startswith(b"HTTP/")
    return False


def write_folder(folder: Path, services: int) -> None:
    """The N Services and the probe, in files of 2,000 objects (the manifest source caps the
    size of one file); kept as is when a previous run wrote the same count there."""
    stamp = folder / ".services"
    if stamp.exists() and stamp.read_text() == str(services):
        return
    if folder.exists():
        shutil.rmtree(folder)
    objects = scale_objects(services)
    objects += [service("probe", PROBE_IP, [("http", 80, "TCP")]),
                endpoint_slice("probe", [POD_IP], [("http", BACKEND_PORT, "TCP")])]
    for n in range(0, len(objects), 2000):
        write_manifests(folder / f"part-{n // 2000:03d}", objects[n:n + 2000])
    for part in sorted(folder.glob("part-*")):
        (part / "bench.yaml").rename(folder / f"{part.name}.yaml")
        part.rmdir()
    stamp.write_text(str(services))  # a dotfile: the manifest source skips it


def first_connection(lab: Lab, tree: Path, folder: Path, mode: str, workers: int,
                     name: str, cpus: str = "1") -> tuple[float, float, int] | None:
    """(seconds, CPU seconds, resident bytes) from the start of `tree`'s kubeshim to the
    probe's answer."""
    start = time.monotonic()
    proc = lab.start(name, [
        PYTHON, "-m", "kubeshim", "run", "--manifests", str(folder), "--vip-mode", mode,
        "--workers", str(workers), "--no-dns", "--hostname-override", "bench-node",
        "--healthz-bind-address", "", "--metrics-bind-address", "", "--log-level", "info"],
        cpus, cwd=tree, env={"PYTHONPATH": str(tree)})
    probe = Prober(PROBE_IP, 80)
    try:
        while not probe.answered():
            if not proc.alive():
                print(f"{name}: kubeshim exited:\n{proc.tail()}")
                return None
            if time.monotonic() - start > 120:
                print(f"{name}: no answer within 120 s")
                return None
        return (time.monotonic() - start, proc.cpu_seconds(ended_children=True),
                proc.rss_bytes())
    finally:
        probe.close()
        lab.stop(proc, timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--modes", default="tproxy,interface")
    p.add_argument("--workers", default="1", help="worker counts to run, e.g. 1,2")
    p.add_argument("--cpus", default="1", help="the CPUs kubeshim may use (taskset list)")
    p.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                   help="another checkout of kubeshim to run alternately, e.g. /work/main")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--manifests", type=Path, metavar="DIR",
                   help="where to write the manifest folder (kept and reused)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ks-capture-start-"))
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    folder = args.manifests.resolve() if args.manifests else work / "manifests"
    lab = Lab(work)
    try:
        lab.enter()
        write_folder(folder, args.services)
        lab.sh("ip route add 10.96.0.0/12 dev lo")  # a node's route towards the Service range
        backend = lab.start("backend", [PYTHON, "-m", "http.server", "--bind", POD_IP,
                                        str(BACKEND_PORT)], "0", cwd=work)
        while not answered(POD_IP, BACKEND_PORT):
            time.sleep(0.05)
        print(f"{args.services} Services, {args.services * 10} endpoints, kubeshim on CPUs "
              f"{args.cpus}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        for r in range(args.rounds):
            for mode in args.modes.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    for label, tree in trees.items():
                        name = f"{label}-{mode}-w{workers}"
                        got = first_connection(lab, tree, folder, mode, workers, f"{name}-{r}",
                                               args.cpus)
                        if got is None:
                            return 1
                        # Its CPU time too: on a busy machine the wall time mostly measures
                        # the others.
                        print(f"round {r + 1} {name}: first connection {got[0]:.2f} s after "
                              f"start, kubeshim CPU {got[1]:.2f} s, RSS "
                              f"{got[2] / 2**20:.0f} MiB (load average "
                              f"{os.getloadavg()[0]:.2f})", flush=True)
        lab.stop(backend)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
