"""A small Kubernetes node built from network namespaces, for end-to-end tests.

    with Lab() as lab:
        pod = lab.add_host("pod-a")               # 10.244.0.2/24, default route via the node
        client = lab.add_host("client")
        lab.node.run(["ip", "addr"])              # the node namespace (10.244.0.1 on its bridge)
        proc = pod.popen(["python3", "-m", "http.server", "8080"])

Every host hangs off a bridge inside the `node` namespace, like pods off a node's CNI bridge.
Hosts route everything through the node, so Service addresses (10.96.0.0/12 and the like) reach
whatever the node's kubeshim assigns. No namespace has a route out of the lab and nothing is
assigned in the root namespace. Names carry the pid, so parallel runs never collide; `close()`
(or leaving the `with`) kills what was started through the lab and deletes the namespaces.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

POD_PREFIX = "10.244.0"
NODE_IP = f"{POD_PREFIX}.1"
OUTSIDE_PREFIX = "192.168.50"
OUTSIDE_NODE_IP = f"{OUTSIDE_PREFIX}.1"  # the node's address on the outside segment


def require_root() -> None:
    """Skip (fail under CI) when namespaces cannot be made."""
    if os.geteuid() == 0 and shutil.which("ip"):
        return
    message = "end-to-end tests need root and iproute2 (network namespaces)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Netns:
    """One network namespace; commands run inside it through `ip netns exec`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ip = ""  # set when attached to a lab
        self.procs: list[subprocess.Popen[Any]] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        proc = subprocess.run(self.argv(cmd), text=True, timeout=timeout, check=False, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} in {self.name} exited {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; it is killed when the lab closes."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(cmd), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def wait_port(self, host: str, port: int, proto: str = "tcp", timeout: float = 10) -> None:
        """Wait until something listens on host:port inside this namespace."""
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            where = f"src {host}:{port}" if host else f"sport = :{port}"
            out = self.run(["ss", flag, where]).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on {host}:{port}/{proto} in {self.name}")

    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def delete(self) -> None:
        self.stop_processes()
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
        shutil.rmtree(f"/etc/netns/{self.name}", ignore_errors=True)

    def write_resolv_conf(self, text: str) -> None:
        """Give this namespace its own /etc/resolv.conf (ip netns exec bind-mounts it)."""
        path = Path("/etc/netns") / self.name
        path.mkdir(parents=True, exist_ok=True)
        (path / "resolv.conf").write_text(text)


class LiveConnection:
    """socat in a namespace holding one TCP connection to `address` (host:port) open, to check
    that established connections survive what the test does next."""

    def __init__(self, ns: Netns, address: str, *socat_options: str) -> None:
        self.proc = ns.popen(["socat", *socat_options, "-", f"TCP:{address}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def echo(self, text: str, timeout: float = 3.0) -> str:
        """Send one line and return the line read back ("" if none within `timeout`)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    def close(self, wait: float | None = None) -> None:
        """EOF on stdin: socat half-closes and the peer closes its side; optionally wait for
        socat to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if wait is not None:
            self.proc.wait(wait)


class Lab:
    """A node namespace with a bridge, and hosts (pods, clients) attached to it."""

    def __init__(self, tag: str = "") -> None:
        require_root()
        self.prefix = f"ks{os.getpid()}{tag}"
        self.hosts: dict[str, Netns] = {}
        self._next = 2
        self.node = Netns(f"{self.prefix}-node")
        try:
            self.node.run(["ip", "link", "add", "br0", "type", "bridge"])
            self.node.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "br0"])
            self.node.run(["ip", "link", "set", "br0", "up"])
            self.node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        except BaseException:
            self.node.delete()
            raise

    def add_host(self, name: str, ip: str | None = None, routed: bool = False) -> Netns:
        """A namespace with one veth into the node's bridge, routed through the node.

        `routed`: a pod the way routed CNI plugins (Calico, kindnet) attach one: its own /32 on
        a veth that is not in the bridge, reaching everything (other pods too) via the node."""
        if ip is None:
            ip = f"{POD_PREFIX}.{self._next}"
            self._next += 1
        host = self._attach(name, "" if routed else "br0")
        if routed:
            peer = f"v{len(self.hosts)}"
            self.node.run(["ip", "route", "add", f"{ip}/32", "dev", peer])
            host.run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"])
            host.run(["ip", "link", "set", "eth0", "up"])
            host.run(["ip", "route", "add", NODE_IP, "dev", "eth0"])
        else:
            host.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
            host.run(["ip", "link", "set", "eth0", "up"])
        host.run(["ip", "route", "add", "default", "via", NODE_IP])
        host.ip = ip
        return host

    def add_outside(self, name: str, ip: str) -> Netns:
        """A host off the node (a client, an on-link neighbour) on a second segment, the
        node's `ext0` bridge (OUTSIDE_NODE_IP/24), routed through the node."""
        if "ext0" not in self.node.run(["ip", "-o", "link"]).stdout:
            self.node.run(["ip", "link", "add", "ext0", "type", "bridge"])
            self.node.run(["ip", "addr", "add", f"{OUTSIDE_NODE_IP}/24", "dev", "ext0"])
            self.node.run(["ip", "link", "set", "ext0", "up"])
        host = self._attach(name, "ext0")
        host.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])
        host.run(["ip", "route", "add", "default", "via", OUTSIDE_NODE_IP])
        host.ip = ip
        return host

    def _attach(self, name: str, bridge: str) -> Netns:
        host = Netns(f"{self.prefix}-{name}")
        self.hosts[name] = host
        peer = f"v{len(self.hosts)}"
        subprocess.run(
            ["ip", "link", "add", "eth0", "netns", host.name, "type", "veth",
             "peer", "name", peer, "netns", self.node.name],
            check=True,
        )
        if bridge:
            self.node.run(["ip", "link", "set", peer, "master", bridge])
        self.node.run(["ip", "link", "set", peer, "up"])
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.delete()
        self.node.delete()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(check: Callable[[], object], what: str, timeout: float = 10,
               expected: tuple[type[BaseException], ...] = ()) -> None:
    """Poll `check` until it is truthy; errors of the `expected` types count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except expected:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
