"""Choosing the source of change from the options: a manifest folder or the Kubernetes API."""

from __future__ import annotations

from typing import Protocol

from kubeshim.cluster.errors import ConfigError
from kubeshim.cluster.state import ClusterState
from kubeshim.config import Options


class Source(Protocol):
    async def run(self) -> None: ...


class _APISourceLauncher:
    """Loads credentials inside the event loop (kubeconfig loading is async), then watches."""

    def __init__(self, opts: Options, state: ClusterState) -> None:
        self.opts = opts
        self.state = state

    async def run(self) -> None:
        from kubeshim.cluster.sources.api import APISource
        from kubeshim.cluster.sources.kubeconfig import load_client_config

        o = self.opts
        client = await load_client_config(o.kubeconfig, o.context, in_cluster=o.in_cluster)
        await APISource(client, self.state).run()


def make_source(opts: Options, state: ClusterState) -> Source:
    chosen = [x for x in (opts.manifests, opts.kubeconfig, opts.in_cluster or None) if x]
    if len(chosen) > 1:
        raise ConfigError("choose one source: --manifests DIR, --kubeconfig FILE or --in-cluster")
    if opts.manifests is not None:
        from kubeshim.cluster.sources.manifests import ManifestSource

        if not opts.manifests.exists():
            raise ConfigError(f"--manifests {opts.manifests}: no such file or directory")
        return ManifestSource(opts.manifests, state, service_cidrs=opts.service_networks(),
                              use_inotify=not opts.manifests_poll)
    if opts.kubeconfig is not None or opts.in_cluster:
        return _APISourceLauncher(opts, state)
    raise ConfigError("no source: give --manifests DIR, --kubeconfig FILE or --in-cluster")
