"""llmkit's modules import each other without cycles, and no submodule imports its own package.

The graph is read from the source with `ast`, module by module: `import x`, `from x import y` (an
edge to x.y when that is a module, else to x), relative imports and imports inside functions (a
lazy import still ties two modules together). An edge to a package is an edge to its __init__.
"""
from __future__ import annotations

import ast
from pathlib import Path

import llmkit

ROOT = Path(llmkit.__file__).resolve().parent


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports_of(module: str) -> set[str]:
    """The llmkit modules `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted."""
    reach = {module: _reachable(module) for module in GRAPH}
    components = {tuple(sorted(m for m in reach[module] if module in reach[m])) for module in GRAPH}
    return sorted(list(c) for c in components if len(c) > 1)


def test_the_graph_sees_relative_lazy_and_submodule_imports():
    assert "llmkit.io.hf" in GRAPH["llmkit.io"]                       # from .hf import load_hf
    assert "llmkit.io.families.llama" in GRAPH["llmkit.io.families"]  # from . import bart, ..., llama
    assert "llmkit.config" in GRAPH["llmkit.io.families.llama"]       # from ...config import ModelConfig
    assert "llmkit.generation" in GRAPH["llmkit.cli"]                 # inside a function


def test_no_import_cycles():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) + ": " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(GRAPH[a] & set(c)))
        for c in found)


def test_no_submodule_imports_its_own_package():
    """A package's __init__ imports its submodules; a submodule importing the __init__ back is the
    start of a cycle (and works only while that __init__ has already run far enough)."""
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if m.startswith(t + "."))
    assert not bad, "submodules importing their own package's __init__:\n  " + "\n  ".join(bad)
