"""The layers import downwards only, and no module imports itself back through others.

model/ and balancing/ know nothing of the network or the CLI; net/ knows nothing of the CLI or of the
Python API built on it (mesh/api.py, mesh/tuning.py, mesh/finetune.py). Every import counts, those inside
functions too: a lazy import is still a dependency, and a cycle hidden behind one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"mesh": "mesh", "mesh.cli": "cli", "mesh.net": "net", "mesh.model": "model",
         "mesh.balancing": "balancing"}
API = ("mesh.api", "mesh.tuning", "mesh.finetune")
FORBIDDEN = {
    "model": ("mesh.net", "mesh.cli", *API, "trio", "libp2p"),
    "balancing": ("mesh.net", "mesh.cli", *API, "mesh.model", "trio", "libp2p", "torch", "transformers"),
    "net": ("mesh.cli", *API),
}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in ROOMS.items():
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from mesh.net import wire`
    return out


def test_layers_import_downwards_only():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        for path in (ROOT / folder).glob("*.py"):
            for name in imports(path):
                if name.startswith(forbidden):
                    bad.append(f"{folder}/{path.name} imports {name}")
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    mods = modules()
    graph = {name: {i for i in imports(path) if i in mods and i != name and not name.startswith(i + ".")}
             for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
