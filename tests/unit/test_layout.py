"""The layers point one way, read from the code's own imports (every ``import``, deferred
and ``TYPE_CHECKING`` ones included: a cycle held apart by a late import is still one).

``queues`` (the job contract and its backends) imports nothing of ours but itself;
``servers`` (the system under test) uses ``queues``; ``scenarios`` (what load) uses the
metrics of ``servers``; ``harness`` starts and reads all of them and nothing imports it.
No two packages, at any depth, import each other in a loop, and neither do two modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("queues", "servers", "scenarios", "harness")
# Which top-level package may import which (itself always).
ALLOWED = {
    "queues": set(),
    "servers": {"queues"},
    "scenarios": {"servers"},
    "harness": {"queues", "servers"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str, modules: Iterable[str]) -> str:
    """The package a module lives in (a package's ``__init__`` belongs to the package)."""
    known = set(modules)
    if f"{module}.__init__" in known or any(m.startswith(f"{module}.") for m in known):
        return module
    return module.rpartition(".")[0] or module


def read_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` counts ``a.b`` when
    ``a.b`` is a module, else ``a``)."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    imports: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in files else base)
        imports[module] = {m for m in found if m.split(".")[0] in PACKAGES and m != module}
    return imports


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(imports: Mapping[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in imports.items():
        source = package_of(module, imports)
        for target in targets:
            dest = package_of(target, imports)
            if dest != source:
                graph.setdefault(source, set()).add(dest)
    return graph


IMPORTS = read_imports()


def test_the_reader_finds_every_module_and_its_imports() -> None:
    assert {"queues.base", "servers.web.app", "harness.cli", "scenarios.sender"} <= IMPORTS.keys()
    assert "queues.base" in IMPORTS["servers.worker"]


@pytest.mark.parametrize("package", PACKAGES)
def test_top_level_packages_import_only_the_layers_below(package: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package] | {package}
    )
    assert wrong == []


def test_no_module_cycle() -> None:
    assert cycles(IMPORTS) == []


def test_no_package_cycle() -> None:
    assert cycles(package_graph(IMPORTS)) == []


def test_the_checks_see_a_planted_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """Negative control: the same reader and checks on a tree that has both faults."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "queues" / "backend.py").write_text("from servers.app import create_app\n")
    (tmp_path / "servers" / "app.py").write_text("import queues.backend\n")
    (tmp_path / "harness" / "a").mkdir()
    (tmp_path / "harness" / "a" / "__init__.py").write_text("")
    (tmp_path / "harness" / "a" / "x.py").write_text("def f():\n    from harness.b import y\n")
    (tmp_path / "harness" / "b").mkdir()
    (tmp_path / "harness" / "b" / "__init__.py").write_text("")
    (tmp_path / "harness" / "b" / "y.py").write_text("from ..a import x\n")

    planted = read_imports(tmp_path)
    assert planted["queues.backend"] == {"servers.app"}
    assert ["harness.a.x", "harness.b.y"] in cycles(planted)
    assert ["queues.backend", "servers.app"] in cycles(planted)
    assert ["harness.a", "harness.b"] in cycles(package_graph(planted))
    assert ["queues", "servers"] in cycles(package_graph(planted))
