"""The kubeshim daemon on loopback, as an operator runs it, for integration and reliability tests.

    with backends(("b1", "127.77.0.1")):           # examples/backend.py on 127.77.0.1:18080
        d = Daemon(tmp_path, "--vip-mode", "loopback")
        d.write_config(d.config_text("hostnameOverride: node-1\\n"))
        d.start().wait_serving()                  # /healthz answers (or the daemon died: its log)
        d.dig("web.default.svc.cluster.local"); d.status(); curl(d.url("/livez"))
        d.stop()                                  # SIGTERM, the exit code

Each daemon gets free loopback ports for healthz, metrics and DNS, a DNS upstream port nothing
listens on, a manifest folder and a log file under the test's temporary folder. Daemons and
backends are ended by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.netns import wait_until
from tests.ports import free_dns_port, free_port

ROOT = Path(__file__).resolve().parent.parent
BACKEND_PORT = 18080  # examples/backend.py answers "hello from NAME\n" here


def run(*argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def curl(url: str, max_time: float = 5) -> tuple[int, str]:
    """(HTTP status, body), or (-curl exit code, '')."""
    proc = run("curl", "-sS", "--max-time", str(max_time), "-w", "\n%{http_code}", url)
    if proc.returncode:
        return -proc.returncode, ""
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


def answering(url: str) -> Callable[[], bool]:
    """A check for wait_until: `url` answers 200."""
    return lambda: curl(url)[0] == 200


@contextlib.contextmanager
def backends(*servers: tuple[str, str]) -> Iterator[None]:
    """examples/backend.py as (name, address) on BACKEND_PORT, each answering before the body
    runs, all ended afterwards."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "examples/backend.py"), name, ip,
                               str(BACKEND_PORT)], start_new_session=True)
             for name, ip in servers]
    try:
        for _, ip in servers:
            url = f"http://{ip}:{BACKEND_PORT}/"
            wait_until(answering(url), f"the backend at {url}", timeout=30)
        yield
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=5)


class Daemon:
    """`python -m kubeshim run --config FILE --manifests FOLDER ARGS` on loopback ports."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.healthz, self.metrics = free_port(), free_port()
        self.dns = free_dns_port()
        self.upstream = free_port(kind=socket.SOCK_DGRAM)  # nothing listens there
        self.manifests = tmp / "manifests"
        self.manifests.mkdir(exist_ok=True)
        self.config = tmp / "kube-proxy.yaml"
        self.log = tmp / "kubeshim.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self, extra: str = "") -> str:
        """A KubeProxyConfiguration with this daemon's addresses, `extra` lines appended."""
        return f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
healthzBindAddress: 127.0.0.1:{self.healthz}
metricsBindAddress: 127.0.0.1:{self.metrics}
dns:
  binds: ["127.0.0.1:{self.dns}"]
  upstreams: ["127.0.0.1:{self.upstream}"]
{extra}"""

    def write_config(self, text: str) -> None:
        self.config.write_text(text)

    def start(self) -> Daemon:
        if not self.config.exists():
            self.write_config(self.config_text())
        argv = [sys.executable, "-m", "kubeshim", "run", "--config", str(self.config),
                "--manifests", str(self.manifests), *self.args]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, url: str = "", timeout: float = 30) -> None:
        """Until `url` (default: /healthz) answers 200; fails with the log if the daemon ends.
        Generous: the machine may be busy; nothing here measures speed."""
        url = url or self.url("/healthz")
        try:
            wait_until(lambda: not self.alive() or answering(url)(), url, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.log_text()}") from None
        assert self.alive(), self.log_text()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.healthz}{path}"

    def murl(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics}{path}"

    def log_text(self) -> str:
        return self.log.read_text()

    def status(self) -> dict[str, Any]:
        code, body = curl(self.murl("/status"))
        assert code == 200, (code, self.log_text()[-3000:])
        return json.loads(body)  # type: ignore[no-any-return]

    def served_at(self, name: str) -> str:
        """The address the Service default/`name` is served at (loopback mode)."""
        for svc in self.status()["proxy"]["services"]:
            if svc["name"] == f"default/{name}":
                return next(iter(svc["servedAt"].values()))  # type: ignore[no-any-return]
        raise AssertionError(f"{name} not served")

    def dig(self, name: str, *options: str) -> list[str]:
        """dig +short for `name` (type A unless `options` say otherwise) from this daemon."""
        proc = run("dig", "+short", "+time=2", "+tries=1", "-p", str(self.dns), "@127.0.0.1",
                   *options, name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.split()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 20 s); the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
