"""The package's layers: every import of entrypoint/ (function-level ones too) points down, and none closes a circle.

From the bottom: base (needs nothing of ours), cuda (the backends) and server (talking to vLLM), suspend (the
core), gate and cycle (what `vllm-gate` and `selftest` run), then the commands at the top (cuda_toggle_all.py,
selftest.py). A module may import its own package and the packages of lower layers, nothing above nor beside.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "entrypoint"
# The layer of each subpackage; "" is the package's top (the commands). Equal numbers are neighbours, which
# must not import each other either.
LAYERS = {"base": 0, "cuda": 1, "server": 1, "suspend": 2, "gate": 3, "cycle": 3, "": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every module of ours that `name` imports, wherever the import statement stands in it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from . import safety` imports a module, `from .x import y` a name of x
                if f"{source}.{alias.name}" in MODULES:
                    found.add(f"{source}.{alias.name}")
                elif source in MODULES:
                    found.add(source)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> tuple[str, int]:
    parts = name.split(".")
    package = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return package, LAYERS[package]


def test_every_module_has_a_layer():
    """A new subpackage gets its place in LAYERS (and in docs/how-it-works.md's module map)."""
    assert {layer_of(name)[0] for name in MODULES} <= LAYERS.keys()
    assert GRAPH["entrypoint.cuda_toggle_all"], "the parser found no import in cuda_toggle_all.py"


def test_imports_point_down_the_layers():
    """Each import of another subpackage goes to a lower layer (cuda never imports suspend, base nothing of ours)."""
    upward = []
    for name, imported in sorted(GRAPH.items()):
        package, layer = layer_of(name)
        for target in sorted(imported):
            target_package, target_layer = layer_of(target)
            if target_package != package and target_layer >= layer:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that do not point down a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    """No module imports itself through others, at module level or inside a function."""
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)
