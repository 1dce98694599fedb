"""Shared pytest setup: the repository root on sys.path, logging for kubeshim loggers."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Daemons and tools the tests start (`python -m kubeshim`, the `kubeshim` script) import this
# tree too, whatever their working directory and whichever checkout is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

logging.getLogger("kubeshim").setLevel(logging.DEBUG)

# Real Kubernetes peers (kube-apiserver + etcd control plane, CoreDNS, kube-proxy) as fixtures.
pytest_plugins = ["tests.peers.fixtures"]


# Under CI=true (root, everything installed by scripts/setup.sh) a skip means a missing tool or
# capability that a test quietly stepped around: report it as a failure instead, whichever test
# or fixture decided to skip.
if os.environ.get("CI") == "true":

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
