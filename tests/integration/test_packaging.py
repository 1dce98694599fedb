"""The wheel installs only the `kubeshim` package, so it lives beside dnspython's `dns`.

Builds the wheel from the tree, installs it with its dependencies into a fresh virtual
environment that already holds dnspython, and imports both from outside the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def run(*argv: str | Path, cwd: Path) -> str:
    # Without the source tree on PYTHONPATH (tests/conftest.py puts it there for daemons): its
    # top-level dns/ folder would hide dnspython, which is what this test is about.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_installs_beside_dnspython(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("kubeshim-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kubeshim"}
    for module in ("cluster/state.py", "cluster/sources/api.py", "proxy/proxier.py",
                   "dns/server.py"):
        assert f"kubeshim/{module}" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    run(*pip, "dnspython", cwd=tmp_path)
    run(*pip, wheel, cwd=tmp_path)
    out = run(python, "-c",
              "import dns.resolver, dns.message, kubeshim.dns.server, kubeshim.cluster.state,"
              " kubeshim.proxy.proxier, kubeshim.cli;"
              "print(dns.resolver.__file__); print(kubeshim.dns.server.__file__)",
              cwd=tmp_path)
    dnspython_file, ours = out.split()
    assert "site-packages/dns/resolver.py" in dnspython_file
    assert "site-packages/kubeshim/dns/server.py" in ours
    # The console script works from the installed package.
    assert "run" in run(env_dir / "bin" / "kubeshim", "--help", cwd=tmp_path)
