"""How to reach the API server (URL, TLS, credentials): from a kubeconfig or in-cluster.

This module owns turning a kubeconfig (or the Pod's service account) into a `ClientConfig`, the
small value `APISource` connects with. Kubeconfig parsing is kubernetes_asyncio's loader: it
already merges KUBECONFIG path lists, resolves relative paths, decodes inline `*-data` fields and
runs exec/OIDC credential plugins, which a hand-written loader would have to repeat.

Credentials are re-read, not captured once: a service-account token is projected and rotated by
the kubelet (KEP-1205, refreshed well before its one-hour expiry), so the in-cluster provider
re-reads the file whenever its mtime changes and at least once a minute; a kubeconfig's token
(tokenFile, exec plugin) is reloaded at most once a minute.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeshim.cluster.errors import ConfigError
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.netaddr import join_host_port

if TYPE_CHECKING:
    from kubernetes_asyncio.config.kube_config import KubeConfigLoader

# The service-account volume every Pod gets (k8s.io/client-go rest.InClusterConfig).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REFRESH_SECONDS = 60.0

log = get_logger("sources")

Authorization = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class ClientConfig:
    """Everything needed to talk to one API server."""

    server: str  # e.g. https://10.96.0.1:443, no trailing slash
    ssl: ssl.SSLContext | None  # None for plain http (tests only)
    # Returns the Authorization header value ("Bearer ...") or None; re-reads rotated tokens.
    authorization: Authorization
    # Where the credentials came from, for error messages ("kubeconfig /x context y", ...).
    source: str
    tls_server_name: str | None = None


def ssl_context(
    *,
    ca_file: str | None = None,
    ca_data: str | bytes | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A client TLS context verifying the server against the CA (system CAs when none given)."""
    if isinstance(ca_data, bytes):
        ca_data = ca_data.decode()
    ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if insecure:  # only ever because the kubeconfig says insecure-skip-tls-verify: true
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- in-cluster ----------------------------------------------------------------------------


class _TokenFile:
    """A bearer token file re-read when it changes (mtime/size) or when a minute has passed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._read_at = 0.0
        self._value: str | None = None

    async def __call__(self) -> str | None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        now = time.monotonic()
        if stamp != self._stamp or now - self._read_at >= TOKEN_REFRESH_SECONDS:
            self._value = self.path.read_text().strip()
            self._stamp, self._read_at = stamp, now
        return f"Bearer {self._value}" if self._value else None


def in_cluster_config(
    *,
    host: str | None = None,
    port: str | None = None,
    account_dir: Path | None = None,
) -> ClientConfig:
    """The Pod's own service account (client-go rest.InClusterConfig)."""
    host = host or os.environ.get("KUBERNETES_SERVICE_HOST")
    port = port or os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError(
            "not running in a cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT unset"
        )
    account_dir = account_dir or SERVICE_ACCOUNT_DIR
    token, ca = account_dir / "token", account_dir / "ca.crt"
    for f in (token, ca):
        if not f.is_file():
            raise ConfigError(f"in-cluster service account file missing: {f}")
    return ClientConfig(
        server=f"https://{join_host_port(host, int(port))}",
        ssl=ssl_context(ca_file=str(ca)),
        authorization=_TokenFile(token),
        source=f"in-cluster service account token {token}",
    )


# --- kubeconfig ----------------------------------------------------------------------------


class _KubeconfigAuthorization:
    """The kubeconfig user's credential, reloaded at most once a minute (tokenFile, exec)."""

    def __init__(self, loader: KubeConfigLoader, conf: Any) -> None:
        self._loader = loader
        self._value = _header(conf)
        self._read_at = time.monotonic()

    async def __call__(self) -> str | None:
        if time.monotonic() - self._read_at >= TOKEN_REFRESH_SECONDS:
            from kubernetes_asyncio.client import Configuration

            conf = Configuration()
            self._read_at = time.monotonic()
            try:
                await self._loader.load_and_set(conf)
            except Exception as e:  # a failing exec plugin, an unreadable tokenFile, ...
                log.warning(
                    "cannot refresh kubeconfig credentials; keeping the previous ones",
                    error=repr(e),
                )
            else:
                self._value = _header(conf)
        return self._value


def _header(conf: Any) -> str | None:
    # A tokenFile's trailing newline is not part of the token (client-go trims it too).
    value = str(conf.api_key.get("BearerToken") or "").strip()
    return value if value and value != "Bearer" else None


async def kubeconfig_config(
    path: str | Path | None = None, context: str | None = None
) -> ClientConfig:
    """Load a kubeconfig: `path`, else $KUBECONFIG (a path list), else ~/.kube/config."""
    # Imported here: kubernetes_asyncio loads its whole generated client (~35 MiB RSS), which
    # an in-cluster daemon never needs.
    from kubernetes_asyncio.client import Configuration
    from kubernetes_asyncio.config import ConfigException
    from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

    paths = str(path) if path else os.environ.get("KUBECONFIG") or "~/.kube/config"
    merger = KubeConfigMerger(paths)
    if merger.config is None:
        raise ConfigError(f"kubeconfig not found: {paths}")
    try:
        loader = KubeConfigLoader(
            config_dict=merger.config, active_context=context, config_base_path=None
        )
        conf = Configuration()
        await loader.load_and_set(conf)
    except (ConfigException, KeyError, AssertionError, TypeError) as e:
        raise ConfigError(f"kubeconfig {paths} (context {context or 'current'}): {e!r}") from None
    server = str(conf.host).rstrip("/")
    ctx_name = loader.current_context["name"] if loader.current_context else context
    try:
        tls = (
            ssl_context(
                ca_file=conf.ssl_ca_cert,
                cert_file=conf.cert_file,
                key_file=conf.key_file,
                insecure=not conf.verify_ssl,
            )
            if server.startswith("https")
            else None
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"kubeconfig {paths} context {ctx_name}: TLS files: {e}") from None
    return ClientConfig(
        server=server,
        ssl=tls,
        authorization=_KubeconfigAuthorization(loader, conf),
        source=f"kubeconfig {paths} context {ctx_name}",
        tls_server_name=getattr(conf, "tls_server_name", None) or None,
    )


async def load_client_config(
    kubeconfig: str | Path | None = None, context: str | None = None, in_cluster: bool = False
) -> ClientConfig:
    """The one precedence rule, kube-proxy's: `in_cluster` asks for the service account; else an
    explicit kubeconfig wins; else the service account inside a Pod (KUBERNETES_SERVICE_HOST
    set); else $KUBECONFIG or ~/.kube/config. Raises ConfigError naming what is missing."""
    if in_cluster or (kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST")):
        return in_cluster_config()
    return await kubeconfig_config(kubeconfig, context)

