"""Reaching the loopback control plane from inside a network namespace, through a unix socket.

kube-apiserver listens on 127.0.0.1 of the root namespace; a namespace has its own loopback.
Two socat processes join them without giving the namespace any route out: one in the root
namespace accepts on a unix socket and connects to the apiserver, one in the namespace listens
on 127.0.0.1:<the same port> and connects to that socket (a path, shared by all namespaces).
The kubeconfigs therefore work unchanged inside the namespace, TLS name and all.

`pause()` ends the namespace side (every connection through it drops, new ones are refused)
and `resume()` starts it again: a partition between a node and its API server, on demand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.netns import Netns


class APIBridge:
    """127.0.0.1:`port` inside `netns` forwards to 127.0.0.1:`port` in the root namespace."""

    def __init__(self, netns: Netns, port: int, workdir: Path) -> None:
        self.netns = netns
        self.port = port
        self.socket = workdir / f"apiserver-{port}.sock"
        self.root_side: subprocess.Popen[bytes] | None = None
        self.ns_side: subprocess.Popen[bytes] | None = None

    def start(self) -> APIBridge:
        self.socket.unlink(missing_ok=True)
        self.root_side = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{self.socket},fork,mode=600", f"TCP:127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.root_side.poll() is not None:
                raise RuntimeError(f"socat did not listen on {self.socket}")
            time.sleep(0.02)
        self.resume()
        return self

    def resume(self) -> None:
        """Start the namespace side: the namespace reaches the apiserver again."""
        self.ns_side = subprocess.Popen(
            self.netns.argv(["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                             f"UNIX-CONNECT:{self.socket}"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.netns.wait_port("127.0.0.1", self.port)

    def pause(self) -> None:
        """End the namespace side and every connection it carries (its forked children too)."""
        _end_group(self.ns_side)
        self.ns_side = None

    def stop(self) -> None:
        self.pause()
        _end_group(self.root_side)
        self.root_side = None
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> APIBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group a bridge side leads (socat forks one child per connection)."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
