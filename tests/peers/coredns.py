"""CoreDNS (the binary build.sh makes) serving a cluster zone from a real API server.

`cluster_corefile()` is the Corefile a kubeadm cluster ships (kubernetes + cache + forward,
errors), on one loopback address and port; `CoreDNS` runs it by pid and waits for the `ready`
plugin, which answers 200 once the kubernetes plugin has synced its first list.

    with CoreDNS(peers.coredns, corefile, workdir) as coredns: ...
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tests.peers.cluster import Process, free_port


def cluster_corefile(
    kubeconfig: Path,
    port: int,
    ready_port: int,
    upstream: str,
    zone: str = "cluster.local",
    ttl: int = 30,
    host: str = "127.0.0.1",
) -> str:
    """The default cluster Corefile, bound to `host:port`, forwarding to `upstream`."""
    return f"""\
.:{port} {{
    bind {host}
    errors
    ready {host}:{ready_port}
    kubernetes {zone} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl {ttl}
    }}
    forward . {upstream}
    cache {ttl}
}}
"""


class CoreDNS:
    """One CoreDNS process with its own Corefile, ended by pid."""

    def __init__(self, binary: Path, workdir: Path, kubeconfig: Path, upstream: str,
                 port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self.ready_port = free_port()
        self.corefile = workdir / f"Corefile-{self.port}"
        self.corefile.write_text(
            cluster_corefile(kubeconfig, self.port, self.ready_port, upstream, host=host)
        )
        self.process = Process("coredns", [str(binary), "-conf", str(self.corefile)],
                               workdir / f"coredns-{self.port}.log")

    def start(self, timeout: float = 60) -> CoreDNS:
        self.process.start()
        self.process.wait_until(self._ready, "ready (kubernetes plugin synced)", timeout)
        return self

    def _ready(self) -> bool:
        url = f"http://{self.host}:{self.ready_port}/ready"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> CoreDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
