"""Bulk TCP through the proxy: direct vs kubeshim's Protocol path vs an os.splice forwarder.

    python bench/bench_tcp_splice.py [--seconds 5] [--parallel 1]

Runs iperf3 on loopback three ways, side by side, in one run:
  direct   iperf3 client -> iperf3 server
  protocol iperf3 client -> kubeshim Proxier (loopback mode, uvloop, asyncio Protocols) -> server
  splice   iperf3 client -> a minimal os.splice forwarder on the same loop -> server
and prints Gbit/s for each (client -> server and, with -R, server -> client). The splice
forwarder is the experiment that decides whether the proxy's bulk path should splice: it is
kept here, not in proxy/, unless it measures faster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER = ("127.0.0.1", 15201)
CLUSTER_IP = "10.100.250.1"
SPLICE_LISTEN = ("127.0.0.1", 15202)
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


# --- the splice forwarder (experiment) ---------------------------------------------------------


class SpliceDirection:
    """src socket -> pipe -> dst socket, without copying through user space."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 on_done: Any) -> None:
        self.loop, self.src, self.dst, self.on_done = loop, src, dst, on_done
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.pw, F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0
        self.eof = False
        loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pw, PIPE_SIZE,
                          flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src.fileno())
        self.pending += n
        self.flush()

    def flush(self) -> None:
        while self.pending:
            try:
                m = os.splice(self.pr, self.dst.fileno(), self.pending,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except (BrokenPipeError, ConnectionResetError):
                self.pending = 0
                self.eof = True
                break
            except BlockingIOError:
                # Destination full: stop reading (backpressure) until it drains.
                if not self.eof:
                    self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self.writable)
                return
            self.pending -= m
        if self.eof:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self.close()
            self.on_done()

    def writable(self) -> None:
        self.loop.remove_writer(self.dst.fileno())
        self.flush()
        if not self.pending and not self.eof:
            self.loop.add_reader(self.src.fileno(), self.readable)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.loop.remove_reader(self.src.fileno())
        for fd in (self.pr, self.pw):
            with contextlib.suppress(OSError):
                os.close(fd)


def run_splice_forwarder() -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(SPLICE_LISTEN)
        lsock.listen(128)
        lsock.setblocking(False)

        def accept() -> None:
            client, _ = lsock.accept()
            upstream = socket.create_connection(SERVER)
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done = [0]

            def finished() -> None:
                done[0] += 1
                if done[0] == 2:
                    client.close()
                    upstream.close()

            SpliceDirection(loop, client, upstream, finished)
            SpliceDirection(loop, upstream, client, finished)

        loop.add_reader(lsock.fileno(), accept)
        await asyncio.Event().wait()

    uvloop.run(main())


# --- kubeshim's proxier -------------------------------------------------------------------------


def run_proxier(ready: Any) -> None:
    import uvloop
    from prometheus_client import CollectorRegistry

    from kubeshim.cluster.state import ClusterState
    from kubeshim.proxy.config import ProxyConfig
    from kubeshim.proxy.proxier import Proxier
    from tests.proxy_helpers import endpoint, endpoint_slice, service

    async def main() -> None:
        state = ClusterState()
        proxier = Proxier(state, ProxyConfig(vip_mode="loopback",
                                             nodeport_addresses=["127.0.0.1/32"]),
                          registry=CollectorRegistry())
        await proxier.start()
        state.replace("Service", [service("iperf", CLUSTER_IP, [{"name": "", "port": 5201}])])
        state.replace("EndpointSlice", [endpoint_slice(
            "iperf", [endpoint(SERVER[0])], [{"name": "", "port": SERVER[1]}])])
        await asyncio.sleep(0.2)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


# --- measuring ----------------------------------------------------------------------------------


def iperf(host: str, port: int, seconds: float, parallel: int, reverse: bool) -> float:
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"]
    if reverse:
        cmd.append("-R")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--parallel", type=int, default=1)
    a = p.parse_args()
    server = subprocess.Popen(["iperf3", "-s", "-B", SERVER[0], "-p", str(SERVER[1])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = multiprocessing.Event()
    proxier = multiprocessing.Process(target=run_proxier, args=(ready,), daemon=True)
    splicer = multiprocessing.Process(target=run_splice_forwarder, daemon=True)
    proxier.start()
    splicer.start()
    try:
        ready.wait(10)
        time.sleep(0.3)
        from kubeshim.proxy.vip import LoopbackMapper

        vip = LoopbackMapper().address(CLUSTER_IP)
        targets = {"direct": SERVER, "protocol": (vip, 5201), "splice": SPLICE_LISTEN}
        print(f"iperf3 {a.seconds:g}s x{a.parallel} on loopback, Gbit/s "
              f"(cpus={os.cpu_count()}, python {sys.version.split()[0]})")
        print(f"{'path':10} {'client->server':>15} {'server->client':>15}")
        for name, (host, port) in targets.items():
            up = iperf(host, port, a.seconds, a.parallel, reverse=False)
            down = iperf(host, port, a.seconds, a.parallel, reverse=True)
            print(f"{name:10} {up:15.2f} {down:15.2f}")
    finally:
        for proc in (proxier, splicer):
            proc.terminate()
            proc.join(5)
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
