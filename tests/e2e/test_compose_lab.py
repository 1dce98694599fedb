"""compose.yaml for real: Debian's Docker engine (docker.io) and docker-compose bring the lab up.

The engine (dockerd, with the containerd it starts) runs in a network namespace the test makes
and in a private mount namespace, with its data, sockets, trust key and cgroups under names
that carry the pid: its bridges, iptables rules and published ports exist only in that network
namespace, its mounts only in that mount namespace. No registry is reachable: the Debian base
that tests/peers/images.py makes is loaded as `debian:bookworm-slim` (the Dockerfile's default
base) and compose builds `kubeshim:0.1.0` from the Dockerfile, its pip step offline from
kubeshim's dependencies as wheels (`pip wheel` on the host, cached), served over HTTP inside
the namespace (the Dockerfile's KUBESHIM_WHEELS build argument).

Then, as docs/operations.md tells: `up client` runs the lab's client, which resolves
web.default.svc.cluster.local through kubeshim's DNS and curls the Service through kubeshim;
the engine's namespace (the "host") reaches kubeshim's DNS, the ClusterIP, the published
NodePort and health endpoints; with kubeshim killed, the Service is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.netns import Netns, require_root, wait_until
from tests.peers.images import Builder, _digest, images_dir, write_archive
from tests.peers.node import join_cgroups, make_cgroups, remove_cgroups

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# Debian's engine (docker.io); /usr/local/bin may hold another docker client.
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
COMPOSE = "docker-compose"
PROJECT = "kubeshim-lab"
WHEELS_PORT = 8765
LAB = yaml.safe_load((ROOT / "compose.yaml").read_text())
KUBESHIM_IP = LAB["services"]["kubeshim"]["networks"]["lab"]["ipv4_address"]
SERVICE_FQDN = "web.default.svc.cluster.local"
CLUSTER_IP = "10.96.0.20"
BACKENDS = {f"hello from {name}" for name in LAB["services"] if name.startswith("web-")}


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def dependency_wheels(base_rootfs: Path) -> Path:
    """kubeshim's dependencies and its build backend as wheels for the base's Python, made by
    pip on this host (same Python version), cached under the images' cache by what they are."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    base_python = os.readlink(base_rootfs / "usr/bin/python3")  # e.g. python3.11
    host_python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if base_python != host_python:
        raise RuntimeError(f"the base has {base_python}, this host {host_python}: pip here "
                           "cannot make wheels for the image")
    out = images_dir() / f"wheels-{_digest(base_python.encode(), *map(str.encode, wanted))}"
    if out.is_dir():
        return out
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=images_dir()))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir",
                           "--disable-pip-version-check", "-w", str(tmp), *wanted],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"pip wheel failed: {_tail(proc.stderr or proc.stdout)}")
    try:
        tmp.rename(out)
    except OSError:  # another run made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class Engine:
    """dockerd in a network namespace of its own; `close()` leaves nothing behind."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"kubeshim-compose-{os.getpid()}"
        self.workdir = workdir
        self.ns: Netns | None = None
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{workdir / 'docker.sock'}",
            # docker-compose talks to the engine's API itself (the classic builder).
            "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_BUILDKIT": "0",
        }

    def start(self) -> None:
        self.ns = Netns(self.name)
        make_cgroups(self.name)
        w = self.workdir
        # The trust key would go to /etc/docker/key.json (a setting of the file, not a flag).
        (w / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(w / "key.json")}))
        argv = [
            # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup hierarchies.
            "nsenter", f"--net=/run/netns/{self.name}",
            "unshare", "--mount", "--propagation", "private",
            DOCKERD, f"--config-file={w / 'daemon.json'}", f"--data-root={w / 'data'}",
            f"--exec-root={w / 'exec'}", f"--pidfile={w / 'dockerd.pid'}",
            f"--host=unix://{w / 'docker.sock'}",
            f"--cgroup-parent=/{self.name}", "--log-level=warn",
        ]
        with open(w / "dockerd.log", "wb") as log:
            self.dockerd = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: join_cgroups(self.name, os.getpid()))

        def ready() -> bool:
            if self.dockerd is not None and self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd exited: {_tail(self.log())}")
            return self.docker("version", check=False).returncode == 0

        wait_until(ready, "dockerd to answer", timeout=60)

    def log(self) -> str:
        path = self.workdir / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _run(self, argv: list[str], check: bool,
             timeout: float) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env=self.env, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                                 f"{_tail(proc.stdout + proc.stderr)}")
        return proc

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._run([DOCKER, *args], check, timeout)

    def compose(self, *args: str, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self._run([COMPOSE, "-p", PROJECT, "-f", str(ROOT / "compose.yaml"), *args],
                         check, timeout)

    def close(self) -> list[str]:
        """Stop the lab and the engine, kill what is left in its cgroups, delete the namespace
        and the data. Returns what could not be removed."""
        if self.dockerd is not None and self.dockerd.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.compose("down", "--volumes", "--timeout", "1", check=False, timeout=120)
            self.dockerd.send_signal(signal.SIGTERM)
            try:
                self.dockerd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait()
        left = remove_cgroups(self.name)
        if self.ns is not None:
            self.ns.delete()
        # The overlay mounts lived in dockerd's mount namespace, gone with its processes.
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)
        if self.workdir.exists():
            left.append(f"{self.workdir} not removed")
        return left


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    require_root()
    for tool in (DOCKERD, DOCKER, shutil.which(COMPOSE) or COMPOSE, "nsenter", "unshare"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed (scripts/setup.sh installs docker.io, "
                     "docker-compose)")
    builder = Builder()
    rootfs, base_layer = builder.base()
    wheels = dependency_wheels(rootfs)
    eng = Engine(Path(tempfile.mkdtemp(prefix="kubeshim-compose-")))
    try:
        eng.start()
        assert eng.ns is not None
        base = eng.workdir / "base.tar"
        write_archive(base, ["debian:bookworm-slim"], [base_layer], [], ["bash"])
        eng.docker("load", "--input", str(base))
        # The build containers reach the namespace through the default bridge's gateway.
        gateway = eng.ns.run(["ip", "-4", "-o", "addr", "show", "docker0"]).stdout.split()[3]
        gateway = gateway.split("/")[0]
        eng.ns.popen([sys.executable, "-m", "http.server", "--bind", gateway,
                      "--directory", str(wheels), str(WHEELS_PORT)])
        eng.ns.wait_port(gateway, WHEELS_PORT)
        start = time.monotonic()
        eng.compose("build", "--build-arg", f"KUBESHIM_WHEELS=http://{gateway}:{WHEELS_PORT}/",
                    timeout=600)
        print(f"compose build: {time.monotonic() - start:.1f}s", file=sys.stderr)
        yield eng
    finally:
        left = eng.close()
        assert not left, f"the engine left: {left}"


@pytest.fixture(scope="module")
def client_run(engine: Engine) -> str:
    """`up client`: kubeshim healthy first (depends_on: service_healthy), then the client."""
    proc = engine.compose("up", "--no-build", "--exit-code-from", "client", "client",
                          check=False, timeout=300)
    if proc.returncode != 0:
        logs = engine.compose("logs", "--no-color", "--tail=30", check=False).stdout
        raise AssertionError(f"compose up exited {proc.returncode}:\n"
                             f"{_tail(proc.stdout + proc.stderr)}\n{_tail(logs)}")
    # Lines the client printed, without compose's `client_1  | ` prefix and colours.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    return "\n".join(line.split("|", 1)[1].strip() for line in plain.splitlines()
                     if line.startswith("client_1") and "|" in line)


def test_the_client_resolves_and_curls_the_service_through_kubeshim(client_run: str) -> None:
    lines = client_run.splitlines()
    assert lines[0] == CLUSTER_IP, client_run  # dig +short web.default.svc.cluster.local
    replies = lines[1:]
    assert len(replies) == 6 and set(replies) == BACKENDS, client_run


def test_the_host_reaches_dns_clusterip_nodeport_and_health(engine: Engine,
                                                            client_run: str) -> None:
    ns = engine.ns
    assert ns is not None
    dig = ns.run(["dig", "+short", "+time=2", "+tries=2", f"@{KUBESHIM_IP}", SERVICE_FQDN])
    assert dig.stdout.split() == [CLUSTER_IP]
    nx = ns.run(["dig", "+time=2", f"@{KUBESHIM_IP}", "nothere.default.svc.cluster.local"])
    assert "status: NXDOMAIN" in nx.stdout
    # As the client does: the Service CIDR routed via kubeshim, in the engine's namespace.
    ns.run(["ip", "route", "add", "10.96.0.0/12", "via", KUBESHIM_IP])
    seen = {ns.run(["curl", "-fsS", "--max-time", "5", f"http://{CLUSTER_IP}/"]).stdout.strip()
            for _ in range(6)}
    assert seen == BACKENDS
    # The published ports (127.0.0.1 of the engine's namespace).
    node_port = ns.run(["curl", "-fsS", "--max-time", "5", "http://127.0.0.1:30080/"])
    assert node_port.stdout.strip() in BACKENDS
    health = json.loads(ns.run(["curl", "-fsS", "--max-time", "5",
                                "http://127.0.0.1:10256/healthz"]).stdout)
    assert health["healthy"] is True
    metrics = ns.run(["curl", "-fsS", "--max-time", "5", "http://127.0.0.1:10249/metrics"])
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in metrics.stdout


def test_without_kubeshim_the_service_is_gone(engine: Engine, client_run: str) -> None:
    ns = engine.ns
    assert ns is not None
    engine.compose("kill", "kubeshim")
    dig = ns.run(["dig", "+short", "+time=1", "+tries=1", f"@{KUBESHIM_IP}", SERVICE_FQDN],
                 check=False)
    assert CLUSTER_IP not in dig.stdout
    curl = ns.run(["curl", "-fsS", "--max-time", "3", f"http://{CLUSTER_IP}/"], check=False)
    assert curl.returncode != 0
    # The backends themselves still answer: only the Service path went with kubeshim.
    backend = LAB["services"]["web-0"]["networks"]["lab"]["ipv4_address"]
    assert ns.run(["curl", "-fsS", "--max-time", "3",
                   f"http://{backend}:8080/"]).stdout.strip() == "hello from web-0"
