"""The layers import downwards only, no module imports itself back through others, and the tree is the
package: the repository root is `mesh`, each room (api/, cli/, net/, model/, balancing/) a subpackage, and
rooms import each other relatively, so a path-following reader and Python resolve every import alike.

model/ and balancing/ know nothing of the network or the CLI; net/ knows nothing of the CLI or of the
Python API built on it (api/). Every import counts, those inside functions too: a lazy import is still a
dependency, and a cycle hidden behind one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"mesh.api": "api", "mesh.cli": "cli", "mesh.net": "net", "mesh.model": "model",
         "mesh.balancing": "balancing", "mesh.web": "web"}
API = ("mesh.api", "mesh.web")
FORBIDDEN = {
    "model": ("mesh.net", "mesh.cli", *API, "trio", "libp2p"),
    "balancing": ("mesh.net", "mesh.cli", *API, "mesh.model", "trio", "libp2p", "torch", "transformers"),
    "net": ("mesh.cli", *API),
    "api": ("mesh.cli", "mesh.web"),
    "web": ("mesh.cli",),
}


def modules() -> dict[str, Path]:
    out = {"mesh": ROOT / "__init__.py"}
    for package, folder in ROOMS.items():
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def package_of(path: Path) -> str:
    if path == ROOT / "__init__.py":
        return "mesh"
    return next(pkg for pkg, folder in ROOMS.items() if path.parent == ROOT / folder)


def imports(path: Path) -> set[str]:
    """Absolute names of what `path` imports, relative imports resolved against its package."""
    out = set()
    package = package_of(path) if path.is_relative_to(ROOT) and path.parent != ROOT / "tests" else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from . import wire`
    return out


def test_layers_import_downwards_only():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        for path in (ROOT / folder).glob("*.py"):
            for name in imports(path):
                if name.startswith(forbidden):
                    bad.append(f"{folder}/{path.name} imports {name}")
    assert not bad, bad


def test_rooms_import_each_other_relatively():
    """`from mesh.x import` inside the package would name a path (mesh/x) the tree does not have."""
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "mesh":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mesh" for a in node.names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} import mesh…")
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
