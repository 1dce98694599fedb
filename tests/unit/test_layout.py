"""The product's shape: imports flow one way, `kubeshim -> proxy, dns -> cluster`; `proxy` and
`dns` never import each other; and no module imports another that (through its own imports at
load time) imports it back."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "kubeshim"
LAYERS = {"cluster": 0, "proxy": 1, "dns": 1, "kubeshim": 2}


def modules() -> dict[str, Path]:
    found = {}
    paths = [Path(d, f) for d, _, files in os.walk(PACKAGE, followlinks=True)  # the links too
             for f in files if f.endswith(".py")]
    for path in paths:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, load_time_only: bool) -> set[str]:
    """kubeshim modules `path` imports; with `load_time_only`, only those imported when it loads
    (not inside functions, not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if load_time_only:
        todo: list[ast.AST] = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo += node.orelse
            elif isinstance(node, ast.If | ast.Try | ast.With):
                todo += [n for field in ("body", "orelse", "finalbody", "handlers")
                         for n in getattr(node, field, [])]
            elif isinstance(node, ast.ExceptHandler):
                todo += node.body
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubeshim"):
            out.add(node.module or "")
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kubeshim"))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("cluster", "proxy", "dns") else "kubeshim"


def test_imports_flow_one_way() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        for dep in imports(path, load_time_only=False) & known.keys():
            a, b = layer(name), layer(dep)
            if a != b and (LAYERS[b] >= LAYERS[a]):
                wrong.append(f"{name} imports {dep}")
    assert wrong == []


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports(path, load_time_only=True) & known.keys()
             for name, path in known.items()}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    # A package's __init__ is imported by its own modules' parents, not a cycle of code.
    cycles = [m for m in graph if m in reach(m) and not PACKAGE.joinpath(
        *m.split(".")[1:], "__init__.py").exists()]
    assert cycles == []
