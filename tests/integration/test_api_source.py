"""APISource against the fake API server over real HTTPS: convergence, reconnects, 410 relists,
bookmarks, authentication and authorization failures, invalid objects, stalls, TLS, in-cluster
token rotation."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.sources.api import APISource
from kubeshim.cluster.sources.kubeconfig import (
    ClientConfig,
    ConfigError,
    in_cluster_config,
    kubeconfig_config,
    load_client_config,
)
from kubeshim.cluster.state import ClusterState, ServiceChange
from tests.fakeapi import PKI, FakeAPIServer, make_pki

TOKEN = "test-token"


def service(name: str, ip: str, port: int = 80, ns: str = "default") -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port}]},
    }


def endpoint_slice(name: str, svc: str, ips: list[str], ns: str = "default") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def key(name: str, ns: str = "default") -> NamespacedName:
    return NamespacedName(ns, name)


def endpoints(state: ClusterState, name: str) -> list[str]:
    info = state.services.get(key(name))
    return [e.ip for e in info.ports[0].endpoints] if info and info.ports else []


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


async def drop(server: FakeAPIServer) -> None:
    """Abort the client's open watches (once both are open), as a dying API server would."""
    await wait_for(lambda: server.watches == 2, what="both watches open")
    server.drop_connections()


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Log records with their key=value fields, as the daemon prints them."""
    return "\n".join(
        r.getMessage() + "".join(f" {k}={v}" for k, v in getattr(r, "kv", {}).items())
        for r in caplog.records
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def server(pki: PKI) -> AsyncIterator[FakeAPIServer]:
    srv = FakeAPIServer(tokens={TOKEN}, bookmark_interval=60)
    ctx = srv.server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    srv.url = await srv.start(ctx)  # type: ignore[attr-defined]
    yield srv
    await srv.stop()


def write_kubeconfig(
    path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any]
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server, **cluster}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": {"cluster": "fake", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


@pytest.fixture
async def client(server: FakeAPIServer, pki: PKI, tmp_path: Path) -> ClientConfig:
    kc = write_kubeconfig(
        tmp_path / "kubeconfig",
        server.url,
        {"token": TOKEN},  # type: ignore[attr-defined]
        {"certificate-authority": str(pki.ca)},
    )
    return await kubeconfig_config(kc)


class Running:
    """An APISource running in a task, with every ServiceChange its subscriber saw."""

    def __init__(self, source: APISource) -> None:
        self.source = source
        self.state = source.state
        self.changes: list[ServiceChange] = []
        self.state.subscribe(self.changes.extend)
        self.task = asyncio.create_task(source.run())

    def watch_rvs(self, server: FakeAPIServer, plural: str) -> list[str]:
        return [
            q["resourceVersion"]
            for verb, p, q in server.requests
            if verb == "watch" and p == plural
        ]


@pytest.fixture
def run_source() -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(client: ClientConfig, **kw: Any) -> Running:
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("backoff_cap", 0.2)
        r = Running(APISource(client, ClusterState(), **kw))
        running.append(r)
        return r

    yield start
    for r in running:
        r.task.cancel()


async def test_initial_list_and_watch_converge(server, client, run_source) -> None:
    server.load(
        [service(f"s{i}", f"10.96.0.{i + 10}") for i in range(5)]
        + [endpoint_slice(f"s{i}-a", f"s{i}", [f"10.0.0.{i + 1}"]) for i in range(5)]
    )
    r = run_source(client, page_size=2)  # 5 objects of each kind: three pages
    await wait_for(lambda: r.state.synced, what="initial sync")
    assert sorted(r.state.services) == [key(f"s{i}") for i in range(5)]
    assert endpoints(r.state, "s3") == ["10.0.0.4"]
    pages = [q for v, p, q in server.requests if v == "list"]
    assert sum(1 for q in pages if "continue" in q) == 4
    assert not any("continue" in q and "resourceVersion" in q for q in pages)

    server.put(service("new", "10.96.1.1"))
    server.put(endpoint_slice("new-a", "new", ["10.0.1.1", "10.0.1.2"]))
    await wait_for(lambda: endpoints(r.state, "new") == ["10.0.1.1", "10.0.1.2"])
    server.put(endpoint_slice("s0-a", "s0", ["10.0.0.99"]))
    await wait_for(lambda: endpoints(r.state, "s0") == ["10.0.0.99"])
    server.delete("Service", "default", "s1")
    await wait_for(lambda: key("s1") not in r.state.services)
    assert r.source.resource_versions["EndpointSlice"] == str(server.rv - 1)


async def test_dropped_connection_resumes_without_loss_or_repeat(
    server, client, run_source
) -> None:
    server.load([service("web", "10.96.0.10")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    for round_ in range(4):
        await drop(server)
        # Changes made while the client is away must arrive after it reconnects.
        rvs = [
            server.put(endpoint_slice(f"web-{round_}-{i}", "web", [f"10.1.{round_}.{i}"]))
            for i in range(3)
        ]
        await wait_for(lambda n=round_: len(endpoints(r.state, "web")) == 3 * (n + 1))
        await wait_for(lambda rv=rvs[-1]: r.source.resource_versions["EndpointSlice"] == str(rv))
    # Every reconnect resumed from the last applied event, never from an older or newer one.
    resumed = r.watch_rvs(server, "endpointslices")
    assert len(resumed) >= 5
    applied = {str(server.rv - 12 + 3 * n) for n in range(4)} | {resumed[0]}
    assert set(resumed) <= applied
    # Each slice's ADDED reached the subscriber exactly once: 12 growths of the endpoint set.
    sizes = [
        len(c.current.ports[0].endpoints) for c in r.changes if c.key == key("web") and c.current
    ]
    assert sizes == sorted(set(sizes)) and sizes[-1] == 12
    assert list(r.state.objects("EndpointSlice")) == sorted(r.state.objects("EndpointSlice"))


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists_and_deletes_reach_subscribers(
    server, client, run_source, gone_as_http
) -> None:
    server.gone_as_http = gone_as_http
    server.load([service("a", "10.96.0.1"), service("b", "10.96.0.2"), service("c", "10.96.0.3")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced and server.watches == 2)
    server.stall()  # the client will not see the delete as a watch event
    server.delete("Service", "default", "b")
    server.put(service("d", "10.96.0.4"))
    server.compact()
    await drop(server)
    await wait_for(lambda: key("b") not in r.state.services and key("d") in r.state.services)
    deleted = [c.key for c in r.changes if c.current is None]
    assert deleted == [key("b")]
    lists = [q for v, p, q in server.requests if v == "list" and p == "services"]
    # The first list may come from the watch cache; the relist after 410 is a consistent read.
    assert [q.get("resourceVersion") for q in lists] == ["0", None]


async def test_failed_relist_keeps_the_state(server, client, run_source, caplog) -> None:
    # An error is never a deletion: after 410 Gone the relists fail several times; meanwhile
    # every Service keeps serving, and only a successful list replaces the state.
    server.load([service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced and server.watches == 2)
    server.fail_next = [500, 503, 500, 500]
    server.send_gone()
    await wait_for(lambda: log_text(caplog).count("API request failed verb=list") >= 4)
    assert {key("a"), key("b")} <= set(r.state.services)
    assert [c.key for c in r.changes if c.current is None] == []
    server.delete("Service", "default", "b")
    await wait_for(lambda: key("b") not in r.state.services)
    assert [c.key for c in r.changes if c.current is None] == [key("b")]
    assert key("a") in r.state.services


async def test_gone_error_event_mid_stream(server, client, run_source, caplog) -> None:
    server.load([service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced and server.watches == 2)
    server.stall()
    server.delete("Service", "default", "a")
    server.send_gone()  # ERROR {code: 410} is the first thing the stream sends when resumed
    server.stall(False)
    await wait_for(lambda: key("a") not in r.state.services)
    assert [c.key for c in r.changes if c.current is None] == [key("a")]
    assert "resource version expired, relisting" in log_text(caplog)


async def test_bookmark_advances_rv_and_resume_uses_it(pki, client, run_source, server) -> None:
    server.bookmark_interval = 0.2
    server.load([service("a", "10.96.0.1")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    listed = r.source.resource_versions["Service"]
    # Slices change; the Services watch only learns the newer resourceVersion from bookmarks.
    for i in range(3):
        server.put(endpoint_slice(f"a-{i}", "a", [f"10.0.0.{i + 1}"]))
    await wait_for(lambda: r.source.resource_versions["Service"] == str(server.rv), what="bookmark")
    assert int(r.source.resource_versions["Service"]) > int(listed)
    await drop(server)
    await wait_for(lambda: r.watch_rvs(server, "services")[-1] == str(server.rv), what="resume")
    assert sum(1 for v, p, _ in server.requests if v == "list" and p == "services") == 1


async def test_bad_token_is_a_clear_authentication_error(
    server, pki, tmp_path, run_source, caplog
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", server.url, {"token": "wrong"}, {"certificate-authority": str(pki.ca)}
    )
    r = run_source(await kubeconfig_config(kc))
    await wait_for(lambda: "authentication failed" in log_text(caplog))
    text = log_text(caplog)
    assert f"server={server.url}" in text
    assert f"credentials=kubeconfig {kc} context ctx" in text
    assert not r.state.synced and not r.task.done()


async def test_forbidden_names_verb_and_resource_and_keeps_retrying(
    server, client, run_source, caplog
) -> None:
    server.forbidden.add("endpointslices")
    server.load([service("a", "10.96.0.1"), endpoint_slice("a-1", "a", ["10.0.0.1"])])
    r = run_source(client)
    want = (
        'forbidden: cannot list resource "endpointslices" in API group "discovery.k8s.io"'
        " at the cluster scope"
    )
    await wait_for(lambda: want in log_text(caplog))
    await wait_for(lambda: sum(1 for v, p, _ in server.requests if p == "endpointslices") >= 3)
    assert r.state.is_synced("Service") and not r.state.synced and not r.task.done()
    assert 'User "system:serviceaccount:kube-system:kubeshim" cannot list' in log_text(caplog)
    server.forbidden.clear()
    await wait_for(lambda: r.state.synced)
    assert endpoints(r.state, "a") == ["10.0.0.1"]


async def test_invalid_object_is_skipped_by_name(server, client, run_source, caplog) -> None:
    bad_listed = service("listed-bad", "10.96.0.2")
    bad_listed["spec"]["ports"][0]["port"] = 70000
    server.load([service("a", "10.96.0.1"), bad_listed])
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    assert sorted(r.state.services) == [key("a")]
    bad = service("watched-bad", "not-an-ip")
    server.put(bad)
    server.put(service("after", "10.96.0.3"))
    await wait_for(lambda: key("after") in r.state.services)
    text = log_text(caplog)
    assert (
        "skipping invalid object kind=Service object=default/listed-bad"
        " reason=field spec.ports[0].port" in text
    )
    assert "object=default/watched-bad" in text and "spec.clusterIP" in text
    assert key("watched-bad") not in r.state.services


async def test_stalled_stream_is_detected_and_restarted(server, client, run_source, caplog) -> None:
    server.load([service("a", "10.96.0.1")])
    r = run_source(client, stall_timeout=0.5)
    await wait_for(lambda: r.state.synced and server.watches == 2)
    server.stall()  # the open watches go silent: no events, no bookmarks, connection open
    server.put(service("b", "10.96.0.2"))
    await wait_for(lambda: key("b") in r.state.services, what="delivery after restart")
    assert "watch stalled, restarting" in log_text(caplog)
    assert sum(1 for v, p, _ in server.requests if v == "list" and p == "services") == 1


@pytest.mark.parametrize("inline", [False, True], ids=["files", "inline-data"])
async def test_kubeconfig_client_certificate(server, pki, tmp_path, run_source, inline) -> None:
    server.load([service("a", "10.96.0.1")])
    if inline:
        b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
        user = {
            "client-certificate-data": b64(pki.client_cert),
            "client-key-data": b64(pki.client_key),
        }
        cluster = {"certificate-authority-data": b64(pki.ca)}
    else:
        user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
        cluster = {"certificate-authority": str(pki.ca)}
    kc = write_kubeconfig(tmp_path / "kc", server.url, user, cluster)
    r = run_source(await kubeconfig_config(kc))
    await wait_for(lambda: r.state.synced)
    assert list(r.state.services) == [key("a")]


async def test_wrong_ca_fails_tls_verification_clearly(
    server, pki, tmp_path, run_source, caplog
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", server.url, {"token": TOKEN}, {"certificate-authority": str(pki.other_ca)}
    )
    r = run_source(await kubeconfig_config(kc))
    await wait_for(lambda: "TLS verification of the API server failed" in log_text(caplog))
    assert "CERTIFICATE_VERIFY_FAILED" in log_text(caplog)
    assert not r.state.synced and not server.requests


async def test_in_cluster_token_rotation_is_picked_up(server, pki, tmp_path, run_source) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(pki.ca.read_bytes())
    (account / "token").write_text("token-1\n")
    server.tokens = {"token-1"}
    server.load([service("a", "10.96.0.1")])
    client = in_cluster_config(host="127.0.0.1", port=str(server.port), account_dir=account)
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    # The kubelet rotates the projected token; the old one stops working.
    server.tokens = {"token-2"}
    (account / "token").write_text("token-2\n")
    await drop(server)
    server.put(service("b", "10.96.0.2"))
    await wait_for(lambda: key("b") in r.state.services)


async def test_server_errors_back_off_and_resume_without_relisting(
    server, client, run_source, caplog
) -> None:
    server.fail_next = [500, 503]  # the first list attempts fail
    server.load([service("a", "10.96.0.1")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    assert "API request failed verb=list resource=" in log_text(caplog)
    await wait_for(lambda: server.watches == 2)
    rv = r.source.resource_versions["Service"]
    # An ERROR event that is not 410: resume the watch where it was, no relist.
    server.send_error({"kind": "Status", "code": 500, "reason": "InternalError", "message": "x"})
    server.put(service("b", "10.96.0.2"))
    await wait_for(lambda: key("b") in r.state.services)
    lists = [p for v, p, _ in server.requests if v == "list"]
    assert len(lists) == 4  # two injected failures, then one list per kind; none after
    assert rv in r.watch_rvs(server, "services")[1:]


async def test_kubeconfig_context_argument_selects_credentials(
    server, pki, tmp_path, run_source
) -> None:
    server.load([service("a", "10.96.0.1")])
    cluster = {"server": server.url, "certificate-authority": str(pki.ca)}
    kc = tmp_path / "kc"
    kc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "stale",
                "clusters": [{"name": "fake", "cluster": cluster}],
                "users": [
                    {"name": "old", "user": {"token": "expired"}},
                    {"name": "new", "user": {"tokenFile": str(tmp_path / "token")}},
                ],
                "contexts": [
                    {"name": "stale", "context": {"cluster": "fake", "user": "old"}},
                    {"name": "fresh", "context": {"cluster": "fake", "user": "new"}},
                ],
            }
        )
    )
    (tmp_path / "token").write_text(TOKEN + "\n")
    config = await kubeconfig_config(kc, context="fresh")
    assert config.source == f"kubeconfig {kc} context fresh"
    r = run_source(config)
    await wait_for(lambda: r.state.synced)


async def test_kubeconfig_from_env_path_list(
    server, pki, tmp_path, run_source, monkeypatch
) -> None:
    server.load([service("a", "10.96.0.1")])
    kc = write_kubeconfig(
        tmp_path / "kc", server.url, {"token": TOKEN}, {"certificate-authority": str(pki.ca)}
    )
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{kc}")
    r = run_source(await kubeconfig_config())
    await wait_for(lambda: r.state.synced)


@pytest.mark.parametrize("insecure", [True, False], ids=["skip-verify-set", "not-set"])
async def test_insecure_skip_tls_verify_only_when_set(
    server, tmp_path, run_source, caplog, insecure
) -> None:
    server.load([service("a", "10.96.0.1")])
    cluster = {"insecure-skip-tls-verify": True} if insecure else {}
    kc = write_kubeconfig(tmp_path / "kc", server.url, {"token": TOKEN}, cluster)
    r = run_source(await kubeconfig_config(kc))
    if insecure:
        await wait_for(lambda: r.state.synced)
    else:  # the system CAs do not know the test CA
        await wait_for(lambda: "TLS verification of the API server failed" in log_text(caplog))
        assert not r.state.synced


def test_in_cluster_config_errors_name_what_is_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT unset"):
        in_cluster_config(account_dir=tmp_path)
    (tmp_path / "ca.crt").write_text("")
    with pytest.raises(ConfigError, match=f"service account file missing: {tmp_path / 'token'}"):
        in_cluster_config(host="10.96.0.1", port="443", account_dir=tmp_path)


async def test_missing_kubeconfig_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"kubeconfig not found: {tmp_path / 'nope'}"):
        await kubeconfig_config(tmp_path / "nope")


async def test_load_client_config_prefers_explicit_kubeconfig_then_in_cluster(
    server, pki, tmp_path, monkeypatch
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", server.url, {"token": TOKEN}, {"certificate-authority": str(pki.ca)}
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    monkeypatch.setattr("kubeshim.cluster.sources.kubeconfig.SERVICE_ACCOUNT_DIR", tmp_path / "sa")
    assert (await load_client_config(kc)).source.startswith(f"kubeconfig {kc}")
    with pytest.raises(ConfigError, match="service account file missing"):
        await load_client_config()  # in a Pod: the service account, here absent


async def test_object_turning_invalid_keeps_last_valid_version_until_deleted(
    server, client, run_source, caplog
) -> None:
    server.load([service("a", "10.96.0.1")])
    r = run_source(client)
    await wait_for(lambda: r.state.synced)
    server.put(service("a", "10.96.0.999"))  # MODIFIED to something invalid
    server.put(service("marker", "10.96.0.2"))
    await wait_for(lambda: key("marker") in r.state.services)
    assert r.state.services[key("a")].service.cluster_ips == ["10.96.0.1"]
    assert "object=default/a type=MODIFIED" in log_text(caplog)
    server.delete("Service", "default", "a")  # the DELETED event carries the invalid object
    await wait_for(lambda: key("a") not in r.state.services)


# --- against the real kube-apiserver (tests/peers) ---------------------------------------------


@pytest.fixture(scope="module")
def real_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """etcd + kube-apiserver built by tests/peers/build.sh, with deploy/rbac.yaml applied."""
    from tests.peers.cluster import ControlPlane, Peers
    from tests.peers.fixtures import require_peers

    peers = Peers.find()
    require_peers(peers, "etcd", "kube_apiserver", "kubectl")
    cp = ControlPlane(tmp_path_factory.mktemp("apiserver"), peers)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


async def kubectl(cp: Any, *args: str, manifest: Any = None) -> None:
    """kubectl as admin, off the event loop so the source keeps reading its watches."""
    text = yaml.safe_dump_all(manifest) if manifest is not None else None
    await asyncio.to_thread(cp.kubectl, *args, input=text)


def real_service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", **service(name, "")} | {
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }


def real_slice(name: str, svc: str, ips: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", **endpoint_slice(name, svc, ips)}


@pytest.mark.peers
async def test_real_apiserver_list_watch_and_rbac(real_apiserver, run_source, caplog) -> None:
    cp = real_apiserver
    await kubectl(
        cp,
        "apply",
        "-f",
        "-",
        manifest=[real_service("rw"), real_slice("rw-1", "rw", ["10.244.0.1"])],
    )
    # The kubeshim identity of deploy/rbac.yaml, TLS verified against the cluster CA.
    r = run_source(await kubeconfig_config(cp.kubeshim_kubeconfig))
    await wait_for(lambda: endpoints(r.state, "rw") == ["10.244.0.1"], what="initial list")
    await kubectl(
        cp, "apply", "-f", "-", manifest=[real_slice("rw-1", "rw", ["10.244.0.1", "10.244.0.2"])]
    )
    await wait_for(lambda: endpoints(r.state, "rw") == ["10.244.0.1", "10.244.0.2"])
    await kubectl(cp, "delete", "endpointslice", "rw-1", "-n", "default")
    await wait_for(lambda: endpoints(r.state, "rw") == [])
    await kubectl(cp, "delete", "service", "rw", "-n", "default")
    await wait_for(lambda: key("rw") not in r.state.services)
    # An identity without the role: the real authorizer's message, surfaced, retried.
    denied = run_source(await kubeconfig_config(cp.norole_kubeconfig))
    await wait_for(lambda: 'cannot list resource "services" in API group ""' in log_text(caplog))
    assert 'User "norole"' in log_text(caplog)
    assert not denied.task.done() and not denied.state.synced


@pytest.mark.peers
async def test_real_apiserver_restart_and_compaction_relist(
    real_apiserver, run_source, caplog
) -> None:
    cp = real_apiserver
    await kubectl(cp, "apply", "-f", "-", manifest=[real_service("rc")])
    r = run_source(await kubeconfig_config(cp.kubeshim_kubeconfig))
    await wait_for(lambda: r.state.synced and key("rc") in r.state.services)
    # Only slices change: the Services watch stays at its listed resourceVersion, which the
    # compaction below makes too old to resume from.
    await kubectl(
        cp,
        "apply",
        "-f",
        "-",
        manifest=[real_slice(f"rc-{i}", "rc", [f"10.244.1.{i}"]) for i in range(1, 4)],
    )
    await wait_for(lambda: len(endpoints(r.state, "rc")) == 3)
    await asyncio.to_thread(cp.expire_history)  # compact etcd, restart kube-apiserver
    await wait_for(lambda: "resource version expired, relisting" in log_text(caplog), 30)
    await kubectl(cp, "apply", "-f", "-", manifest=[real_service("rc-after")])
    await wait_for(lambda: key("rc-after") in r.state.services, 30, what="watch after relist")
    assert len(endpoints(r.state, "rc")) == 3
