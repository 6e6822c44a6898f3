"""The package's imports flow one way: data -> models -> distributed -> train -> serving ->
analysis -> cli, with dataclass_config and atomic_files above all of them, and no module cycle.

Every ``import dtn_torchrec.X`` / ``from dtn_torchrec.X import ...`` anywhere in a module counts
(function-level imports included), so a lazy import cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "dtn_torchrec"
# Lower index = further upstream; a module may import only its own layer or layers before it.
LAYERS = [
    "dataclass_config",
    "atomic_files",
    "data",
    "models",
    "distributed",
    "train",
    "serving",
    "analysis",
    "cli",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Set[str]:
    """The dtn_torchrec modules ``path`` imports (``from pkg import mod`` resolved to ``pkg.mod``)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dtn_torchrec"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("dtn_torchrec"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in files and m != name}
        for name, path in files.items()
    }


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_every_import_points_upstream() -> None:
    upward = [
        f"{src} -> {dst}"
        for src, dsts in _graph().items()
        for dst in dsts
        if _layer(src) >= 0 and _layer(dst) > _layer(src)
    ]
    assert upward == []


def test_layer_list_names_every_top_level_part() -> None:
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert tops - {"__init__"} == set(LAYERS)


def test_no_import_cycle() -> None:
    graph = _graph()
    # Package __init__ modules re-export their children; an edge child -> own package is the
    # usual `from .pkg import sibling` pattern, not a cycle of logic.
    edges = {src: {d for d in dsts if not src.startswith(d + ".")} for src, dsts in graph.items()}
    state: Dict[str, int] = {}
    cycle: List[str] = []

    def visit(node: str, path: List[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(edges):
        if state.get(module) is None and visit(module, []):
            break
    assert cycle == []
