"""The layers import downwards only: model/ and balancing/ know nothing of the network or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "model": ("mesh.net", "mesh.cli", "mesh.api", "trio", "libp2p"),
    "balancing": ("mesh.net", "mesh.cli", "mesh.api", "mesh.model", "trio", "libp2p", "torch", "transformers"),
    "net": ("mesh.cli", "mesh.api"),
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_layers_import_downwards_only():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        for path in (ROOT / folder).glob("*.py"):
            for name in imports(path):
                if name.startswith(forbidden):
                    bad.append(f"{folder}/{path.name} imports {name}")
    assert not bad, bad
