"""The package dependency rules of docs/architecture.md ("Packages"), read from the source with ast.

Every .py under the foldtron packages is parsed (nothing is imported). An import names the module
it loads: `from models import X` is `models` (models/__init__.py, which imports the rest of the
package) unless `models/X.py` exists; relative imports are resolved. "Module level" means the
statements run at import time: top-level ones and those inside top-level if/try blocks, `if
TYPE_CHECKING:` included (a cycle that only type hints close is still a cycle in the design).
Imports inside functions are "lazy".

Rules:
- no import cycles inside models/ or kernels/, at module level and also through lazy imports (a
  lazy import may defer an optional dependency, not hide a cycle);
- parallel_state and kernels import no other foldtron package;
- moe never imports models;
- nothing imports launch (entry points only);
- optim imports at most parallel_state and kernels.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("trainer", "parallel_state", "models", "moe", "optim", "kernels", "launch")
ACYCLIC = ("models", "kernels")
IMPORTS_NO_OTHER_PACKAGE = ("parallel_state", "kernels")
OPTIM_MAY_IMPORT = {"parallel_state", "kernels"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a module of the parsed packages)
    line: int
    lazy: bool  # inside a function or class body

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', lazy' if self.lazy else ''})"


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """module name -> file, for every .py under the packages (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is a parsed module (None: not foldtron)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str | None, node: ast.stmt, lazy: bool) -> None:
        if target is not None and target != module:
            found.append(Import(module, target, node.lineno, lazy))

    def visit(nodes: list[ast.stmt], lazy: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_resolve(alias.name, modules), node, lazy)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    add(submodule if submodule in modules else _resolve(origin, modules), node, lazy)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body, True)
            else:
                # if / try / with / for ... blocks: their statements run where the block does.
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [], lazy)
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body, lazy)

    visit(tree.body, False)
    return found


def import_graph(root: Path, packages=PACKAGES) -> list[Import]:
    modules = module_files(root, packages)
    return [imp for module, path in modules.items() for imp in _imports_of(module, path, modules)]


def package_of(module: str) -> str:
    return module.split(".")[0]


def cycles(imports: list[Import], package: str, include_lazy: bool) -> list[list[Import]]:
    """The import cycles among `package`'s modules: for each strongly connected component of more
    than one module, one shortest cycle through it, as its imports."""
    first: dict[tuple[str, str], Import] = {}  # one import per (source, target): the first line
    for imp in imports:
        if package_of(imp.source) == package == package_of(imp.target) and (include_lazy or not imp.lazy):
            key = (imp.source, imp.target)
            if key not in first or imp.line < first[key].line:
                first[key] = imp
    edges: dict[str, set[str]] = {}
    for source, target in first:
        edges.setdefault(source, set()).add(target)
        edges.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [[first[edge] for edge in _shortest_cycle(edges, component)] for component in components]


def _shortest_cycle(edges: dict[str, set[str]], component: set[str]) -> list[tuple[str, str]]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    path = [(v, start)]
                    while v != start:
                        path.append((parent[v], v))
                        v = parent[v]
                    return path[::-1]
                if w not in parent:
                    parent[w] = v
                    next_frontier.append(w)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start} in its component")


def _describe(found: list[list[Import]]) -> str:
    return "\n".join("cycle:\n  " + "\n  ".join(map(str, cycle)) for cycle in found)


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph(Path(REPO_ROOT))


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_module_level_import_cycles(graph, package):
    found = cycles(graph, package, include_lazy=False)
    assert not found, (f"import cycles inside {package}/ (break them by moving the shared helper into a "
                       f"module both import):\n{_describe(found)}")


@pytest.mark.parametrize("package", ACYCLIC)
def test_lazy_imports_do_not_hide_cycles(graph, package):
    found = cycles(graph, package, include_lazy=True)
    assert not found, (f"import cycles inside {package}/ closed by imports inside functions (a lazy "
                       f"import may defer an optional dependency, not hide a cycle):\n{_describe(found)}")


def _cross_package(graph: list[Import], source_package: str) -> list[Import]:
    return [imp for imp in graph if package_of(imp.source) == source_package
            and package_of(imp.target) != source_package]


@pytest.mark.parametrize("package", IMPORTS_NO_OTHER_PACKAGE)
def test_bottom_packages_import_no_other_foldtron_package(graph, package):
    bad = _cross_package(graph, package)
    assert not bad, f"{package} must import no other foldtron package:\n" + "\n".join(map(str, bad))


def test_moe_never_imports_models(graph):
    bad = [imp for imp in _cross_package(graph, "moe") if package_of(imp.target) == "models"]
    assert not bad, "moe must not import models (moe/context.py declares what models reads):\n" + "\n".join(
        map(str, bad))


def test_nothing_imports_launch(graph):
    bad = [imp for imp in graph if package_of(imp.target) == "launch"]
    assert not bad, "launch/ holds entry points; nothing imports them:\n" + "\n".join(map(str, bad))


def test_optim_imports_at_most_parallel_state_and_kernels(graph):
    bad = [imp for imp in _cross_package(graph, "optim") if package_of(imp.target) not in OPTIM_MAY_IMPORT]
    assert not bad, f"optim may import only {sorted(OPTIM_MAY_IMPORT)}:\n" + "\n".join(map(str, bad))


def test_the_graph_sees_the_packages(graph):
    """Guards the rules above against passing on an empty or misread graph."""
    sources = {package_of(imp.source) for imp in graph}
    assert {"trainer", "models", "kernels", "moe", "launch"} <= sources
    assert any(imp.source == "models.block" and imp.target == "models.mixers" for imp in graph)
    assert any(imp.source == "models.model" and imp.target == "models.init" and not imp.lazy for imp in graph)


def test_checker_finds_a_cycle_through_a_package_init_and_a_lazy_one(tmp_path):
    """A deliberately cyclic package: `from models import X` goes through models/__init__.py."""
    package = tmp_path / "models"
    package.mkdir()
    (package / "__init__.py").write_text("from models.a import A\n")
    (package / "a.py").write_text("from models.b import B\nA = 1\n")
    (package / "b.py").write_text("from models import A\nB = 2\n")
    (package / "c.py").write_text("def f():\n    from models.d import D\n    return D\n")
    (package / "d.py").write_text("from models.c import f\nD = 3\n")
    imports = import_graph(tmp_path, packages=("models",))
    module_level = cycles(imports, "models", include_lazy=False)
    assert [[str(imp) for imp in c] for c in module_level] == [[
        "models -> models.a (line 1)", "models.a -> models.b (line 1)", "models.b -> models (line 1)"]]
    with_lazy = cycles(imports, "models", include_lazy=True)
    assert sorted(sorted(imp.source for imp in c) for c in with_lazy) == [
        ["models", "models.a", "models.b"], ["models.c", "models.d"]]
    assert any(imp.lazy for c in with_lazy for imp in c)
