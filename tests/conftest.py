"""Shared pytest setup: the repository root on sys.path, logging for kubeshim loggers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logging.getLogger("kubeshim").setLevel(logging.DEBUG)

# Real Kubernetes peers (kube-apiserver + etcd control plane, CoreDNS, kube-proxy) as fixtures.
pytest_plugins = ["tests.peers.fixtures"]
