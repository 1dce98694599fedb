"""The DNS package's shape: the sans-IO cores import no socket shell (cycles across the whole
product are tests/unit/test_layout.py's)."""

from __future__ import annotations

import ast
from pathlib import Path

DNS = Path(__file__).resolve().parents[2] / "dns"
SHELLS = {"server", "batch", "forward", "mmsg"}
CORES = {"names", "records", "wire", "cache", "gate", "handler", "config", "metrics"}


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in DNS.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubeshim.dns"):
                parts = (node.module or "").split(".")
                deps.update(parts[2:3] or (a.name for a in node.names))
        graph[path.stem] = deps
    return graph


def test_cores_import_no_shell() -> None:
    graph = imports()
    assert CORES | SHELLS | {"__init__"} == set(graph)
    assert {m: graph[m] & SHELLS for m in CORES if graph[m] & SHELLS} == {}
