"""compose.yaml and the Dockerfile: valid against the Compose specification's JSON schema, and
honest: images from this repository or standard public ones, addresses and routes that fit
together, a kubeshim command line kubeshim accepts, manifests it can serve.

The schema comes from the compose-spec/compose-go Go module (schema/compose-spec.json) through
`go mod download`, cached in the Go module cache; nothing is vendored.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubeshim.cli import build_parser, options_from_args
from kubeshim.cluster.model import decode

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_GO = "github.com/compose-spec/compose-go/v2"
COMPOSE_GO_VERSION = "v2.16.2"
PUBLIC_IMAGES = {"debian:bookworm-slim", "curlimages/curl", "busybox"}
LOCAL_IMAGE = "kubeshim:0.1.0"


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def compose_schema() -> dict[str, Any]:
    """compose-spec.json of a pinned compose-go release, fetched into the Go module cache."""
    if shutil.which("go") is None:
        _missing("the Compose schema is fetched with `go mod download`; Go is not installed")
    proc = subprocess.run(["go", "mod", "download", "-json", f"{COMPOSE_GO}@{COMPOSE_GO_VERSION}"],
                          capture_output=True, text=True, timeout=300, cwd="/",
                          env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"})
    if proc.returncode != 0:
        _missing(f"go mod download {COMPOSE_GO}: {proc.stderr.strip() or proc.stdout.strip()}")
    module_dir = Path(json.loads(proc.stdout)["Dir"])
    return dict(json.loads((module_dir / "schema" / "compose-spec.json").read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def test_compose_file_follows_the_specification(compose_schema: dict[str, Any],
                                                compose: dict[str, Any]) -> None:
    jsonschema.validate(compose, compose_schema)


def test_the_schema_check_catches_mistakes(compose_schema: dict[str, Any],
                                           compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["kubeshim"]["cap_ad"] = ["NET_ADMIN"]  # a typo compose would reject
    with pytest.raises(jsonschema.ValidationError, match="cap_ad"):
        jsonschema.validate(broken, compose_schema)


def test_images_come_from_this_repository_or_standard_ones(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builders = [s for s in services.values() if "build" in s]
    assert builders and all(s["image"] == LOCAL_IMAGE and s["build"] == "." for s in builders)
    for name, svc in services.items():
        image = svc["image"]
        assert image == LOCAL_IMAGE or image.split(":")[0] in PUBLIC_IMAGES | {
            i.split(":")[0] for i in PUBLIC_IMAGES}, f"{name}: image {image}"
        if image == LOCAL_IMAGE and "build" not in svc:
            assert svc.get("pull_policy") == "never", f"{name} must not pull the local image"
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    # FROM ${BASE}: the ARG's default is the base a plain `docker build` uses.
    args = dict(line.split()[1].split("=", 1) for line in dockerfile
                if line.startswith("ARG ") and "=" in line)
    bases = [line.split()[1] for line in dockerfile if line.startswith("FROM ")]
    bases = [args.get(b.strip("${}"), b) if b.startswith("$") else b for b in bases]
    assert bases and all(b in PUBLIC_IMAGES for b in bases)
    for line in dockerfile:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not here"


def test_the_network_fits_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    subnet = ipaddress.ip_network(compose["networks"]["lab"]["ipam"]["config"][0]["subnet"])
    addresses = {name: ipaddress.ip_address(svc["networks"]["lab"]["ipv4_address"])
                 for name, svc in services.items()}
    assert all(a in subnet for a in addresses.values())
    assert len(set(addresses.values())) == len(addresses)
    kubeshim = services["kubeshim"]
    assert kubeshim["cap_add"] == ["NET_ADMIN"]

    # kubeshim: a command line its own parser accepts, serving the lab's manifest folder.
    args = build_parser().parse_args(kubeshim["command"])
    opts = options_from_args(args)
    assert opts.proxy.vip_mode == "interface"
    assert opts.dns.binds == [(str(addresses["kubeshim"]), 53)]
    manifests = ROOT / Path(str(opts.manifests)).relative_to("/app")
    assert manifests.is_dir()

    # The client: routes the Service CIDR via kubeshim and resolves through it.
    client = services["client"]
    script = client["command"][0]
    assert f"ip route add 10.96.0.0/12 via {addresses['kubeshim']}" in script
    assert client["dns"] == [str(addresses["kubeshim"])]
    assert client["cap_add"] == ["NET_ADMIN"]
    assert "http://web.default.svc.cluster.local/" in script

    # The manifests: every endpoint is a backend container, on the port it listens on; every
    # ClusterIP is inside the CIDR the client routes to kubeshim.
    backends = {str(addresses[n]): int(s["command"][2]) for n, s in services.items()
                if n.startswith("web-")}
    assert len(backends) >= 2
    seen: set[str] = set()
    for path in sorted(manifests.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            obj = decode(doc["kind"], doc)
            if doc["kind"] == "Service":
                for ip in obj.cluster_ips:  # type: ignore[union-attr]
                    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/12")
            else:
                ports = {p.port for p in obj.ports or ()}  # type: ignore[union-attr]
                for ep in obj.endpoints or ():  # type: ignore[union-attr]
                    assert ep.addresses[0] in backends, ep.addresses[0]
                    assert backends[ep.addresses[0]] in ports
                    assert ep.node_name == opts.proxy.node_name
                    seen.add(ep.addresses[0])
    assert seen == set(backends), "every backend replica is an endpoint"
