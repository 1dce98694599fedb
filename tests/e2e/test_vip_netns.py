"""proxy/vip.py against a real kernel: the VIP interface and the node addresses for NodePorts.

Each test runs the plumbing inside a network namespace of its own (`ip netns exec ... python`),
so netlink edits land there, and reads the result back with iproute2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT
from tests.netns import Netns, require_root

pytestmark = pytest.mark.e2e


@pytest.fixture
def ns() -> Iterator[Netns]:
    require_root()
    space = Netns(f"ks-vip-{os.getpid()}")
    try:
        yield space
    finally:
        space.delete()


def python(ns: Netns, code: str) -> str:
    proc = ns.run([sys.executable, "-c", code], check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def addresses(ns: Netns, dev: str) -> set[str]:
    out = ns.run(["ip", "-j", "addr", "show", "dev", dev], check=False)
    if out.returncode != 0:
        return set()
    return {f"{a['local']}/{a['prefixlen']}" for link in json.loads(out.stdout)
            for a in link["addr_info"] if a.get("scope") == "global"}


def test_interface_vips_assign_remove_and_delete_what_they_created(ns: Netns) -> None:
    out = python(ns, """
import subprocess
from kubeshim.proxy.vip import InterfaceVips
v = InterfaceVips("kubeshim0")
v.prepare()
for ip in ("10.96.0.10", "10.96.0.11", "fd00:96::10"):
    v.add(ip)
v.add("10.96.0.10")  # again: no error, nothing twice
v.remove("10.96.0.11")
print(v.kind)
print(subprocess.run(["ip", "-br", "addr", "show", "dev", "kubeshim0"], capture_output=True,
                     text=True).stdout)
v.close()
""")
    kind, shown = out.split("\n", 1)
    assert kind == "bridge"  # this kernel has no dummy driver: a bridge without ports
    # Host routes only (/32, /128): no route to the Service CIDR appears.
    assert "10.96.0.10/32" in shown and "fd00:96::10/128" in shown and "10.96.0.11" not in shown
    assert ns.run(["ip", "link", "show", "kubeshim0"], check=False).returncode != 0


def test_an_existing_interface_loses_stale_addresses_and_stays(ns: Netns) -> None:
    ns.run(["ip", "link", "add", "kubeshim0", "type", "bridge"])
    ns.run(["ip", "addr", "add", "10.96.0.99/32", "dev", "kubeshim0"])  # left by a crash
    out = python(ns, """
from kubeshim.proxy.vip import InterfaceVips
v = InterfaceVips("kubeshim0")
v.prepare()
v.add("10.96.0.10")
print(v.kind, sorted(v.assigned))
""")
    assert out.strip() == "existing ['10.96.0.10']"
    assert addresses(ns, "kubeshim0") == {"10.96.0.10/32"}
    python(ns, """
from kubeshim.proxy.vip import InterfaceVips
v = InterfaceVips("kubeshim0")
v.prepare()
v.add("10.96.0.11")
v.close()
""")
    # Not created by kubeshim: it stays, without the addresses kubeshim put there.
    assert addresses(ns, "kubeshim0") == set()
    assert ns.run(["ip", "link", "show", "kubeshim0"], check=False).returncode == 0


def test_nodeport_addresses_follow_cidrs_and_primary(ns: Netns) -> None:
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    for dev, ip in (("eth0", "192.0.2.10/24"), ("eth1", "198.51.100.10/24")):
        ns.run(["ip", "addr", "add", ip, "dev", dev])
        ns.run(["ip", "link", "set", dev, "up"])
    ns.run(["ip", "route", "add", "default", "via", "198.51.100.1", "dev", "eth1"])
    out = python(ns, """
import json
from kubeshim.proxy.vip import nodeport_addresses
print(json.dumps([nodeport_addresses([]), nodeport_addresses(["192.0.2.0/24"]),
                  nodeport_addresses(["primary"]), nodeport_addresses(["127.0.0.0/8"])]))
try:
    nodeport_addresses(["everything"])
except ValueError as e:
    print(e)
""")
    every, cidr, primary, loopback = json.loads(out.splitlines()[0])
    assert {"127.0.0.1", "192.0.2.10", "198.51.100.10"} <= set(every)
    assert cidr == ["192.0.2.10"]
    assert primary == ["198.51.100.10"]  # the address on the default route's interface
    assert loopback == ["127.0.0.1"]
    assert "'everything' is not a CIDR" in out.splitlines()[1]
