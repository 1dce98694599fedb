"""The DNS package's shape: imports among its modules flow one way (no cycle), and the
sans-IO cores import no socket shell."""

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


def test_no_import_cycle_among_dns_modules() -> None:
    graph = imports()

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_cores_import_no_shell() -> None:
    graph = imports()
    assert CORES | SHELLS | {"__init__"} == set(graph)
    assert {m: graph[m] & SHELLS for m in CORES if graph[m] & SHELLS} == {}
